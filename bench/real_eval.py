"""The monitors on the real DiffusionGemma captures: every capture x probability rule x signals.

    python bench/real_eval.py [--real ../shared/real] [--config FILE] [--limit N] [--json out.json]

Prints, per run (capture/rule/signals), `canvaswatch eval`'s table, then the requirements of
issue 11 item 4 (canvaswatch.server.evaluation.real_data) with whether each holds. The
captures are read from --real (never copied into the repository; BENCHMARKS.md cites their
repository, files and commits).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from canvaswatch.server.bottleneck.vocab import load_vocabulary
from canvaswatch.server.config import load_config
from canvaswatch.server.evaluation import evaluate as ev
from canvaswatch.server.evaluation.real_data import as_table, requirements, score_runs
from canvaswatch.server.ops.logs import configure_logging
from canvaswatch.server.pipeline.engine import Engine

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default=str(ROOT.parent / "shared" / "real"))
    parser.add_argument("--config")
    parser.add_argument("--limit", type=int, help="at most N runs per capture")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    real = Path(args.real)
    if not real.is_dir():
        print(f"real_eval: {real}: no such directory (the captures are not in this repository)", file=sys.stderr)
        return 2
    configure_logging("warning")
    config = load_config(args.config)
    engine = Engine(config, load_vocabulary(config.vocab.tokenizer))
    started = time.perf_counter()
    scores = score_runs(engine, real, limit=args.limit)
    for run, rows in scores.items():
        print(f"\n### {run.name}\n")
        print(ev.as_table(rows))
    found = requirements(engine, scores)
    print("\n### requirements on real dynamics\n")
    print(as_table(found))
    held = sum(r.holds for r in found)
    print(f"\n{held} of {len(found)} hold ({time.perf_counter() - started:.0f} s)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({
            "runs": {run.name: ev.as_json(rows) for run, rows in scores.items()},
            "requirements": [{"monitor": r.monitor, "run": r.run.name, "what": r.what, "value": r.value,
                              "limit": r.limit, "holds": r.holds} for r in found],
        }, indent=2) + "\n")
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
