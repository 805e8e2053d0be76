"""canvaswatch.client: what a serving stack imports to stream denoising steps to the sidecar.

Light on purpose: grpcio, protobuf and torch only (no server, no monitors).
Names are imported lazily, so `canvaswatch.client.token_bottleneck` works in a
process that never opens a gRPC channel.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AsyncWatchStream": "canvaswatch.client.stream",
    "WatchError": "canvaswatch.client.stream",
    "WatchStream": "canvaswatch.client.stream",
    "Bottleneck": "canvaswatch.client.token_bottleneck",
    "bottleneck": "canvaswatch.client.token_bottleneck",
    "bottleneck_probs": "canvaswatch.client.token_bottleneck",
    "SamplerSignals": "canvaswatch.client.sampler_signals",
    "read_traces": "canvaswatch.client.trace",
    "write_traces": "canvaswatch.client.trace",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'canvaswatch.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
