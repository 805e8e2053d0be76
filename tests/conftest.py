"""Shared fixtures: the real Gemma vocabulary, a real sidecar on an ephemeral loopback port, trace builders."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from canvaswatch.client.stream import channel_options
from canvaswatch.client.tensors import encode_tensor
from canvaswatch.server.app import SidecarThread
from canvaswatch.server.config import parse_config
from canvaswatch.server.vocab import TokenizerVocabulary, load_vocabulary
from canvaswatch.v1 import monitor_pb2 as pb


@pytest.fixture(scope="session")
def vocab() -> TokenizerVocabulary:
    """The real default vocabulary (Gemma 3, 262,144 tokens); converted once per machine, then ~1.5 s."""
    return load_vocabulary()


@dataclass
class RunningSidecar:
    thread: SidecarThread
    audit_path: Path

    @property
    def target(self) -> str:
        return self.thread.target

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.thread.sidecar.metrics_port}/metrics"

    def metrics_text(self) -> str:
        return urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target, options=channel_options())


def start_sidecar(vocab: TokenizerVocabulary, tmp_path: Path, extra: dict | None = None) -> RunningSidecar:
    audit = tmp_path / "audit.jsonl"
    raw = {
        "server": {"grpc_port": 0, "metrics_port": 0, "max_message_bytes": 8 * 1024 * 1024},
        "logging": {"audit_log": str(audit), "log_content": True},
    }
    for section, table in (extra or {}).items():
        raw.setdefault(section, {}).update(table)
    return RunningSidecar(SidecarThread(parse_config(raw), vocab=vocab).start(), audit)


@pytest.fixture
def sidecar(vocab: TokenizerVocabulary, tmp_path: Path):
    running = start_sidecar(vocab, tmp_path)
    yield running
    running.thread.stop()


def install_entry_point(directory: Path, monkeypatch: pytest.MonkeyPatch, name: str, target: str) -> None:
    """Make `target` discoverable as a canvaswatch.monitors entry point, as an installed package would."""
    dist = directory / f"cw_entry_{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: cw-entry-{name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[canvaswatch.monitors]\n{name} = {target}\n")
    monkeypatch.syspath_prepend(str(directory))


def topk_step(ids: torch.Tensor, probs: torch.Tensor, block: int = 0, step: int = 0,
              info: pb.RequestInfo | None = None) -> pb.StepState:
    message = pb.StepState(block=block, step=step, topk=pb.TopK(ids=encode_tensor(ids.to(torch.int32)),
                                                                 probs=encode_tensor(probs.float())))
    if info is not None:
        message.info.CopyFrom(info)
    return message


def info_for(request_id: str, canvas_length: int, model: str = "test-model") -> pb.RequestInfo:
    return pb.RequestInfo(request_id=request_id, model=model, canvas_length=canvas_length)
