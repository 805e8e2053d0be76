"""The CPU embedding matrix shared with the workers through /dev/shm instead of copied into each."""

from __future__ import annotations

import os

import structlog
import torch

log = structlog.get_logger(__name__)


def shareable(embeddings: torch.Tensor | None) -> torch.Tensor | None:
    """The matrix moved to shared memory for the workers, or None: each worker then loads its own.

    A GPU matrix is not shared (each worker loads it onto the device). Neither is one that does
    not fit in /dev/shm with room to spare: a container's default 64 MB there would end in SIGBUS
    when the pages are touched, not in an error at start.
    """
    if embeddings is None or embeddings.device.type != "cpu":
        return None
    if not fits_in_shared_memory(embeddings):
        log.warning("embeddings_not_shared", reason="/dev/shm too small; each monitor worker loads its own copy",
                    needed_mb=(embeddings.numel() * embeddings.element_size()) >> 20)
        return None
    return embeddings.share_memory_()


def fits_in_shared_memory(tensor: torch.Tensor) -> bool:
    """Whether /dev/shm has room for `tensor` and a quarter more."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize >= tensor.numel() * tensor.element_size() * 1.25
