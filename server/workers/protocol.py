"""What the front and a monitor worker say to each other: request frames and typed stream statuses.

One pipe each way per worker. The front writes length-prefixed frames (kind, stream id, the
StepState's bytes or nothing); the worker takes every complete frame waiting in its pipe as one
batch (a busy worker gets larger batches, not more wake-ups) and answers with one pickled list
of replies: (stream id, serialised events, StreamStatus or None), ("metrics", snapshot),
("ready", index) or ("failed", reason).
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass

from canvaswatch.server.errors import Refusal, StepError

# front -> worker: body length, kind, stream id, then the body (a StepState's bytes, or nothing)
REQUEST = struct.Struct("<IBQ")
# worker -> front: body length, then a pickled list of replies
REPLY = struct.Struct("<I")


class Frame(enum.IntEnum):
    OPEN = 0
    MESSAGE = 1
    END = 2  # the client half-closed: the worker ends the stream (incomplete unless it saw the final)
    CANCEL = 3  # the front is gone: count the request as cancelled (CUT as body: incomplete), answer nobody
    STOP = 4  # the worker exits


CUT = b"cut"  # a CANCEL's body when the drain deadline ended the stream, not its client


class StreamEnd(enum.Enum):
    FINISHED = "finished"  # the worker has the final message (the verdict came with it); the stream stays open
    OK = "ok"  # input ended after the final message: the stream is over and counted
    REFUSED = "refused"  # a StepError ended it: the call is aborted with the refusal's status
    LOST = "lost"  # the worker died with the stream open (front side only)
    INPUT_ENDED = "input_ended"  # every message answered and the client's input over (front side only)


@dataclass(frozen=True)
class StreamStatus:
    end: StreamEnd
    refusal: Refusal | None = None
    message: str = ""

    @property
    def over(self) -> bool:
        """Whether the worker has let go of the stream (FINISHED keeps it: a late message is still refused)."""
        return self.end is not StreamEnd.FINISHED

    def error(self) -> StepError:
        return StepError(self.message, self.refusal or Refusal.INTERNAL)

    @classmethod
    def refused(cls, err: StepError) -> "StreamStatus":
        return cls(StreamEnd.REFUSED, err.refusal, err.message)


def take_requests(buffer: bytearray) -> list[tuple[int, int, bytes]]:
    """Every complete request frame at the front of `buffer`, removed from it."""
    frames, at = [], 0
    while len(buffer) - at >= REQUEST.size:
        size, kind, stream_id = REQUEST.unpack_from(buffer, at)
        stop = at + REQUEST.size + size
        if stop > len(buffer):
            break
        frames.append((kind, stream_id, bytes(buffer[at + REQUEST.size : stop])))
        at = stop
    del buffer[:at]
    return frames


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
