"""Recorded traces on disk: `.cwtrace` files of length-delimited canvaswatch.v1.Trace messages.

Each record is a varint byte length followed by a serialised Trace, the
framing protobuf uses for delimited streams, so any protobuf runtime reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from canvaswatch.v1 import monitor_pb2 as pb

MAX_RECORD_BYTES = 1 << 31


class TraceFileError(ValueError):
    pass


def write_traces(path: str | Path, traces: Iterable[pb.Trace]) -> int:
    """Write traces to path (replacing it, creating its folder as `inspect -o` does); returns how many were written."""
    count = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        for trace in traces:
            data = trace.SerializeToString()
            out.write(_varint(len(data)))
            out.write(data)
            count += 1
    return count


def read_traces(path: str | Path) -> Iterator[pb.Trace]:
    with open(path, "rb") as source:
        index = 0
        while True:
            length = _read_varint(source, path, index)
            if length is None:
                if index == 0:  # nothing to check, replay or score: say so rather than succeed silently
                    raise TraceFileError(f"{path}: holds no trace (an empty file); `canvaswatch simulate` and "
                                         f"`canvaswatch import` write .cwtrace files")
                return
            # a first record that does not read is most likely not a .cwtrace at all: say how to make one
            hint = (" (is it a .cwtrace? a capture such as ../shared/real/clean.json is converted with "
                    "`canvaswatch import`)") if index == 0 else ""
            if length > MAX_RECORD_BYTES:
                raise TraceFileError(f"{path}: record {index} declares {length} bytes, more than a trace may hold{hint}")
            data = source.read(length)
            if len(data) != length:
                raise TraceFileError(f"{path}: record {index} is truncated ({len(data)} of {length} bytes){hint}")
            trace = pb.Trace()
            try:
                trace.ParseFromString(data)
            except Exception as err:
                raise TraceFileError(f"{path}: record {index} is not a canvaswatch.v1.Trace: {err}{hint}") from None
            yield trace
            index += 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(source: BinaryIO, path: str | Path, index: int) -> int | None:
    value, shift = 0, 0
    while True:
        byte = source.read(1)
        if not byte:
            if shift == 0:
                return None
            raise TraceFileError(f"{path}: record {index} has a truncated length prefix")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise TraceFileError(f"{path}: record {index} has a malformed length prefix")
