"""Prepare the probe's evaluation: a small embedding matrix, the probe, a config and labelled traces.

    python bench/eval_probe.py DIR [--per-scenario 20]
    canvaswatch eval DIR/probe.cwtrace --config DIR/probe.toml --json /tmp/eval-probe.json

The traces are SIMULATED `embeddings`-form requests (canvaswatch.client.simulate_hidden):
a concept planted along the probe's direction, and the hard negatives beside it (a quarter of
the strength; the full strength along an orthogonal direction; noise only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from canvaswatch.server.bottleneck.vocab import load_vocabulary  # noqa: E402
from tests.probe_eval import write_probe_eval  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--per-scenario", type=int, default=20)
    args = parser.parse_args()
    config, traces = write_probe_eval(args.directory.resolve(), load_vocabulary().size, per_scenario=args.per_scenario)
    print(f"config: {config}\ntraces: {traces}")


if __name__ == "__main__":
    main()
