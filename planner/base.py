"""The frozen pydantic base of every vramplan type, and the byte helpers they share."""

from __future__ import annotations

from collections.abc import Callable

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


def largest_passing(passes: Callable[[int], bool], low: int, limit: int) -> int:
    """The largest value in [low, limit] for which `passes` holds, found by doubling from `low`
    and then bisecting (0 when `low` itself fails); `passes` must be monotone (true, then false)."""
    if low > limit or not passes(low):
        return 0
    high = low * 2
    while high <= limit and passes(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if passes(middle) else (low, middle)
    return low
