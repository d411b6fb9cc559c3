"""vramplan: how much GPU memory a Hugging Face model needs, term by term.

The public API is small:

    from vramplan import estimate, Workload
    est = estimate("llama-3.1-8b", Workload(batch=8, prompt_len=2048, new_tokens=256))
    est.peak_allocated_bytes, est.peak_device_bytes, est.breakdown

`estimate` reads the model's config (bundled profile, local path or Hub id) and returns a
frozen `Estimate`; nothing here imports torch or transformers.
"""

from __future__ import annotations

from pathlib import Path

from .catalog import gpu_catalog
from .model import Architecture, architecture_from_config
from .request import PlanRequest, PrecisionChoice, Workload
from .result import Estimate, PlanResult
from .runtimes.transformers.estimate import estimate_architecture
from .source import ModelSource, resolve, stored_sizes

__all__ = ["Architecture", "Estimate", "ModelSource", "PlanRequest", "PlanResult", "PrecisionChoice", "Workload",
           "estimate", "estimate_precisions", "load_model", "plan", "plan_maximum"]

# `--precision all`: the comparison of the seed post, for any model
ALL_PRECISIONS = (("fp32", False), ("fp16", False), ("bf16", False), ("int8", False), ("nf4", False),
                  ("nf4", True), ("fp4", False))
__version__ = "0.1.0"


def load_model(model: str, revision: str | None = None) -> tuple[ModelSource, Architecture]:
    """Resolve a model reference and normalize its config."""
    source = resolve(model, revision)
    return source, architecture_from_config(source.config, source.name)


def estimate_precisions(model: str, workload: Workload | None = None, gpu: str | None = None, *,
                        compute_dtype: str = "bf16", revision: str | None = None,
                        gpu_catalog_file: Path | None = None) -> list[Estimate]:
    """One estimate per precision vramplan knows (bitsandbytes 4-bit with and without double
    quantization), for the same workload and GPU."""
    source, arch = load_model(model, revision)
    chosen_gpu = gpu_catalog(gpu_catalog_file).find(gpu) if gpu else None
    return [estimate_architecture(arch, source.name, workload or Workload(),
                                  PrecisionChoice(name=name, double_quant=dq, compute_dtype=compute_dtype),
                                  chosen_gpu)
            for name, dq in ALL_PRECISIONS]


def estimate(model: str, workload: Workload | None = None, precision: str = "auto",
             gpu: str | None = None, *, double_quant: bool = False, compute_dtype: str = "bf16",
             revision: str | None = None, gpu_catalog_file: Path | None = None) -> Estimate:
    """Estimate one run of `model` (a bundled name, local path or Hub id)."""
    source, arch = load_model(model, revision)
    choice = PrecisionChoice(name=precision, double_quant=double_quant, compute_dtype=compute_dtype)
    chosen_gpu = gpu_catalog(gpu_catalog_file).find(gpu) if gpu else None
    return estimate_architecture(arch, source.name, workload or Workload(), choice, chosen_gpu,
                                 stored=stored_sizes(source.stored_tensors))


def _plan_request(arch: Architecture, *, context: int, new_tokens: int, concurrency: int, precision: str,
                  runtime: str, tp: int | None, pp: int | None, gpu_memory_utilization: float,
                  max_num_batched_tokens: int | None, kv_cache_dtype: str, max_gpus: int, multi_node: bool):
    from .catalog import precisions

    if precision == "any":
        chosen = tuple(precisions().precisions)
    elif precision == "auto":  # a pre-quantized checkpoint as stored, else its torch_dtype
        chosen = ("auto",) if arch.quantization is not None else (arch.config_dtype or "bf16",)
    else:
        chosen = (precision,)
    return PlanRequest(context=context, new_tokens=min(new_tokens, context - 1), concurrency=concurrency,
                       precisions=chosen, runtime=runtime, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                       gpu_memory_utilization=gpu_memory_utilization,
                       max_num_batched_tokens=max_num_batched_tokens, kv_cache_dtype=kv_cache_dtype,
                       max_gpus=max_gpus, allow_multi_node=multi_node)


def plan(model: str, gpus: list[str] | None = None, *, top: int = 10, revision: str | None = None,
         gpu_catalog_file: Path | None = None, context: int = 4096, new_tokens: int = 256,
         concurrency: int = 1, precision: str = "auto", runtime: str = "transformers", tp: int | None = None,
         pp: int | None = None, gpu_memory_utilization: float = 0.9, max_num_batched_tokens: int | None = None,
         kv_cache_dtype: str = "auto", max_gpus: int = 64, multi_node: bool = False):
    """Ranked plans (GPU kind, count, tp x pp layout, replicas) that serve the workload."""
    from .planning import make_plans

    source, arch = load_model(model, revision)
    catalog = gpu_catalog(gpu_catalog_file)
    kinds = [catalog.find(g) for g in gpus] if gpus else list(catalog.gpus)
    request = _plan_request(arch, context=context, new_tokens=new_tokens, concurrency=concurrency,
                            precision=precision, runtime=runtime, tp=tp, pp=pp,
                            gpu_memory_utilization=gpu_memory_utilization,
                            max_num_batched_tokens=max_num_batched_tokens, kv_cache_dtype=kv_cache_dtype,
                            max_gpus=max_gpus, multi_node=multi_node)
    return make_plans(arch, source.name, kinds, request, top=top)


def plan_maximum(model: str, gpu: str, what: str, *, revision: str | None = None,
                 gpu_catalog_file: Path | None = None, **options) -> list[dict]:
    """For each tp x pp layout of `gpu`: the largest context or concurrency one replica fits."""
    from .planning import candidate_layouts, largest_fitting

    source, arch = load_model(model, revision)
    kind = gpu_catalog(gpu_catalog_file).find(gpu)
    request = _plan_request(arch, **options)
    rows = []
    for tp, pp in sorted(candidate_layouts(arch, kind, request), key=lambda layout: layout[0] * layout[1]):
        best = largest_fitting(arch, source.name, kind, request, what, tp, pp)
        rows.append({"gpu": kind.name, "gpus": tp * pp, "tp": tp, "pp": pp, what: best})
    return rows
