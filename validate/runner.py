"""`vramplan validate`: measure one case (or a sweep) on this machine's GPU and compare.

A case runs in a fresh worker process (the same `vramplan.validate.worker` the committed sweeps
used), so its allocator and NVML figures carry no history from this process, and an OOM is a
result rather than a crash. This module imports torch only inside that worker.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from ..base import Frozen, gib
from ..config import shrink_config
from ..errors import WorkloadError
from ..model import architecture_from_config
from ..request import Workload
from ..result import Estimate
from ..runtimes.transformers.estimate import resolve_attention
from ..source import load_dtype, resolve
from . import compare, sweep


class ReportLine(Frozen):
    name: str
    predicted_bytes: int
    measured_bytes: int | None

    @property
    def error(self) -> float | None:
        if not self.measured_bytes:
            return None
        return self.predicted_bytes / self.measured_bytes - 1


class Report(Frozen):
    """One measured case against its estimate: what `validate` and `validate --train` print."""

    model: str
    case: dict[str, Any]
    status: str  # ok, oom, error
    detail: str | None = None
    gpu: str | None = None
    lines: list[ReportLine] = Field(default_factory=list)


class ValidationReport(Report):
    estimate: Estimate | None = None

    def totals(self) -> list[ReportLine]:
        return [line for line in self.lines if line.name in ("peak allocated", "peak on device")]

    def within(self, tolerance_pct: float) -> bool:
        if self.status != "ok":
            return False
        return all(abs(line.error) * 100 <= tolerance_pct for line in self.totals()
                   if line.error is not None)


def _require_gpu_stack() -> None:
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise WorkloadError(f"vramplan validate needs {' and '.join(missing)}: "
                            "pip install 'vramplan[validate]' (with your CUDA build of torch).")
    check_cuda = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
    probe = subprocess.run([sys.executable, "-c", check_cuda], capture_output=True, text=True, check=False)
    if probe.returncode == 3:
        raise WorkloadError("No CUDA device is visible to torch here; vramplan validate measures a real GPU.")
    if probe.returncode != 0:
        raise WorkloadError(f"torch failed to start: {probe.stderr.strip().splitlines()[-1:]}")


def _run_worker(config: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        rows = Path(tmp) / "rows.jsonl"
        job.write_text(json.dumps({"config": config, "cases": [case]}))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if case.get("allocator") == "expandable":  # read when CUDA starts in the worker
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        proc = subprocess.run([sys.executable, "-m", "vramplan.validate.worker", str(job), str(rows)],
                              capture_output=True, text=True, env=env, check=False)
        if not rows.exists() or not rows.read_text().strip():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"case": case, "status": "error", "error": " | ".join(tail) or f"exit {proc.returncode}"}
        return json.loads(rows.read_text().splitlines()[-1])


def validate_one(model: str, workload: Workload, *, precision: str, double_quant: bool,
                 compute_dtype: str, revision: str | None, weights: str, layers: int | None,
                 out: Path | None) -> ValidationReport:
    _require_gpu_stack()
    source = resolve(model, revision)
    config = shrink_config(source.config, layers)
    arch = architecture_from_config(config, source.name)
    if precision == "auto":  # what from_pretrained loads: the config's dtype, else the stored one
        precision = load_dtype(arch.config_dtype, arch.quantization is not None, source.stored_tensors)[0] or "bf16"
    workload = resolve_attention(arch, workload)
    case = {"model": model, "layers": layers, "precision": precision, "attn": workload.attn,
            "batch": workload.batch, "prompt_len": workload.prompt_len,
            "new_tokens": workload.new_tokens if workload.mode == "generate" else 0,
            "mode": workload.mode, "double_quant": double_quant, "diagnose": False}
    if workload.allocator != "default":
        case["allocator"] = workload.allocator
    if weights == "checkpoint":
        case["checkpoint"] = str(Path(source.name)) if source.origin == "directory" else source.name
        case["revision"] = revision
    if compute_dtype != "bf16":
        case["compute_dtype"] = compute_dtype
    row = _run_worker(source.config, case)
    row["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if out is not None:
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    if row.get("status") != "ok":
        return ValidationReport(model=model, case=case, status=row.get("status", "error"),
                                detail=row.get("error"))
    comparison = compare.compare_row(row, source.config)
    est = comparison.estimate
    inventory = row.get("inventory", {})
    after_load = sum(t.bytes for t in est.breakdown if t.group == "model")
    reserve = next((t.bytes for t in est.breakdown if t.name == "allocator reserve"), 0)
    lines = [
        ReportLine(name="after load and warm-up", predicted_bytes=after_load,
                   measured_bytes=inventory.get("allocated_after_warmup_bytes")),
        ReportLine(name="peak allocated", predicted_bytes=est.peak_allocated_bytes,
                   measured_bytes=row["peak_allocated_bytes"]),
        ReportLine(name="peak reserved", predicted_bytes=est.peak_allocated_bytes + reserve,
                   measured_bytes=row["peak_reserved_bytes"]),
        ReportLine(name="peak on device", predicted_bytes=est.peak_device_bytes,
                   measured_bytes=row.get("device_bytes")),
    ]
    return ValidationReport(model=model, case=case, status="ok", gpu=comparison.gpu, lines=lines,
                            estimate=est)


def report_text(report: ValidationReport) -> str:
    head = f"{report.model}: {compare_label(report.case)}"
    if report.status != "ok":
        return f"{head}\nmeasurement {report.status}: {report.detail}"
    return lines_table(head, f"on {report.gpu}; peak at {report.estimate.peak_phase}", report.lines)


def lines_table(head: str, where: str, lines: list[ReportLine]) -> str:
    """Prediction against measurement, one line per total (every validate report prints this)."""
    out = [head, where, "", f"{'':26s}{'predicted':>12s}{'measured':>12s}{'error':>9s}"]
    for line in lines:
        measured = f"{gib(line.measured_bytes):10.2f} G" if line.measured_bytes else f"{'n/a':>12s}"
        error = f"{line.error * 100:+8.2f}%" if line.error is not None else f"{'':>9s}"
        out.append(f"{line.name:26s}{gib(line.predicted_bytes):10.2f} G{measured}{error}")
    return "\n".join(out)


def compare_label(case: dict[str, Any]) -> str:
    return (f"{case['precision']}{'+dq' if case.get('double_quant') else ''} {case['attn']} "
            f"batch {case['batch']}, prompt {case['prompt_len']}, {case['new_tokens']} new tokens, "
            f"{case['mode']}" + (f", {case['layers']} layers" if case.get("layers") else ""))


def run_sweep(matrix: Path, out: Path) -> None:
    _require_gpu_stack()
    added = sweep.run_matrix(matrix, out, lambda m: resolve(m).config, sweep.print_progress)
    print(f"{added} rows appended to {out}", file=sys.stderr)


class GpuLine(Frozen):
    device: int
    stage: int
    predicted_allocated: int
    measured_allocated: int | None
    predicted_device: int
    measured_device: int | None

    @property
    def allocated_error(self) -> float | None:
        return self.predicted_allocated / self.measured_allocated - 1 if self.measured_allocated else None


class ParallelReport(Frozen):
    model: str
    case: dict[str, Any]
    tp: int
    pp: int
    status: str
    detail: str | None = None
    gpus: list[GpuLine] = Field(default_factory=list)

    def within(self, tolerance_pct: float) -> bool:
        return self.status == "ok" and all(
            line.allocated_error is not None and abs(line.allocated_error) * 100 <= tolerance_pct
            for line in self.gpus)


def _visible_gpus() -> int:
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, check=False)
    return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0


def validate_parallel(model: str, workload: Workload, *, precision: str, revision: str | None, weights: str,
                      layers: int | None, tp: int, pp: int, out: Path | None) -> ParallelReport:
    """Measure one case across tp (torchrun) or pp (device_map) GPUs and compare per GPU."""
    from ..catalog import gpu_catalog
    from . import multigpu

    _require_gpu_stack()
    multigpu.check_layout(tp, pp, _visible_gpus())
    source = resolve(model, revision)
    config = shrink_config(source.config, layers)
    arch = architecture_from_config(config, source.name)
    if precision == "auto":
        precision = load_dtype(arch.config_dtype, arch.quantization is not None, source.stored_tensors)[0] or "bf16"
    workload = resolve_attention(arch, workload)
    case = {"model": model, "layers": layers, "precision": precision, "attn": workload.attn,
            "batch": workload.batch, "prompt_len": workload.prompt_len, "new_tokens": workload.new_tokens,
            "mode": workload.mode, "double_quant": False, "tp": tp, "pp": pp}
    if weights == "checkpoint":
        case["checkpoint"] = source.name
    device_map = multigpu.device_map_for_stages(arch, pp) if pp > 1 else None
    with tempfile.TemporaryDirectory() as tmp:
        job_path, rows_path = Path(tmp) / "job.json", Path(tmp) / "rows.jsonl"
        job_path.write_text(json.dumps(multigpu.job(config, case, device_map)))
        command = (multigpu.torchrun_command(tp, str(job_path), str(rows_path)) if tp > 1 else
                   [sys.executable, "-m", "vramplan.validate.parallel_worker", str(job_path), str(rows_path)])
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    if not rows:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return ParallelReport(model=model, case=case, tp=tp, pp=pp, status="error", detail=tail)
    if out is not None:
        with out.open("a") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
    gpu = next(g for g in gpu_catalog().gpus if g.outside_torch_key == compare.gpu_key(rows[0]["env"]["gpu"]))
    stages = multigpu.predicted_per_gpu(arch, source.name, workload, precision, gpu, tp, pp)
    lines = []
    for index, row in enumerate(rows):
        stage = index if pp > 1 else 0
        est = stages[stage]
        lines.append(GpuLine(device=row["device"], stage=stage, predicted_allocated=est.peak_allocated_bytes,
                             measured_allocated=row.get("peak_allocated_bytes"),
                             predicted_device=est.peak_device_bytes, measured_device=row.get("device_bytes")))
    return ParallelReport(model=model, case=case, tp=tp, pp=pp, status="ok", gpus=lines)


def parallel_report_text(report: ParallelReport) -> str:
    head = f"{report.model}: {compare_label(report.case)}, tp {report.tp} x pp {report.pp}"
    if report.status != "ok":
        return f"{head}\nmeasurement {report.status}: {report.detail}"
    out = [head, "", f"{'GPU':>4s} {'stage':>6s} {'predicted':>11s} {'measured':>11s} {'error':>9s}"]
    for line in report.gpus:
        measured = f"{gib(line.measured_allocated):9.2f} G" if line.measured_allocated else f"{'n/a':>11s}"
        error = f"{line.allocated_error * 100:+8.2f}%" if line.allocated_error is not None else ""
        out.append(f"{line.device:>4d} {line.stage:>6d} {gib(line.predicted_allocated):9.2f} G {measured} {error}")
    out.append("(peak allocated per GPU)")
    return "\n".join(out)
