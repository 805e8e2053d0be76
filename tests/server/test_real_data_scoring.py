"""How real-data scoring treats captures it cannot score: absent files, held-out files named on
the command line, and captures without the runs a requirement needs (no real data needed here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from canvaswatch.server.evaluation.evaluate import MonitorScore
from canvaswatch.server.evaluation.real_data import Run, capture_paths, requirements

ROOT = Path(__file__).resolve().parents[2]


def _score(monitor: str, positives: int, negatives: int, recall: float, fpr: float) -> MonitorScore:
    return MonitorScore(monitor=monitor, positives=positives, negatives=negatives, true_positives=0,
                        false_positives=0, precision=float("nan"), recall=recall, false_positive_rate=fpr,
                        auroc=float("nan"))


def test_absent_captures_are_listed_and_named_files_are_scored_alone(tmp_path):
    (tmp_path / "gallery.json").write_text("[]")
    present, absent = capture_paths(tmp_path)
    assert present == {"gallery": tmp_path / "gallery.json"}
    assert absent == ["clean", "bench_order", "films", "poem"]
    held_out = tmp_path / "held_out_clean.json"
    held_out.write_text("{}")
    present, absent = capture_paths(tmp_path, {"clean": held_out, "poem": tmp_path / "nope.json"})
    assert present == {"clean": held_out} and absent == ["poem"]
    with pytest.raises(ValueError, match="unknown capture 'poems'"):
        capture_paths(tmp_path, {"poems": held_out})


def test_a_requirement_is_stated_only_where_its_runs_exist():
    engine = SimpleNamespace(monitors=[])
    clean = Run("clean", "committed", True)
    # only answer-stable runs: no recall to state (0.0 of nothing is no failure), the FPR is stated
    found = requirements(engine, {clean: [_score("self_correction", 0, 10, 0.0, 0.0)]})
    assert [(r.what, r.holds) for r in found] == [("FPR on answer-stable runs", True)]
    # only revised runs: no FPR to state (0.0 of nothing is no pass)
    found = requirements(engine, {clean: [_score("self_correction", 5, 0, 0.4, 0.0)]})
    assert [(r.what, r.holds) for r in found] == [("recall on revised answers", False)]


def test_real_eval_skips_what_is_absent_and_says_so(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "real_eval.py"), "--real", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "skipped gallery, clean, bench_order, films, poem" in run.stderr
    assert "no capture to score" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "real_eval.py"), "--capture", "clean"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "expected NAME=FILE" in run.stderr


def test_real_eval_leaves_out_a_malformed_run_and_names_it(tmp_path):
    from tests.server.test_importers import curves, films_run, write

    late = films_run()
    late["lock"][0] = 8
    write(tmp_path, "films_order.json", [films_run(), late])
    curves(tmp_path)
    command = [sys.executable, str(ROOT / "bench" / "real_eval.py"), "--real", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "skipped a malformed run: films_order.json: [1].lock[0]: lock step 8 is beyond T" in run.stderr
    assert "skipped gallery, clean, bench_order, poem" in run.stderr and "films/committed/signals" in run.stdout
    run = subprocess.run(command + ["--strict"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "real_eval: films_order.json: [1].lock[0]" in run.stderr


def test_real_eval_scores_named_files_with_the_curves_beside_them_and_skips_an_unusable_capture(tmp_path):
    from tests.server.test_importers import curves, films_run, write

    held_out, empty = tmp_path / "held_out", tmp_path / "empty"
    held_out.mkdir()
    empty.mkdir()
    films = write(held_out, "films_later.json", [films_run(), films_run(lock=[5, 5, 4, 4, 3, 2, 1, 0, 0, 0])])
    curves(held_out)  # beside the named file only: --real has none
    broken = write(held_out, "poem_later.json", ["oops"])
    command = [sys.executable, str(ROOT / "bench" / "real_eval.py"), "--real", str(empty),
               "--capture", f"films={films}", "--capture", f"poem={broken}", "--k", "3", "--json", str(tmp_path / "out.json")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "skipped a malformed run: poem_later.json: [0]: expected an object" in run.stderr
    assert "skipped capture poem: poem_later.json: (top level): no valid runs in the file" in run.stderr
    assert "films/entropy/signals" in run.stdout and "poem/" not in run.stdout
    import json
    out = json.loads((tmp_path / "out.json").read_text())
    assert set(out["unusable"]) == {"poem"} and {r.split("/")[0] for r in out["runs"]} == {"films"}
