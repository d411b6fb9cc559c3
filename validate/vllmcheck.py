"""Published vLLM start-up logs (profiles/vllm_startup_logs.yaml) replayed with the planner's
rules: the row's release, GPU (the logged total where the log prints one) and flags. Torch-free;
tests/test_vllm.py holds every row to its tolerances and scripts/vllm_table.py writes README's table.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml
from vramplan.catalog import Gpu, gpu_catalog
from vramplan.model import architecture_from_config
from vramplan.parallel import shard
from vramplan.request import PlanRequest
from vramplan.result import VllmStartup
from vramplan.runtimes.vllm import vllm_startup
from vramplan.source import load_bundled

GIB = 1 << 30
ROWS: list[dict[str, Any]] = yaml.safe_load(
    (resources.files("vramplan.profiles") / "vllm_startup_logs.yaml").read_text(encoding="utf-8"))["logs"]
TESTABLE = [r for r in ROWS if "predict" in r]

# logged field -> (VllmStartup figure, relative tolerance or None, absolute GiB tolerance or None)
RELATIVE = {"kv_cache_gib": "kv_cache_bytes", "kv_cache_tokens": "kv_cache_tokens", "gpu_blocks": "gpu_blocks",
            "max_concurrency": "max_concurrency"}
ABSOLUTE = {"model_loading_gib": "model_loading_bytes", "weights_gib": "model_loading_bytes",
            "activation_peak_gib": "activation_peak_bytes", "non_torch_gib": "non_torch_bytes",
            "cudagraph_gib": "cudagraph_figure", "peak_torch_memory_gib": "peak_torch_figure"}


def logged_gpu(spec: dict[str, Any]) -> Gpu:
    """The row's GPU; a logged total replaces the catalog's memory, and a GPU the log does not
    name is one built from that total (names decide vLLM's defaults: none here)."""
    total = spec.get("total_gib")
    if spec.get("gpu"):
        gpu = gpu_catalog().find(spec["gpu"])
        return gpu if total is None else gpu.model_copy(update={"memory_bytes": round(total * GIB)})
    return Gpu(name="logged GPU", vendor="nvidia", memory_bytes=round(total * GIB), memory_source="the log's total",
               bandwidth_gbps=1000, bf16=True, fp8=True, int8=True, gpus_per_node=8, interconnect="PCIe")


def predict(row: dict[str, Any]) -> VllmStartup:
    spec = row["predict"]
    source = load_bundled(spec["config"])
    if source is None:
        raise ValueError(f"{row['id']}: {spec['config']} is not a bundled config")
    config = dict(source.config)
    if "quantization_config" in spec:  # the checkpoint's config is the base one plus its quantization
        config["quantization_config"] = spec["quantization_config"]
    arch = architecture_from_config(config, spec["config"])
    if arch.config_dtype is None:
        arch = arch.model_copy(update={"config_dtype": "bf16"})
    request = PlanRequest(runtime="vllm", context=spec["max_model_len"], vllm_version=spec["rules"],
                          entrypoint=spec.get("entrypoint", "serve"),
                          gpu_memory_utilization=spec.get("gpu_memory_utilization"),
                          max_num_batched_tokens=spec.get("max_num_batched_tokens"),
                          max_num_seqs=spec.get("max_num_seqs"), kv_cache_dtype=spec.get("kv_cache_dtype", "auto"),
                          sampler=spec.get("sampler", "auto"))
    tp = spec.get("tp", 1)
    return vllm_startup(shard(arch, tp, 1, 0, replicate_kv=True), logged_gpu(spec), request, "auto", tp)


def figure(startup: VllmStartup, name: str) -> float:
    if name == "cudagraph_figure":
        return startup.cudagraph_bytes + startup.cudagraph_outside_bytes
    if name == "peak_torch_figure":  # 0.6.4 prints the absolute torch peak: weights + activations
        return startup.model_loading_bytes + startup.activation_peak_bytes
    return getattr(startup, name)


def drift(row: dict[str, Any], startup: VllmStartup) -> list[str]:
    """Every logged figure outside its tolerance, in words."""
    logged, skipped = row["logged"], row["predict"].get("unchecked", {})
    out = []
    for field, name in RELATIVE.items():
        want = logged.get(field)
        if want is None or field in skipped:
            continue
        got = figure(startup, name) / (GIB if field.endswith("_gib") else 1)
        if abs(got - want) > 0.03 * abs(want):
            out.append(f"{field}: predicted {got:,.2f}, logged {want:,.2f} ({(got - want) / abs(want):+.1%})")
    for field, name in ABSOLUTE.items():
        want = logged.get(field)
        if want is None or field in skipped:
            continue
        got = figure(startup, name) / GIB
        if abs(got - want) > 0.25:
            out.append(f"{field}: predicted {got:.2f} GiB, logged {want:.2f} GiB ({got - want:+.2f})")
    return out
