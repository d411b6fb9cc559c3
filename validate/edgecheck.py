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
    """The case and its batch, and the GPU when it is not the H200 (where most rows ran)."""
    name = gpu(row).name
    return f"{case_id(row['case'])}-b{row['case']['batch']}" + ("" if name == "H200" else f"-{name.lower()}")


def architecture(case: dict[str, Any]) -> Architecture:
    return architecture_from_config(shrink_config(resolve(case["model"]).config, case.get("layers")), case["model"])


def workload(case: dict[str, Any]) -> Workload:
    return Workload(batch=case.get("batch", 1), prompt_len=case["prompt_len"], new_tokens=case["new_tokens"],
                    attn=case["attn"], allocator=case["allocator"])


def gpu(row: dict[str, Any] | None = None) -> Gpu:
    """The GPU a row ran on (its env); the H200 for a row without one (every search summary so far)."""
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


def predicted_boundary(search: dict[str, Any], workers: int | None = None) -> LargestFit:
    case = search["case"]
    return largest_fit_detail(architecture(case), case["model"], workload(case),
                              PrecisionChoice(name=case["precision"]), gpu(search), FIELD[search["what"]],
                              workers=workers)


def _shape_key(row: dict[str, Any], what: str) -> str:
    """A row's GPU and case without the value a search varies: the key that groups a search with its
    trials."""
    case = row["case"]
    return json.dumps([gpu(row).name, {k: v for k, v in case.items() if k != FIELD[what]}, what], sort_keys=True)


def merged_searches(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The edge searches, one per case and axis, each with the GPU's edge as all of that case's
    trials show it (the search's own, a later search's, fixed trials): `smallest_oom` the lowest
    value that ran out of memory, `largest_ok` the highest that ran below it. Near capacity the
    edge is not monotone (edge-h200-36: Llama-3.2-3B runs 40085 and 43257 tokens, not 40086), so
    values that ran above the first out-of-memory are kept apart, in `runs_above`."""
    rows = list(rows)
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("kind") != "edge-search":
            continue
        key = _shape_key(row, row["what"])
        seen = merged.get(key)
        if seen is None:
            merged[key] = {**row, "oks": set(), "ooms": set()}
            seen = merged[key]
        else:
            seen["trial_count"] = seen.get("trial_count", 0) + row.get("trial_count", 0)
        seen["oks"].add(row["largest_ok"])
        seen["ooms"].add(row["smallest_oom"])
    for row in rows:
        if row.get("kind") != "edge" or row.get("status") not in ("ok", "oom"):
            continue
        for what in FIELD:
            search = merged.get(_shape_key(row, what))
            if search is not None:
                search["oks" if row["status"] == "ok" else "ooms"].add(row["case"][FIELD[what]])
    for search in merged.values():
        oks, ooms = search.pop("oks") - {None}, search.pop("ooms") - {None}
        first_oom = min(ooms, default=None)
        below = [v for v in oks if first_oom is None or v < first_oom]
        search.update(largest_ok=max(below, default=None), smallest_oom=first_oom,
                      runs_above=sorted(v for v in oks if first_oom is not None and v > first_oom))
    return list(merged.values())


def boundary_holds(search: dict[str, Any], predicted: int) -> bool:
    """The prediction runs on the GPU and one more does not (within the search's resolution): every
    value the GPU tried up to it ran, and the lowest that ran out of memory is above it."""
    upper = search["smallest_oom"]
    return search["largest_ok"] <= predicted and (upper is None or predicted < upper)


def estimate(row: dict[str, Any]) -> Estimate:
    case = row["case"]
    return estimate_architecture(architecture(case), case["model"], workload(case),
                                 PrecisionChoice(name=case["precision"]), gpu(row))


def measured_peak_device(row: dict[str, Any]) -> int:
    """NVML's figure at the end is the peak only when nothing was released: after a retry the
    reserved peak plus what was outside torch at the end is."""
    return row["peak_reserved_bytes"] + row["device_bytes"] - row["reserved_at_end_bytes"]


def fills_the_gpu(row: dict[str, Any]) -> bool:
    return row["status"] == "ok" and measured_peak_device(row) >= FULL_GPU_SHARE * row["gpu_total_bytes"]
