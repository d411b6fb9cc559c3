"""A simulation of PyTorch's CUDA caching allocator, to predict what it keeps reserved.

The rules are those of c10/cuda/CUDACachingAllocator.cpp with the default configuration
(no expandable segments, no max_split_size):

* a request is rounded up to 512 bytes; up to 1 MiB it is served from the small pool,
  above from the large pool;
* a free block is looked up best-fit (the smallest free block of the pool that is large
  enough, lowest address first among equals); a large-pool block is split when more than
  1 MiB would be left over, a small-pool block when at least 512 bytes would;
* when no free block fits, a new segment is reserved: 2 MiB for small requests, 20 MiB for
  requests under 10 MiB, else the request rounded up to 2 MiB;
* a freed block merges with free neighbours of its segment; nothing is returned to the
  driver while the run lasts.

Reserved memory is the sum of the segments. The simulation is exact for a given sequence of
requests; how well it predicts a real run depends on how well the sequence does.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20
LARGE_BUFFER = 20 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(size: int) -> int:
    return MIN_BLOCK if size < MIN_BLOCK else -(-size // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False)
class _Block:
    address: int
    size: int
    segment: int
    small: bool
    free: bool = True
    prev: _Block | None = None
    next: _Block | None = None


def _absorb(left: _Block, right: _Block) -> _Block:
    """Merge `right` into its neighbour `left` (same segment, adjacent); returns `left`."""
    left.size += right.size
    left.next = right.next
    if right.next is not None:
        right.next.prev = left
    return left


@dataclass
class CachingAllocator:
    """Allocate and free by handle; `reserved` and `peak_reserved` follow the real allocator."""

    allocated: int = 0
    reserved: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    _free: dict[bool, list[tuple[int, int, int]]] = field(default_factory=lambda: {True: [], False: []})
    _by_key: dict[tuple[int, int], _Block] = field(default_factory=dict)
    _live: dict[int, _Block] = field(default_factory=dict)
    _next_address: int = 0
    _next_handle: int = 0

    def malloc(self, nbytes: int) -> int:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._take_free(size, small)
        if block is None:
            block = self._new_segment(segment_size(size), small)
        remaining = block.size - size
        if (small and remaining >= MIN_BLOCK) or (not small and remaining > SMALL_SIZE):
            rest = _Block(block.address + size, remaining, block.segment, small, True, block, block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._add_free(rest)
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        handle = self._next_handle
        self._next_handle += 1
        self._live[handle] = block
        return handle

    def free(self, handle: int) -> None:
        block = self._live.pop(handle)
        self.allocated -= block.size
        block.free = True
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                self._remove_free(neighbour)
        if block.prev is not None and block.prev.free:
            block = _absorb(block.prev, block)
        if block.next is not None and block.next.free:
            block = _absorb(block, block.next)
        self._add_free(block)

    # -- free lists, ordered by (size, address) as the allocator's std::set is ------------------

    def _add_free(self, block: _Block) -> None:
        key = (block.size, block.address)
        bisect.insort(self._free[block.small], (block.size, block.address, id(block)))
        self._by_key[key] = block

    def _remove_free(self, block: _Block) -> None:
        pool = self._free[block.small]
        entry = (block.size, block.address, id(block))
        index = bisect.bisect_left(pool, entry)
        del pool[index]
        del self._by_key[(block.size, block.address)]

    def _take_free(self, size: int, small: bool) -> _Block | None:
        pool = self._free[small]
        index = bisect.bisect_left(pool, (size, -1, -1))
        if index == len(pool):
            return None
        block_size, address, _ = pool.pop(index)
        return self._by_key.pop((block_size, address))

    def _new_segment(self, size: int, small: bool) -> _Block:
        block = _Block(self._next_address, size, self._next_address, small, True)
        self._next_address += size + ROUND_LARGE  # segments never touch
        self.reserved += size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block
