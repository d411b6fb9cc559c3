"""Committed edge rows (profiles/measurements/h200-edge.jsonl) against the planner: the largest fit
of each search, the verdict of each trial, the device bytes of each full-GPU trial. Torch-free;
tests/test_edge.py holds them and scripts/edge_table.py writes README's table from them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from vramplan.catalog import DTYPE_BYTES, Gpu, gpu_catalog, runtime_profile
from vramplan.config import shrink_config
from vramplan.model import architecture_from_config
from vramplan.model.spec import Architecture
from vramplan.request import PrecisionChoice, Workload
from vramplan.result import Estimate
from vramplan.runtimes.transformers import attention
from vramplan.runtimes.transformers.estimate import _family_layout, estimate_architecture
from vramplan.runtimes.transformers.fit import LargestFit, largest_fit_detail
from vramplan.source import resolve
from vramplan.weights import resolve_precision

from .findmax import FIELD

FULL_GPU_SHARE = 0.5  # a trial "fills the GPU" when its device peak is at least this share


def case_id(case: dict[str, Any]) -> str:
    layers = f"-l{case['layers']}" if case.get("layers") else ""
    tokens = "" if case.get("new_tokens", 16) == 16 else f"-t{case['new_tokens']}"
    return (f"{case['model']}{layers}-{case['precision']}-{case['attn']}-n{case['prompt_len']}{tokens}-"
            f"{case['allocator']}")


def trial_id(row: dict[str, Any]) -> str:
    return f"{case_id(row['case'])}-b{row['case']['batch']}"


def architecture(case: dict[str, Any]) -> Architecture:
    return architecture_from_config(shrink_config(resolve(case["model"]).config, case.get("layers")), case["model"])


def workload(case: dict[str, Any]) -> Workload:
    return Workload(batch=case.get("batch", 1), prompt_len=case["prompt_len"], new_tokens=case["new_tokens"],
                    attn=case["attn"], allocator=case["allocator"])


def gpu(row: dict[str, Any] | None = None) -> Gpu:
    name = (row or {}).get("env", {}).get("gpu", "H200").replace("NVIDIA ", "")
    return gpu_catalog().find(name)


def decode_kernel(row: dict[str, Any]) -> str:
    """The attention kernel a measured row's decode steps ran, as the planner picks it for that row's
    GPU (attention.decode_kernel): the key of calibration.yaml's decode_outside_torch_per_step."""
    case = row["case"]
    arch = architecture(case)
    _, compute, _ = resolve_precision(arch, PrecisionChoice(name=case["precision"]))
    return attention.decode_kernel(arch, _family_layout(arch, runtime_profile()), case["attn"], DTYPE_BYTES[compute],
                                   gpu(row))


def predicted_boundary(search: dict[str, Any]) -> LargestFit:
    case = search["case"]
    return largest_fit_detail(architecture(case), case["model"], workload(case),
                              PrecisionChoice(name=case["precision"]), gpu(), FIELD[search["what"]])


def merged_searches(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The edge searches, one per case and axis: a later search of the same case (a follow-up
    that tried values nearer the boundary, fresh processes each) narrows the earlier bracket to
    its largest run and smallest out-of-memory."""
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("kind") != "edge-search":
            continue
        key = json.dumps([row["case"], row["what"]], sort_keys=True)
        seen = merged.get(key)
        if seen is None:
            merged[key] = dict(row)
            continue
        oks = [v for v in (seen["largest_ok"], row["largest_ok"]) if v is not None]
        ooms = [v for v in (seen["smallest_oom"], row["smallest_oom"]) if v is not None]
        seen.update(largest_ok=max(oks) if oks else None, smallest_oom=min(ooms) if ooms else None,
                    trial_count=seen.get("trial_count", 0) + row.get("trial_count", 0))
    return list(merged.values())


def boundary_holds(search: dict[str, Any], predicted: int) -> bool:
    """The prediction runs on the GPU and one more does not (within the search's resolution)."""
    upper = search["smallest_oom"]
    return search["largest_ok"] <= predicted and (upper is None or predicted < upper)


def estimate(row: dict[str, Any]) -> Estimate:
    case = row["case"]
    return estimate_architecture(architecture(case), case["model"], workload(case),
                                 PrecisionChoice(name=case["precision"]), gpu())


def measured_peak_device(row: dict[str, Any]) -> int:
    """NVML's figure at the end is the peak only when nothing was released: after a retry the
    reserved peak plus what was outside torch at the end is."""
    return row["peak_reserved_bytes"] + row["device_bytes"] - row["reserved_at_end_bytes"]


def fills_the_gpu(row: dict[str, Any]) -> bool:
    return row["status"] == "ok" and measured_peak_device(row) >= FULL_GPU_SHARE * row["gpu_total_bytes"]
