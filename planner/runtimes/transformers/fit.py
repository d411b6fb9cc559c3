"""Will it run? The run replayed at the GPU's capacity, and the largest batch or prompt that does.

The point model says how much the run allocates; whether it runs is decided by the caching
allocator at the edge of the GPU: a request that finds no cached block and no room for a new
segment makes it release its free segments and retry, and then fail. `replay_at_capacity`
replays the run's requests (sequence.py) through the allocator with the GPU's torch-usable
memory; `largest_fit` bisects the largest batch or prompt length whose replay completes.

The capacity is what the driver can still hand to torch when the run needs it: the GPU's
memory less what is outside torch's reserve by then (the CUDA context, the kernels the first
matmul and attention load, the driver's last 3.125 MiB), from calibration.yaml's `<GPU>-edge`
entry (fitted from the committed edge rows by scripts/calibrate.py; allocator.capacity).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from ...base import Frozen
from ...catalog import Calibration, Gpu, RuntimeProfile, calibration, runtime_profile
from ...errors import WorkloadError
from ...model.spec import Architecture
from ...request import MAX_BATCH, MAX_TOKENS, AllocatorMode, PrecisionChoice, Workload
from ...weights import allocation_sizes, resolve_precision, weight_breakdown
from ..allocator import Capacity, capacity
from . import attention, kernel_limits, overhead, sequence
from .replay_pool import ReplayPool, worker_count
from .sequence import SimulatedRun

FitAxis = Literal["batch", "prompt_len"]


class _Run:
    """What a replay needs that does not depend on the batch or the prompt: computed once."""

    def __init__(self, arch: Architecture, workload: Workload, choice: PrecisionChoice,
                 profile: RuntimeProfile) -> None:
        from .estimate import _family_layout, check_workload, resolve_attention, run_spec

        self.arch = arch
        self.workload = resolve_attention(arch, workload)
        check_workload(arch, self.workload)
        self.chosen, self.compute, self.choice = resolve_precision(arch, choice)
        self.weights = weight_breakdown(arch, self.chosen, self.compute, self.choice.double_quant)
        self.layout = _family_layout(arch, profile)
        self.allocations = allocation_sizes(arch, self.chosen, self.compute, self.choice.double_quant)
        self.workspaces = overhead.cublas_workspaces(arch, profile)
        self._run_spec = run_spec
        self.profile = profile
        self.bitsandbytes = self.chosen.kind.startswith("bnb")

    def capacity(self, gpu: Gpu, fitted: Calibration | None) -> Capacity:
        spec = self._run_spec(self.arch, self.workload, self.weights, self.chosen, self.compute)
        kernel = attention.decode_kernel(self.arch, self.layout, self.workload.attn, spec.activation_bytes, gpu)
        return capacity(gpu, fitted, self.bitsandbytes, kernel)

    def replay(self, workload: Workload, capacity: Capacity | None, allocator: AllocatorMode) -> SimulatedRun:
        spec = self._run_spec(self.arch, workload, self.weights, self.chosen, self.compute)
        return sequence.simulate(self.arch, self.layout, spec, self.allocations, self.workspaces,
                                 capacity=capacity, expandable=allocator == "expandable")

    def runs(self, workload: Workload, capacity: Capacity, allocator: AllocatorMode,
             fitted: Calibration) -> SimulatedRun:
        """The replay at the capacity, held to the verdict's whole rule (estimate._completes): the
        point model's allocated peak and the load's fit too, which is what decides for families whose
        layers the replay does not follow request by request."""
        from .estimate import _completes, candidate_points, fixed_terms, load_peak_bytes, point_model_failure

        result = self.replay(workload, capacity, allocator)
        spec = self._run_spec(self.arch, workload, self.weights, self.chosen, self.compute)
        fixed = fixed_terms(self.arch, self.weights, self.chosen, self.compute, self.profile, workload)
        allocated = sum(t.bytes for t in fixed) + max(candidate_points(self.arch, self.layout, spec),
                                                      key=lambda p: p.total).total
        load_peak = load_peak_bytes(self.arch, self.weights, self.chosen, self.compute, fitted, fixed)
        if result.completed and not _completes(result, capacity.after(workload.decode_forwards), allocated,
                                               load_peak):
            result = result.model_copy(update={"completed": False,
                                               "failed_at": point_model_failure(allocated, load_peak)})
        return result


def replay_at_capacity(arch: Architecture, workload: Workload, choice: PrecisionChoice, gpu: Gpu,
                       allocator: AllocatorMode | None = None, profile: RuntimeProfile | None = None,
                       fitted: Calibration | None = None) -> SimulatedRun:
    run = _Run(arch, workload, choice, profile or runtime_profile())
    cap = run.capacity(gpu, fitted)
    return run.replay(run.workload, cap, allocator or workload.allocator)


class LargestFit(Frozen):
    what: FitAxis
    value: int  # 0: not even 1 fits
    allocator: AllocatorMode
    capacity_bytes: int
    capacity_why: str
    replays: int
    limit: int
    limit_why: str | None = None  # when a kernel's indices set `limit` (kernel_limits.py)
    # the smallest value tried that did not fit, and where its replay failed
    fails_from: int | None = None
    fails_at: str | None = None
    # a larger value whose replay completes too (the edge is not monotone there), when one was seen
    also_runs: int | None = None


def largest_fit_detail(arch: Architecture, model: str, workload: Workload | None, choice: PrecisionChoice | None,
                       gpu: Gpu, what: FitAxis = "batch", allocator: AllocatorMode | None = None,
                       limit: int | None = None, profile: RuntimeProfile | None = None,
                       fitted: Calibration | None = None, workers: int | None = None) -> LargestFit:
    """The largest `what` whose replay at `gpu`'s capacity completes (0 when none does). When its
    replays are slow (long generations), up to `workers` of them run at once (replay_pool; default:
    the CPUs this process may use), with the same answer."""
    if what not in ("batch", "prompt_len"):
        raise WorkloadError(f"the largest fit is over batch or prompt_len, not {what!r}.")
    workload = workload or Workload()
    choice = choice or PrecisionChoice()
    mode = allocator or workload.allocator
    run = _Run(arch, workload, choice, profile or runtime_profile())
    fitted = fitted or calibration()
    cap = run.capacity(gpu, fitted)
    top = limit or (MAX_BATCH if what == "batch" else MAX_TOKENS)
    if what == "prompt_len" and arch.max_positions is not None and arch.encoder is None:
        top = min(top, arch.max_positions - run.workload.new_tokens)
    top, limit_why = _within_kernel_limits(run, what, top)
    if top < 1:  # not even 1 stays within the kernels' indices
        return LargestFit(what=what, value=0, allocator=mode, capacity_bytes=cap.bytes, capacity_why=cap.why,
                          replays=0, limit=0, limit_why=limit_why, fails_from=1, fails_at=limit_why)
    failures: dict[int, SimulatedRun] = {}
    seen: dict[int, bool] = {}

    def replay(value: int) -> SimulatedRun:
        return run.runs(run.workload.model_copy(update={what: value}), cap, mode, fitted)

    def record(value: int, result: SimulatedRun) -> None:
        seen[value] = result.completed
        if not result.completed:
            failures[value] = result

    with ReplayPool(replay, workers or worker_count()) as pool:
        def fits(value: int) -> bool:
            if value not in seen:
                record(value, pool.timed(value))
            return seen[value]

        def prefetch(values: Iterable[int]) -> None:
            """Replay these values at once (in workers) where replays are slow; else leave each to fits()."""
            todo = [v for v in dict.fromkeys(values) if 0 < v <= top and v not in seen]
            if pool.parallel and len(todo) > 1:
                for value, result in zip(todo, pool.map(todo), strict=True):
                    record(value, result)

        low, high = _bracket(fits, _first_guess(run, what, cap.bytes, top), top)
        while high - low > 1:
            prefetch(_bisection_points(low, high, pool.batch_size))
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        edge = low
        if high <= top:
            low, high = _walk_down(fits, prefetch, pool.batch_size, low, high)
    fail = failures.get(high)
    return LargestFit(what=what, value=low, allocator=mode, capacity_bytes=cap.bytes, capacity_why=cap.why,
                      replays=len(seen), limit=top, limit_why=limit_why, fails_from=high if high <= top else None,
                      fails_at=fail.failed_at if fail else None, also_runs=edge if edge > low else None)


def largest_fit(arch: Architecture, model: str, workload: Workload | None, choice: PrecisionChoice | None,
                gpu: Gpu, what: FitAxis = "batch", **options) -> int:
    """The largest batch or prompt length whose replay completes on `gpu` (0: none does)."""
    return largest_fit_detail(arch, model, workload, choice, gpu, what, **options).value


def _within_kernel_limits(run: _Run, what: FitAxis, top: int) -> tuple[int, str | None]:
    """The search's bound lowered to the last value whose forward stays within its kernels'
    indices (kernel_limits.py), and why; else (top, None)."""
    limit = kernel_limits.token_limit(run.arch, run.chosen)

    def within(value: int) -> bool:
        spec = run._run_spec(run.arch, run.workload.model_copy(update={what: value}), run.weights, run.chosen,
                             run.compute)
        return kernel_limits.forward_tokens(spec) <= limit.tokens

    if limit is None or within(top):
        return top, None
    low, high = 0, top  # the forward's tokens grow with the value: bisect the last one within the limit
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if within(middle) else (low, middle)
    return low, limit.why()


def _bracket(fits, guess: int, top: int) -> tuple[int, int]:
    """(a value that fits or 0, a larger one that does not or top + 1), stepping out from the
    guess by a growing step."""
    step = max(1, guess // 16)
    if fits(guess):
        low = guess
        while low < top:
            value = min(top, low + step)
            if not fits(value):
                return low, value
            low, step = value, step * 2
        return top, top + 1
    high = guess
    while high > 1:
        value = max(1, high - step)
        if fits(value):
            return value, high
        high, step = value, step * 2
    return 0, 1


# Below the edge the bisection finds, the allocator's edge is not always monotone: sizes that grow with
# the value cross its 2 MiB rounding at different values, so near capacity some values run and their
# neighbours do not (measured, edge-h200-36: Llama-3.2-3B runs 40085, 40089 and 43257 tokens, not 40086,
# 40128 or 42000; Qwen3-Next fp32 runs batch 244, 246, 266 and 280, not 245, 261 or 285). The answer a
# user can launch with is the last value below the first failure: a failure with this many completing
# values below it, more than the longest run of completing values among the failures of the measured
# edges (16: Llama-3.2-1B eager runs 16880-16895 tokens, between failures from 16869 and from 16896;
# edge-h200-37). Long generations pay for it most: the window's replays each run every decode step.
CLEAR_BELOW_AN_EDGE = 32


# how far below the bisection's edge the search walks value by value before it bisects instead
WALK_LIMIT = 4 * CLEAR_BELOW_AN_EDGE


def _walk_down(fits, prefetch, chunk: int, low: int, high: int) -> tuple[int, int]:
    """From an edge (low fits, high does not) down to (v, v + 1) where v + 1 does not fit and the
    CLEAR_BELOW_AN_EDGE values up to v do: value by value, each failure moving the edge below it
    (the highest such v below the edge), `chunk` values replayed at a time; past WALK_LIMIT values
    below the edge (failures all the way), by bisection on that window (_lowest_edge)."""
    edge, failure, clear, value = low, high, 1, low - 1  # `clear` values up to `edge` fit; `failure` does not
    while clear < CLEAR_BELOW_AN_EDGE and value > 0:
        if low - value > WALK_LIMIT:
            return _lowest_edge(fits, prefetch, chunk, low, high)
        prefetch(range(value, value - chunk, -1))
        if fits(value):
            clear += 1
        else:
            failure, edge, clear = value, value - 1, 0
        value -= 1
    return edge, failure


def _lowest_edge(fits, prefetch, chunk: int, low: int, high: int) -> tuple[int, int]:
    """From an edge (low fits, high does not) down to the lowest: (v, v + 1) where v + 1 does not
    fit and the CLEAR_BELOW_AN_EDGE values up to v do, found by bisecting on that window."""
    def clear(value: int) -> bool:
        window = range(value, max(0, value - CLEAR_BELOW_AN_EDGE), -1)
        for start in range(0, len(window), chunk):
            part = window[start:start + chunk]
            prefetch(part)
            if not all(fits(v) for v in part):
                return False
        return True

    step = CLEAR_BELOW_AN_EDGE
    while low > 0 and not clear(low):
        high, low = low, max(0, low - step)
        step *= 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if clear(middle) else (low, middle)
    return low, high


def _bisection_points(low: int, high: int, count: int) -> list[int]:
    """The next `count` midpoints a bisection of (low, high) may ask for, level by level."""
    points: list[int] = []
    intervals = [(low, high)]
    while intervals and len(points) < count:
        halves = []
        for lo, hi in intervals:
            if hi - lo > 1 and len(points) < count:
                middle = (lo + hi) // 2
                points.append(middle)
                halves += [(lo, middle), (middle, hi)]
        intervals = halves
    return points


def _first_guess(run: _Run, what: FitAxis, capacity: int, top: int) -> int:
    """Where the allocated peak of the point model reaches the capacity, scaling linearly from
    value 1 (a start for the bracket: the allocator's reserve moves the edge below it)."""
    from .estimate import candidate_points

    # the weights and the point model's peak only (not runs()'s whole allocated rule): it is only where
    # the bracket starts, and the replay is not monotone everywhere, so moving the start moves some
    # boundaries (Llama-3.2-3B's prompt-length search moved when this was tried)
    def allocated(value: int) -> int:
        spec = run._run_spec(run.arch, run.workload.model_copy(update={what: value}), run.weights, run.chosen,
                             run.compute)
        peak = max(candidate_points(run.arch, run.layout, spec), key=lambda p: p.total).total
        return run.weights.weight_bytes + peak

    one, two = allocated(1), allocated(2)
    slope = max(1, two - one)
    guess = 1 + (capacity - one) // slope
    return max(1, min(top, int(guess * 0.9)))


__all__ = ["LargestFit", "capacity", "largest_fit", "largest_fit_detail", "replay_at_capacity"]
