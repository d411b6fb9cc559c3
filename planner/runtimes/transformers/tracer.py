"""The replay's requests on their way to the caching allocator: each labelled with where the run
is (phase, layer) and what the tensor is, so that an out-of-memory names the request."""

from __future__ import annotations

from ..allocator import EXPANDABLE_RANGE, CachingAllocator


class Tracer:
    """Requests go to the allocator labelled with where the run is (phase, layer) and what the
    tensor is, so an out-of-memory can say which request failed; `at_capacity`: under a GPU's."""

    def __init__(self, capacity: int | None = None, expandable: bool = False,
                 address_space: int = EXPANDABLE_RANGE, workspaces: list[int] | None = None,
                 per_decode_step: int = 0) -> None:
        self.alloc = CachingAllocator(capacity=capacity, expandable=expandable, address_space=address_space)
        self.at_capacity = capacity is not None
        self.per_decode_step = per_decode_step
        self.workspaces = list(workspaces or [])
        self.pending_workspaces = list(self.workspaces)
        self.where, self.op = "load", "weights"
        self.layer_order = "coarse"

    def at(self, where: str | None = None, op: str | None = None) -> None:
        if where is not None:
            self.where = where
        if op is not None:
            self.op = op

    def new(self, nbytes: int, name: str | None = None) -> int | None:
        if nbytes <= 0:
            return None
        return self.alloc.malloc(nbytes, (self.where, name or self.op))  # joined only for an out-of-memory

    def drop(self, *handles: int | None) -> None:
        for handle in handles:
            if handle is not None:
                self.alloc.free(handle)

    def temp(self, nbytes: int) -> None:
        self.drop(self.new(nbytes))

    def decode_step(self) -> None:
        """A cached decode forward starts: what the previous one added outside torch (cuDNN
        attention's graph for its key length) is no longer the allocator's to reserve."""
        self.alloc.shrink_capacity(self.per_decode_step)

    def matmul(self, biased: bool = True) -> None:
        """Called once a matmul's output exists: the run's first takes cuBLAS's workspace (kept to
        the end of the process), and the first with a bias cuBLASLt's (cublas_workspaces: the
        second) after it; without `biased`, a matmul known to have none (the rotary tables')."""
        while self.pending_workspaces and (biased or len(self.pending_workspaces) == len(self.workspaces)):
            self.new(self.pending_workspaces.pop(0), "cuBLAS workspace")
