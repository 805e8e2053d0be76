"""The `Tensor` wire form: little-endian, row-major bytes with dtype and shape.

One implementation for both sides: the client encodes, the server decodes and
validates. Decoding never trusts the message: shape, dtype and byte count are
checked before any memory is interpreted.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from canvaswatch.v1 import monitor_pb2 as pb


class TensorFormatError(ValueError):
    """A Tensor message that cannot be read as declared; `field` names where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# dtype -> (torch dtype, bytes per element). bfloat16 has no numpy dtype, so
# every decode goes through torch.frombuffer on the raw bytes.
_DTYPES: dict[int, tuple[torch.dtype, int]] = {
    pb.FLOAT32: (torch.float32, 4),
    pb.FLOAT16: (torch.float16, 2),
    pb.BFLOAT16: (torch.bfloat16, 2),
    pb.INT32: (torch.int32, 4),
    pb.INT64: (torch.int64, 8),
    pb.UINT8: (torch.uint8, 1),
}
_TORCH_TO_WIRE = {torch_dtype: wire for wire, (torch_dtype, _) in _DTYPES.items()}


def encode_tensor(tensor: torch.Tensor) -> pb.Tensor:
    """Serialise a tensor (any device) into the wire form."""
    if tensor.dtype not in _TORCH_TO_WIRE:
        raise TypeError(f"dtype {tensor.dtype} has no wire form; use one of {list(_TORCH_TO_WIRE)}")
    cpu = tensor.detach().to("cpu").contiguous()
    # NumPy has no bfloat16: reinterpret its bits as int16 (same width, same byte order).
    array = (cpu.view(torch.int16) if cpu.dtype == torch.bfloat16 else cpu).numpy()
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return pb.Tensor(dtype=_TORCH_TO_WIRE[cpu.dtype], shape=list(cpu.shape), data=data)


def decode_tensor(message: pb.Tensor, field: str, *, ndim: int | None = None) -> torch.Tensor:
    """Read a wire tensor into a CPU torch tensor, validating it.

    Raises TensorFormatError naming `field` for an unknown dtype, a shape of the
    wrong rank, or a byte count that disagrees with shape x element size.
    """
    return _to_tensor(*_checked(message, field, ndim))


def decode_array(message: pb.Tensor, field: str, *, ndim: int | None = None) -> np.ndarray:
    """decode_tensor as a read-only NumPy view of the bytes (no copy), for the top-k hot path.

    BFLOAT16 has no NumPy dtype: it is read through torch and widened to float32.
    """
    checked = _checked(message, field, ndim)
    torch_dtype, _, shape, data = checked
    if torch_dtype is torch.bfloat16:
        return _to_tensor(*checked).float().numpy()
    return np.frombuffer(data, dtype=_NUMPY_DTYPES[torch_dtype]).reshape(shape)


_NUMPY_DTYPES = {torch.float32: np.dtype("<f4"), torch.float16: np.dtype("<f2"),
                 torch.int32: np.dtype("<i4"), torch.int64: np.dtype("<i8"), torch.uint8: np.dtype("u1")}


def _checked(message: pb.Tensor, field: str, ndim: int | None) -> tuple[torch.dtype, int, tuple[int, ...], bytes]:
    if message.dtype not in _DTYPES:
        name = pb.DType.Name(message.dtype) if message.dtype in pb.DType.values() else str(message.dtype)
        raise TensorFormatError(f"{field}.dtype", f"unsupported dtype {name}")
    torch_dtype, itemsize = _DTYPES[message.dtype]
    shape = tuple(message.shape)
    if ndim is not None and len(shape) != ndim:
        raise TensorFormatError(f"{field}.shape", f"expected {ndim} dimensions, got shape {list(shape)}")
    data = message.data  # one read: each access to a bytes field builds a new bytes object
    expected = math.prod(shape) * itemsize
    if len(data) != expected:
        raise TensorFormatError(
            f"{field}.data",
            f"shape {list(shape)} of {pb.DType.Name(message.dtype)} needs {expected} bytes, got {len(data)}",
        )
    return torch_dtype, itemsize, shape, data


def _to_tensor(torch_dtype: torch.dtype, itemsize: int, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=torch_dtype)
    # frombuffer shares the message's immutable bytes; clone so the tensor is writable and owned.
    flat = torch.frombuffer(bytearray(data), dtype=torch_dtype)
    if not _little_endian_host():
        flat = flat.view(torch.uint8).view(-1, itemsize).flip(-1).contiguous().view(torch_dtype).flatten()
    return flat.view(shape)


def _little_endian_host() -> bool:
    return np.little_endian
