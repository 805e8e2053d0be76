"""Prepare the classifier's evaluation on the labelled corpus: a tiny trained model and a config.

    python bench/eval_classifier.py DIR
    canvaswatch simulate /tmp/corpus.cwtrace --corpus --per-scenario 20
    canvaswatch eval /tmp/corpus.cwtrace --config DIR/eval.toml --json /tmp/eval-classifier.json

The model is the tests' tiny BERT, trained here in seconds from a config (no
download): "unsafe" means bleach together with ammonia. The config runs the
default monitors plus `classifier` on that model, so one eval prints every
monitor's scores, the classifier's among them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.tiny_classifier import build_tiny_classifier, write_eval_config  # noqa: E402


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    directory = Path(sys.argv[1]).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    model = build_tiny_classifier(directory / "model")
    config = write_eval_config(model, directory / "eval.toml")
    print(f"model: {model}\nconfig: {config}")


if __name__ == "__main__":
    main()
