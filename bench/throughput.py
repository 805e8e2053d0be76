"""Top-k path throughput: the sidecar with its default monitors vs a bare gRPC echo, same messages, same run.

    python bench/throughput.py [--lengths 256,1024] [--streams 1,8] [--steps 200] [--monitor-processes 0,2] [--repeats 7]
                               [--profiles default,hot,high_entropy]

Both servers run as separate processes on 127.0.0.1 (grpc.aio, same message
size limits). The echo server implements the same Watch RPC but only reads
each StepState and answers one empty Verdict at the end: the cost of moving
and parsing the bytes. The client replays identical pre-serialised top-k
steps (k = 8, SIMULATED requests on the simulator's calibrated profiles,
bench/traffic.py says how a canvas of any length is filled; `synthetic` is the
generator of the figures before issue 12) to each, and prints steps/s and MB/s with
the sidecar/echo ratio (target: >= 0.5), and where /proc exists the CPU
each server process spent per step (the echo; the sidecar's gRPC process;
its busiest monitor worker), which shows what limits a run. `--monitor-processes` runs one
sidecar per value of server.monitor_processes (0: monitors on the gRPC
process; N: N worker processes), each measured against the same echo.
`--repeats R` measures each row R times, echo and sidecar alternating, and
reports median rates: on a shared machine single runs vary by +-25%.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import grpc

from canvaswatch.client.stream import channel_options
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from traffic import PROFILE_NAMES, profile_steps  # noqa: E402


def run_streams(worker, count: int) -> float:
    """Seconds for `count` threads running worker(0..count-1) at once; raises if any failed
    (a failed stream must fail the benchmark, not look fast)."""
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            worker(index)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} stream(s) failed: {errors[0]}")
    return elapsed


class EchoServicer(pb_grpc.CanvasMonitorServicer):
    async def Watch(self, request_iterator, context):
        request_id, count = "", 0
        async for message in request_iterator:
            request_id = request_id or message.info.request_id
            count += 1
            if message.final:
                yield pb.MonitorEvent(request_id=request_id, verdict=pb.Verdict(request_id=request_id, steps_seen=count))


async def serve_echo(port: int) -> None:
    server = grpc.aio.server(options=channel_options())
    pb_grpc.add_CanvasMonitorServicer_to_server(EchoServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(target: str, timeout: float = 120.0) -> None:
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=timeout)
    channel.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (its threads included) from /proc; NaN where there is none."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (a sidecar's monitor workers and multiprocessing's helper)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rpartition(")")[2].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _per_step(seconds: float, count: int) -> str:
    # /proc counts in clock ticks (10 ms): over a few hundred steps that is +-10-50 us a step
    return "n/a" if seconds != seconds else f"{seconds / count * 1e6:.0f}"


def drive(target: str, steps: list[pb.StepState], streams: int, length: int) -> tuple[float, float]:
    """All streams at once, each sending every step then final; returns (steps/s, MB/s)."""
    channel = grpc.insecure_channel(target, options=channel_options())
    stub = pb_grpc.CanvasMonitorStub(channel)
    payload = sum(s.ByteSize() for s in steps)

    def one(index: int) -> None:
        def messages():
            for i, step in enumerate(steps):
                if i == 0:
                    first = pb.StepState()
                    first.CopyFrom(step)
                    first.info.CopyFrom(pb.RequestInfo(request_id=f"bench-{index}", model="bench", canvas_length=length))
                    yield first
                else:
                    yield step
            yield pb.StepState(final=True, output_ids=[1000])
        events = list(stub.Watch(messages(), timeout=600))
        assert events[-1].HasField("verdict"), events[-1]

    elapsed = run_streams(one, streams)
    channel.close()
    return streams * len(steps) / elapsed, streams * payload / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--monitor-processes", default="0", help="comma-separated server.monitor_processes values")
    parser.add_argument("--config", help="the sidecars' TOML config (default: the built-in one)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per row, echo and sidecar alternating; rates are medians, CPU columns means")
    parser.add_argument("--profiles", default=",".join(PROFILE_NAMES),
                        help="comma-separated traffic: default, hot, high_entropy (calibrated), synthetic (pre-issue-12)")
    parser.add_argument("--compare-python", help="also run a sidecar with this interpreter (e.g. a venv whose canvaswatch is "
                        "another commit's worktree), measured in the same alternation: a same-run before/after")
    parser.add_argument("--echo-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_port:
        asyncio.run(serve_echo(args.echo_port))
        return

    from canvaswatch.server.bottleneck.vocab import load_vocabulary

    modes = [int(x) for x in args.monitor_processes.split(",")]
    echo_port = free_port()
    pythons = [("this", sys.executable)] + ([("compare", args.compare_python)] if args.compare_python else [])
    variants = [(label, python, mode) for mode in modes for label, python in pythons]
    grpc_ports = [free_port() for _ in variants]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    echo = subprocess.Popen([sys.executable, __file__, "--echo-port", str(echo_port)], env=env)
    sidecars = [subprocess.Popen([python, "-m", "canvaswatch.server.cli", "serve", "--grpc-port", str(port),
                                  "--metrics-port", "-1", "--monitor-processes", str(mode),
                                  *(["--config", args.config] if args.config else [])], env=env, stderr=subprocess.DEVNULL)
                for port, (_, python, mode) in zip(grpc_ports, variants)]
    try:
        wait_ready(f"127.0.0.1:{echo_port}")
        for port in grpc_ports:
            wait_ready(f"127.0.0.1:{port}")
        print(f"# top-k path throughput, k=8, {args.steps} steps per stream, default monitors, "
              f"{os.cpu_count()} cores, client and all servers on this machine (idle ones wait in epoll)")
        print("| profile | L | streams | monitor processes | sidecar | echo steps/s | sidecar steps/s | ratio | echo MB/s "
              "| sidecar MB/s | CPU us/step: echo | front | busiest worker |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        vocab = load_vocabulary()
        for profile, length in ((p, int(x)) for p in args.profiles.split(",") for x in args.lengths.split(",")):
            steps = profile_steps(profile, length, args.steps, vocab)
            for streams in (int(x) for x in args.streams.split(",")):
                for port, (label, _, mode), sidecar in zip(grpc_ports, variants, sidecars):
                    target = f"127.0.0.1:{port}"
                    drive(target, steps[:20], max(streams, mode or 1), length)  # warm-up, every worker
                    echo_runs, side_runs = [], []
                    echo_cpu = front = busiest = 0.0
                    for _ in range(args.repeats):  # alternate, so drifts of a shared machine hit both alike
                        before = cpu_seconds(echo.pid)
                        echo_runs.append(drive(f"127.0.0.1:{echo_port}", steps, streams, length))
                        echo_cpu += cpu_seconds(echo.pid) - before
                        spent, workers = cpu_seconds(sidecar.pid), {pid: cpu_seconds(pid) for pid in children(sidecar.pid)}
                        side_runs.append(drive(target, steps, streams, length))
                        front += cpu_seconds(sidecar.pid) - spent
                        busiest += max((cpu_seconds(pid) - used for pid, used in workers.items()), default=0.0)
                    (echo_rate, echo_mb), (side_rate, side_mb) = _median(echo_runs), _median(side_runs)
                    count = args.repeats * streams * len(steps)
                    print(f"| {profile} | {length} | {streams} | {mode} | {label} | {echo_rate:.0f} | {side_rate:.0f} | {side_rate / echo_rate:.2f} | "
                          f"{echo_mb:.1f} | {side_mb:.1f} | {_per_step(echo_cpu, count)} | {_per_step(front, count)} | "
                          f"{_per_step(busiest, count) if mode else '-'} |", flush=True)
    finally:
        for process in (echo, *sidecars):
            process.terminate()
            process.wait(timeout=30)


def _median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The run with the median rate (steps/s, MB/s of the same run)."""
    return sorted(runs)[len(runs) // 2]


if __name__ == "__main__":
    main()
