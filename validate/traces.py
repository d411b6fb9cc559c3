"""Replay the GPU's own allocator traces (validate.edge.compact_trace rows) through the planner's
caching-allocator model.

Two questions, kept apart: is the allocator model right (feed it the requests the GPU made, in
the order it made them, and compare its segments with the GPU's after every event), and is the
request sequence right (the planner's replay of the same run against this one, both through the
same allocator). Torch-free: the traces are committed JSON.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramplan.runtimes.allocator import EXPANDABLE_RANGE, SMALL_SIZE, CachingAllocator, OutOfMemory

SEGMENT_GROWS = ("segment_alloc", "segment_map")
SEGMENT_SHRINKS = ("segment_free", "segment_unmap")


def read_traces(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def generate_starts(trace: dict[str, Any]) -> int:
    """Index of generate()'s first request: what comes before is the model's build (and the
    empty_cache() after it, which the trace shows as segment frees)."""
    labels = trace["labels"]
    return next(i for i, (action, _, _, label) in enumerate(trace["events"])
                if action == "alloc" and "generation/" in labels[label])


@dataclass
class TraceReplay:
    completed: bool  # every request the GPU served was served (an OOM trace: up to its OOM)
    reserved_agrees: bool  # the model's reserved bytes equal the GPU's after every request
    first_disagreement: int | None  # event index where they first differ
    gpu_out_of_memory: bool  # the trace ends in the GPU's out-of-memory
    model_out_of_memory_at: int | None  # event index where the model ran out of memory
    model_tried_bytes: int | None  # what the model's failing request needed (torch's "Tried to allocate")
    gpu_tried_bytes: int | None  # the GPU's failing request, as the trace records it
    peak_reserved: int
    peak_allocated: int
    # the first request above 1 MiB the model places elsewhere than the GPU did, by offset from the
    # first such request (None: every one where the GPU put it, or a trace without addresses)
    first_misplaced: int | None = None


def replay(trace: dict[str, Any], capacity: int | None = None, follow_gpu_releases: bool = False,
           address_space: int = EXPANDABLE_RANGE) -> TraceReplay:
    """Feed the trace's requests to the allocator model. With a `capacity` the model decides its
    own retries (and `address_space` bounds an expandable segment); `follow_gpu_releases`
    releases the cache wherever the GPU did (for comparing without a capacity). The build's
    empty_cache() is always followed."""
    expandable = trace["case"]["allocator"] == "expandable"
    model = CachingAllocator(capacity=capacity, expandable=expandable, address_space=address_space)
    handles: dict[int, int] = {}
    gpu_reserved = 0
    start = generate_starts(trace)
    first_disagreement = None
    gpu_oom = False
    model_oom_at = model_tried = gpu_tried = None
    addresses = trace.get("addresses")
    first_large: tuple[int, int] | None = None  # (the GPU's address, the model's) of the first large request
    first_misplaced = None
    for index, (action, block, size, _) in enumerate(trace["events"]):
        if action in SEGMENT_GROWS:
            gpu_reserved += size
            continue
        if action in SEGMENT_SHRINKS:
            gpu_reserved -= size
            if follow_gpu_releases or index < start:
                model.release_cached()
            continue
        if action == "oom":
            gpu_oom, gpu_tried = True, size
            try:
                model.malloc(size)
            except OutOfMemory as oom:
                model_oom_at, model_tried = index, oom.tried
            break
        if action == "alloc":
            try:
                handles[block] = model.malloc(size)
            except OutOfMemory as oom:
                model_oom_at, model_tried = index, oom.tried
                break
            if addresses and size > SMALL_SIZE and first_misplaced is None:  # the large pool's
                placed = (addresses[index], model._live[handles[block]].address)  # the model's block, read in place
                first_large = first_large or placed
                if placed[0] - first_large[0] != placed[1] - first_large[1]:
                    first_misplaced = index
        elif action == "free_completed" and block in handles:
            model.free(handles.pop(block))
        if first_disagreement is None and model.reserved != gpu_reserved:
            first_disagreement = index
    return TraceReplay(completed=model_oom_at is None, reserved_agrees=first_disagreement is None,
                       first_disagreement=first_disagreement, gpu_out_of_memory=gpu_oom,
                       model_out_of_memory_at=model_oom_at, model_tried_bytes=model_tried,
                       gpu_tried_bytes=gpu_tried, peak_reserved=model.peak_reserved,
                       peak_allocated=model.peak_allocated, first_misplaced=first_misplaced)
