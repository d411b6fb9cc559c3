"""vramplan: how much GPU memory a Hugging Face model needs, term by term.

The public API is small:

    from vramplan import estimate, Workload
    est = estimate("llama-3.1-8b", Workload(batch=8, prompt_len=2048, new_tokens=256))
    est.peak_allocated_bytes, est.peak_device_bytes, est.breakdown

`estimate`, `plan`, `plan_maximum`, `memory_series` and `bundled_models` read the model's
config (bundled profile, local path or Hub id) and return frozen result models; every invalid
request is a `VramplanError` whose message is one sentence. Nothing here imports torch or
transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .api_training import estimate_training, plan_training, training_maximum
from .catalog import gpu_catalog
from .catalog import precision as known_precision
from .catalog import precisions as precision_catalog
from .errors import VramplanError, WorkloadError
from .loading import _architecture, _load
from .model import Architecture
from .parallel import shard
from .planning import (
    LayoutMaximum,
    MaximumReport,
    MemorySeries,
    PlanReport,
    SeriesLine,
    SortKey,
    largest_fitting,
    make_plans,
)
from .request import MAX_TOKENS, PlanRequest, PrecisionChoice, Training, Workload
from .result import Estimate, EstimateMaximum, PlanResult
from .result.training import TrainingEstimate, TrainingMaximum, TrainingPlanResult
from .runtimes.transformers.estimate import estimate_architecture, resolve_attention
from .source import ModelEntry, ModelSource, bundled_names, load_bundled, stored_sizes

__all__ = [
    "Architecture",
    "Estimate",
    "MaximumReport",
    "MemorySeries",
    "ModelEntry",
    "ModelSource",
    "PlanReport",
    "PlanRequest",
    "PlanResult",
    "PrecisionChoice",
    "Training",
    "TrainingEstimate",
    "TrainingMaximum",
    "TrainingPlanResult",
    "Workload",
    "bundled_models",
    "estimate",
    "estimate_maximum",
    "estimate_precisions",
    "estimate_training",
    "load_model",
    "memory_series",
    "plan",
    "plan_maximum",
    "plan_training",
    "training_maximum",
]

# `--precision all`: the comparison of the seed post, for any model
ALL_PRECISIONS = (("fp32", False), ("fp16", False), ("bf16", False), ("int8", False), ("nf4", False),
                  ("nf4", True), ("fp4", False))
__version__ = "0.1.0"
DEFAULT_CONTEXT = 4096
MULTI_GPU_CAVEAT = ("tensor/pipeline layouts, NCCL buffers and CUDA-graph constants are not measured (every "
                    "committed row is one process on one GPU): these per-GPU figures are the single-GPU engine "
                    "applied to each rank's share.")
VLLM_ONLY = {"gpu_memory_utilization": "--gpu-memory-utilization", "max_num_batched_tokens": "--max-num-batched-tokens",
             "max_num_seqs": "--max-num-seqs", "vllm_version": "--vllm-version", "entrypoint": "--entrypoint",
             "sampler": "--sampler"}


def load_model(model: str, revision: str | None = None) -> tuple[ModelSource, Architecture]:
    """Resolve a model reference and normalize its config."""
    source, arch, _ = _load(model, revision)
    return source, arch


def _with_note(est: Estimate, note: str | None) -> Estimate:
    return est.model_copy(update={"notes": [note, *est.notes]}) if note else est


def estimate_precisions(model: str, workload: Workload | None = None, gpu: str | None = None, *,
                        compute_dtype: str = "bf16", revision: str | None = None,
                        gpu_catalog_file: Path | None = None) -> list[Estimate]:
    """One estimate per precision vramplan knows (bitsandbytes 4-bit with and without double
    quantization), for the same workload and GPU."""
    source, arch, _ = _load(model, revision)
    catalog = gpu_catalog(gpu_catalog_file) if gpu is not None or gpu_catalog_file is not None else None
    chosen_gpu = catalog.find(gpu) if catalog is not None and gpu is not None else None
    return [estimate_architecture(arch, source.name, workload or Workload(),
                                  PrecisionChoice(name=name, double_quant=dq, compute_dtype=compute_dtype),
                                  chosen_gpu)
            for name, dq in ALL_PRECISIONS]


def estimate(model: str, workload: Workload | None = None, precision: str = "auto",
             gpu: str | None = None, *, double_quant: bool = False, compute_dtype: str = "bf16",
             revision: str | None = None, gpu_catalog_file: Path | None = None) -> Estimate:
    """Estimate one run of `model` (a bundled name, local path or Hub id)."""
    source, arch, note = _load(model, revision)
    choice = PrecisionChoice(name=precision, double_quant=double_quant, compute_dtype=compute_dtype)
    catalog = gpu_catalog(gpu_catalog_file) if gpu is not None or gpu_catalog_file is not None else None
    chosen_gpu = catalog.find(gpu) if catalog is not None and gpu is not None else None
    workload = workload or Workload()
    est = estimate_architecture(arch, source.name, workload, choice, chosen_gpu,
                                stored=stored_sizes(source.stored_tensors))
    beyond = beyond_positions("prompt + new tokens", workload.prompt_len + workload.new_tokens,
                              model_positions(arch, source.config), arch)
    if beyond:
        est = est.model_copy(update={"notes": [*est.notes, beyond + "."]})
    return _with_note(est, note if precision == "auto" else None)


def beyond_positions(what: str, tokens: int, positions: int | None, arch: Architecture) -> str | None:
    """A note when a run's tokens pass the context the model was trained for, where nothing stops
    them (rotary or no positions: a learned table or ALiBi's is a hard limit, refused instead)."""
    if positions is None or arch.max_positions is not None or tokens <= positions:
        return None
    return (f"{what} {tokens} is beyond the model's {positions} positions (max_position_embeddings): "
            "transformers runs it, rotary positions extrapolate, quality may not")


def model_positions(arch: Architecture, config: dict[str, Any]) -> int | None:
    """The positions a model addresses: its learned table's size, else the config's
    max_position_embeddings (or an alias), the context the model was trained for."""
    if arch.max_positions is not None:
        return arch.max_positions
    for part in (config, config.get("text_config")):
        if not isinstance(part, dict):
            continue
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            value = part.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= MAX_TOKENS:
                return value
    return None


def _plan_precisions(arch: Architecture, precision: str) -> tuple[str, ...]:
    if precision == "all":
        raise WorkloadError("--precision all is estimate-only (one row per precision); plan takes one precision, "
                            "auto (the checkpoint's) or any (every precision).")
    if precision == "any":
        return tuple(precision_catalog().precisions)
    if precision == "auto":  # a pre-quantized checkpoint as stored, else the dtype it loads in
        return ("auto",) if arch.quantization is not None else (arch.config_dtype or "bf16",)
    if precision not in precision_catalog().precisions:
        raise WorkloadError(f"Unknown precision {precision[:40]!r}; choose auto, any or one of: "
                            f"{', '.join(precision_catalog().precisions)}.")
    return (precision,)


def _check_positive(**values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise WorkloadError(f"--{name.replace('_', '-')} must be at least 1, not {value}.")


def _check_kv_dtype(runtime: str, kv_cache_dtype: str, chosen: tuple[str, ...]) -> str:
    """--kv-cache-dtype means what it means for estimate; each runtime takes what it can hold."""
    if kv_cache_dtype == "auto":
        return "auto"
    if runtime == "transformers":  # what estimate takes: DynamicCache in the activation dtype, or quantized
        if kv_cache_dtype in ("fp16", "bf16", "fp32") and chosen != (kv_cache_dtype,):
            raise WorkloadError(f"transformers' DynamicCache stores keys in the activation dtype: --kv-cache-dtype "
                                f"{kv_cache_dtype} needs --precision {kv_cache_dtype} (or a quantized cache: "
                                "int8/int4).")
        return kv_cache_dtype
    if kv_cache_dtype.startswith("int"):
        raise WorkloadError(f"--kv-cache-dtype {kv_cache_dtype} is transformers' QuantizedCache; vLLM stores its KV "
                            "cache in the model dtype (auto) or fp8.")
    if kv_cache_dtype == "fp8":
        return "fp8"
    if chosen != (kv_cache_dtype,):
        raise WorkloadError(f"vLLM keeps its KV cache in the model dtype unless it is fp8: --kv-cache-dtype "
                            f"{kv_cache_dtype} needs --precision {kv_cache_dtype}.")
    return "auto"


def _plan_request(arch: Architecture, positions: int | None, *, context: int | None, new_tokens: int,
                  concurrency: int, precision: str, runtime: str, tp: int | None, pp: int | None,
                  gpu_memory_utilization: float | None = None, max_num_batched_tokens: int | None = None,
                  max_num_seqs: int | None = None, kv_cache_dtype: str = "auto", max_gpus: int = 64,
                  multi_node: bool = False, vllm_version: str | None = None, entrypoint: str | None = None,
                  sampler: str | None = None, allocator: str = "default") -> PlanRequest:
    """A PlanRequest, or the one sentence that says why the request is invalid."""
    if runtime not in ("transformers", "vllm"):
        raise WorkloadError(f"Unknown runtime {runtime[:40]!r}; choose transformers or vllm.")
    vllm_given = {"gpu_memory_utilization": gpu_memory_utilization, "max_num_batched_tokens": max_num_batched_tokens,
                  "max_num_seqs": max_num_seqs, "vllm_version": vllm_version, "entrypoint": entrypoint,
                  "sampler": sampler}
    if runtime == "vllm":
        from .runtimes.vllm import release_rules

        release_rules(vllm_version)  # an unknown release is one sentence here
    if runtime == "transformers":
        given = [flag for name, flag in VLLM_ONLY.items() if vllm_given[name] is not None]
        if given:
            raise WorkloadError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} vLLM's; "
                                "add --runtime vllm, or leave it out for --runtime transformers.")
    if context is None:
        context = min(DEFAULT_CONTEXT, positions) if positions else DEFAULT_CONTEXT
    elif new_tokens >= context:  # a default context may clamp the new tokens; a given one is the user's word
        raise WorkloadError(f"--new-tokens {new_tokens} must be less than --context {context} (prompt plus "
                            "generated tokens).")
    _check_positive(context=context, new_tokens=new_tokens, concurrency=concurrency, tp=tp, pp=pp,
                    max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, max_gpus=max_gpus)
    if context < 2 or context > MAX_TOKENS:
        raise WorkloadError(f"--context must be between 2 and {MAX_TOKENS} tokens, not {context}.")
    if arch.max_positions is not None and context > arch.max_positions:
        raise WorkloadError(f"{arch.model_type} can address {arch.max_positions} positions; --context {context} "
                            "exceeds them.")
    if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
        raise WorkloadError(f"--gpu-memory-utilization must be a fraction in (0, 1], not {gpu_memory_utilization}.")
    if concurrency > 1 << 20 or max_gpus > 4096:
        raise WorkloadError("--concurrency is at most 1048576 and --max-gpus at most 4096.")
    for name, size in (("tensor", tp), ("pipeline", pp)):
        if size is not None and size > 4096:
            raise WorkloadError(f"{name} parallel size {size} is beyond any cluster (at most 4096).")
    if tp is not None and tp & (tp - 1):
        raise WorkloadError(f"tensor parallel size {tp} is not a power of two (1, 2, 4, ...), as planned layouts "
                            f"split the {arch.num_heads} attention heads.")
    if tp or pp:  # a fixed layout the model cannot take is an invalid request, not a plan that does not fit
        shard(arch, tp or 1, pp or 1, 0, replicate_kv=runtime == "vllm")
    if (tp or 1) * (pp or 1) > max_gpus:
        raise WorkloadError(f"--tp {tp or 1} x --pp {pp or 1} needs {(tp or 1) * (pp or 1)} GPUs, more than "
                            f"--max-gpus {max_gpus}.")
    chosen = _plan_precisions(arch, precision)
    kv = _check_kv_dtype(runtime, kv_cache_dtype, chosen)
    return PlanRequest(context=context, new_tokens=min(new_tokens, context - 1), concurrency=concurrency,
                       precisions=chosen, runtime=runtime, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                       gpu_memory_utilization=gpu_memory_utilization if runtime == "vllm" else None,
                       max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                       kv_cache_dtype=kv, max_gpus=max_gpus, allow_multi_node=multi_node,
                       vllm_version=vllm_version, entrypoint=entrypoint or "serve", sampler=sampler or "auto",
                       allocator=allocator)


def _plan_notes(arch: Architecture, model: str, request: PlanRequest, report: PlanReport,
                positions: int | None, dtype_note: str | None) -> list[str]:
    """The caveats `estimate` prints for the per-GPU runs, and what the plans rest on."""
    notes = [dtype_note] if dtype_note and request.precisions != tuple(precision_catalog().precisions) else []
    if report.plans and request.runtime == "transformers":
        best = report.plans[0]
        choice = request.precisions[0] if len(request.precisions) == 1 else best.precision
        workload = Workload(batch=best.batch_per_replica or 1, prompt_len=request.context - request.new_tokens,
                            new_tokens=request.new_tokens, attn=request.attn)
        try:
            rank = shard(arch, best.tp, best.pp, 0, replicate_kv=False)
            notes += estimate_architecture(rank, model, workload, PrecisionChoice(name=choice)).notes
        except VramplanError:
            notes += list(arch.notes)
    else:
        notes += list(arch.notes)
    beyond = beyond_positions("--context", request.context, positions, arch)
    if beyond:
        notes.append(beyond + ", and vLLM refuses such a max_model_len unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1.")
    if report.unmeasured_gpus:
        notes.append(f"no committed rows measured {', '.join(report.unmeasured_gpus)} (marked *): their memory "
                     "outside torch is the H100 figure, not a measurement.")
    if request.runtime == "vllm" or any(p.tp * p.pp > 1 for p in report.plans):
        notes.append(MULTI_GPU_CAVEAT if request.runtime == "transformers" else
                     "vLLM's accounting is modelled from its source, not measured here; " + MULTI_GPU_CAVEAT)
    return list(dict.fromkeys(notes))


def plan(model: str, gpus: list[str] | None = None, *, top: int = 10, sort: SortKey = "gpus",
         revision: str | None = None, gpu_catalog_file: Path | None = None, context: int | None = None,
         new_tokens: int = 256, concurrency: int = 1, precision: str = "auto", runtime: str = "transformers",
         tp: int | None = None, pp: int | None = None, gpu_memory_utilization: float | None = None,
         max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None, kv_cache_dtype: str = "auto",
         max_gpus: int = 64, multi_node: bool = False, vllm_version: str | None = None,
         entrypoint: str | None = None, sampler: str | None = None, allocator: str = "default") -> PlanReport:
    """Ranked plans (GPU kind, count, tp x pp layout, replicas) that serve the workload. The
    default context is min(4096, the model's positions)."""
    if not 1 <= top <= 1000:
        raise WorkloadError(f"--top must be between 1 and 1000, not {top}.")
    if sort not in ("gpus", "memory", "cost", "headroom"):
        raise WorkloadError(f"Unknown --sort {sort[:40]!r}; choose gpus, memory, cost or headroom.")
    source, arch, note = _load(model, revision)
    catalog = gpu_catalog(gpu_catalog_file)
    kinds = list({k.name: k for k in (catalog.find(g) for g in gpus)}.values()) if gpus else list(catalog.gpus)
    positions = model_positions(arch, source.config)
    request = _plan_request(arch, positions, context=context, new_tokens=new_tokens, concurrency=concurrency,
                            precision=precision, runtime=runtime, tp=tp, pp=pp,
                            gpu_memory_utilization=gpu_memory_utilization,
                            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                            kv_cache_dtype=kv_cache_dtype, max_gpus=max_gpus, multi_node=multi_node,
                            vllm_version=vllm_version, entrypoint=entrypoint, sampler=sampler, allocator=allocator)
    report = make_plans(arch, source.name, kinds, request, top=top, sort=sort)
    return report.model_copy(update={"notes": _plan_notes(arch, source.name, request, report, positions, note)})


def plan_maximum(model: str, gpu: str, what: str, *, revision: str | None = None,
                 gpu_catalog_file: Path | None = None, **options) -> MaximumReport:
    """For each tp x pp layout of `gpu`: the largest context or concurrency one replica fits,
    context capped at the model's positions (and said so)."""
    from .planning import candidate_layouts

    if what not in ("context", "concurrency"):
        raise WorkloadError(f"--max answers context or concurrency (batch), not {what[:40]!r}.")
    source, arch, note = _load(model, revision)
    kind = gpu_catalog(gpu_catalog_file).find(gpu)
    positions = model_positions(arch, source.config)
    options.setdefault("context", None)
    options.setdefault("new_tokens", 256)
    options.setdefault("concurrency", 1)
    options.setdefault("precision", "auto")
    options.setdefault("runtime", "transformers")
    options.setdefault("tp", None)
    options.setdefault("pp", None)
    request = _plan_request(arch, positions, **options)
    limit = positions if what == "context" else None
    search_limit = limit or (1 << 22 if what == "context" else 1 << 20)
    rows = []
    for tp, pp in sorted(candidate_layouts(arch, kind, request), key=lambda layout: layout[0] * layout[1]):
        best = largest_fitting(arch, source.name, kind, request, what, tp, pp, limit=search_limit)
        rows.append(LayoutMaximum(gpu=kind.name, gpus=tp * pp, tp=tp, pp=pp, value=best,
                                  capped=limit is not None and best == limit))
    notes = [note] if note and options["precision"] == "auto" else []
    if any(r.capped for r in rows):
        notes.append(f"capped at the model's {limit} positions (max_position_embeddings); the GPU would hold more.")
    if not kind.measured:
        notes.append(f"no committed rows measured {kind.name}: its memory outside torch is the H100 figure.")
    notes += _kernel_limit_notes(arch, request.precisions[0])
    return MaximumReport(model=source.name, gpu=kind.name, what=what, request=request, limit=limit, layouts=rows,
                         notes=notes)


def _kernel_limit_notes(arch: Architecture, precision_name: str) -> list[str]:
    """What bounds a plan's values whatever the memory (runtimes/transformers/kernel_limits.py)."""
    from .runtimes.transformers.kernel_limits import token_limit

    known = precision_name in precision_catalog().precisions
    limit = token_limit(arch, known_precision(precision_name)) if known else None
    if limit is None:
        return []
    return [f"{limit.why()}; a tensor-parallel rank's narrower Linears allow more tokens."]


def memory_series(model: str, axis: str = "context", precisions: list[str] | None = None,
                  gpus: list[str] | None = None, *, batch: int = 1, prompt_len: int = 2048, new_tokens: int = 128,
                  attn: str = "auto", upto: int | None = None, revision: str | None = None,
                  gpu_catalog_file: Path | None = None) -> MemorySeries:
    """`plot`'s data: peak device memory per precision against prompt length (or batch)."""
    if axis not in ("context", "batch"):
        raise WorkloadError(f"--x is context or batch, not {axis[:40]!r}.")
    first = 256 if axis == "context" else 1
    if upto is not None and not first <= upto <= (MAX_TOKENS if axis == "context" else 1 << 16):
        raise WorkloadError(f"--upto must be at least {first} (the chart's first {axis} value), not {upto}.")
    source, arch, note = _load(model, revision)
    chosen = list(dict.fromkeys(precisions or [arch.config_dtype or "bf16", "int8", "nf4"]))
    if "all" in chosen:
        chosen = list(dict.fromkeys(name for name, _ in ALL_PRECISIONS))
    for name in chosen:
        if name != "auto":
            known_precision(name)
    catalog = gpu_catalog(gpu_catalog_file)
    kinds = [catalog.find(g) for g in gpus or []]
    base = Workload(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, attn=attn)
    if axis == "batch":
        values = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= (upto or 64)]
    else:
        top = upto or min(model_positions(arch, source.config) or 131072, 131072)
        values = [256 << i for i in range(20) if 256 << i <= top]
    lines = []
    for name in chosen:
        peaks: list[int | None] = []
        refused: list[str | None] = []
        for x in values:
            workload = base.model_copy(update={"prompt_len": x} if axis == "context" else {"batch": x})
            try:
                est = estimate_architecture(arch, source.name, workload, PrecisionChoice(name=name))
                peaks.append(est.peak_device_bytes)
                refused.append(None)
            except VramplanError as exc:
                peaks.append(None)
                refused.append(str(exc))
        lines.append(SeriesLine(precision=name, peak_device_bytes=peaks, refused=refused))
    if not any(y is not None for line in lines for y in line.peak_device_bytes):
        reason = next((r for line in lines for r in line.refused if r), "no point could be estimated.")
        raise WorkloadError(f"Nothing to plot: {reason}")
    notes = [note] if note and arch.config_dtype in chosen else []
    return MemorySeries(model=source.name, axis=axis, values=values, workload=base,
                        attn=resolve_attention(arch, base).attn, lines=lines, gpus=kinds, notes=notes)


def bundled_models() -> list[ModelEntry]:
    """The bundled configs, each sized or with the reason it is refused."""
    entries = []
    for hub_id, alias in bundled_names():
        source = load_bundled(hub_id)
        try:
            arch = _architecture(source)
            entries.append(ModelEntry(hub_id=hub_id, alias=alias, model_type=arch.model_type,
                                      parameters=arch.parameters))
        except VramplanError as exc:
            entries.append(ModelEntry(hub_id=hub_id, alias=alias, refused=str(exc).split(";")[0]))
    return entries


def estimate_maximum(model: str, workload: Workload, what: str, gpu: str, precision: str = "auto", *,
                     double_quant: bool = False, compute_dtype: str = "bf16", revision: str | None = None,
                     gpu_catalog_file: Path | None = None) -> EstimateMaximum:
    """`estimate --max batch|prompt-len`: the largest value whose run, replayed through the caching
    allocator at `gpu`'s capacity (workload.allocator's mode), completes."""
    from .runtimes.transformers.fit import largest_fit_detail

    if what not in ("batch", "prompt_len"):
        raise WorkloadError(f"--max is batch or prompt-len, not {what!r}.")
    source, arch, _ = _load(model, revision)
    kind = gpu_catalog(gpu_catalog_file).find(gpu)
    choice = PrecisionChoice(name=precision, double_quant=double_quant, compute_dtype=compute_dtype)  # type: ignore[arg-type]
    workload = resolve_attention(arch, workload)
    fit = largest_fit_detail(arch, source.name, workload, choice, kind, what)  # type: ignore[arg-type]
    other = "expandable" if workload.allocator == "default" else "default"
    alt = largest_fit_detail(arch, source.name, workload, choice, kind, what, allocator=other)  # type: ignore[arg-type]
    prompt = max(fit.value, alt.value) if what == "prompt_len" else workload.prompt_len
    beyond = beyond_positions("a prompt + new tokens of", prompt + workload.new_tokens,
                              model_positions(arch, source.config), arch)
    return EstimateMaximum(model=source.name, gpu=kind.name, what=what, allocator=workload.allocator,  # type: ignore[arg-type]
                           largest=fit.value, capacity_bytes=fit.capacity_bytes, capacity_why=fit.capacity_why,
                           fails_from=fit.fails_from, fails_at=fit.fails_at, also_runs=fit.also_runs,
                           largest_other_allocator=alt.value,
                           limit=fit.limit, limit_why=fit.limit_why, notes=[beyond + "."] if beyond else [])
