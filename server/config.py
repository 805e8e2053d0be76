"""One TOML file configures the sidecar; it is validated at start-up and errors name the key.

    [server]
    grpc_port = 50051
    metrics_port = 9464            # 0 = any free port, -1 = no metrics endpoint
    host = "127.0.0.1"
    metrics_host = ""              # the metrics endpoint's address; "" = the same as host
    max_message_bytes = 150994944  # 144 MiB: one 256 x 262,144 float16 logits step fits
    max_streams = 256
    max_streams_per_peer = 0       # > 0: streams one client address may hold open (0 = only max_streams)
    max_streams_per_token = 0      # > 0, with auth_tokens: streams one bearer token may hold open
    first_message_timeout_s = 30.0 # a stream that sends nothing this long ends with DEADLINE_EXCEEDED
    idle_timeout_s = 120.0         # ... and one silent this long between two messages
    keepalive_time_s = 60.0        # the server pings a connection quiet this long ...
    keepalive_timeout_s = 20.0     # ... and drops it if the ping is not answered within this
    min_ping_interval_s = 10.0     # client pings more often than this end the connection (too_many_pings)
    max_prompt_ids = 32768         # info.prompt_ids longer than this are refused (INVALID_ARGUMENT)
    max_flags_per_monitor = 100    # flags one monitor may put in one verdict; the rest are counted and summarised
    max_verdict_bytes = 1048576    # a verdict stays under this (and under max_message_bytes) however many flags
    stream_flags_past_bounds = false # true: every flag is an event; false: past the two bounds above only a
                                   # flag more severe than its monitor's streamed ones is (events stay bounded)
    drain_grace_s = 10.0           # SIGTERM: open streams get this long to finish; new ones are refused
    monitor_policy = "fail_open"   # or "fail_closed": a failed monitor makes the verdict CRITICAL
    monitor_budget_ms = 50.0       # per monitor per step (wall time); every overrun is counted ...
    monitor_budget_strikes = 3     # ... this many on_step overruns in a row stop the monitor for the request (0: never)
    monitor_budget_hard_ms = 10000.0 # ... and one start/on_step call longer than this stops it at once (0: never)
    monitor_hard_deadline_s = 30.0 # a step still running after this (a runaway monitor) ends its stream; a worker is killed
    auth_tokens = []               # if set, calls need "authorization: Bearer <token>"
    tls_cert = ""                  # PEM certificate chain: the gRPC port serves TLS (with tls_key)
    tls_key = ""                   # PEM private key of tls_cert
    tls_client_ca = ""             # PEM CA bundle: clients must present a certificate it signed (mutual TLS)
    workers = 2                    # dense steps decoded at once (memory), and threads for reloads
    monitor_processes = 0          # > 0: decode and monitor in N worker processes (several cores)
    large_canvas_nice = 19         # in-process: a stream of >= 8,192 positions runs its steps this much nicer (0: off)

    [vocab]
    tokenizer = "gemma3-270m"      # or a transformers tokenizer directory

    [dense]                        # the `embeddings` and `logits` forms
    embeddings = "gemma3-270m"     # tied embedding matrix: "", a .gguf file or a checkpoint dir
    tensor = ""                    # its name, if not a usual *embed_tokens.weight
    device = "cpu"                 # or "cuda", "cuda:1"
    dtype = "float32"              # or "bfloat16", "float16"
    k = 8                          # tokens kept per position
    top_p = 0.0                    # > 0: the smallest set reaching p, at most k tokens
    logit_scale = 1.0              # logits = softcap(logit_scale * H Eᵀ)
    softcap = 0.0                  # > 0: c * tanh(x / c), Gemma-style final soft-capping
    backend = "auto"               # "torch" (chunked), "triton" (fused, CUDA), "screened" (int8 screen, CPU) or "auto"
    batch_window_ms = 0.0          # > 0: concurrent streams' steps share one launch (GPU)

    [logging]
    level = "info"
    log_content = false            # decoded text in logs, events and the audit log
    audit_log = ""                 # JSON lines of every flag; empty = off
    audit_max_bytes = 104857600    # the audit log rotates at this size (0: never) ...
    audit_backups = 5              # ... keeping this many old files (audit.jsonl.1 is the newest)
    report_dir = ""                # an HTML timeline per flagged request, linked from the audit log
    report_max_files = 1000        # reports kept in report_dir, the oldest removed first (0: no limit)

    [monitors.lexicon]             # enabled by being present; `enabled = false` turns one off
    patterns = ["..."]

With no file, every built-in monitor that needs no external file runs with its
defaults (see DEFAULT_MONITORS).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from canvaswatch.monitors import registry
from canvaswatch.monitors.base import MonitorProtocol
from canvaswatch.server.bottleneck.embedding import DEFAULT_EMBEDDINGS
from canvaswatch.server.bottleneck.vocab import DEFAULT_TOKENIZER

# Built-ins that work with no external file; new ones join as they land.
DEFAULT_MONITORS: tuple[str, ...] = (
    "lexicon", "self_correction", "non_chronological", "token_smearing", "sequence_smearing",
    "intermediate_context", "transparency",
)


MAX_GRPC_MESSAGE_BYTES = 2**31 - 1


class ConfigError(ValueError):
    """Invalid configuration; the message starts with the offending key."""


@dataclass(frozen=True)
class ServerSection:
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    metrics_port: int = 9464
    metrics_host: str = ""  # "" = host; e.g. "0.0.0.0" for a scraper while gRPC stays on the loopback
    max_message_bytes: int = 144 * 1024 * 1024
    max_streams: int = 256
    # Starvation (docs/operations.md): stream deadlines bound how long a silent stream holds its slot;
    # the per-peer and per-token limits bound how many slots one client can hold. A sidecar serves one
    # inference server in the usual deployment, so the per-peer limit is off unless asked for.
    max_streams_per_peer: int = 0
    max_streams_per_token: int = 0
    first_message_timeout_s: float = 30.0
    idle_timeout_s: float = 120.0
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    min_ping_interval_s: float = 10.0
    # Bounds per request (docs/operations.md): memory and output stay bounded whatever a client sends
    # or a monitor raises.
    max_prompt_ids: int = 32768
    max_flags_per_monitor: int = 100
    max_verdict_bytes: int = 1024 * 1024
    # Events are bounded like the verdict (wire contract v1.3, server/pipeline/session.py): past the two
    # bounds above a flag is streamed only if it raises its monitor's highest streamed severity.
    stream_flags_past_bounds: bool = False
    # SIGTERM / SIGINT (docs/operations.md): streams already open get this long to finish before they are
    # cut with UNAVAILABLE; a pod's terminationGracePeriodSeconds should exceed it.
    drain_grace_s: float = 10.0
    monitor_policy: str = "fail_open"
    monitor_budget_ms: float = 50.0
    # The budget's strike policy (docs/operations.md): under load a step occasionally takes 0.1-0.4 s for
    # reasons not the monitor's (CPU contention, GC, GIL waits), and a kernel compiled on first use took
    # 5 s once on a loaded 2-core machine; so one overrun alone never stops a monitor unless it is past
    # the hard limit, which is set above such one-offs.
    monitor_budget_strikes: int = 3
    monitor_budget_hard_ms: float = 10000.0
    monitor_hard_deadline_s: float = 30.0
    auth_tokens: list[str] = field(default_factory=list)
    # TLS for the gRPC port (docs/operations.md); tls_client_ca makes it mutual. Bearer tokens work on top.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    workers: int = 2
    # 0: decode and monitor on the gRPC process's event loop. N > 0: N worker processes do it and the
    # gRPC process relays bytes (server/workers/pool.py); for more streams than one core can monitor.
    monitor_processes: int = 0
    # In-process (docs/operations.md): the step thread of a stream whose canvas has LARGE_CANVAS positions
    # or more (monitors/compiled.py; ordinary canvases are 256-2,048) lowers its OS priority by this much,
    # so ordinary streams' threads and the event loop go first on a busy machine. 0: off.
    large_canvas_nice: int = 19

    def __post_init__(self) -> None:
        if not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc_port: must be a port number in [0, 65535], got {self.grpc_port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port: must be a port number in [0, 65535] or -1 (off), got {self.metrics_port}")
        if self.monitor_policy not in ("fail_open", "fail_closed"):
            raise ValueError(f"monitor_policy: expected 'fail_open' or 'fail_closed', got {self.monitor_policy!r}")
        for key in ("max_message_bytes", "max_streams", "workers"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_message_bytes > MAX_GRPC_MESSAGE_BYTES:  # gRPC's channel arguments are C ints
            raise ValueError(f"max_message_bytes: must be at most {MAX_GRPC_MESSAGE_BYTES} (2 GiB - 1, gRPC's limit), "
                             f"got {self.max_message_bytes}")
        if not 0 <= self.monitor_processes <= 256:
            raise ValueError(f"monitor_processes: must be in [0, 256] (0: monitors in the gRPC process), got {self.monitor_processes}")
        if not 0 < self.monitor_budget_ms <= 3_600_000:  # NaN fails this too (it turned the budgets off)
            raise ValueError(f"monitor_budget_ms: must be in (0, 3600000], got {self.monitor_budget_ms}")
        if not 0 <= self.monitor_budget_strikes <= 1000:
            raise ValueError(f"monitor_budget_strikes: must be in [0, 1000] (0: overruns never stop a monitor), "
                             f"got {self.monitor_budget_strikes}")
        if not (self.monitor_budget_hard_ms == 0 or self.monitor_budget_ms <= self.monitor_budget_hard_ms <= 3_600_000):
            raise ValueError(f"monitor_budget_hard_ms: must be 0 (off) or in [monitor_budget_ms = {self.monitor_budget_ms:g}, "
                             f"3600000], got {self.monitor_budget_hard_ms}")
        if not (0 < self.monitor_hard_deadline_s <= 3600 and self.monitor_hard_deadline_s * 1000 > self.monitor_budget_hard_ms):
            raise ValueError(f"monitor_hard_deadline_s: must be in (0, 3600] seconds and longer than monitor_budget_hard_ms "
                             f"= {self.monitor_budget_hard_ms:g} ms, got {self.monitor_hard_deadline_s}")
        for key in ("max_streams_per_peer", "max_streams_per_token"):
            if not 0 <= getattr(self, key) <= self.max_streams:
                raise ValueError(f"{key}: must be in [0, max_streams = {self.max_streams}] (0: no limit of its own), "
                                 f"got {getattr(self, key)}")
        if self.max_streams_per_token and not self.auth_tokens:
            raise ValueError("max_streams_per_token: needs auth_tokens (a token is what identifies a client)")
        for key in ("first_message_timeout_s", "idle_timeout_s", "keepalive_time_s", "keepalive_timeout_s",
                    "min_ping_interval_s"):
            value = getattr(self, key)
            # NaN fails this too; gRPC takes milliseconds, so a value under 1 ms would become 0 (no limit)
            if not 0.001 <= value <= 86400:
                raise ValueError(f"{key}: must be in [0.001, 86400] seconds, got {value}")
        for token in self.auth_tokens:
            if not isinstance(token, str) or not token.strip():
                raise ValueError("auth_tokens: every token must be a non-blank string (a blank one would let in "
                                 "a client sending a bare 'Bearer ')")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert: tls_cert and tls_key go together (the certificate and its private key)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca: mutual TLS needs the server's own tls_cert and tls_key")
        for key in ("tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, key)
            if value and not Path(value).is_file():
                raise ValueError(f"{key}: no such file {value!r}")
        if not 0 <= self.drain_grace_s <= 3600:
            raise ValueError(f"drain_grace_s: must be in [0, 3600] seconds, got {self.drain_grace_s}")
        if not 0 <= self.max_prompt_ids <= 16 * 1024 * 1024:
            raise ValueError(f"max_prompt_ids: must be in [0, 16777216], got {self.max_prompt_ids}")
        if not 0 <= self.large_canvas_nice <= 19:
            raise ValueError(f"large_canvas_nice: must be in [0, 19] (0: off), got {self.large_canvas_nice}")
        if not 1 <= self.max_flags_per_monitor <= 100_000:
            raise ValueError(f"max_flags_per_monitor: must be in [1, 100000], got {self.max_flags_per_monitor}")
        # A verdict leaves room under the message limit for the event around it and the summary flag.
        if not 4096 <= self.max_verdict_bytes <= self.max_message_bytes - 65536:
            raise ValueError(f"max_verdict_bytes: must be in [4096, max_message_bytes - 65536 = "
                             f"{self.max_message_bytes - 65536}], got {self.max_verdict_bytes}")


@dataclass(frozen=True)
class VocabSection:
    tokenizer: str = DEFAULT_TOKENIZER


@dataclass(frozen=True)
class DenseSection:
    embeddings: str = DEFAULT_EMBEDDINGS
    tensor: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    k: int = 8
    top_p: float = 0.0
    logit_scale: float = 1.0
    softcap: float = 0.0
    backend: str = "auto"
    chunk: int = 32768
    batch_window_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.backend not in ("auto", "torch", "triton", "screened"):
            raise ValueError(f"backend: expected auto, torch, triton or screened, got {self.backend!r}")
        if self.backend == "screened" and self.device != "cpu":
            raise ValueError(f"backend: 'screened' is the CPU path; it needs device = \"cpu\", got {self.device!r}")
        if not 1 <= self.k <= 1024:
            raise ValueError(f"k: must be in [1, 1024], got {self.k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in [0, 1] (0 = off), got {self.top_p}")
        if not 0.0 <= self.batch_window_ms <= 100.0:
            raise ValueError(f"batch_window_ms: must be in [0, 100], got {self.batch_window_ms}")
        if not 0 <= self.softcap < float("inf"):  # NaN fails this too
            raise ValueError(f"softcap: must be a finite number >= 0 (0 = off), got {self.softcap}")
        if not 0 < self.logit_scale < float("inf"):
            raise ValueError(f"logit_scale: must be a finite number > 0, got {self.logit_scale}")
        if self.chunk < 1:
            raise ValueError(f"chunk: must be >= 1, got {self.chunk}")


@dataclass(frozen=True)
class LoggingSection:
    level: str = "info"
    log_content: bool = False
    audit_log: str = ""
    audit_max_bytes: int = 100 * 1024 * 1024
    audit_backups: int = 5
    report_dir: str = ""
    report_max_files: int = 1000

    def __post_init__(self) -> None:
        if self.level.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"level: expected debug, info, warning or error, got {self.level!r}")
        if self.audit_max_bytes != 0 and self.audit_max_bytes < 1024 * 1024:
            raise ValueError(f"audit_max_bytes: must be 0 (never rotate) or >= 1048576, got {self.audit_max_bytes}")
        if not 1 <= self.audit_backups <= 1000:
            raise ValueError(f"audit_backups: must be in [1, 1000], got {self.audit_backups}")
        if not 0 <= self.report_max_files <= 1_000_000:
            raise ValueError(f"report_max_files: must be in [0, 1000000] (0: no limit), got {self.report_max_files}")


@dataclass(frozen=True)
class MonitorSpec:
    name: str
    table: Mapping[str, Any]


@dataclass(frozen=True)
class Config:
    server: ServerSection = field(default_factory=ServerSection)
    vocab: VocabSection = field(default_factory=VocabSection)
    dense: DenseSection = field(default_factory=DenseSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    monitors: tuple[MonitorSpec, ...] = tuple(MonitorSpec(name, {}) for name in DEFAULT_MONITORS)

    def check_monitors(self) -> None:
        """Check every enabled monitor's name and parameters, building none; raises ConfigError naming the key."""
        for spec in self.monitors:
            try:
                registry.validate(spec.name, spec.table, f"monitors.{spec.name}")
            except registry.MonitorConfigError as err:
                raise ConfigError(str(err)) from None

    def build_monitors(self) -> list[MonitorProtocol]:
        """Instantiate the enabled monitors, as an engine does once; raises ConfigError naming the key.

        Constructors may load models or start threads: whoever builds monitors closes them.
        What only a constructor can find wrong (an unreadable model, a probe file missing
        a label's tensors) is reported here, with the key, when the engine is built.
        """
        built = []
        for spec in self.monitors:
            try:
                built.append(registry.build(spec.name, spec.table, f"monitors.{spec.name}"))
            except registry.MonitorConfigError as err:
                for monitor in built:
                    close = getattr(monitor, "close", None)
                    if callable(close):
                        close()
                raise ConfigError(str(err)) from None
        return built

    def with_server(self, **overrides: Any) -> "Config":
        """This config with [server] keys replaced (command-line flags), validated like the file's."""
        try:
            server = dataclasses.replace(self.server, **overrides)
        except ValueError as err:
            raise ConfigError(f"server.{err}") from None
        return dataclasses.replace(self, server=server)


_SECTIONS = {"server": ServerSection, "vocab": VocabSection, "dense": DenseSection, "logging": LoggingSection}


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return default_config()
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {str(path)!r}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return parse_config(raw)


def default_config() -> Config:
    config = Config()
    config.check_monitors()  # the defaults must always validate
    return config


def parse_config(raw: Mapping[str, Any]) -> Config:
    unknown = set(raw) - set(_SECTIONS) - {"monitors"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section; expected server, vocab, dense, logging, monitors")
    sections = {name: _parse_section(cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()}
    monitors_table = raw.get("monitors", None)
    if monitors_table is None:
        specs = tuple(MonitorSpec(name, {}) for name in DEFAULT_MONITORS)
    else:
        if not isinstance(monitors_table, dict):
            raise ConfigError("monitors: expected tables [monitors.<name>]")
        specs = []
        for name, table in monitors_table.items():
            if not isinstance(table, dict):
                raise ConfigError(f"monitors.{name}: expected a table [monitors.{name}]")
            enabled = table.get("enabled", True)
            if not isinstance(enabled, bool):
                raise ConfigError(f"monitors.{name}.enabled: expected bool, got {type(enabled).__name__}")
            if enabled:
                specs.append(MonitorSpec(name, dict(table)))
        specs = tuple(specs)
    config = Config(monitors=specs, **sections)
    config.check_monitors()
    return config


def _parse_section(cls: type, table: Any, key: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table [{key}]")
    try:
        return registry.parse_params(cls, table, key)
    except registry.MonitorConfigError as err:
        raise ConfigError(str(err)) from None


__all__ = ["Config", "ConfigError", "DEFAULT_MONITORS", "load_config", "parse_config", "default_config"]
