"""Settings of the vLLM plugin (canvaswatch.client.vllm): environment variables, or a TOML file.

    CANVASWATCH_VLLM_TARGET=127.0.0.1:50051 vllm serve google/diffusiongemma-26B-A4B-it ...

The plugin is enabled exactly when a target is set. Every key can come from the
file named by CANVASWATCH_VLLM_CONFIG (top-level keys, as in the table below) or
from CANVASWATCH_VLLM_<KEY> (upper case); the environment wins. Values are
checked at start-up and an error names the key and where it came from.

    key                 default   meaning
    target              (unset)   sidecar address host:port; unset = plugin off
    k                   8         tokens kept per position (the top-k bottleneck)
    top_p               (unset)   keep the smallest top-k prefix reaching p instead (0 < p <= 1)
    drop_policy         oldest    when a queue is full: "oldest" evicts, "newest" refuses the new step
    max_pending         64        steps queued per request stream before dropping
    step_queue          256       engine steps queued for the collector thread before dropping
    send_canvas         true      also send the sampled canvas (canvas_ids, 4 bytes a position)
    model               (vLLM's)  model name sent to the sidecar (default: the served model name)
    tenant              ""        tenant sent to the sidecar
    auth_token          (unset)   sent as "authorization: Bearer <token>"
    verdict_timeout_s   30        how long a finished request's stream waits for its verdict
    gate                off       "abort": a flag at or above gate_severity arriving mid-denoising ends
                                  the request (finish_reason "abort"; see canvaswatch.client.vllm_gate);
                                  "hold": a request's output reaches its caller only after its verdict
                                  (canvaswatch.client.vllm_hold); "off": monitor only
    gate_severity       CRITICAL  (abort) the least severe flag that ends a request: INFO, WARNING, CRITICAL
    gate_fail           open      (abort) when the request's stream to the sidecar fails (sidecar down):
                                  "open" serves it unjudged (counted, logged), "closed" ends it too
    gate_block_at       CRITICAL  (hold) a verdict with a flag at or above this withholds the output
    gate_budget_s       2         (hold) the longest a finished request's output waits for its verdict (0 < s <= 30)
    gate_on_timeout     open      (hold) no verdict in the budget: "open" releases (counted, logged),
                                  "closed" withholds

No dependency beyond the standard library: it is read in every vLLM process.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "CANVASWATCH_VLLM_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
GATE_MODES = ("off", "abort", "hold")
ABORT_KEYS = ("gate_severity", "gate_fail")
HOLD_KEYS = ("gate_block_at", "gate_budget_s", "gate_on_timeout")
MAX_BUDGET_S = 30.0  # the sidecar waits at most 30 s in one GetVerdict call (server/transport/verdicts.py)
SEVERITIES = ("INFO", "WARNING", "CRITICAL")


class PluginConfigError(ValueError):
    """A setting that cannot be used; the message names the key and its source."""


@dataclass(frozen=True)
class PluginConfig:
    target: str = ""
    k: int = 8
    top_p: float | None = None
    drop_policy: str = "oldest"
    max_pending: int = 64
    step_queue: int = 256
    send_canvas: bool = True
    model: str = ""
    tenant: str = ""
    auth_token: str = field(default="", repr=False)
    verdict_timeout_s: float = 30.0
    gate: str = "off"
    gate_fail: str = "open"
    gate_severity: str = "CRITICAL"
    gate_block_at: str = "CRITICAL"
    gate_budget_s: float = 2.0
    gate_on_timeout: str = "open"

    @property
    def enabled(self) -> bool:
        return bool(self.target)

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.auth_token}")] if self.auth_token else []


_KEYS = {name: spec.type for name, spec in PluginConfig.__dataclass_fields__.items()}
NOT_SETTINGS = {ENV_PREFIX + "VENV"}  # .ci/vllm_venv.sh's cache location, not a plugin setting
log = logging.getLogger("canvaswatch.vllm")


def load_config(environ: Mapping[str, str] | None = None) -> PluginConfig:
    """The plugin's settings from the file named by CANVASWATCH_VLLM_CONFIG, then the environment."""
    environ = os.environ if environ is None else environ
    raw: dict[str, tuple[Any, str]] = {}
    path = environ.get(CONFIG_ENV, "").strip()
    if path:
        try:
            table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise PluginConfigError(f"{CONFIG_ENV}={path}: cannot read it: {err}") from err
        for key, value in table.items():
            if key not in _KEYS:
                raise PluginConfigError(f"{path}: unknown key {key!r}; known: {', '.join(sorted(_KEYS))}")
            raw[key] = (value, f"{path}: {key}")
    for key in _KEYS:
        name = ENV_PREFIX + key.upper()
        if name in environ:
            raw[key] = (environ[name], name)
    _warn_unknown(environ)
    return _validated({key: _parse(key, value, source) for key, (value, source) in raw.items()},
                      {key: source for key, (_, source) in raw.items()})


def _warn_unknown(environ: Mapping[str, str]) -> list[str]:
    """Warn about CANVASWATCH_VLLM_* names that are no setting (a misspelt one is otherwise silently
    ignored, its default used), as vLLM warns about unknown VLLM_* names; returns them."""
    known = {ENV_PREFIX + key.upper() for key in _KEYS} | {CONFIG_ENV} | NOT_SETTINGS
    unknown = sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        log.warning("canvaswatch plugin: %s is no setting and is ignored%s", name,
                    f" (did you mean {close[0]}?)" if close else "")
    return unknown


def _parse(key: str, value: Any, source: str) -> Any:
    kind = _KEYS[key]
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind in ("float", "float | None"):
            if isinstance(value, str) and value.strip() == "" and kind == "float | None":
                return None
            return float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return str(value).strip()
    except (TypeError, ValueError):
        raise PluginConfigError(f"{source}: expected {kind.replace(' | None', '')}, got {value!r}") from None


def _validated(values: dict[str, Any], sources: dict[str, str]) -> PluginConfig:
    def fail(key: str, message: str) -> PluginConfigError:
        return PluginConfigError(f"{sources.get(key, key)}: {message}")

    config = PluginConfig(**values)
    if config.k < 1:
        raise fail("k", f"must be >= 1, got {config.k}")
    if config.top_p is not None and not (math.isfinite(config.top_p) and 0.0 < config.top_p <= 1.0):
        raise fail("top_p", f"must be in (0, 1], got {config.top_p}")
    if config.drop_policy not in ("oldest", "newest"):
        raise fail("drop_policy", f"must be 'oldest' or 'newest', got {config.drop_policy!r}")
    for key in ("max_pending", "step_queue"):
        if getattr(config, key) < 1:
            raise fail(key, f"must be >= 1, got {getattr(config, key)}")
    if not (math.isfinite(config.verdict_timeout_s) and config.verdict_timeout_s > 0):
        raise fail("verdict_timeout_s", f"must be a finite number of seconds > 0, got {config.verdict_timeout_s}")
    if config.target and (":" not in config.target or config.target.startswith(":")):
        raise fail("target", f"must be host:port, got {config.target!r}")
    if config.gate not in GATE_MODES:
        raise fail("gate", f"must be one of {', '.join(GATE_MODES)}, got {config.gate!r}")
    # A key of the other gate mode is a mistake worth stopping for: the operator believes it does something.
    # (With gate = "off" they are ignored, so a gate can be switched off without editing the file.)
    for key in ABORT_KEYS + HOLD_KEYS:
        mode = "abort" if key in ABORT_KEYS else "hold"
        if key in sources and config.gate not in ("off", mode):
            raise fail(key, f"only used with gate = '{mode}', but gate is {config.gate!r}")
    if config.gate_fail not in ("open", "closed"):
        raise fail("gate_fail", f"must be 'open' or 'closed', got {config.gate_fail!r}")
    for key in ("gate_severity", "gate_block_at"):
        if getattr(config, key).upper() not in SEVERITIES:
            raise fail(key, f"must be one of {', '.join(SEVERITIES)}, got {getattr(config, key)!r}")
    if not (math.isfinite(config.gate_budget_s) and 0 < config.gate_budget_s <= MAX_BUDGET_S):
        raise fail("gate_budget_s", f"must be seconds in (0, {MAX_BUDGET_S:g}], got {config.gate_budget_s}")
    if config.gate == "hold" and config.gate_budget_s > config.verdict_timeout_s:
        # the worker closes a finished request's stream after verdict_timeout_s: a longer hold waits for nothing
        raise fail("gate_budget_s", f"must not exceed verdict_timeout_s ({config.verdict_timeout_s:g}), "
                                    f"got {config.gate_budget_s}")
    if config.gate_on_timeout not in ("open", "closed"):
        raise fail("gate_on_timeout", f"must be 'open' or 'closed', got {config.gate_on_timeout!r}")
    return replace(config, gate_severity=config.gate_severity.upper(), gate_block_at=config.gate_block_at.upper())
