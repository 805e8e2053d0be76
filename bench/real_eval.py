"""The monitors on the real DiffusionGemma captures: every capture x probability rule x signals.

    python bench/real_eval.py [--real ../shared/real] [--capture NAME=FILE ...] [--strict] [--config FILE]
                              [--limit N] [--k K] [--seed N] [--json out.json]

Prints, per run (capture/rule/signals), `canvaswatch eval`'s table, then the requirements of
issue 11 item 4 (canvaswatch.server.evaluation.real_data) with whether each holds. The
captures are read from --real (never copied into the repository; BENCHMARKS.md cites their
repository, files and commits). A malformed run is left out and named on stderr, and so is a
capture that cannot be imported at all (--strict: either stops the run). A capture whose file
is absent is skipped, and said so;
`--capture gallery=heldout/gallery.json` (repeatable) scores those files alone, each with the
anim_curves.json beside it (else the one under --real) for the entropy rule.
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
from canvaswatch.server.evaluation.real_data import as_table, capture_paths, requirements, score_runs
from canvaswatch.server.importers import DEFAULT_K, FORMATS, CaptureError
from canvaswatch.server.ops.logs import configure_logging
from canvaswatch.server.pipeline.engine import Engine

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default=str(ROOT.parent / "shared" / "real"))
    parser.add_argument("--config")
    parser.add_argument("--limit", type=int, help="at most N runs per capture")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help=f"top-k width of the imported traces (default {DEFAULT_K})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the importers' fill rules (default 0)")
    parser.add_argument("--strict", action="store_true",
                        help="a malformed run refuses its whole file (default: it is left out and named on stderr)")
    parser.add_argument("--capture", action="append", default=[], metavar="NAME=FILE",
                        help=f"score this file as capture NAME ({', '.join(FORMATS)}); repeatable; only these then")
    args = parser.parse_args()
    real = Path(args.real)
    try:
        overrides = dict(_capture(spec) for spec in args.capture)
        paths, absent = capture_paths(real, overrides)
    except ValueError as err:
        print(f"real_eval: {err}", file=sys.stderr)
        return 2
    if absent:
        print(f"real_eval: skipped {', '.join(absent)}: no file at "
              f"{', '.join(str(overrides.get(n, real / FORMATS[n].file)) for n in absent)}", file=sys.stderr)
    if not paths:
        print(f"real_eval: no capture to score under {real} (the captures are not in this repository)", file=sys.stderr)
        return 2
    configure_logging("warning")
    config = load_config(args.config)
    engine = Engine(config, load_vocabulary(config.vocab.tokenizer))
    started = time.perf_counter()
    skipped: dict[str, CaptureError] = {}  # one entry per malformed run (each file is read once per rule/signals)
    unusable: dict[str, CaptureError] = {}
    try:
        scores = score_runs(engine, real, paths=paths, limit=args.limit, k=args.k, seed=args.seed,
                            on_invalid=None if args.strict else lambda err: skipped.setdefault(str(err), err),
                            on_unusable=None if args.strict else unusable.__setitem__)
    except (CaptureError, ValueError) as err:  # --strict: a malformed capture; a bad --k: one line
        print(f"real_eval: {err}", file=sys.stderr)
        engine.close()
        return 2
    finally:
        for message in skipped:  # before anything else is said: the reasons runs were left out
            print(f"real_eval: skipped a malformed run: {message}", file=sys.stderr)
    for capture, err in unusable.items():
        print(f"real_eval: skipped capture {capture}: {err}", file=sys.stderr)
    if not scores:
        print("real_eval: no capture could be scored", file=sys.stderr)
        engine.close()
        return 2
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
            "skipped": list(skipped),
            "unusable": {capture: str(err) for capture, err in unusable.items()},
            "requirements": [{"monitor": r.monitor, "run": r.run.name, "what": r.what, "value": r.value,
                              "limit": r.limit, "holds": r.holds} for r in found],
        }, indent=2) + "\n")
    engine.close()
    return 0


def _capture(spec: str) -> tuple[str, Path]:
    name, sep, file = spec.partition("=")
    if not sep or not file:
        raise ValueError(f"--capture {spec!r}: expected NAME=FILE, e.g. gallery=heldout/gallery.json")
    return name, Path(file)


if __name__ == "__main__":
    raise SystemExit(main())
