"""Files for the probe's evaluation: a small embedding matrix, the probe, a config and the labelled traces.

Shared by tests/server/test_evaluate.py and bench/eval_probe.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from canvaswatch.client.simulate_hidden import hidden_corpus, probe_direction, probe_tensors
from canvaswatch.client.trace import write_traces


def write_probe_eval(directory: Path, vocab_size: int, *, hidden_size: int = 32,
                     per_scenario: int = 10) -> tuple[Path, Path]:
    """(config, traces) under `directory`; the matrix is random: the probe reads vectors, not tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    matrix = directory / "matrix"
    matrix.mkdir(exist_ok=True)
    weights = torch.randn(vocab_size, hidden_size, generator=torch.Generator().manual_seed(0)) / hidden_size**0.5
    save_file({"model.embed_tokens.weight": weights}, str(matrix / "model.safetensors"))
    direction = probe_direction(hidden_size)
    save_file(probe_tensors(direction), str(directory / "probe.safetensors"))
    config = directory / "probe.toml"
    config.write_text(f'[dense]\nembeddings = "{matrix}"\n\n[monitors.probe]\npath = "{directory / "probe.safetensors"}"\n')
    traces = directory / "probe.cwtrace"
    write_traces(traces, hidden_corpus(direction, per_scenario=per_scenario))
    return config, traces
