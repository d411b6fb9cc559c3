"""The edge of the GPU: the caching allocator under a capacity limit, and the committed
largest-fit searches (profiles/measurements/h200-edge.jsonl) predicted by the replay."""

from __future__ import annotations

import pytest
from vramplan.runtimes.allocator import CachingAllocator, OutOfMemory

MIB = 2**20
GIB = 2**30


def _steps(expandable: bool) -> list[tuple[int, float]]:
    """allocator.md section 8's first table, replayed: (reserved MiB, allocated MiB) after each step."""
    a = CachingAllocator(expandable=expandable)
    seen = []

    def mark():
        seen.append((a.reserved // MIB, round(a.allocated / MIB, 4)))

    a.malloc(1)
    mark()
    a.malloc(3 * MIB // 2)
    mark()
    a.malloc(3 * MIB // 2)
    mark()
    a.malloc(12 * MIB + 1)
    mark()
    a.malloc(39 * MIB // 2)
    mark()
    sixteen = [a.malloc(16 * MIB) for _ in range(8)]
    mark()
    for h in sixteen:
        a.free(h)
    for _ in range(4):
        a.malloc(32 * MIB)
    mark()
    for h in list(a._live):
        a.free(h)
    a.release_cached()
    mark()
    return seen


def test_allocator_reference_steps_default():
    # measured on an H200, torch 2.11 (allocator.md section 8)
    assert _steps(False) == [(2, 0.0005), (22, 1.5005), (22, 3.0005), (22, 15.001), (42, 35.001),
                             (170, 163.001), (298, 163.001), (0, 0.0)]


def test_allocator_reference_steps_expandable():
    assert _steps(True) == [(2, 0.0005), (22, 1.5005), (22, 3.0005), (22, 15.001), (42, 34.501),
                            (182, 162.501), (182, 162.501), (0, 0.0)]


def _fill(expandable: bool) -> tuple[CachingAllocator, list[int], list[int]]:
    """Fill a 142,626 MiB device: 1 GiB tensors, then 20 MiB, 2 MiB and 512 B ones, each until OOM."""
    a = CachingAllocator(capacity=142626 * MIB, expandable=expandable)
    marks, gib = [], []
    for size in (GIB, 20 * MIB, 2 * MIB, 512):
        try:
            while True:
                handle = a.malloc(size)
                if size == GIB:
                    gib.append(handle)
        except OutOfMemory:
            pass
        marks.append(a.reserved // MIB)
    return a, marks, gib


@pytest.mark.parametrize("expandable, marks, after", [
    (False, [142336, 142616, 142616, 142626], 142114),
    (True, [142340, 142620, 142620, 142626], 142146),
])
def test_allocator_fills_the_device_as_measured(expandable, marks, after):
    a, seen, gib = _fill(expandable)
    assert seen == marks
    assert (a.num_alloc_retries, a.num_ooms) == (4, 4)
    # free two 1 GiB tensors that are not adjacent, then ask for 1.5 GiB: only the OOM retry's
    # release (whole segments; expandable: the pages inside free blocks) makes room
    # (expandable: tensor 10 starts on a 20 MiB page boundary and frees 51 whole pages, tensor 21
    # starts 4 MiB into one and frees 50: the 101 pages the GPU unmapped)
    a.free(gib[10])
    a.free(gib[21])
    a.malloc(3 * GIB // 2)
    assert a.reserved // MIB == after
    assert (a.num_alloc_retries, a.num_ooms) == (5, 4)


def test_out_of_memory_names_the_request_and_the_unusable_reserve():
    a = CachingAllocator(capacity=100 * MIB)
    keep = a.malloc(30 * MIB)
    hole = a.malloc(40 * MIB)
    a.malloc(28 * MIB)
    a.free(hole)  # 40 MiB free but pinned in a segment? no: its own segment, released on retry
    a.free(keep)
    with pytest.raises(OutOfMemory) as caught:
        a.malloc(80 * MIB, "layer 3 mlp.up_proj")
    err = caught.value
    assert err.label == "layer 3 mlp.up_proj"
    assert err.tried == 80 * MIB
    assert a.reserved == 28 * MIB  # the two free segments were released before giving up
    assert err.reserved_unusable == 0
    assert (a.num_alloc_retries, a.num_ooms) == (1, 1)


def test_a_partly_used_segment_stays_reserved():
    a = CachingAllocator(capacity=100 * MIB)
    big = a.malloc(60 * MIB)
    a.free(big)
    small = a.malloc(30 * MIB)  # carved out of the 60 MiB segment: 30 MiB free stay pinned
    with pytest.raises(OutOfMemory) as caught:
        a.malloc(50 * MIB)
    assert caught.value.reserved_unusable == 30 * MIB
    a.free(small)
    a.malloc(50 * MIB)  # now the whole segment is free: best fit, no retry
    assert (a.reserved, a.num_alloc_retries) == (60 * MIB, 1)
