"""The frozen pydantic base of every vramplan type, and the byte helpers they share."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

GIB = 2**30

# The CUDA caching allocator hands out blocks in multiples of 512 bytes; what
# `torch.cuda.memory_allocated()` counts is the rounded size, so every tensor we predict is
# rounded the same way (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize).
ALLOCATOR_BLOCK_BYTES = 512


class Frozen(BaseModel):
    """Immutable, strict: our own types reject unknown fields and never change after creation."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def block_bytes(nbytes: int) -> int:
    """What the caching allocator holds for a tensor of `nbytes` (a zero-size tensor holds 0)."""
    if nbytes <= 0:
        return 0
    return -(-nbytes // ALLOCATOR_BLOCK_BYTES) * ALLOCATOR_BLOCK_BYTES


def gib(nbytes: int) -> float:
    return nbytes / GIB
