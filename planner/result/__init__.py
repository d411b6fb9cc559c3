"""The typed results every layer shares: breakdown terms, estimates, verdicts and plans.

A breakdown is a list of named terms, each with its bytes and a one-line `why`; the CLI, the
JSON output, validate and the tests all read these same objects.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..base import Frozen
from ..request import AllocatorMode, PlanRequest, RuntimeName, Workload
from .vllm import VllmStartup

# what a term belongs to: the loaded model (after load and warm-up), the run's inputs, the
# runtime's own tensors at the peak, or device memory beyond torch's allocated bytes
TermGroup = Literal["model", "inputs", "runtime", "device"]


class BreakdownTerm(Frozen):
    name: str
    bytes: int
    why: str
    scope: Literal["allocated", "outside"]  # inside max_memory_allocated, or only on the device
    group: TermGroup


class Verdict(Frozen):
    gpu: str
    memory_bytes: int
    fits: bool  # the run's requests, replayed through the caching allocator at capacity, all succeed
    headroom_bytes: int  # capacity less the reserved peak; when it does not fit, minus the failed request's shortfall
    allocator: AllocatorMode = "default"
    # what torch can reserve at the run's last decode step: memory_bytes less what is outside torch by then
    capacity_bytes: int | None = None
    fails_at: str | None = None  # the request that ran out of memory: phase, layer, tensor, size
    reserved_unusable_bytes: int | None = None  # reserved but unallocated when it failed
    fits_with_expandable_segments: bool | None = None  # under PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    alloc_retries: int = 0  # times the replay's allocator released its cache and retried (cudaMalloc retries)
    # why the run fails whatever the memory (a kernel's 32-bit indices it passes: kernel_limits.py)
    kernel_limit: str | None = None


class Estimate(Frozen):
    model: str
    model_type: str
    precision: str
    double_quant: bool = False
    compute_dtype: str
    workload: Workload
    parameters: int
    weights_bytes: int
    kv_cache_bytes: int
    peak_phase: str
    peak_kind: str  # mlp, attention:<kernel>, logits, decode, int8, dequantize
    peak_allocated_bytes: int
    peak_device_bytes: int
    load_peak_allocated_bytes: int  # while from_pretrained loads (and bitsandbytes quantizes) the weights
    breakdown: list[BreakdownTerm]
    notes: list[str]
    verdict: Verdict | None = None
    # why the run fails whatever the memory, GPU or not (a kernel's 32-bit indices it passes)
    kernel_limit: str | None = None
    checkpoint_bytes: int | None = None  # what the checkpoint's safetensors store, when known
    calibrated_with: dict[str, str]


class GpuShare(Frozen):
    """What one GPU of a pipeline stage holds (all tensor-parallel ranks of a stage are alike)."""

    stage: int
    layers: int
    peak_bytes: int
    breakdown: list[BreakdownTerm]
    vllm: VllmStartup | None = None  # the start-up log figures, under the vllm runtime


class Plan(Frozen):
    gpu: str
    gpus: int
    tp: int
    pp: int
    replicas: int
    precision: str
    runtime: RuntimeName
    per_gpu_peak_bytes: int
    gpu_memory_bytes: int
    headroom_bytes: int
    cost_per_hour: float | None = None
    batch_per_replica: int | None = None  # transformers
    kv_cache_bytes: int | None = None  # vllm: the KV pool per GPU
    max_concurrent_sequences: int | None = None  # vllm: per replica, at `context` tokens each
    per_gpu: list[GpuShare]


class PlanResult(Frozen):
    model: str
    request: PlanRequest
    plans: list[Plan]
    considered: int
    rejected: dict[str, int]  # reason -> how many layouts


class EstimateMaximum(Frozen):
    """`estimate --max batch|prompt-len`: the largest value whose run, replayed through the caching
    allocator at the GPU's capacity, completes; and the same under the other allocator mode."""

    model: str
    gpu: str
    what: Literal["batch", "prompt_len"]
    allocator: Literal["default", "expandable"]
    largest: int  # 0: not even 1 fits
    capacity_bytes: int
    capacity_why: str
    fails_from: int | None = None  # the smallest value tried that did not fit
    fails_at: str | None = None  # where its replay ran out of memory
    # a larger value whose replay completes too: near capacity the edge is not monotone
    also_runs: int | None = None
    largest_other_allocator: int | None = None  # under the other mode (expandable when default was asked)
    limit: int  # the model's positions or the search's bound
    limit_why: str | None = None  # when a kernel's indices set `limit` (kernel_limits.py)
    notes: list[str] = Field(default_factory=list)
