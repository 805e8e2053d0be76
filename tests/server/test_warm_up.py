"""Engine.warm_up: the kernels and phrase tables are ready before the first request, and nothing is counted."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from prometheus_client import generate_latest

from canvaswatch.server.config import default_config
from canvaswatch.server.bottleneck.dense import DenseDecoder
from canvaswatch.server.pipeline.engine import Engine


def _samples(engine: Engine) -> dict[str, float]:
    found = {}
    for line in generate_latest(engine.metrics.registry).decode().splitlines():
        if line and not line.startswith("#") and "_created" not in line:
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def test_warm_up_builds_the_phrase_tables_and_leaves_no_trace(vocab, tmp_path):
    config = default_config()
    config = dataclasses.replace(config, logging=dataclasses.replace(config.logging, audit_log=str(tmp_path / "audit.jsonl")))
    engine = Engine(config, vocab, dense=DenseDecoder(None, vocab.size))
    before = _samples(engine)
    matcher = next(m for m in engine.monitors if m.name == "lexicon").phrases.matcher
    assert not matcher._scans
    engine.warm_up()
    assert id(vocab) in matcher._scans  # the compiled scan's table exists: no request builds it
    assert _samples(engine) == before  # no step, decode, flag or request counted
    assert not (tmp_path / "audit.jsonl").exists() or (tmp_path / "audit.jsonl").read_text() == ""
    engine.close()


def _probe_after_warm_up(tmp_path, probe: str) -> list[str]:
    """stdout lines of `probe` (Python, with `v` the vocab module) run after a default engine's warm-up, in a fresh
    process: the kernels' compiled specialisations are process-wide, and other tests fill them."""
    script = tmp_path / "probe.py"
    script.write_text(
        "from canvaswatch.server.bottleneck import vocab as v\n"
        "from canvaswatch.server.bottleneck.dense import DenseDecoder\n"
        "from canvaswatch.server.config import default_config\n"
        "from canvaswatch.server.pipeline.engine import Engine\n"
        "vocab = v.load_vocabulary()\n"
        "Engine(default_config(), vocab, dense=DenseDecoder(None, vocab.size)).warm_up()\n"
        + probe
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


def test_warm_up_compiles_the_text_kernel_for_the_final_canvas_too(tmp_path):
    layouts = _probe_after_warm_up(
        tmp_path, "print(sorted(str(signature[0]) for signature in v._gather_pieces.signatures))\n")[-1]
    # the final message's output ids arrive contiguous (finish decodes them): ready before the first request
    assert "array(int64, 1d, C)" in layouts, layouts


def test_warm_up_compiles_the_gil_free_twins_and_the_block_end_kernels(tmp_path):
    # A huge canvas runs the kernels' GIL-free twins (monitors/compiled.py); compiling one inside a request
    # would hold the GIL for ~0.5 s.
    lines = _probe_after_warm_up(
        tmp_path,
        "from canvaswatch.monitors import compiled\n"
        "from canvaswatch.monitors import non_chronological as nc\n"
        "print('judge', len(nc._commit_order.signatures), len(nc._rank_correlation.signatures), 'x')\n"
        "for kernel, twin in compiled._twins:\n"
        "    print(kernel.__name__, len(kernel.signatures), sorted(map(str, kernel.signatures)) == sorted(map(str, twin.signatures)),"
        " twin.targetoptions.get('nogil'))\n",
    )
    rows = {line.split()[0]: line.split()[1:] for line in lines}
    # non_chronological's block-end judgement: the warm-up canvas has an order to judge, so both kernels ran
    # (_commit_order once per layout of the token column: the top-k's strided one, the argmax signal's)
    assert int(rows["judge"][0]) >= 1 and int(rows["judge"][1]) >= 1, rows["judge"]
    for name in ("_check_topk", "_walk_lattice", "_scan", "_smear_pairs", "_smear_phrases", "advance_runs",
                 "_update_commits", "_advance"):
        used, same, nogil = rows[name]
        assert int(used) >= 1 and same == "True" and nogil == "True", (name, rows[name])


def test_serving_flagged_traffic_with_and_without_sampler_signals_compiles_nothing_more(tmp_path):
    # A kernel specialisation first needed by a request is compiled (~0.5 s, a budget strike) or loaded
    # from the disk cache inside that request. The warm-up must cover what real traffic brings: flags
    # (their evidence text decodes column slices) and the signals the transformers and vLLM adapters send.
    from tests.server.test_importers import gallery_run, write

    gallery = write(tmp_path, "gallery.json", [gallery_run(), gallery_run(name="other", seed=3, why="Nothing.")])
    lines = _probe_after_warm_up(
        tmp_path,
        "from pathlib import Path\n"
        "from canvaswatch.client.simulate import labelled_corpus\n"
        "from canvaswatch.monitors.compiled import compiled_signatures\n"
        "from canvaswatch.server.importers import import_capture\n"
        "before = compiled_signatures()\n"
        "engine = Engine(default_config(), vocab, dense=DenseDecoder(None, vocab.size))\n"
        "traces = labelled_corpus(vocab.encode, vocab.size, per_scenario=2)\n"
        f"traces += import_capture('gallery', Path({str(gallery)!r}), encoder=vocab)\n"
        "print('signalled', sum(t.steps[0].HasField('accepted') for t in traces))\n"
        "print('flags', sum(len(engine.check_trace(t).flags) for t in traces))\n"
        "after = compiled_signatures()\n"
        "for name, signatures in after.items():\n"
        "    for signature in set(signatures) - set(before[name]):\n"
        "        print('new', name, signature)\n",
    )
    counts = {line.split()[0]: int(line.split()[1]) for line in lines if line.split()[0] in ("signalled", "flags")}
    assert counts["signalled"] == 2 and counts["flags"] > 0, lines
    assert [line for line in lines if line.startswith("new ")] == []
