"""transformers' generate() and forward() on one GPU: Architecture + workload -> `Estimate`.

peak_allocated_bytes is what torch.cuda.max_memory_allocated() reports for the run: the
weights (as the allocator holds them), the cuBLAS workspace, the inputs, and the runtime
tensors alive at the run's highest point. peak_device_bytes adds what nvidia-smi shows beyond
that: the caching allocator's reserve and the memory outside torch (CUDA context, kernels).
"""

from __future__ import annotations

import math
from typing import Literal

from ...catalog import (
    DTYPE_BYTES,
    Calibration,
    FamilyLayout,
    Gpu,
    Precision,
    RuntimeProfile,
    calibration,
    gpu_catalog,
    runtime_profile,
)
from ...errors import UnsupportedModelError, WorkloadError
from ...model.spec import Architecture
from ...request import PrecisionChoice, Workload
from ...result import BreakdownTerm, Estimate, Verdict
from ...weights import WeightBreakdown, allocation_sizes, resolve_precision, weight_breakdown
from ..allocator import capacity, decode_growth
from . import attention, kernel_limits, kv_cache, overhead, sequence
from .activations import Point, RunSpec, decode_point, prefill_points
from .decode_replay import replayed_steps
from .kv_cache import KvFormat


def _checkpoint_notes(arch: Architecture, stored: dict[str, tuple[int, tuple[int, ...]]] | None,
                      weights: WeightBreakdown) -> list[str]:
    """Stored bytes are not memory: name what the checkpoint holds that the model does not load."""
    if not stored:
        return []
    loaded = {n for t in arch.tensors for n in t.names()}
    modules = {n.rsplit(".", 1)[0] for n in loaded}
    extra = sorted(n for n in stored if n not in loaded and n.rsplit(".", 1)[0] not in modules)
    total = sum(nbytes for nbytes, _ in stored.values())
    note = (f"the checkpoint stores {sum(math.prod(s) for _, s in stored.values()):,} elements "
            f"({total / 2**30:.2f} GiB); the loaded model holds {weights.parameters:,} parameters")
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        note += f"; not loaded: {shown}"
    return [note + "."]


def _precision_notes(arch: Architecture, chosen: Precision, choice: PrecisionChoice) -> list[str]:
    scheme = arch.quantization
    if scheme is None:
        return []
    if choice.name != "auto":
        return [f"the config is a pre-quantized {scheme.label} checkpoint; this estimate is for the same "
                f"model at {chosen.name} instead (use --precision auto for the checkpoint as stored)."]
    if scheme.method == "mxfp4":
        return ["mxfp4 weights are dequantized to bf16 by transformers 5.17 unless the `kernels` package, "
                "Triton >= 3.4 and a GPU of compute capability >= 7.5 are present; this estimate is the bf16 case."]
    if chosen.kind == "prequantized":
        return [f"{scheme.label}: weights as the checkpoint stores them; the quantized matmul kernels' "
                "own workspaces are not included (not measured)."]
    return []


def _moe_notes(arch: Architecture, chosen: Precision, peak_kind: str) -> list[str]:
    moe = arch.moe
    if moe is None:
        return []
    notes = []
    if chosen.kind in ("bnb_int8", "bnb_4bit"):
        notes.append("bitsandbytes converts nn.Linear layers only: transformers 5.17 keeps the fused expert "
                     "weights (3-D parameters) in the compute dtype, so most of this model stays unquantized "
                     "(read from integrations/bitsandbytes.py; not measured).")
    if chosen.kind == "prequantized" and chosen.scheme is not None and chosen.scheme.method == "fp8":
        notes.append("fp8 experts as transformers' FP8Experts holds them (float8 weights, fp32 block scales); "
                     "their kernels' workspaces are not measured.")
    if peak_kind == "decode" and not moe.all_experts:
        notes.append("decode runs the experts with batched_mm, which copies each selected expert's weights "
                     f"per token: {moe.top_k} experts x batch on every MoE layer of every step (measured).")
    return notes


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


def check_workload(arch: Architecture, workload: Workload) -> None:
    if workload.attn not in arch.attention_implementations:
        raise WorkloadError(
            f"{arch.model_type} has no {workload.attn} attention in transformers 5.17; "
            f"use --attn {' or '.join(arch.attention_implementations)}.")
    if arch.encoder is not None:
        if workload.mode == "forward":
            raise WorkloadError(f"{arch.model_type}: a single forward() of an encoder-decoder model (decoder over "
                                "the whole prompt) is not modelled yet; estimate generate() instead.")
        if arch.max_positions is not None and max(workload.prompt_len, workload.new_tokens) > arch.max_positions:
            raise WorkloadError(
                f"{arch.model_type} can address {arch.max_positions} positions in its encoder (the prompt) and "
                f"in its decoder (the new tokens); lower --prompt-len or --new-tokens.")
        return
    total = workload.prompt_len + workload.new_tokens
    if arch.max_positions is not None and total > arch.max_positions:
        raise WorkloadError(
            f"{arch.model_type} can address {arch.max_positions} positions; prompt + new tokens "
            f"= {total}. Lower --prompt-len or --new-tokens.")


def run_spec(arch: Architecture, workload: Workload, weights: WeightBreakdown, chosen: Precision,
             compute: str) -> RunSpec:
    element = DTYPE_BYTES[compute]
    quant = {"bnb_int8": "int8", "bnb_4bit": "4bit"}.get(chosen.kind, "none")
    prompt, new_tokens, keeps_cache, reruns = workload.prompt_len, workload.new_tokens, True, 0
    if workload.mode == "generate" and not arch.use_cache:
        # every step re-runs the whole sequence: the last one, prompt + new_tokens - 1 long, is the largest
        prompt, new_tokens, keeps_cache, reruns = prompt + max(new_tokens - 1, 0), 1, False, max(new_tokens - 1, 0)
    return RunSpec(batch=workload.batch, prompt_len=prompt, new_tokens=new_tokens, mode=workload.mode,
                   attn=workload.attn, activation_bytes=element, kv=kv_format(workload, compute),
                   quantization=quant, largest_linear_elements=weights.largest_linear_elements,
                   keeps_cache=keeps_cache,
                   cache_restart_step=kv_cache.restart_step(arch, prompt, new_tokens)
                   if keeps_cache and workload.mode == "generate" else None,
                   reruns=reruns, fp16=compute == "fp16")


def kv_format(workload: Workload, compute: str) -> KvFormat:
    element = DTYPE_BYTES[compute]
    dtype = workload.kv_cache_dtype
    if dtype in ("auto", compute):
        return KvFormat(element_bytes=element)
    if dtype in ("fp16", "bf16", "fp32"):
        raise WorkloadError(f"transformers' DynamicCache stores keys in the activation dtype ({compute}); "
                            f"--kv-cache-dtype {dtype} needs --precision {dtype} (or a quantized cache: int8/int4).")
    if dtype == "fp8":
        return KvFormat(element_bytes=1)
    return KvFormat(kind="quantized", element_bytes=element, nbits=int(dtype.removeprefix("int")))


def candidate_points(arch: Architecture, layout: FamilyLayout, spec: RunSpec) -> list[Point]:
    points = prefill_points(arch, layout, spec)
    decode = decode_point(arch, spec)
    if decode is not None:
        points.append(decode)
    return points


def _completes(run: sequence.SimulatedRun, capacity: int, allocated: int, load_peak: int) -> bool:
    """The replay completed, and the point model's peak and the load fit too (families whose
    layers are not replayed request by request are held by those)."""
    return run.completed and max(allocated, load_peak) <= capacity


def point_model_failure(allocated: int, load_peak: int) -> str:
    """Where a run whose replay completes still does not fit: the load, or the point model's peak."""
    return "the model's load" if load_peak > allocated else "the run's allocated peak (the point model's)"


def _order_notes(arch: Architecture, run: sequence.SimulatedRun) -> list[str]:
    """What the verdict rests on when the layers' request order is not one held to a GPU trace or
    read op by op from the family's code (README, "Will it run?")."""
    if run.layer_order == "coarse":
        return [f"{arch.model_type}'s layers are replayed through the allocator in a coarse request order "
                "(neither traced on a GPU nor read op by op from its code for this attention and precision): "
                "near the capacity the verdict is less certain than for traced families."]
    if run.layer_order == "none":
        return ["this model's layers are not replayed request by request (recurrent scans other than "
                "Mamba's up to 65,536 layer-tokens, Mamba-2's and Qwen3-Next's without bitsandbytes; "
                "encoder-decoder runs other than T5's under SDPA in bf16 or fp32): the verdict holds the "
                "allocated peak to the capacity, without the caching allocator's reserve, which can make it "
                "optimistic near the capacity (Qwen3-Next on an H200, before its replay: said batch 242 fits, "
                "214 ran out of memory, the reserve was 10-16 GiB; Jamba, Granite-4.0-H, Falcon-H1 and Mamba "
                "held to one batch)."]
    return []


# How much of the verdict an estimate on a GPU works out: "advice", the replay in both allocator
# modes (whether expandable segments would make it fit) and where it fails; "fits", whether it fits
# in the requested mode only, without a replay where the peaks alone exceed the capacity (a plan's
# many trial layouts and batches); "none", no verdict (the GPU sets what is outside torch only).
VerdictDepth = Literal["advice", "fits", "none"]


def _verdict(gpu: Gpu, capacity: int, mode: str, runs: dict[str, sequence.SimulatedRun], allocated: int,
             load_peak: int, kernel_limit: str | None = None) -> Verdict:
    if kernel_limit is not None:  # fails whatever the memory: under either allocator
        return Verdict(gpu=gpu.name, memory_bytes=gpu.memory_bytes, fits=False, allocator=mode,
                       headroom_bytes=capacity - max(allocated, load_peak), capacity_bytes=capacity,
                       fits_with_expandable_segments=False, kernel_limit=kernel_limit)
    if mode not in runs:  # not replayed ("fits"): the peaks alone exceed the capacity
        return Verdict(gpu=gpu.name, memory_bytes=gpu.memory_bytes, fits=False, allocator=mode,
                       headroom_bytes=capacity - max(allocated, load_peak), capacity_bytes=capacity,
                       fails_at=point_model_failure(allocated, load_peak))
    run = runs[mode]
    fits = _completes(run, capacity, allocated, load_peak)
    if fits:  # the tightest moment: the replay's (the capacity shrinks as it runs), or the peaks' at its end
        headroom = min(capacity - max(allocated, load_peak),
                       run.least_spare_bytes if run.least_spare_bytes is not None else capacity - run.peak_reserved)
    elif not run.completed:
        headroom = -(run.shortfall_bytes or 0)
    else:
        headroom = capacity - max(allocated, load_peak)
    fails_at = run.failed_at if not run.completed else (None if fits else point_model_failure(allocated, load_peak))
    expandable = runs.get("expandable")
    return Verdict(gpu=gpu.name, memory_bytes=gpu.memory_bytes, fits=fits, headroom_bytes=headroom,
                   allocator=mode, capacity_bytes=capacity, fails_at=fails_at,
                   reserved_unusable_bytes=run.reserved_unusable_bytes, alloc_retries=run.alloc_retries,
                   fits_with_expandable_segments=(_completes(expandable, capacity, allocated, load_peak)
                                                  if expandable is not None else None))


def fixed_terms(arch: Architecture, weights: WeightBreakdown, chosen: Precision, compute: str,
                profile: RuntimeProfile, workload: Workload) -> list[BreakdownTerm]:
    """What is allocated beside the run's activations: the model as loaded, the cuBLAS workspace,
    the inputs."""
    fixed = [
        BreakdownTerm(name="weights", group="model", bytes=weights.weight_bytes, scope="allocated",
                      why=f"{weights.parameters:,} parameters at {chosen.name}"
                          + ("" if chosen.kind == "dtype" else f", unconverted tensors in {compute}")),
        BreakdownTerm(name="quantization state", group="model", bytes=weights.quant_state_bytes, scope="allocated",
                      why="bitsandbytes scales, absmax and lookup tables" if chosen.kind.startswith("bnb")
                      else "the checkpoint's scales and zero points"),
        BreakdownTerm(name="buffers", group="model", bytes=weights.buffer_bytes, scope="allocated",
                      why="non-persistent buffers the model allocates (rotary frequencies, masks)"),
        BreakdownTerm(name="allocator block rounding", group="model", bytes=weights.rounding_bytes, scope="allocated",
                      why="each tensor occupies whole 512-byte blocks"),
        BreakdownTerm(name="cuBLAS workspace", group="model", bytes=overhead.cublas_workspace(arch, profile),
                      scope="allocated", why="kept by cuBLAS from the first matmul on"),
        BreakdownTerm(name="inputs", group="inputs", bytes=overhead.input_bytes(workload.batch, workload.prompt_len),
                      scope="allocated", why="input_ids and attention_mask (int64)"),
    ]
    if chosen.kind == "bnb_4bit":
        fixed.append(BreakdownTerm(name="bitsandbytes runtime", group="model", scope="allocated",
                                   bytes=profile.constant("bnb_4bit_runtime_bytes"),
                                   why=profile.constants["bnb_4bit_runtime_bytes"].why))
    return fixed


def load_peak_bytes(arch: Architecture, weights: WeightBreakdown, chosen: Precision, compute: str,
                    fitted: Calibration, fixed: list[BreakdownTerm]) -> int:
    """The allocated peak while the model loads: the model's terms and the load's largest transient."""
    loaded = sum(t.bytes for t in fixed if t.group == "model")
    transient = 0
    if chosen.kind in ("bnb_int8", "bnb_4bit"):
        ratio = fitted.bnb_load_transient.get("int8" if chosen.kind == "bnb_int8" else "4bit", 0.0)
        transient = int(ratio * weights.largest_linear_elements * DTYPE_BYTES[compute])
    if arch.moe is not None and arch.moe.stored_per_expert and chosen.kind != "prequantized":
        # loading merges the checkpoint's per-expert weights into the fused 3-D parameters: the
        # merged copy of the largest one is transient (measured on bitsandbytes reloads: qwen3-30b-a3b
        # +786/+793 MB with an 805 MB fused gate_up, jamba +3.70 GB with a 3.76 GB one; granite,
        # whose checkpoint stores the experts fused, +21.6 MB)
        largest_expert = max(t.elements_each for t in arch.tensors if t.kind == "expert")
        transient = max(transient, largest_expert * DTYPE_BYTES[compute])
    return loaded + transient


def estimate_architecture(arch: Architecture, model: str, workload: Workload | None = None,
                          choice: PrecisionChoice | None = None, gpu: Gpu | None = None,
                          profile: RuntimeProfile | None = None,
                          fitted: Calibration | None = None,
                          stored: dict[str, tuple[int, tuple[int, ...]]] | None = None,
                          verdict: VerdictDepth = "advice") -> Estimate:
    """The pure core: no I/O, everything it needs passed in or read from packaged data.

    With a `gpu`, the verdict replays the run at its capacity (VerdictDepth says how much of it)."""
    profile = profile or runtime_profile()
    fitted = fitted or calibration()
    workload = workload or Workload()
    choice = choice or PrecisionChoice()
    workload = resolve_attention(arch, workload)
    check_workload(arch, workload)
    chosen, compute, choice = resolve_precision(arch, choice)
    if arch.model_type == "mamba" and chosen.kind in ("bnb_int8", "bnb_4bit"):
        # measured (h100-next2.jsonl): int8 fails in baddbmm on int8 weights, nf4 with a shape
        # error, both in MambaMixer's dt_proj, which reads the weight directly
        raise UnsupportedModelError("transformers 5.17's Mamba mixer cannot run under bitsandbytes (it multiplies "
                                    "dt_proj's weight directly; measured to fail for int8 and nf4).")
    weights = weight_breakdown(arch, chosen, compute, choice.double_quant, stored)
    layout = _family_layout(arch, profile)
    spec = run_spec(arch, workload, weights, chosen, compute)  # pre-quantized: activations like a dtype
    peak = max(candidate_points(arch, layout, spec), key=lambda p: p.total)
    kernel_limit = kernel_limits.passed_limit(arch, chosen, spec)

    fixed = fixed_terms(arch, weights, chosen, compute, profile, workload)
    runtime_terms = [BreakdownTerm(name=t.name, bytes=t.bytes, why=t.why, scope="allocated", group="runtime")
                     for t in peak.terms]
    allocated = sum(t.bytes for t in fixed) + peak.total
    outside, outside_why = overhead.outside_torch(
        fitted, gpu.outside_torch_key if gpu else "H100", chosen.kind.startswith("bnb"))
    allocations = allocation_sizes(arch, chosen, compute, choice.double_quant)
    workspaces = overhead.cublas_workspaces(arch, profile)
    at_capacity: dict[str, sequence.SimulatedRun] = {}
    # the decode steps' attention kernel on this GPU (without one, the H100 the outside figure is of)
    kernel = attention.decode_kernel(arch, layout, workload.attn, spec.activation_bytes,
                                     gpu or gpu_catalog().find("H100"))
    per_step, _ = decode_growth(fitted, kernel)
    limit = None
    load_peak = load_peak_bytes(arch, weights, chosen, compute, fitted, fixed)
    if gpu is not None and verdict != "none":
        # the verdict: the requests replayed at the GPU's capacity, in both allocator modes
        limit = capacity(gpu, fitted, chosen.kind.startswith("bnb"), kernel)
        if verdict == "advice":
            modes = [workload.allocator, *({"default", "expandable"} - {workload.allocator})]
        else:  # "fits": the requested mode, and no replay where the peaks alone exceed the capacity
            modes = [workload.allocator] if max(allocated, load_peak) <= limit.after(workload.decode_forwards) else []
        for mode in modes:
            at_capacity[mode] = sequence.simulate(arch, layout, spec, allocations, workspaces,
                                                  capacity=limit, expandable=mode == "expandable")
    replayed = at_capacity.get(workload.allocator)
    if replayed is None or not replayed.completed:  # the reserve the run would have with room to spare
        replayed = sequence.simulate(arch, layout, spec, allocations, workspaces,
                                     expandable=workload.allocator == "expandable")
    reserve = replayed.run_reserve
    device_terms = [
        BreakdownTerm(name="allocator reserve", group="device", bytes=reserve, scope="outside",
                      why="segments the caching allocator keeps beyond live tensors, from "
                          "replaying the run's requests through its rules"),
        BreakdownTerm(name="memory outside torch", group="device", bytes=outside, scope="outside",
                      why=f"CUDA context and kernels: {outside_why}"),
        BreakdownTerm(name="attention graphs outside torch", group="device", scope="outside",
                      bytes=per_step * workload.decode_forwards,
                      why=f"{per_step / 2**10:.0f} KiB per decode step: {kernel} attention builds and keeps a graph "
                          "for every new key length (median of the H200's long generations)"),
    ]
    device = allocated + reserve + outside + per_step * workload.decode_forwards
    cache = max(kv_cache.cache_bytes(arch, workload.batch, workload.prompt_len, 0, spec.kv),
                kv_cache.held_cache_bytes(arch, workload.batch, workload.prompt_len, spec.cache_growth_steps,
                                          spec.restarted_steps, spec.kv)
                ) if workload.mode == "generate" and spec.keeps_cache else 0
    judged = None
    if gpu is not None and limit is not None:
        judged = _verdict(gpu, limit.after(workload.decode_forwards), workload.allocator, at_capacity, allocated,
                          load_peak, kernel_limit)
    notes = list(arch.notes)
    notes += _precision_notes(arch, chosen, choice)
    notes += _moe_notes(arch, chosen, peak.kind)
    if workload.kv_cache_dtype == "fp8":
        notes.append("fp8 KV cache as serving engines (vLLM, SGLang) store it, one byte per element: "
                     "transformers' own caches cannot hold fp8.")
    elif workload.kv_cache_dtype.startswith("int"):
        notes.append(f"{workload.kv_cache_dtype} KV cache: transformers' QuantizedCache ("
                     + ("HQQ" if workload.kv_cache_dtype == "int8" else "optimum-quanto")
                     + "), residual_length 128 and groups of 64; modelled from cache_utils, not measured.")
    if not spec.keeps_cache and workload.mode == "generate":
        notes.append("the config sets use_cache: false, so generate() keeps no KV cache and re-runs the whole "
                     "sequence at every step (pass use_cache=True to generate() to change that).")
    if spec.restarted_steps:  # run_spec sets a restart for generate() only
        notes.append(f"the sequence passes original_max_position_embeddings ({arch.cache_restart_positions}) at "
                     f"decode step {spec.cache_restart_step}: from there transformers' Phi-3 drops its cache and "
                     "runs each step over a fresh one-token cache (the old one stays allocated until generate() "
                     "returns), so the later tokens attend to themselves only.")
    if workload.attn == "flash_attention_2":
        notes.append("flash_attention_2 is modelled like SDPA's flash kernel; it has no measured rows.")
    if judged is not None:
        notes += _order_notes(arch, replayed)
        decode_steps = workload.new_tokens - 1 if workload.mode == "generate" and spec.keeps_cache else 0
        replayed_decode = replayed_steps(True, decode_steps, arch.num_layers)
        if replayed_decode < decode_steps:
            notes.append(f"the verdict replays the first {replayed_decode} of "
                         f"{decode_steps} decode steps through the allocator; the later ones are held by the point "
                         "model's allocated peak only (their cache updates would keep adding to the reserve).")
    return Estimate(
        model=model, model_type=arch.model_type, precision=chosen.name,
        double_quant=choice.double_quant and chosen.kind == "bnb_4bit", compute_dtype=compute,
        workload=workload, parameters=weights.parameters, weights_bytes=weights.weight_bytes,
        kv_cache_bytes=cache, peak_phase=peak.phase, peak_kind=peak.kind,
        peak_allocated_bytes=allocated,
        peak_device_bytes=device, load_peak_allocated_bytes=load_peak,
        breakdown=[t for t in (*fixed, *runtime_terms, *device_terms) if t.bytes > 0],
        notes=notes + _checkpoint_notes(arch, stored, weights),
        verdict=judged, kernel_limit=kernel_limit,
        checkpoint_bytes=sum(nbytes for nbytes, _ in stored.values()) if stored else None,
        calibrated_with=profile.measured_with.model_dump(),
    )
