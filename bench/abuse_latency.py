"""A normal client's latency while other clients abuse the sidecar (issue 14 item 1): p50/p99 idle and under each abuse.

    python bench/abuse_latency.py [--requests 60] [--length 256] [--steps 16] [--rows silent,huge_step,...]

Everything runs on 127.0.0.1: one sidecar subprocess per mode (in-process, or --monitor-processes N;
and worker mode with two monitor processes for the runaway row), with the test monitors of tests/server/slow_monitors.py
installed through an entry point (each acts only on request ids with its prefix, so the normal
client is monitored by the default set as usual). The normal client sends `--requests` short
top-k requests (L = --length, --steps steps each, the calibrated default profile of
bench/traffic.py) one after another and times each from its first message to its verdict (or to
its error: a request that waited out its 60 s deadline counts with its 60 s); first
idle, then while each abuser runs in background threads. Every abuse is bounded in count and
time (it stops when the normal client is done, and each row is capped at --row-timeout s).

Abuse rows (the issue's table, those in scope here):
  silent       200 streams that send nothing (slots, first-message deadline)
  huge_step    2 clients sending one large valid top-k step (L = 65,536, k = 8) after another
  slow_monitor 4 clients whose requests hit a monitor that sleeps 2 s a step (stopped by the strikes)
  prompt_ids   4 clients sending requests with 32,768 prompt ids (the bound)
  flag_storm   2 clients whose requests raise 50 flags a step (verdict and audit bounds)
  cpu_hog      (a control, not an abuse of the sidecar) one process spinning pure Python: one core taken
               from the machine, no request sent; what sharing the cores alone costs the normal client
  runaway      (worker mode) 1 client whose request sends a monitor into an infinite loop; the worker
               is killed at server.monitor_hard_deadline_s (5 s here) and replaced
`--server KEY=VALUE` adds a [server] key to this sidecar's config and `--compare-server KEY=VALUE`
measures a second one with its own (e.g. `--compare-server max_streams_per_peer=8`).
Each abuser thread has a connection of its own. The sidecar knows a client by its address, so on
127.0.0.1 the normal client and the abusers are one client to its per-client limits unless `--tokens`
gives each side a bearer token of its own (the abuser's threads share one: one bad actor, several
streams).
`--compare-python PY` measures a second sidecar (e.g. the commit before, from its worktree) in the
same run, without the keys it does not know; `--switch-ms` / `--compare-switch-ms` start either
sidecar with that sys.setswitchinterval (how long a thread running Python keeps the GIL when
another wants it; Python's default is 5 ms). With a second sidecar, both run at once (the idle one
costs nothing) and take turns row by row (A B, then B A, ...), so the machine's drift falls on
both; `--repeats N` goes round the rows N times.
Target: the normal client's p99 within 2x its idle p99 in the same mode, the idle p99 measured in
the same run (and, with --repeats, in the same round). Each ratio comes with a 90% bootstrap interval
(both samples redrawn; the idle row's own interval shows the spread of idle against itself): with 150
requests a p99 is the second-worst request, so a row reads as over 2x only where its interval is.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from canvaswatch.client.stream import channel_options
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import free_port, wait_ready  # noqa: E402
from traffic import profile_steps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("silent", "huge_step", "slow_monitor", "prompt_ids", "flag_storm", "cpu_hog", "runaway")
PLUGINS = {"sleepy": "Sleepy", "runaway": "Runaway", "storm": "Storm"}


def start_sidecar(workdir: Path, monitor_processes: int, python: str = sys.executable,
                  new_keys: bool = True, switch_ms: float | None = None, name: str = "this",
                  server_keys: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    plugins = workdir / "plugins"
    if not plugins.exists():
        dist = plugins / "cw_abuse_monitors-1.0.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cw-abuse-monitors\nVersion: 1.0\n")
        (dist / "entry_points.txt").write_text("[canvaswatch.monitors]\n" + "".join(
            f"{name} = tests.server.slow_monitors:{cls}\n" for name, cls in PLUGINS.items()))
    config = workdir / f"sidecar-{monitor_processes}-{name}.toml"
    monitors = "".join(f"[monitors.{name}]\n" for name in
                       ("lexicon", "self_correction", "non_chronological", "token_smearing", "sequence_smearing",
                        "intermediate_context", "transparency"))
    config.write_text(
        "[server]\nmax_message_bytes = 150994944\n"
        + ("monitor_budget_hard_ms = 2000.0\nmonitor_hard_deadline_s = 5.0\n" if new_keys else "")
        + "".join(f"{line}\n" for line in server_keys)
        + (f"auth_tokens = {list(TOKENS.values())!r}\n".replace("'", '"') if METADATA["normal"] else "") +
        "[dense]\nembeddings = \"\"\n"
        f"[logging]\naudit_log = \"{workdir}/audit-{monitor_processes}-{name}.jsonl\"\n"
        f"{monitors}[monitors.sleepy]\nrequest_prefix = \"slow\"\nseconds = 2.0\n"
        "[monitors.runaway]\nrequest_prefix = \"loop\"\n[monitors.storm]\nrequest_prefix = \"storm\"\nper_step = 50\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugins), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = ["-m", "canvaswatch.server.cli"]
    if switch_ms is not None:
        command = ["-c", f"import runpy, sys; sys.setswitchinterval({switch_ms / 1000!r}); "
                         "runpy.run_module('canvaswatch.server.cli', run_name='__main__', alter_sys=True)"]
    log_path = workdir / f"sidecar-{monitor_processes}-{name}.log"
    process = subprocess.Popen([python, *command, "serve", "--config", str(config),
                                "--grpc-port", str(port), "--metrics-port", "-1",
                                "--monitor-processes", str(monitor_processes)],
                               env=env, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))
    target = f"127.0.0.1:{port}"
    try:
        wait_ready(target, timeout=300)
    except grpc.FutureTimeoutError:
        process.kill()
        raise SystemExit(f"the sidecar did not start:\n{log_path.read_text()[-2000:]}")
    return process, target


TOKENS = {"normal": "normal-client-token", "abuser": "abuser-client-token"}
METADATA: dict[str, tuple] = {"normal": (), "abuser": ()}  # with --tokens: each side's bearer token


def use_tokens() -> None:
    for who, token in TOKENS.items():
        METADATA[who] = (("authorization", f"Bearer {token}"),)


@functools.lru_cache(maxsize=8)
def _prompt(prompt_ids: int) -> pb.RequestInfo:
    # built once: an abuser spends its CPU on requests, not on rebuilding 32,768 ids each time
    return pb.RequestInfo(prompt_ids=range(prompt_ids))


def request(stub, steps: list[pb.StepState], request_id: str, length: int, prompt_ids: int = 0,
            timeout: float = 120.0, metadata: tuple = ()) -> pb.Verdict:
    def messages():
        for i, step in enumerate(steps):
            if i == 0:
                first = pb.StepState()
                first.CopyFrom(step)
                first.info.CopyFrom(_prompt(prompt_ids))
                first.info.request_id, first.info.model, first.info.canvas_length = request_id, "abuse-bench", length
                yield first
            else:
                yield step
        yield pb.StepState(final=True, output_ids=[1000])

    events = list(stub.Watch(messages(), metadata=metadata, timeout=timeout))
    return events[-1].verdict


class AbuserProcess:
    """One kind of abuse in its own process (so the abusers' client-side work does not share the normal
    client's GIL); SIGTERM ends it, and it reports how many of its requests got a verdict."""

    def __init__(self, kind: str, target: str, length: int, nice: int = 0) -> None:
        self.process = subprocess.Popen([sys.executable, __file__, "--abuse", kind, "--target", target,
                                         "--length", str(length), *(["--tokens"] if METADATA["abuser"] else [])],
                                        stdout=subprocess.PIPE, text=True,
                                        preexec_fn=(lambda: os.nice(nice)) if nice else None)
        self.done = self.failed = 0

    def finish(self) -> None:
        self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=120)
            self.done, self.failed = (int(x) for x in out.split()[-2:])
        except (subprocess.TimeoutExpired, ValueError):
            self.process.kill()
            self.done, self.failed = -1, -1


def abuse_main(kind: str, target: str, length: int) -> None:
    from canvaswatch.server.bottleneck.vocab import load_vocabulary

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    abuser = Abuser(kind, target, load_vocabulary(), length)
    abuser.start()
    print("started", flush=True)
    # With a timeout: a SIGTERM the OS hands to one of gRPC's threads does not interrupt the main
    # thread's untimed wait, so its handler would only run once something else woke that thread.
    while not stop.wait(0.2):
        pass
    abuser.finish()
    print(abuser.done, abuser.failed, flush=True)


class Abuser:
    """Background threads doing one kind of abuse until stopped; counts what they got back."""

    def __init__(self, kind: str, target: str, vocab, length: int) -> None:
        self.kind, self.target, self.vocab, self.length = kind, target, vocab, length
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.done = self.failed = 0
        self.lock = threading.Lock()
        self.channels: list[grpc.Channel] = []
        self.calls: list = []

    def start(self) -> None:
        if self.kind == "silent":
            channel = grpc.insecure_channel(self.target, options=channel_options())
            self.channels.append(channel)
            stub = pb_grpc.CanvasMonitorStub(channel)
            gate = threading.Event()

            def nothing():
                gate.wait()  # sends nothing until the row ends
                return
                yield  # noqa: unreachable - makes this a generator

            self._gate = gate
            for _ in range(200):
                self.calls.append(stub.Watch(nothing(), metadata=METADATA["abuser"], timeout=600))  # returns at once; gRPC reads nothing()
            return
        if self.kind == "cpu_hog":
            def spin():
                while not self.stop.is_set():
                    sum(range(1000))

            thread = threading.Thread(target=spin, daemon=True)
            thread.start()
            self.threads.append(thread)
            return
        count, make = {
            "huge_step": (2, lambda: (profile_steps("default", 65536, 1, self.vocab), 65536, 0, "huge")),
            "slow_monitor": (4, lambda: (profile_steps("default", 64, 8, self.vocab), 64, 0, "slow")),
            "prompt_ids": (4, lambda: (profile_steps("default", 64, 4, self.vocab), 64, 32768, "prompt")),
            "flag_storm": (2, lambda: (profile_steps("default", 64, 16, self.vocab), 64, 0, "storm")),
            "runaway": (1, lambda: (profile_steps("default", 64, 4, self.vocab), 64, 0, "loop")),
        }[self.kind]
        steps, length, prompt_ids, prefix = make()
        for index in range(count):
            thread = threading.Thread(target=self._loop, args=(index, steps, length, prompt_ids, prefix), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _loop(self, index: int, steps, length: int, prompt_ids: int, prefix: str) -> None:
        # a connection of its own, as separate clients have (one process's channels otherwise share one)
        channel = grpc.insecure_channel(self.target, options=[*channel_options(), ("grpc.use_local_subchannel_pool", 1)])
        self.channels.append(channel)
        stub = pb_grpc.CanvasMonitorStub(channel)
        number = 0
        while not self.stop.is_set():
            number += 1
            try:
                request(stub, steps, f"{prefix}-{index}-{number}", length, prompt_ids, timeout=60,
                        metadata=METADATA["abuser"])
                ok = True
            except grpc.RpcError:
                ok = False
            with self.lock:
                self.done += ok
                self.failed += not ok

    def finish(self) -> None:
        self.stop.set()
        if self.kind == "silent":
            self._gate.set()
            for call in self.calls:
                call.cancel()
        for thread in self.threads:
            thread.join(timeout=90)
        for channel in self.channels:
            channel.close()


def normal_client(target: str, steps, length: int, count: int, label: str) -> tuple[list[float], int]:
    channel = grpc.insecure_channel(target, options=channel_options())
    stub = pb_grpc.CanvasMonitorStub(channel)
    latencies, errors = [], 0
    for number in range(count):
        started = time.perf_counter()
        try:
            request(stub, steps, f"normal-{label}-{number}", length, timeout=60, metadata=METADATA["normal"])
        except grpc.RpcError:
            errors += 1  # its time still counts: a request that waited out its deadline is the worst latency
        latencies.append(time.perf_counter() - started)
    channel.close()
    return latencies, errors


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def ratio_interval(row: list[float], idle: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 90% bootstrap interval for p99(row) / p99(idle): both samples redrawn with replacement. A p99 of
    150 requests is their second worst, so one slow request moves it; the interval says how far."""
    import numpy as np

    if not row or not idle:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    a, b = np.asarray(row), np.asarray(idle)
    ratios = (np.quantile(rng.choice(a, (resamples, len(a))), 0.99, axis=1, method="nearest")
              / np.quantile(rng.choice(b, (resamples, len(b))), 0.99, axis=1, method="nearest"))
    low, high = np.quantile(ratios, [0.05, 0.95])
    return float(low), float(high)


def run_row(kind: str, target: str, steps, args) -> tuple[list[float], int, AbuserProcess]:
    abuser = AbuserProcess(kind, target, args.length, args.abusers_nice)
    while abuser.process.stdout.readline().strip() not in ("started", ""):
        pass  # its start-up logs (the vocabulary) come first
    time.sleep(1.0)  # the abuse is under way before the normal client starts
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(
        zip(("lat", "err"), normal_client(target, steps, args.length, args.requests, kind))), daemon=True)
    runner.start()
    runner.join(args.row_timeout)
    abuser.finish()
    runner.join(60)
    return result.get("lat", []), result.get("err", args.requests), abuser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--row-timeout", type=float, default=120.0)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the rows (each with its own idle row)")
    parser.add_argument("--switch-ms", type=float, help="this sidecar's sys.setswitchinterval, ms (default: its own)")
    parser.add_argument("--compare-python", help="also measure a sidecar run by this interpreter (another commit's "
                        "worktree; without the budget keys it may not know), same rows, same normal client")
    parser.add_argument("--compare-new-keys", action="store_true", help="give the --compare-python sidecar the "
                        "budget keys too (it knows them)")
    parser.add_argument("--compare-switch-ms", type=float, help="also measure a sidecar (this interpreter unless "
                        "--compare-python) with this sys.setswitchinterval, ms")
    parser.add_argument("--server", action="append", default=[], metavar="KEY=VALUE",
                        help="a [server] key for this sidecar's config, TOML (e.g. max_streams_per_peer=8); repeatable")
    parser.add_argument("--compare-server", action="append", default=[], metavar="KEY=VALUE",
                        help="also measure a sidecar (this interpreter unless --compare-python) with these [server] keys")
    parser.add_argument("--tokens", action="store_true", help="the sidecars check bearer tokens, and the normal "
                        "client and the abuser each have one (an authenticated deployment: one token per client)")
    parser.add_argument("--monitor-processes", type=int, default=0, help="the sidecar's server.monitor_processes for "
                        "every row but runaway (which always runs with 2); default 0 (in-process)")
    parser.add_argument("--abusers-nice", type=int, default=0, help="run the abusers' client process at this OS "
                        "niceness (19: they get only what the sidecar and the normal client leave, as if they ran on "
                        "other machines; a decomposition of the figures, not a deployment)")
    parser.add_argument("--abuse", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokens:
        use_tokens()
    if args.abuse:
        abuse_main(args.abuse, args.target, args.length)
        return
    from canvaswatch.server.bottleneck.vocab import load_vocabulary

    vocab = load_vocabulary()
    steps = profile_steps("default", args.length, args.steps, vocab)
    rows = args.rows.split(",")
    print(f"# normal client: {args.requests} requests one after another, L={args.length}, {args.steps} top-k steps each "
          f"(default profile), default monitors; {os.cpu_count()} cores, everything on this machine")
    print("| round | sidecar | mode | abuse | normal p50 ms | normal p99 ms | p99 / idle p99 | its 90% interval "
          "| normal errors | abuser requests ok / failed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    def label(name: str, switch_ms: float | None, keys: list[str]) -> str:
        return name + "".join(f" ({part})" for part in
                              ([f"switch {switch_ms:g} ms"] if switch_ms is not None else []) + keys)

    sidecars = [(label("this", args.switch_ms, args.server), sys.executable, True, args.switch_ms, tuple(args.server))]
    if args.compare_python or args.compare_switch_ms is not None or args.compare_server:
        sidecars.append((label("compare", args.compare_switch_ms, args.compare_server),
                         args.compare_python or sys.executable, args.compare_new_keys or not args.compare_python,
                         args.compare_switch_ms, tuple(args.compare_server)))
    with tempfile.TemporaryDirectory() as tmp:
        modes = sorted({args.monitor_processes, 2})
        for mode in modes:
            mode_rows = [r for r in rows if mode == (2 if r == "runaway" else args.monitor_processes)]
            if not mode_rows:
                continue
            running = []
            try:
                for number, (_, python, new_keys, switch_ms, keys) in enumerate(sidecars):
                    running.append(start_sidecar(Path(tmp), mode, python, new_keys, switch_ms, name=f"s{number}",
                                                 server_keys=keys))
                for _, target in running:
                    normal_client(target, steps, args.length, 5, "warm")
                turn = 0
                for round_ in range(1, args.repeats + 1):
                    idle_latencies = {}  # per sidecar: this round's idle row, what its rows are judged against
                    for kind in ["idle", *mode_rows]:
                        order = list(range(len(sidecars)))
                        if turn % 2:
                            order.reverse()  # A B, B A, ...: drift falls on both
                        turn += 1
                        for index in order:
                            name, target = sidecars[index][0], running[index][1]
                            if kind == "idle":
                                idle, errors = normal_client(target, steps, args.length, args.requests, "idle")
                                idle_latencies[index] = idle
                                low, high = ratio_interval(idle, idle)
                                print(f"| {round_} | {name} | {mode} | none (idle) | {p(idle, 0.5) * 1e3:.1f} | "
                                      f"{p(idle, 0.99) * 1e3:.1f} | 1.00 | {low:.2f}-{high:.2f} | {errors} | - |", flush=True)
                                continue
                            lat, err, abuser = run_row(kind, target, steps, args)
                            low, high = ratio_interval(lat, idle_latencies[index])
                            print(f"| {round_} | {name} | {mode} | {kind} | {p(lat, 0.5) * 1e3:.1f} | {p(lat, 0.99) * 1e3:.1f} | "
                                  f"{p(lat, 0.99) / p(idle_latencies[index], 0.99):.2f} | {low:.2f}-{high:.2f} | {err} | "
                                  f"{abuser.done} / {abuser.failed} |", flush=True)
                            time.sleep(1.0)
            finally:
                for process, _ in running:
                    process.terminate()
                for process, _ in running:
                    try:
                        process.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        process.kill()


if __name__ == "__main__":
    main()
