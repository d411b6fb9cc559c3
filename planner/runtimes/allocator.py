"""A simulation of PyTorch's CUDA caching allocator (torch 2.11), with the GPU's capacity.

The rules are those of c10/cuda/CUDACachingAllocator.cpp with the default configuration
(no max_split_size, no garbage collection, one stream), and the reference cases in
tests/test_edge.py were measured on an H200:

* a request is rounded up to 512 bytes; up to 1 MiB it is served from the small pool,
  above from the large pool;
* a free block is looked up best-fit (the smallest free block of the pool that is large
  enough, lowest address first among equals); the driver places each new segment below the
  ones before it, so among free blocks of one size the newest segment's wins (this alone
  decides whether a layer's 16 GiB temporary reuses a free segment or needs a new one: the
  GPU traces in profiles/measurements/h200-edge-traces.jsonl.gz, replayed, show it); once
  segments were released (an out-of-memory retry), a new one takes the highest released address
  range strictly larger than itself, at its top, on a 32 MiB boundary (the traces' addresses of
  Qwen3-Next); segments under 32 MiB lie apart from the large ones;
* a large-pool block is split when more than 1 MiB would be left over, a small-pool block
  when at least 512 bytes would;
* when no free block fits, a new segment is reserved: 2 MiB for small requests, 20 MiB for
  requests under 10 MiB, else the request rounded up to 2 MiB;
* a freed block merges with free neighbours of its segment; nothing is returned to the
  driver while memory lasts.

With a `capacity` (what the driver can still hand to torch: the GPU's memory less what is
outside torch), a new segment that does not fit makes the allocator release every cached
segment that is entirely free, in both pools (`release_cached_blocks`), count a retry and
try again; if that fails too the request raises `OutOfMemory`, which names the request and
how much was reserved but unusable (free pieces of segments something else still holds).
The capacity shrinks as a generation runs (`Capacity.per_decode_step`: with cuDNN's attention,
SDPA's first choice on the H200, the driver holds ~100 KiB more outside torch after every
decode step, a graph per new key length).

`expandable=True` is PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: one segment per pool,
a virtual range of 1 1/8 of the device, mapped in pages (20 MiB large, 2 MiB small); blocks
always split; on the retry every page lying entirely inside a free block is unmapped, leaving
holes. Best fit counts the unmapped range behind a free block as part of it, and walks on to
larger blocks while their "expandable size" is smaller (get_free_block); without a free block,
the first hole by address from which a run of free and unmapped blocks holds the request is
mapped, piece by piece (find_expandable_block, try_allocate_expandable_block); a run whose
pages would pass the range's end starts another segment, right above the last one.

Reserved memory is the sum of the segments (the mapped pages). Fed the requests of the edge
trials as the GPU recorded them (tests/test_edge_traces.py), the simulation reserves what the
GPU reserved after every request and runs out of memory at the request the GPU ran out at,
but for the traces listed there with what they show.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..base import Frozen
from ..catalog import Calibration, Gpu, calibration

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20  # small-pool segment, and small-pool page when expandable
LARGE_BUFFER = 20 << 20  # segment for 1-10 MiB requests, and large-pool page when expandable
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20
VA_ALIGN = 32 << 20  # where the driver starts a segment (the H200 traces' addresses)
# without a device: an expandable segment's virtual range that no run reaches the end of
EXPANDABLE_RANGE = 1 << 50
TOP_OF_ADDRESS_SPACE = 1 << 62
SMALL_SEGMENTS_RANGE = 1 << 50


EDGE_SUFFIX = "-edge"  # calibration.yaml's outside_torch entry for what is unavailable at the edge


class Capacity(Frozen):
    bytes: int  # when the run starts
    why: str
    address_space: int  # the virtual range of an expandable segment on this GPU
    # what each cached decode step adds outside torch (cuDNN attention's graphs: h200-outside-growth.jsonl),
    # so much less the allocator can have from the next step on
    per_decode_step: int = 0

    def after(self, decode_steps: int) -> int:
        """The capacity once `decode_steps` cached decode steps have run."""
        return self.bytes - self.per_decode_step * max(0, decode_steps)


def expandable_range(device_bytes: int) -> int:
    """An expandable segment reserves 1 1/8 of the device's memory as address space
    (ExpandableSegment's address_space_size, in whole large pages); its pages map inside it,
    holes included, and a run whose pages would pass its end starts another segment."""
    return -(-(device_bytes + device_bytes // 8) // LARGE_BUFFER) * LARGE_BUFFER


def decode_growth(fitted: Calibration, kernel: str | None) -> tuple[int, str]:
    """What memory outside torch grows by per cached decode step whose attention runs `kernel`
    (attention.decode_kernel; none for a capacity without a run), and why. A kernel without rows
    is taken to grow nothing (as flash, math and eager attention were measured not to)."""
    entry = fitted.decode_outside_torch_per_step.get(kernel) if kernel else None
    if entry is None or entry.bytes == 0:
        return 0, ""
    return entry.bytes, f", less {entry.bytes / 2**10:.0f} KiB per decode step: {kernel} attention's graphs " \
        f"outside torch (median of {entry.samples} long generations)"


def capacity(gpu: Gpu, fitted: Calibration | None = None, bitsandbytes: bool = False,
             decode_kernel: str | None = None) -> Capacity:
    """The most the caching allocator can reserve on `gpu` when a run starts whose decode steps'
    attention runs `decode_kernel`, and what each of those steps takes from that."""
    fitted = fitted or calibration()
    extra = fitted.bitsandbytes_outside_torch_bytes if bitsandbytes else 0
    per_step, step_why = decode_growth(fitted, decode_kernel)
    edge_key = gpu.outside_torch_key + EDGE_SUFFIX
    by_kernel = fitted.outside_torch.get(f"{edge_key}/{decode_kernel}")  # an eager run loads no SDPA kernels
    edge = by_kernel or fitted.outside_torch.get(edge_key)
    if edge is not None:
        rows = f"{gpu.outside_torch_key} edge rows" + (f" with {decode_kernel} attention" if by_kernel else "")
        why = (f"{gpu.memory_bytes / 2**20:,.0f} MiB less {edge.bytes / 2**20:,.1f} MiB outside torch at the edge "
               f"(median of {edge.samples} {rows}){step_why}")
        return Capacity(bytes=gpu.memory_bytes - edge.bytes - extra, why=why,
                        address_space=expandable_range(gpu.memory_bytes), per_decode_step=per_step)
    # no edge rows for this GPU: its outside-torch figure plus what the measured GPU's edge rows
    # show beyond that same figure (memory the driver does not attribute to the process, its slack)
    measured = next((k.removesuffix(EDGE_SUFFIX) for k in fitted.outside_torch if k.endswith(EDGE_SUFFIX)), None)
    own = fitted.outside_torch.get(gpu.outside_torch_key) or fitted.outside_torch["default"]
    outside = own.bytes
    beyond = 0
    if measured is not None and measured in fitted.outside_torch:
        beyond = fitted.outside_torch[measured + EDGE_SUFFIX].bytes - fitted.outside_torch[measured].bytes
    why = (f"{gpu.memory_bytes / 2**20:,.0f} MiB less {(outside + beyond) / 2**20:,.1f} MiB outside torch: an "
           f"assumption ({gpu.name} has no edge rows; its outside-torch figure plus the "
           f"{beyond / 2**20:.1f} MiB the {measured or 'measured'} edge rows show beyond it){step_why}")
    return Capacity(bytes=gpu.memory_bytes - outside - beyond - extra, why=why,
                    address_space=expandable_range(gpu.memory_bytes), per_decode_step=per_step)


def round_size(size: int) -> int:
    return MIN_BLOCK if size < MIN_BLOCK else -(-size // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class OutOfMemory(Exception):
    """The request the allocator could not serve, even after releasing its cache."""

    def __init__(self, label: str | tuple[str, str], requested: int, tried: int, allocated: int, reserved: int,
                 capacity: int) -> None:
        self.label = ", ".join(label) if isinstance(label, tuple) else label  # (where, what): the tracer's
        self.requested = requested  # the request, rounded
        self.tried = tried  # what torch's message says it tried to allocate (the segment size)
        self.allocated = allocated
        self.reserved = reserved
        self.capacity = capacity
        super().__init__(f"out of memory at {label or 'a request'}: tried to allocate {tried / 2**20:.2f} MiB "
                         f"with {self.reserved_unusable / 2**20:.2f} MiB reserved but unallocated")

    @property
    def reserved_unusable(self) -> int:
        """Reserved but unallocated when the request failed (torch's 'reserved by PyTorch but
        unallocated'): free pieces of segments that live blocks pin."""
        return self.reserved - self.allocated


@dataclass(eq=False, slots=True)
class _Block:
    address: int
    size: int
    segment: int
    small: bool
    free: bool = True
    prev: _Block | None = field(default=None, repr=False)
    next: _Block | None = field(default=None, repr=False)
    mapped: bool = True


def _split(block: _Block, size: int, mapped: bool = True) -> _Block:
    """Cut `block` to `size` bytes; the rest becomes a free block after it in the same segment
    (mapped or not, for an expandable segment's unmapped range). Returns the rest."""
    rest = _Block(block.address + size, block.size - size, block.segment, block.small, True, block, block.next,
                  mapped=mapped)
    if block.next is not None:
        block.next.prev = rest
    block.next = rest
    block.size = size
    return rest


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

    capacity: int | None = None
    expandable: bool = False
    address_space: int = EXPANDABLE_RANGE  # an expandable segment's virtual range
    allocated: int = 0
    reserved: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    least_spare: int | None = None  # under a capacity: the least it ever exceeded the reserve by
    num_alloc_retries: int = 0
    num_ooms: int = 0
    # each pool's free blocks (small: True) as (size, address, block), the std::set's order (no ties)
    _free: dict[bool, list[tuple[int, int, _Block]]] = field(default_factory=lambda: {True: [], False: []})
    _live: dict[int, _Block] = field(default_factory=dict)
    _unmapped: dict[bool, list[_Block]] = field(default_factory=lambda: {True: [], False: []})
    _lowest_address: int = TOP_OF_ADDRESS_SPACE - SMALL_SEGMENTS_RANGE
    _small_address: int = TOP_OF_ADDRESS_SPACE
    _released: list[tuple[int, int]] = field(default_factory=list)  # address ranges released segments left
    _released_by_length: list[tuple[int, int, int]] = field(default_factory=list)  # the same, (length, start, end)
    _expandable_end: dict[bool, int] = field(default_factory=dict)  # each pool's last expandable range's end
    _next_handle: int = 0

    def malloc(self, nbytes: int, label: str | tuple[str, str] = "") -> int:
        size = MIN_BLOCK if nbytes < MIN_BLOCK else -(-nbytes // MIN_BLOCK) * MIN_BLOCK  # round_size
        small = size <= SMALL_SIZE
        if self.expandable:
            block = self._take_free(size, small)
        else:  # _take_free's best fit, inline: most of a replay's time is here
            pool = self._free[small]
            index = bisect.bisect_left(pool, (size, -1))
            block = pool.pop(index)[2] if index < len(pool) else None
        if block is None:
            block = self._grow(size, small)
            if block is None and self.capacity is not None:
                self.num_alloc_retries += 1
                self.release_cached()
                block = self._grow(size, small)
            if block is None:
                self.num_ooms += 1
                raise OutOfMemory(label, size, segment_size(size), self.allocated, self.reserved,
                                  self.capacity or 0)
        remaining = block.size - size
        if remaining >= MIN_BLOCK and (small or self.expandable or remaining > SMALL_SIZE):
            # _split and _add_free, inline
            after = block.next
            rest = _Block(block.address + size, remaining, block.segment, small, True, block, after)
            if after is not None:
                after.prev = rest
            block.next = rest
            block.size = size
            bisect.insort(self._free[small], (remaining, rest.address, rest))
        block.free = False
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        handle = self._next_handle
        self._next_handle += 1
        self._live[handle] = block
        return handle

    def free(self, handle: int) -> None:
        block = self._live.pop(handle)
        self.allocated -= block.size
        block.free = True
        # _merge and _add_free, inline (a replay's other hot path)
        pool = self._free[block.small]
        prev, nxt = block.prev, block.next
        if prev is not None and prev.free and prev.mapped:
            del pool[bisect.bisect_left(pool, (prev.size, prev.address))]
            prev.size += block.size
            prev.next = nxt
            if nxt is not None:
                nxt.prev = prev
            block = prev
        if nxt is not None and nxt.free and nxt.mapped:
            del pool[bisect.bisect_left(pool, (nxt.size, nxt.address))]
            block.size += nxt.size
            block.next = nxt.next
            if nxt.next is not None:
                nxt.next.prev = block
        bisect.insort(pool, (block.size, block.address, block))

    def release_cached(self) -> None:
        """torch.cuda.empty_cache(), and the first step of an out-of-memory retry: return every
        segment that is entirely free (expandable: unmap every page inside a free block)."""
        for small in (False, True):
            for _, _, block in list(self._free[small]):
                if self.expandable:
                    self._unmap(block)
                elif block.prev is None and block.next is None:
                    self._remove_free(block)
                    self.reserved -= block.size
                    if block.size >= VA_ALIGN:
                        self._return_range(block.address, block.size)

    # -- growing: a new segment, or pages mapped at the end of the expandable one -----------------

    def _grow(self, size: int, small: bool) -> _Block | None:
        if not self.expandable:
            seg = segment_size(size)
            if self.capacity is not None and self.reserved + seg > self.capacity:
                return None
            address = self._new_range(seg)
            block = _Block(address, seg, address, small, True)
            self._reserve(seg)
            return block
        return self._map(size, small)

    def _new_range(self, size: int) -> int:
        """The driver's virtual addresses (the H200 traces' addresses): a segment starts on a
        VA_ALIGN boundary as high as it fits. While no segment was ever released each new one lies
        below all others; the ranges released segments leave are reused: the highest such range
        strictly larger than the segment takes it, at its top (a range of exactly the segment's
        size is passed over, as the traces of Qwen3-Next show twice), else it goes below every
        address handed out."""
        if size < VA_ALIGN:  # small segments lie apart, above the large ones, newest lowest
            self._small_address -= size + ROUND_LARGE
            return self._small_address
        longer = self._released_by_length  # bisected: the few ranges strictly longer than the segment
        fitting = [(start, end) for _, start, end in longer[bisect.bisect_right(longer, (size, TOP_OF_ADDRESS_SPACE)):]
                   if (end - size) // VA_ALIGN * VA_ALIGN >= start]  # whose aligned top holds it
        if fitting:
            start, end = max(fitting)  # the highest
            address = (end - size) // VA_ALIGN * VA_ALIGN
            self._drop_range(start, end)
            for rest_start, rest_end in ((start, address), (address + size, end)):  # what is left either side
                if rest_end > rest_start:
                    self._add_range(rest_start, rest_end)
            return address
        self._lowest_address = (self._lowest_address - size) // VA_ALIGN * VA_ALIGN
        return self._lowest_address

    def _return_range(self, address: int, size: int) -> None:
        """A released segment's range, merged with released ranges it touches."""
        start, end = address, address + size
        index = bisect.bisect_left(self._released, (start, end))
        if index < len(self._released) and self._released[index][0] == end:
            end = self._released[index][1]
            self._drop_range(address + size, end)
        if index > 0 and self._released[index - 1][1] == start:
            start = self._released[index - 1][0]
            self._drop_range(start, address)
        self._add_range(start, end)

    def _add_range(self, start: int, end: int) -> None:
        bisect.insort(self._released, (start, end))
        bisect.insort(self._released_by_length, (end - start, start, end))

    def _drop_range(self, start: int, end: int) -> None:
        del self._released[bisect.bisect_left(self._released, (start, end))]
        del self._released_by_length[bisect.bisect_left(self._released_by_length, (end - start, start, end))]

    def _reserve(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self._note_spare()

    def shrink_capacity(self, nbytes: int) -> None:
        """What outside torch grew by is no longer the allocator's to reserve."""
        self.capacity = None if self.capacity is None else self.capacity - nbytes
        self._note_spare()

    def _note_spare(self) -> None:
        if self.capacity is not None:
            spare = self.capacity - self.reserved
            self.least_spare = spare if self.least_spare is None else min(self.least_spare, spare)

    def _page(self, small: bool) -> int:
        return SMALL_BUFFER if small else LARGE_BUFFER

    def _map(self, size: int, small: bool) -> _Block | None:
        """try_allocate_expandable_block. The candidate is the first unmapped range, by address
        (with the free block before it), from which a run of free and unmapped blocks holds
        `size`; without one, a new segment (another virtual range). Its unmapped pieces are
        mapped one at a time, each piece all or nothing: a piece the driver cannot back fails
        the request, and the pieces mapped before it stay mapped (and free)."""
        unmapped = self._unmapped[small]
        candidate = next((c for c in self._candidates(small) if self._run_holds(c, size)), None)
        if candidate is None:  # another range: the first where segments go, each later one right above the
            end = self._expandable_end.get(small)  # last (the addresses of the H100 trace in edge-h100-1)
            address = self._new_range(self.address_space) if end is None else -(-end // VA_ALIGN) * VA_ALIGN
            self._expandable_end[small] = address + self.address_space
            candidate = _Block(address, self.address_space, address, small, True, mapped=False)
            unmapped.append(candidate)
        if not candidate.mapped:
            candidate = self._map_block(candidate, min(candidate.size, size))
            if candidate is None:
                return None
        while candidate.size < size:
            hole = candidate.next  # free -> unmapped -> ...: the merge left an unmapped range next
            candidate = self._map_block(hole, min(size - candidate.size, hole.size))
            if candidate is None:
                return None
        self._remove_free(candidate)
        return candidate

    def _candidates(self, small: bool) -> Iterator[_Block]:
        for hole in sorted(self._unmapped[small], key=lambda b: b.address):
            yield hole.prev if hole.prev is not None and hole.prev.free else hole

    @staticmethod
    def _run_holds(block: _Block | None, size: int) -> bool:
        """has_available_address_space: free blocks, mapped or not, from `block` on hold `size`."""
        have = 0
        while have < size and block is not None and block.free:
            have += block.size
            block = block.next
        return have >= size

    def _map_block(self, hole: _Block, size: int) -> _Block | None:
        """map_block: back the pages of `hole` that cover its first `size` bytes, merge them with
        the free mapped neighbours; the merged free block, or None when the driver is out."""
        need = -(-size // self._page(hole.small)) * self._page(hole.small)
        if self.capacity is not None and self.reserved + need > self.capacity:
            return None
        unmapped = self._unmapped[hole.small]
        unmapped.remove(hole)
        if need < hole.size:  # the rest of the range stays unmapped
            unmapped.append(_split(hole, need, mapped=False))
        hole.mapped = True
        self._reserve(need)
        return self._add_free(self._merge(hole))

    def _unmap(self, block: _Block) -> None:
        """Unmap the pages lying entirely inside a free block; the partial pages at either end
        stay mapped and free."""
        page, base = self._page(block.small), block.segment  # pages count from the segment's start
        start = base + -(-(block.address - base) // page) * page
        end = base + (block.address + block.size - base) // page * page
        if end <= start:
            return
        self._remove_free(block)
        pieces = []
        if start > block.address:
            pieces.append((block.address, start - block.address, True))
        pieces.append((start, end - start, False))
        if block.address + block.size > end:
            pieces.append((end, block.address + block.size - end, True))
        before, after = block.prev, block.next
        blocks = [_Block(a, n, block.segment, block.small, True, mapped=m) for a, n, m in pieces]
        for left, right in itertools.pairwise(blocks):
            left.next, right.prev = right, left
        blocks[0].prev, blocks[-1].next = before, after
        if before is not None:
            before.next = blocks[0]
        if after is not None:
            after.prev = blocks[-1]
        self.reserved -= end - start
        for piece in blocks:
            if piece.mapped:
                self._add_free(piece)
            else:
                hole = piece
                if hole.prev is not None and hole.prev.free and not hole.prev.mapped:
                    self._unmapped[block.small].remove(hole.prev)
                    hole = _absorb(hole.prev, hole)
                if hole.next is not None and hole.next.free and not hole.next.mapped:
                    self._unmapped[block.small].remove(hole.next)
                    hole = _absorb(hole, hole.next)
                self._unmapped[block.small].append(hole)

    # -- free lists, ordered by (size, address) as the allocator's std::set is ------------------

    def _merge(self, block: _Block) -> _Block:
        prev, nxt = block.prev, block.next
        if prev is not None and prev.free and prev.mapped:
            self._remove_free(prev)
            block = _absorb(prev, block)
        if nxt is not None and nxt.free and nxt.mapped:
            self._remove_free(nxt)
            block = _absorb(block, nxt)
        return block

    def _add_free(self, block: _Block) -> _Block:
        bisect.insort(self._free[block.small], (block.size, block.address, block))
        return block

    def _remove_free(self, block: _Block) -> None:
        pool = self._free[block.small]
        del pool[bisect.bisect_left(pool, (block.size, block.address))]

    def _take_free(self, size: int, small: bool) -> _Block | None:
        pool = self._free[small]
        index = bisect.bisect_left(pool, (size, -1))
        if index == len(pool):
            return None
        if self.expandable:
            # get_free_block: for best fit a block counts the unmapped range behind it as its own
            # ("expandable size"); walk on while the next larger block's expandable size is smaller
            def expandable_size(entry: tuple[int, int, _Block]) -> int:
                block = entry[2]
                return block.size + (block.next.size if block.next is not None and not block.next.mapped else 0)

            while index + 1 < len(pool) and expandable_size(pool[index + 1]) < expandable_size(pool[index]):
                index += 1
        return pool.pop(index)[2]
