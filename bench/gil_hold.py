"""How long one stream's huge step holds up another stream's ordinary steps, with the large-canvas
kernels holding the GIL and releasing it (monitors/compiled.py, LARGE_CANVAS).

    python bench/gil_hold.py [--rounds 4] [--steps 400]

In one process, as the sidecar runs them with server.monitor_processes = 0: a background thread
feeds one stream's huge valid top-k steps (L = 65,536, k = 8, the abuse benchmark's, one request
after another) through a StreamTable; the main thread feeds another stream's ordinary steps
(L = 256, k = 8, the calibrated default profile of bench/traffic.py) through its own, and times
each step (wall clock, StreamTable.handle). Rows: the ordinary stream alone, then beside the huge
one with the twins (the default: kernels let go of the GIL from LARGE_CANVAS positions on) and
with LARGE_CANVAS raised past 65,536 (every kernel keeps the GIL), alternating `--rounds` times so
drift falls on both. Without gRPC, clients or other processes, this isolates what the GIL costs;
the end-to-end figure (a normal client over gRPC on loopback) is bench/abuse_latency.py's. With
2 cores, the two threads can run at once only where one of them has let go of the GIL.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from traffic import profile_steps  # noqa: E402

from canvaswatch.monitors import compiled  # noqa: E402
from canvaswatch.server.bottleneck.vocab import load_vocabulary  # noqa: E402
from canvaswatch.server.config import default_config  # noqa: E402
from canvaswatch.server.pipeline.engine import Engine  # noqa: E402
from canvaswatch.server.workers.protocol import Frame  # noqa: E402
from canvaswatch.server.workers.streams import StreamTable  # noqa: E402
from canvaswatch.v1 import monitor_pb2 as pb  # noqa: E402

HUGE = 65536


def request_bytes(steps: list[pb.StepState], request_id: str, length: int) -> list[bytes]:
    """One request's messages: info on the first, every step, then the final message."""
    messages = [pb.StepState() for _ in steps]
    for message, step in zip(messages, steps):
        message.CopyFrom(step)
    messages[0].info.CopyFrom(pb.RequestInfo(request_id=request_id, canvas_length=length))
    messages.append(pb.StepState(final=True, output_ids=[1000]))
    return [m.SerializeToString() for m in messages]


def feed(engine: Engine, stream_id: int, raws: list[bytes], timings: list[float] | None = None) -> None:
    table = StreamTable(engine)
    table.handle(Frame.OPEN, stream_id, b"")
    for raw in raws:
        started = time.perf_counter()
        table.handle(Frame.MESSAGE, stream_id, raw)
        if timings is not None:
            timings.append(time.perf_counter() - started)
    table.handle(Frame.END, stream_id, b"")


def ordinary_row(engine: Engine, raws: list[bytes], steps: int, huge: list[bytes] | None) -> tuple[list[float], int]:
    """Per-step wall seconds of `steps` ordinary steps, with the huge stream running beside them or not;
    and how many huge steps ran meanwhile."""
    stop, huge_steps = threading.Event(), [0]

    def abuse() -> None:
        number = 0
        while not stop.is_set():
            number += 1
            feed(engine, 1_000_000 + number, huge)
            huge_steps[0] += 1

    thread = threading.Thread(target=abuse, daemon=True) if huge is not None else None
    if thread is not None:
        thread.start()
        time.sleep(0.2)  # the huge stream is under way
    timings: list[float] = []
    number = 0
    while len(timings) < steps:
        number += 1
        feed(engine, number, raws, timings)
    stop.set()
    if thread is not None:
        thread.join()
    return timings[:steps], huge_steps[0]


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=400, help="ordinary steps timed per row")
    args = parser.parse_args()
    vocab = load_vocabulary()
    engine = Engine(default_config(), vocab)
    engine.warm_up()
    raws = request_bytes(profile_steps("default", 256, 16, vocab), "ordinary", 256)
    huge = request_bytes(profile_steps("default", HUGE, 1, vocab), "huge", HUGE)
    default_bound = compiled.LARGE_CANVAS
    feed(engine, 0, huge)  # first huge request off the books (the twins' signatures at this length)
    print(f"# ordinary steps L=256 k=8 beside huge steps L={HUGE} k=8 ({len(huge[0]) / 1e6:.1f} MB), one process, "
          f"StreamTable.handle wall ms per ordinary step")
    print("| round | huge stream | large-canvas kernels | p50 ms | p99 ms | max ms | huge steps meanwhile |")
    print("|---|---|---|---|---|---|---|")
    for number in range(1, args.rounds + 1):
        modes = [("release", default_bound), ("hold", HUGE + 1)]
        if number % 2 == 0:
            modes.reverse()
        rows = [("none", "-", None, default_bound)] + [("beside", name, huge, bound) for name, bound in modes]
        for label, name, load, bound in rows:
            compiled.LARGE_CANVAS = bound
            timings, huge_steps = ordinary_row(engine, raws, args.steps, load)
            ms = [t * 1e3 for t in timings]
            print(f"| {number} | {label} | {name} | {statistics.median(ms):.2f} | {quantile(ms, 0.99):.2f} | "
                  f"{max(ms):.2f} | {huge_steps if load else '-'} |", flush=True)
    compiled.LARGE_CANVAS = default_bound
    engine.close()


if __name__ == "__main__":
    main()
