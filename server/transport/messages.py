"""Request bytes parsed by us, not by gRPC: bytes that are not the message get INVALID_ARGUMENT.

When a deserializer registered with gRPC raises, grpc.aio logs a traceback and the client sees
UNKNOWN. The deserializers here never raise: bytes that do not parse become an `Undecodable`,
which the method refuses with INVALID_ARGUMENT and a message naming the message and its type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from google.protobuf.message import Message

from canvaswatch.server.errors import StepError, invalid


@dataclass(frozen=True)
class Undecodable:
    """Bytes that did not parse as `type_name`; `size` for the message, never the bytes themselves."""

    type_name: str
    size: int

    def refusal(self, where: str) -> StepError:
        return invalid(f"{where}: {self.size} bytes that are not a valid {self.type_name} (protobuf)")


def tolerant(message_type: type[Message]) -> Callable[[bytes], Any]:
    """A gRPC request deserializer for `message_type` that returns an Undecodable instead of raising."""
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception:  # DecodeError mostly; whatever the parser raises, the bytes are not the message
            return Undecodable(name, len(data))

    return parse
