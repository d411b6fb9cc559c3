"""Architecture + workload -> `Estimate`: every byte of one run, term by term.

peak_allocated_bytes is what torch.cuda.max_memory_allocated() reports for the run: the
weights (as the allocator holds them), the cuBLAS workspace, the inputs, and the runtime
tensors alive at the run's highest point. peak_device_bytes adds what nvidia-smi shows beyond
that: the caching allocator's reserve and the memory outside torch (CUDA context, kernels).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .architecture import Architecture
from .base import Frozen
from .catalog import (
    DTYPE_BYTES,
    Calibration,
    FamilyLayout,
    Gpu,
    Precision,
    RuntimeProfile,
    calibration,
    precision,
    runtime_profile,
)
from .errors import WorkloadError
from .runtime import kv_cache, overhead, sequence
from .runtime.activations import Point, RunSpec, decode_point, prefill_points
from .weights import WeightBreakdown, allocation_sizes, compute_dtype, weight_breakdown

MAX_BATCH = 1 << 16
MAX_TOKENS = 1 << 24


class Workload(Frozen):
    """One run: `generate` (prefill, then new_tokens - 1 decode steps) or one `forward`."""

    batch: int = Field(1, ge=1, le=MAX_BATCH)
    prompt_len: int = Field(512, ge=1, le=MAX_TOKENS)
    new_tokens: int = Field(128, ge=0, le=MAX_TOKENS)
    mode: Literal["generate", "forward"] = "generate"
    # "auto": what transformers picks itself, SDPA where the family has it, else eager
    attn: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    kv_cache_dtype: Literal["auto"] = "auto"


class PrecisionChoice(Frozen):
    name: str = "auto"  # "auto": the config's torch_dtype, bf16 when it has none
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # bitsandbytes' compute dtype
    double_quant: bool = False


class BreakdownTerm(Frozen):
    name: str
    bytes: int
    why: str
    scope: Literal["allocated", "outside"]  # inside max_memory_allocated, or only on the device


class Verdict(Frozen):
    gpu: str
    memory_bytes: int
    fits: bool
    headroom_bytes: int


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
    breakdown: list[BreakdownTerm]
    notes: list[str]
    verdict: Verdict | None = None
    calibrated_with: dict[str, str]


def resolve_precision(arch: Architecture, choice: PrecisionChoice) -> tuple[Precision, str]:
    name = choice.name
    if name == "auto":
        name = arch.config_dtype or "bf16"
    chosen = precision(name)
    return chosen, compute_dtype(chosen, choice.compute_dtype)


def _family_layout(arch: Architecture, profile: RuntimeProfile) -> FamilyLayout:
    layout = profile.families.get(arch.family)
    if layout is None:
        raise WorkloadError(f"No runtime layout for family {arch.family!r} in runtimes.yaml.")
    return layout


def resolve_attention(arch: Architecture, workload: Workload) -> Workload:
    if workload.attn != "auto":
        return workload
    chosen = "sdpa" if "sdpa" in arch.attention_implementations else "eager"
    return workload.model_copy(update={"attn": chosen})


def _check_workload(arch: Architecture, workload: Workload) -> None:
    if workload.attn not in arch.attention_implementations:
        raise WorkloadError(
            f"{arch.model_type} has no {workload.attn} attention in transformers 5.17; "
            f"use --attn {' or '.join(arch.attention_implementations)}.")
    total = workload.prompt_len + workload.new_tokens
    if arch.max_positions is not None and total > arch.max_positions:
        raise WorkloadError(
            f"{arch.model_type} can address {arch.max_positions} positions; prompt + new tokens "
            f"= {total}. Lower --prompt-len or --new-tokens.")


def run_spec(arch: Architecture, workload: Workload, weights: WeightBreakdown, chosen: Precision,
             compute: str) -> RunSpec:
    element = DTYPE_BYTES[compute]
    quant = {"bnb_int8": "int8", "bnb_4bit": "4bit"}.get(chosen.kind, "none")
    return RunSpec(batch=workload.batch, prompt_len=workload.prompt_len,
                   new_tokens=workload.new_tokens, mode=workload.mode, attn=workload.attn,
                   activation_bytes=element, kv_element_bytes=element, quantization=quant,
                   largest_linear_elements=weights.largest_linear_elements)


def candidate_points(arch: Architecture, layout: FamilyLayout, spec: RunSpec) -> list[Point]:
    points = prefill_points(arch, layout, spec)
    decode = decode_point(arch, spec)
    if decode is not None:
        points.append(decode)
    return points


def estimate_architecture(arch: Architecture, model: str, workload: Workload | None = None,
                          choice: PrecisionChoice | None = None, gpu: Gpu | None = None,
                          profile: RuntimeProfile | None = None,
                          fitted: Calibration | None = None) -> Estimate:
    """The pure core: no I/O, everything it needs passed in or read from packaged data."""
    profile = profile or runtime_profile()
    fitted = fitted or calibration()
    workload = workload or Workload()
    choice = choice or PrecisionChoice()
    workload = resolve_attention(arch, workload)
    _check_workload(arch, workload)
    chosen, compute = resolve_precision(arch, choice)
    weights = weight_breakdown(arch, chosen, compute, choice.double_quant)
    layout = _family_layout(arch, profile)
    spec = run_spec(arch, workload, weights, chosen, compute)
    peak = max(candidate_points(arch, layout, spec), key=lambda p: p.total)

    fixed = [
        BreakdownTerm(name="weights", bytes=weights.weight_bytes, scope="allocated",
                      why=f"{weights.parameters:,} parameters at {chosen.name}"
                          + ("" if chosen.kind == "dtype" else f", unconverted tensors in {compute}")),
        BreakdownTerm(name="quantization state", bytes=weights.quant_state_bytes, scope="allocated",
                      why="bitsandbytes scales, absmax and lookup tables"),
        BreakdownTerm(name="buffers", bytes=weights.buffer_bytes, scope="allocated",
                      why="non-persistent buffers the model allocates (rotary frequencies, masks)"),
        BreakdownTerm(name="allocator block rounding", bytes=weights.rounding_bytes, scope="allocated",
                      why="each tensor occupies whole 512-byte blocks"),
        BreakdownTerm(name="cuBLAS workspace", bytes=overhead.cublas_workspace(arch, profile),
                      scope="allocated", why="kept by cuBLAS from the first matmul on"),
        BreakdownTerm(name="inputs", bytes=overhead.input_bytes(workload.batch, workload.prompt_len),
                      scope="allocated", why="input_ids and attention_mask (int64)"),
    ]
    if chosen.kind == "bnb_4bit":
        fixed.append(BreakdownTerm(name="bitsandbytes runtime", scope="allocated",
                                   bytes=profile.constant("bnb_4bit_runtime_bytes"),
                                   why=profile.constants["bnb_4bit_runtime_bytes"].why))
    runtime_terms = [BreakdownTerm(name=t.name, bytes=t.bytes, why=t.why, scope="allocated")
                     for t in peak.terms]
    allocated = sum(t.bytes for t in fixed) + peak.total
    outside, outside_why = overhead.outside_torch(
        fitted, gpu.outside_torch_key if gpu else "H100", chosen.kind.startswith("bnb"))
    simulated = sequence.simulate(arch, layout, spec,
                                  allocation_sizes(arch, chosen, compute, choice.double_quant),
                                  overhead.cublas_workspace(arch, profile))
    reserve = simulated.run_reserve
    device_terms = [
        BreakdownTerm(name="allocator reserve", bytes=reserve, scope="outside",
                      why="segments the caching allocator keeps beyond live tensors, from "
                          "replaying the run's requests through its rules"),
        BreakdownTerm(name="memory outside torch", bytes=outside, scope="outside",
                      why=f"CUDA context and kernels: {outside_why}"),
    ]
    device = allocated + reserve + outside
    cache = max(kv_cache.cache_bytes(arch, workload.batch, workload.prompt_len, 0, spec.kv_element_bytes),
                kv_cache.cache_bytes(arch, workload.batch, workload.prompt_len,
                                     max(workload.new_tokens - 1, 0), spec.kv_element_bytes)
                ) if workload.mode == "generate" else 0
    verdict = None
    if gpu is not None:
        verdict = Verdict(gpu=gpu.name, memory_bytes=gpu.memory_bytes, fits=device <= gpu.memory_bytes,
                          headroom_bytes=gpu.memory_bytes - device)
    notes = list(arch.notes)
    if workload.attn == "flash_attention_2":
        notes.append("flash_attention_2 is modelled like SDPA's flash kernel; it has no measured rows.")
    return Estimate(
        model=model, model_type=arch.model_type, precision=chosen.name,
        double_quant=choice.double_quant and chosen.kind == "bnb_4bit", compute_dtype=compute,
        workload=workload, parameters=weights.parameters, weights_bytes=weights.weight_bytes,
        kv_cache_bytes=cache, peak_phase=peak.phase, peak_kind=peak.kind,
        peak_allocated_bytes=allocated,
        peak_device_bytes=device,
        breakdown=[t for t in (*fixed, *runtime_terms, *device_terms) if t.bytes > 0],
        notes=notes,
        verdict=verdict,
        calibrated_with=profile.measured_with.model_dump(),
    )
