"""Prediction against measurement, for one row or a whole committed measurement set.

Pure and torch-free: the CI accuracy gate, the README table script and `vramplan validate`
all compare through here, so they cannot disagree about what an error is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from ..base import Frozen
from ..catalog import gpu_catalog
from ..config import shrink_config
from ..errors import VramplanError
from ..model import architecture_from_config
from ..request import PrecisionChoice, Workload
from ..result import Estimate
from ..runtimes.transformers.estimate import estimate_architecture
from ..source import resolve


class Comparison(Frozen):
    """One measured row next to its prediction."""

    case: dict[str, Any]
    gpu: str
    measured_allocated: int
    predicted_allocated: int
    measured_device: int | None
    predicted_device: int
    estimate: Estimate

    @property
    def allocated_error(self) -> float:
        return self.predicted_allocated / self.measured_allocated - 1

    @property
    def device_error(self) -> float | None:
        if not self.measured_device:
            return None
        return self.predicted_device / self.measured_device - 1

    def label(self) -> str:
        c = self.case
        layers = f" ({c['layers']} layers)" if c.get("layers") else ""
        dq = "+dq" if c.get("double_quant") else ""
        return (f"{c['model']}{layers} {c['precision']}{dq} {c['attn']} b{c['batch']} "
                f"n{c['prompt_len']} t{c['new_tokens']} {c['mode']}")


def measurement_files() -> list[Path]:
    folder = resources.files("vramplan.profiles") / "measurements"
    return sorted(Path(str(f)) for f in folder.iterdir() if f.name.endswith(".jsonl"))


def read_rows(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield json.loads(line)


def gpu_key(gpu_name: str) -> str:
    """The catalog entry a measured device name belongs to ("NVIDIA H100 80GB HBM3" -> H100)."""
    for gpu in gpu_catalog().gpus:
        if gpu.outside_torch_key != "default" and gpu.outside_torch_key.lower() in gpu_name.lower():
            return gpu.outside_torch_key
    return "default"


def predict_case(case: dict[str, Any], config: dict[str, Any], gpu_name: str) -> Estimate:
    arch = architecture_from_config(shrink_config(config, case.get("layers")), case["model"])
    workload = Workload(batch=case["batch"], prompt_len=case["prompt_len"],
                        new_tokens=case.get("new_tokens", 0), mode=case.get("mode", "generate"),
                        attn=case["attn"], allocator=case.get("allocator", "default"))
    choice = PrecisionChoice(name=case["precision"], double_quant=bool(case.get("double_quant")))
    key = gpu_key(gpu_name)
    gpu = next((g for g in gpu_catalog().gpus if g.outside_torch_key == key), None)
    return estimate_architecture(arch, case["model"], workload, choice, gpu)


def compare_row(row: dict[str, Any], config: dict[str, Any] | None = None) -> Comparison:
    case = row["case"]
    # a checkpoint row names the bundled config its weights were written from
    config = config if config is not None else resolve(case.get("config_source") or case["model"]).config
    gpu_name = row.get("env", {}).get("gpu", "")
    est = predict_case(case, config, gpu_name)
    return Comparison(case=case, gpu=gpu_name, measured_allocated=row["peak_allocated_bytes"],
                      predicted_allocated=est.peak_allocated_bytes,
                      measured_device=row.get("device_bytes"),
                      predicted_device=est.peak_device_bytes, estimate=est)


def row_kind(row: dict[str, Any]) -> str:
    """inference (a generate() or forward() case), edge (one trial of a largest-fit search),
    edge-search (a search's summary) or train (a fine-tuning step)."""
    return row.get("kind", "inference")


def comparable(row: dict[str, Any]) -> bool:
    """Inference rows with a measured peak: OOMs and refusals are data, but have no peak to
    compare; edge and training rows are held by their own tests."""
    return row_kind(row) == "inference" and row.get("status") == "ok" and "peak_allocated_bytes" in row


def compare_rows(rows: Iterable[dict[str, Any]]) -> tuple[list[Comparison], list[tuple[dict, str]]]:
    """Every comparable row's comparison, and the rows the engine refuses (with why)."""
    done: list[Comparison] = []
    refused: list[tuple[dict, str]] = []
    for row in rows:
        if not comparable(row):
            continue
        try:
            done.append(compare_row(row))
        except VramplanError as exc:
            refused.append((row["case"], str(exc)))
    return done, refused




def drift(comparison: Comparison, row: dict[str, Any]) -> str:
    """Which part of a prediction drifted: the memory before the run, or the runtime terms at
    the peak (listed, next to the measured live set when the row recorded one)."""
    est = comparison.estimate
    base_pred = sum(t.bytes for t in est.breakdown if t.group in ("model", "inputs"))
    runtime_terms = [t for t in est.breakdown if t.group == "runtime"]
    runtime_pred = sum(t.bytes for t in runtime_terms)
    base_meas = row["base_allocated_bytes"]
    runtime_meas = row["peak_allocated_bytes"] - base_meas
    mib = 2**20
    lines = [
        f"{comparison.label()}: predicted {comparison.predicted_allocated / mib:.1f} MiB, "
        f"measured {comparison.measured_allocated / mib:.1f} MiB ({comparison.allocated_error:+.2%})",
        f"  before the run: predicted {base_pred / mib:.1f}, measured {base_meas / mib:.1f} MiB",
        f"  runtime at the peak ({est.peak_phase}): predicted {runtime_pred / mib:.1f}, "
        f"measured {runtime_meas / mib:.1f} MiB",
    ]
    lines += [f"    {t.name}: {t.bytes / mib:.1f} MiB" for t in runtime_terms]
    live = row.get("peak_live_set", {}).get("live", [])
    if live:
        lines.append("  measured live set at the peak (largest groups):")
        lines += [f"    {g['bytes'] * g['count'] / mib:.1f} MiB = {g['count']} x {g['bytes']} B at "
                  f"{g['where'].split(' < ')[0]}" for g in live[:8]]
    return "\n".join(lines)
