"""The vLLM plugin's hold (gate = "hold"): what it adds from finished-in-engine to released, p50 / p99.

    flock /tmp/cw-bench.lock nice -n 19 python bench/vllm_hold_latency.py [--requests 120]

Runs tests/client/vllm_cpu_hold_engine.py in bench mode in the vLLM 0.33.0 venv (.ci/vllm_venv.sh; this
checkout's wheel is built and installed there, no dependencies): vLLM's real DiffusionSampler and model
state on the CPU (stand-in forward, as the tests), one-block requests 8 at a time, and vLLM's real
OutputProcessor and RequestOutputCollectors in an AsyncLLM-style frontend. A sidecar on its defaults runs
here (gRPC on loopback). Half the requests go through an OutputProcessor with the plugin's hold, half,
alternated, through one without it (the baseline from the same run). Measured per request: from the
engine step that finished it (its EngineCoreOutput handed to the frontend) to its caller's `await
queue.get()` returning the finished RequestOutput. The held path includes the worker sending the
stream's final message at the next engine step's start, the sidecar's end-of-request monitors, and the
GetVerdict round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from canvaswatch.server.app import SidecarThread  # noqa: E402
from canvaswatch.server.bottleneck.dense import DenseDecoder  # noqa: E402
from canvaswatch.server.bottleneck.vocab import load_vocabulary  # noqa: E402
from canvaswatch.server.config import parse_config  # noqa: E402
from canvaswatch.server.ops.logs import configure_logging  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=120, help="held requests (as many again without the hold)")
    parser.add_argument("--budget-s", type=float, default=10.0)
    args = parser.parse_args()
    venv = subprocess.run(["bash", str(ROOT / ".ci" / "vllm_venv.sh")], capture_output=True, text=True, check=True)
    python = Path(venv.stdout.strip().splitlines()[-1]) / "bin" / "python"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp, str(ROOT)],
                       capture_output=True, check=True)
        [wheel] = Path(tmp).glob("canvaswatch-*.whl")
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
                       capture_output=True, check=True)
        configure_logging("warning")
        config = parse_config({"server": {"grpc_port": 0, "metrics_port": -1}, "dense": {"embeddings": ""}})
        vocab = load_vocabulary(config.vocab.tokenizer)
        sidecar = SidecarThread(config, vocab=vocab, dense=DenseDecoder(None, vocab.size, k=config.dense.k)).start()
        out = Path(tmp) / "engine.json"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", tmp),
               "CANVASWATCH_VLLM_TARGET": sidecar.target, "CANVASWATCH_VLLM_GATE": "hold",
               "CANVASWATCH_VLLM_GATE_BUDGET_S": str(args.budget_s), "CANVASWATCH_VLLM_MAX_PENDING": "1000",
               "CANVASWATCH_TEST_BENCH_N": str(args.requests)}
        try:
            done = subprocess.run([python, str(ROOT / "tests" / "client" / "vllm_cpu_hold_engine.py"), str(out)],
                                  capture_output=True, text=True, env=env, cwd=tmp)
        finally:
            sidecar.stop()
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return 1
        result = json.loads(out.read_text())
    rows = {}
    for name in ("main", "plain"):
        ids = [r for r, f in result["frontend_of"].items() if f == name]
        seconds = [result["received"][r][-1]["at"] - result["finished_at"][r][1] for r in ids]
        steps = [result["received"][r][-1]["engine_step"] - result["finished_at"][r][0] for r in ids]
        rows[name] = (len(ids), seconds, steps)
    print(f"{args.requests} held + {args.requests} plain one-block requests, 8 at a time; engine steps "
          f"{result['engine_steps']}; decisions {result['decisions']['main']}; run {result['seconds']:.0f} s")
    print("| frontend | requests | p50 | p99 | max | engine steps later (p50 / max) |")
    print("|---|---|---|---|---|---|")
    for name, label in (("main", "hold (gate = hold)"), ("plain", "vLLM's OutputProcessor alone (baseline)")):
        n, seconds, steps = rows[name]
        print(f"| {label} | {n} | {percentile(seconds, 50) * 1e3:.2f} ms | {percentile(seconds, 99) * 1e3:.2f} ms | "
              f"{max(seconds) * 1e3:.2f} ms | {statistics.median(steps):g} / {max(steps)} |")
    added = percentile(rows["main"][1], 50) - percentile(rows["plain"][1], 50)
    print(f"hold adds {added * 1e3:.2f} ms at the median; p99 ratio hold / baseline "
          f"{percentile(rows['main'][1], 99) / max(percentile(rows['plain'][1], 99), 1e-9):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
