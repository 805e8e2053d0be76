"""The vLLM plugin against real vLLM 0.33.0: its DiffusionSampler and model state, on the CPU, and a real sidecar.

vLLM lives in its own virtual environment outside the checkout (.ci/vllm_venv.sh builds it once per
machine, ~9.4 GB); the canvaswatch wheel built from this checkout is installed into it, and
tests/client/vllm_cpu_engine.py drives vLLM's own classes there. The sidecar runs here, on an
ephemeral loopback port, with a recording monitor, so what it received can be compared with what
the sampler did. Where the venv is absent and cannot be built (no disk), the test skips and says why.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests import recording_monitor
from tests.conftest import install_entry_point, start_sidecar

ROOT = Path(__file__).resolve().parents[2]
VENV_SCRIPT = ROOT / ".ci" / "vllm_venv.sh"
ENGINE = Path(__file__).with_name("vllm_cpu_engine.py")


def _quiet(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "is ignored: it is neither" not in line)[-4000:]


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The vLLM venv's python (built now if absent: ~4-9 min once per machine)."""
    done = subprocess.run(["bash", str(VENV_SCRIPT)], capture_output=True, text=True, timeout=3600)
    if done.returncode == 3:
        reason = "vLLM 0.33.0 venv absent and not buildable here: " + (done.stderr.strip().splitlines() or ["?"])[-1]
        print(f"\n*** SKIPPING the real-vLLM plugin tests: {reason}\n", file=sys.stderr)
        warnings.warn(reason)
        pytest.skip(reason)
    assert done.returncode == 0, _quiet(done.stderr)
    return Path(done.stdout.strip().splitlines()[-1]) / "bin" / "python"


@pytest.fixture(scope="module")
def installed(vllm_python: Path, tmp_path_factory) -> Path:
    """This checkout's wheel, installed into the vLLM venv after proving it changes nothing else there."""
    dist = tmp_path_factory.mktemp("vllm-dist")
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = dist.glob("canvaswatch-*.whl")
    report = dist / "report.json"
    # a wheel left by an earlier run would make the dry run below a no-op
    subprocess.run([vllm_python, "-m", "pip", "uninstall", "-y", "-q", "canvaswatch"], capture_output=True, text=True)
    # With its dependencies resolved against what vLLM installed: only canvaswatch itself would change.
    dry = subprocess.run([vllm_python, "-m", "pip", "install", "--dry-run", "--report", str(report), str(wheel)],
                         capture_output=True, text=True)
    assert dry.returncode == 0, _quiet(dry.stderr)
    would = [(item["metadata"]["name"], item["metadata"]["version"]) for item in json.loads(report.read_text())["install"]]
    assert [name for name, _ in would] == ["canvaswatch"], would
    done = subprocess.run([vllm_python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                          capture_output=True, text=True)
    assert done.returncode == 0, _quiet(done.stderr)
    versions = subprocess.run([vllm_python, "-c", "import torch, transformers, vllm; print(torch.__version__, "
                               "transformers.__version__, vllm.__version__)"], capture_output=True, text=True)
    assert versions.returncode == 0, versions.stderr[-3000:]
    torch_version, transformers_version, vllm_version = versions.stdout.split()[-3:]
    assert torch_version.startswith("2.14.0") and transformers_version == "5.20.2" and vllm_version == "0.33.0"
    return vllm_python


def _accepted_by_rule(entropy: list[float], bound: float) -> list[int]:
    """DiffusionGemma's entropy-bound acceptance, written out: the lowest-entropy positions whose summed entropy,
    less the largest of them, stays <= bound."""
    order = sorted(range(len(entropy)), key=lambda i: entropy[i])
    accepted, total, largest = [0] * len(entropy), 0.0, 0.0
    for i in order:
        total, largest = total + entropy[i], max(largest, entropy[i])
        if total - largest <= bound:
            accepted[i] = 1
    return accepted


def run_engine(python: str, script: Path, running, tmp_path: Path, settings: dict[str, str]) -> dict:
    """Run a CPU vLLM engine script in the vLLM venv against the running sidecar (then stopped) with the
    plugin's CANVASWATCH_VLLM_* `settings`; returns the JSON the script wrote."""
    out = tmp_path / "engine.json"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", str(tmp_path)),
           "CANVASWATCH_VLLM_TARGET": running.target, **settings}
    try:
        done = subprocess.run([python, str(script), str(out)], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=900)
    finally:
        running.thread.stop()
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return json.loads(out.read_text())

@pytest.mark.slow
def test_plugin_streams_every_step_of_concurrent_vllm_requests_to_a_real_sidecar(installed, vocab, tmp_path, monkeypatch):
    install_entry_point(tmp_path, monkeypatch, "recorder", "tests.recording_monitor:Recorder")
    recording_monitor.RECORDED.clear()
    running = start_sidecar(vocab, tmp_path, {"monitors": {"recorder": {}, "lexicon": {}, "self_correction": {}}})
    result = run_engine(installed, ENGINE, running, tmp_path, {
        "CANVASWATCH_VLLM_K": "8", "CANVASWATCH_VLLM_MAX_PENDING": "1000", "CANVASWATCH_VLLM_DROP_POLICY": "oldest"})
    truth, verdicts = result["truth"], result["verdicts"]
    vocab_size, canvas, bound = result["vocab"], result["canvas"], result["entropy_bound"]
    assert result["flushed"] and result["counters"].get("errors", 0) == 0, result["counters"]

    # Five vLLM requests, one preempted and resumed: six streams, every one with its verdict.
    assert set(truth) == {"req-A", "req-B", "req-C", "req-D", "req-E", "req-E#2"}
    assert set(verdicts) == set(truth)
    recorded = [r for r in recording_monitor.RECORDED if "final" not in r]
    finals = {r["request_id"]: r["final"] for r in recording_monitor.RECORDED if "final" in r}
    total_steps = 0
    for stream_id, expected in truth.items():
        steps = [r for r in recorded if r["request_id"] == stream_id]
        # every denoising step, in order, exactly as the sampler ran them
        assert [(r["block"], r["step"]) for r in steps] == [(s["block"], s["step"]) for s in expected["steps"]], stream_id
        assert len(steps) > 0
        total_steps += len(steps)
        verdict = verdicts[stream_id]
        assert verdict["steps_seen"] == len(steps) and verdict["steps_dropped"] == 0, (stream_id, verdict)
        assert verdict["monitor_errors"] == []
        for got, want in zip(steps, expected["steps"]):
            where = (stream_id, want["block"], want["step"])
            assert got["length"] == canvas and got["k"] == 8 and got["vocab"] == vocab_size, where
            assert 0 <= got["max_id"] < vocab_size, where
            # the top-k is of the distribution the sampler used: its top-1 is the sampler's argmax
            assert got["top1"] == want["argmax"] == got["argmax_ids"], where
            assert got["canvas_ids"] == want["canvas"], where
            assert got["kept_max"] <= 1.0 + 1e-3, where
            assert all(math.isclose(a, b, rel_tol=2e-3, abs_tol=2e-3) for a, b in zip(got["entropy"], want["entropy"])), where
            assert math.isclose(got["temperature"], want["temperature"], rel_tol=1e-6), where
            # accepted: the entropy-bound rule on the sampler's own entropies ...
            assert got["accepted"] == _accepted_by_rule(want["entropy"], bound), where
            # ... and what the sampler did with it: accepted positions keep its sample, the rest are re-noised
            assert all(c == s for a, c, s in zip(got["accepted"], want["canvas"], want["sample"]) if a), where
            assert sum(1 for a, c, s in zip(got["accepted"], want["canvas"], want["sample"]) if not a and c == s) <= 1
            if expected["top_k"]:
                # the request's own top_k applies before the sampler's softmax, so at most that many tokens live
                assert got["live"] <= expected["top_k"], where
        # the final message carries every canvas the request committed
        assert finals[stream_id] == expected["committed"], stream_id
    assert [len(truth[s]["committed"]) for s in ("req-A", "req-B", "req-C", "req-D", "req-E", "req-E#2")] == \
        [2 * canvas, 2 * canvas, 0, canvas, 0, canvas]
    assert total_steps == result["counters"]["steps_sent"]
    assert any(r["live"] == 8 for r in recorded if r["request_id"] == "req-A")
    print(f"\nvLLM CPU engine: {result['engine_steps']} engine steps, {total_steps} request steps streamed, "
          f"sampler {result['sampler_seconds']:.2f} s of which the plugin's hooks {result['plugin_engine_seconds']:.2f} s "
          f"(CPU: device work runs inline here), run {result['seconds']:.1f} s")


def test_accepted_rule_written_out_matches_torch_form():
    entropy = torch.tensor([0.3, 0.05, 2.0, 0.1, 0.4])
    ordered, order = torch.sort(entropy)
    mask = (torch.cumsum(ordered, 0) - torch.cummax(ordered, 0).values) <= 0.5
    expected = torch.zeros(5, dtype=torch.bool).scatter(0, order, mask).int().tolist()
    assert _accepted_by_rule(entropy.tolist(), 0.5) == expected == [1, 1, 0, 1, 1]
