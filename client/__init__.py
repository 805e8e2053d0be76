"""canvaswatch.client: what a serving stack imports to stream denoising steps to the sidecar.

Light on purpose: grpcio, protobuf and torch only (no server, no monitors).
"""

from canvaswatch.client.bottleneck import Bottleneck, bottleneck, bottleneck_probs
from canvaswatch.client.stream import AsyncWatchStream, WatchError, WatchStream
from canvaswatch.client.trace import read_traces, write_traces

__all__ = [
    "AsyncWatchStream",
    "Bottleneck",
    "WatchError",
    "WatchStream",
    "bottleneck",
    "bottleneck_probs",
    "read_traces",
    "write_traces",
]
