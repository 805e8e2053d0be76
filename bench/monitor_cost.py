"""Per-step cost of decoding and of each default monitor, at L in {256, 1024}, k = 8.

    python bench/monitor_cost.py [--lengths 256,1024] [--steps 200]

Steps are SIMULATED canvases (a text settling left to right over random
vocabulary noise, the throughput benchmark's generator); each
monitor then runs over freshly decoded steps in a new request (so the canvas
text each builds is inside its timing; in the server, monitors share it).
Prints microseconds per step (mean over the steps, best of 3 passes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from throughput import make_steps  # noqa: E402

from canvaswatch.monitors.base import RequestMeta  # noqa: E402
from canvaswatch.server.config import default_config  # noqa: E402
from canvaswatch.server.dense import DenseDecoder  # noqa: E402
from canvaswatch.server.engine import Engine  # noqa: E402
from canvaswatch.server.vocab import load_vocabulary  # noqa: E402


def best_of(passes: int, fn, setup=lambda: None) -> float:
    best = float("inf")
    for _ in range(passes):
        prepared = setup()
        start = time.perf_counter()
        fn(prepared)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    vocab = load_vocabulary()
    engine = Engine(default_config(), vocab, dense=DenseDecoder(None, vocab.size))
    lengths = [int(x) for x in args.lengths.split(",")]
    rows: dict[str, list[float]] = {}
    for length in lengths:
        messages = make_steps(length, args.steps)
        rows.setdefault("decode (topk form)", []).append(
            best_of(3, lambda _: [engine.decoder.decode(m, length, "bench") for m in messages]) / len(messages))
        meta = RequestMeta("bench", "bench", "", (), length, args.steps)

        def fresh() -> list:
            # new DecodedSteps each pass: their cached text and views are computed inside the timing
            return [engine.decoder.decode(m, length, "bench") for m in messages]

        for monitor in engine.monitors:
            def run(decoded, monitor=monitor):
                state = monitor.start(meta)
                for step in decoded:
                    monitor.on_step(state, step)
            rows.setdefault(monitor.name, []).append(best_of(3, run, fresh) / len(messages))
    print(f"# per-step cost, k=8, {args.steps} SIMULATED steps, best of 3, microseconds")
    print("| stage | " + " | ".join(f"L={length}" for length in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for name, costs in rows.items():
        print(f"| {name} | " + " | ".join(f"{c * 1e6:.0f}" for c in costs) + " |")
    totals = [sum(costs[i] for costs in rows.values()) for i in range(len(lengths))]
    print("| **total** | " + " | ".join(f"{t * 1e6:.0f}" for t in totals) + " |")


if __name__ == "__main__":
    main()
