"""Serving with transformers: one `generate()` per replica, split across GPUs.

Tensor parallel runs through torchrun and the model's tp_plan (one process per GPU, NCCL
buffers on each), pipeline parallel through a device_map split (one process, its layers on
each GPU). A replica serves `concurrency` sequences as one batch, or the batch is split across
replicas. Each GPU is estimated with the single-GPU engine on the rank's own architecture
(parallel.shard), so every per-GPU number is the same breakdown `estimate` prints.
"""

from __future__ import annotations

from functools import lru_cache

from ...catalog import Gpu, calibration, gpu_catalog, runtime_profile
from ...errors import WorkloadError
from ...model.spec import Architecture
from ...parallel import shard, stage_layers
from ...request import PlanRequest, PrecisionChoice, RuntimeName, Workload
from ...result import BreakdownTerm, Estimate, GpuShare, Plan
from ..allocator import capacity
from .estimate import estimate_architecture


def _stage_estimate(arch: Architecture, model: str, workload: Workload, choice: PrecisionChoice, gpu: Gpu,
                    tp: int, pp: int, stage: int, replicate_kv: bool) -> Estimate:
    """A rank's estimate on `gpu`. Without its verdict the estimate depends on the GPU only through
    its memory-outside-torch figure and its attention kernel (cached per pair); the verdict needs a
    replay at the GPU's own capacity only when the unconstrained run reserves more than that
    capacity: below it the allocator never reaches the limit, so the run is the same one and fits.
    That verdict is whether it fits only (a plan tries many layouts and batches: no advice on the
    other allocator, which estimate --gpu gives, and no replay where the peaks alone do not fit)."""
    est = _cached_stage_estimate(arch, model, workload, choice, gpu.outside_torch_key, gpu.prefers_cudnn_attention,
                                 tp, pp, stage, replicate_kv)
    # a bound for this shortcut only (the verdict below knows the run's kernel): the capacity at the
    # last decode step if its attention grows what is outside torch as cuDNN's does
    limit = capacity(gpu, calibration(), est.precision in ("int8", "nf4", "fp4"),
                     "cudnn" if gpu.prefers_cudnn_attention else None).after(est.workload.decode_forwards)
    reserved = est.peak_allocated_bytes + next((t.bytes for t in est.breakdown if t.name == "allocator reserve"), 0)
    if reserved <= limit:
        return est
    rank = shard(arch, tp, pp, stage, replicate_kv=replicate_kv)
    return _with_communication(estimate_architecture(rank, model, workload, choice, gpu, verdict="fits"), tp)


@lru_cache(maxsize=4096)
def _cached_stage_estimate(arch: Architecture, model: str, workload: Workload, choice: PrecisionChoice,
                           outside_key: str, cudnn_attention: bool, tp: int, pp: int, stage: int,
                           replicate_kv: bool) -> Estimate:
    representative = next(g for g in gpu_catalog().gpus
                          if g.outside_torch_key == outside_key and g.prefers_cudnn_attention == cudnn_attention)
    rank = shard(arch, tp, pp, stage, replicate_kv=replicate_kv)
    return _with_communication(estimate_architecture(rank, model, workload, choice, representative,
                                                     verdict="none"), tp)


def _with_communication(est: Estimate, tp: int) -> Estimate:
    """A tensor-parallel rank's estimate with NCCL's buffers beside it."""
    if tp == 1:
        return est
    comm = runtime_profile().serving["nccl_buffers_bytes"]
    term = BreakdownTerm(name="communication buffers", bytes=comm.value, why=comm.why, scope="outside",
                         group="device")
    return est.model_copy(update={"breakdown": [*est.breakdown, term],
                                  "peak_device_bytes": est.peak_device_bytes + comm.value})


def transformers_layout(arch: Architecture, model: str, request: PlanRequest, precision: str, gpu: Gpu,
                        tp: int, pp: int, batch: int, judged: bool = True) -> list[Estimate]:
    """One estimate per pipeline stage for a replica running `batch` sequences; without `judged`,
    without their verdicts (no replay at the GPU's capacity)."""
    prompt = request.context - request.new_tokens
    if prompt < 1:
        raise WorkloadError("--context must exceed --new-tokens.")
    workload = Workload(batch=batch, prompt_len=prompt, new_tokens=request.new_tokens, attn=request.attn,
                        allocator=request.allocator, kv_cache_dtype=request.kv_cache_dtype)
    choice = PrecisionChoice(name=precision)
    if not judged:
        return [_cached_stage_estimate(arch, model, workload, choice, gpu.outside_torch_key,
                                       gpu.prefers_cudnn_attention, tp, pp, s, False) for s in range(pp)]
    return [_stage_estimate(arch, model, workload, choice, gpu, tp, pp, s, replicate_kv=False)
            for s in range(pp)]


def _plan_from_stages(stages: list[Estimate], gpu: Gpu, tp: int, pp: int, replicas: int, precision: str,
                      runtime: RuntimeName, arch: Architecture, **extra) -> Plan:
    peak = max(e.peak_device_bytes for e in stages)
    gpus = tp * pp * replicas
    return Plan(
        gpu=gpu.name, gpus=gpus, tp=tp, pp=pp, replicas=replicas, precision=stages[0].precision, runtime=runtime,
        per_gpu_peak_bytes=peak, gpu_memory_bytes=gpu.memory_bytes, headroom_bytes=gpu.memory_bytes - peak,
        cost_per_hour=gpu.price_per_hour_usd * gpus if gpu.price_per_hour_usd else None,
        per_gpu=[GpuShare(stage=i, layers=len(stage_layers(arch.num_layers, pp, i)), peak_bytes=e.peak_device_bytes,
                          breakdown=e.breakdown) for i, e in enumerate(stages)],
        **extra,
    )


def plan_transformers(arch: Architecture, model: str, request: PlanRequest, precision: str, gpu: Gpu,
                      tp: int, pp: int) -> Plan | str:
    """The fewest replicas whose batches fit (more replicas, smaller batches), or why none does."""
    k = request.concurrency

    def attempt(replicas: int) -> Plan | None:
        batch = -(-k // replicas)
        stages = transformers_layout(arch, model, request, precision, gpu, tp, pp, batch)
        # the replay at capacity decides (the caching allocator's own rules); the device total must fit too
        # (and no kernel's indices overflowed: kernel_limits)
        if all(e.kernel_limit is None and (e.verdict is None or e.verdict.fits)
               and e.peak_device_bytes <= gpu.memory_bytes for e in stages):
            return _plan_from_stages(stages, gpu, tp, pp, replicas, precision, "transformers", arch,
                                     batch_per_replica=batch)
        return None

    most = min(k, request.max_gpus // (tp * pp))
    if most < 1:
        return "needs more GPUs than --max-gpus"
    best = attempt(most)
    if best is None:
        return "one sequence does not fit" if -(-k // most) == 1 else "needs more GPUs than --max-gpus"

    def too_few(replicas: int) -> bool:
        """Whether the allocated peak of a stage exceeds the GPU's memory (the capacity is below it):
        no replay, so cheap; those batches cannot fit."""
        stages = transformers_layout(arch, model, request, precision, gpu, tp, pp, -(-k // replicas), judged=False)
        return any(e.peak_allocated_bytes > gpu.memory_bytes for e in stages)

    low, high = 0, most  # attempt(high) fits; find the fewest replicas that do
    while high - low > 1:  # first, without replays: up to where the allocated peak alone fits the memory
        middle = (low + high) // 2
        low, high = (middle, high) if too_few(middle) else (low, middle)
    step = 1  # then up from there by a growing step, where the answer usually is (each step replays)
    while high < most and (found := attempt(high)) is None:
        low, high, step = high, min(most, high + step), step * 2
    if high < most:
        best = found
    while high - low > 1:
        middle = (low + high) // 2
        found = attempt(middle)
        if found is None:
            low = middle
        else:
            high, best = middle, found
    return best



def largest_transformers(arch: Architecture, model: str, request: PlanRequest, precision: str, gpu: Gpu,
                         tp: int, pp: int, what: str, limit: int) -> int:
    """`plan --max` for one replica of tp x pp: the largest concurrency (one batch) or context whose
    replay completes at the GPU's capacity on every stage (fit.largest_fit on each rank), in a
    fraction of a second per layout instead of one estimate per bisection step."""
    from .fit import largest_fit

    new_tokens = request.new_tokens
    workload = Workload(batch=request.concurrency if what == "context" else 1,
                        prompt_len=max(request.context - new_tokens, 1), new_tokens=new_tokens, attn=request.attn,
                        allocator=request.allocator)
    choice = PrecisionChoice(name=precision)
    axis = "batch" if what == "concurrency" else "prompt_len"
    best = limit
    for stage in range(pp):
        rank = shard(arch, tp, pp, stage, replicate_kv=False)
        top = limit if axis == "batch" else limit - new_tokens
        value = largest_fit(rank, model, workload, choice, gpu, axis, limit=max(top, 1))
        best = min(best, value if axis == "batch" else value + new_tokens if value else 0)
    return best
