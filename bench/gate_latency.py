"""Gate mode's cost: from the final step's send to the verdict in hand, p50 / p99.

    python bench/gate_latency.py [--requests 200] [--profile default] [--canvas-length 256] [--steps 48]

A sidecar on its defaults (in this process's loop thread, gRPC on loopback) and SIMULATED requests
of the calibrated profile, sent step by step through the client's WatchStream as a serving loop
would (steps paced so the sidecar keeps up, as it does at serving rates). Measured per request:
the time from `finish()` (the committed canvas handed over) until `result()` returns, which is
what a held canvas waits in gate mode. Prints the percentiles and, as the baseline from the same
run, the same interval for a bare gRPC echo of the messages (bench/throughput.py's echo).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).parent))

from throughput import free_port, serve_echo, wait_ready  # noqa: E402

from canvaswatch.client import simulate  # noqa: E402
from canvaswatch.client.stream import WatchStream, channel_options  # noqa: E402
from canvaswatch.server.app import SidecarThread  # noqa: E402
from canvaswatch.server.bottleneck.vocab import load_vocabulary  # noqa: E402
from canvaswatch.server.config import parse_config  # noqa: E402
from canvaswatch.server.ops.logs import configure_logging  # noqa: E402


def hold_times(target: str, traces, pause_s: float) -> list[float]:
    out = []
    with grpc.insecure_channel(target, options=channel_options()) as channel:
        for trace in traces:
            steps = list(trace.steps)
            stream = WatchStream(channel, steps[0].info, max_pending=len(steps) + 1)
            for message in steps[:-1]:
                copy = type(message)()
                copy.CopyFrom(message)
                copy.ClearField("info")
                stream.send(copy)
                time.sleep(pause_s)
            last = steps[-1]
            started = time.perf_counter()
            stream.finish(list(last.output_ids))
            stream.result(timeout=30)
            out.append(time.perf_counter() - started)
            stream.close()
    return out


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return f"p50 {p(0.50):.2f} ms, p99 {p(0.99):.2f} ms, max {ordered[-1] * 1000:.2f} ms (n={len(values)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--canvas-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--pause-ms", type=float, default=2.0, help="between steps, as a serving loop's step time")
    args = parser.parse_args()
    configure_logging("warning")
    vocab = load_vocabulary()
    traces = [simulate.scenario(simulate.SCENARIOS[i % len(simulate.SCENARIOS)], vocab.encode, vocab.size,
                                request_id=f"gate-{i}", seed=i, steps=args.steps, canvas_length=args.canvas_length,
                                profile=args.profile) for i in range(args.requests)]
    echo_port = free_port()
    loop = asyncio.new_event_loop()
    threading.Thread(target=lambda: loop.run_until_complete(serve_echo(echo_port)), daemon=True).start()
    wait_ready(f"127.0.0.1:{echo_port}")
    config = parse_config({"server": {"grpc_port": 0, "metrics_port": -1}, "dense": {"embeddings": ""}})
    with SidecarThread(config, vocab=vocab) as sidecar:
        # alternate halves so drift hits both alike
        half = args.requests // 2
        side = hold_times(sidecar.target, traces[:half], args.pause_ms / 1000)
        echo = hold_times(f"127.0.0.1:{echo_port}", traces[:half], args.pause_ms / 1000)
        side += hold_times(sidecar.target, traces[half:], args.pause_ms / 1000)
        echo += hold_times(f"127.0.0.1:{echo_port}", traces[half:], args.pause_ms / 1000)
    print(f"SIMULATED requests, profile {args.profile}, L={args.canvas_length}, {args.steps} steps, default monitors")
    print(f"final step -> verdict, sidecar: {percentiles(side)}")
    print(f"final step -> verdict, bare echo (baseline): {percentiles(echo)}")
    print(f"median difference: {(statistics.median(side) - statistics.median(echo)) * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
