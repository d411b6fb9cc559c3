"""`vramplan validate --train` and `vramplan validate --find-max`: measure on this machine's GPU,
in fresh worker processes, and compare with the estimate. Torch-free: the GPU side is
`vramplan.validate.train` (training steps) and `vramplan.validate.edge` (edge trials).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from ..base import Frozen
from ..catalog import gpu_catalog
from ..config import shrink_config
from ..model import architecture_from_config
from ..request import PrecisionChoice, Training, Workload
from ..result.training import TrainingEstimate
from ..runtimes.training import estimate_training
from ..runtimes.transformers.estimate import estimate_architecture, resolve_attention
from ..source import load_dtype, resolve
from . import compare, findmax
from .runner import Report, ReportLine, _require_gpu_stack, lines_table


class TrainingReport(Report):
    estimate: TrainingEstimate | None = None

    def within(self, tolerance_pct: float) -> bool:
        return self.status == "ok" and all(abs(line.error) * 100 <= tolerance_pct for line in self.lines
                                           if line.error is not None and line.name == "peak allocated")


def _gpu_for(row: dict[str, Any]):
    key = compare.gpu_key(row.get("env", {}).get("gpu", ""))
    return next((g for g in gpu_catalog().gpus if g.outside_torch_key == key), None)


def training_case(model: str, training: Training, precision: str, layers: int | None) -> dict[str, Any]:
    return {"model": model, "layers": layers, "method": training.method, "precision": precision,
            "attn": training.attn, "gradient_checkpointing": training.gradient_checkpointing,
            "optimizer": training.optimizer, "autocast": training.autocast, "lora_rank": training.lora_rank,
            "double_quant": training.double_quant, "batch": training.batch, "seq_len": training.seq_len}


def validate_training(model: str, training: Training, *, precision: str, revision: str | None,
                      layers: int | None, out: Path | None) -> TrainingReport:
    """Two default training steps in a fresh worker, against `estimate --train` for the same case."""
    _require_gpu_stack()
    source = resolve(model, revision)
    config = shrink_config(source.config, layers)
    arch = architecture_from_config(config, source.name)
    if precision == "auto":
        precision = "nf4" if training.method == "qlora" else (
            load_dtype(arch.config_dtype, arch.quantization is not None, source.stored_tensors)[0] or "bf16")
    case = training_case(model, training, "bf16" if training.method == "qlora" else precision, layers)
    with tempfile.TemporaryDirectory() as tmp:
        job, rows = Path(tmp) / "job.json", Path(tmp) / "rows.jsonl"
        job.write_text(json.dumps({"config": source.config, "cases": [case]}))
        proc = subprocess.run([sys.executable, "-m", "vramplan.validate.train", str(job), str(rows)],
                              capture_output=True, text=True, check=False)
        if not rows.exists() or not rows.read_text().strip():
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            return TrainingReport(model=model, case=case, status="error", detail=tail or f"exit {proc.returncode}")
        row = json.loads(rows.read_text().splitlines()[-1])
    row["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if out is not None:
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    if row.get("status") != "ok":
        return TrainingReport(model=model, case=case, status=row.get("status", "error"), detail=row.get("error"))
    choice = PrecisionChoice(name=precision, double_quant=training.double_quant)
    est = estimate_training(arch, model, training, choice, _gpu_for(row))
    lines = [ReportLine(name="peak allocated", predicted_bytes=est.peak_allocated_bytes,
                        measured_bytes=row["peak_allocated_bytes"]),
             ReportLine(name="peak reserved", predicted_bytes=est.peak_allocated_bytes + next(
                 (t.bytes for t in est.breakdown if t.name == "allocator reserve"), 0),
                 measured_bytes=row["peak_reserved_bytes"]),
             ReportLine(name="peak on device", predicted_bytes=est.peak_device_bytes,
                        measured_bytes=row.get("device_bytes"))]
    return TrainingReport(model=model, case=case, status="ok", gpu=row["env"]["gpu"], lines=lines, estimate=est)


def training_report_text(report: TrainingReport) -> str:
    c = report.case
    head = (f"{report.model}: {c['method']} {c['precision']}, {c['optimizer']}, batch {c['batch']}, "
            f"sequence {c['seq_len']}" + (", gradient checkpointing" if c["gradient_checkpointing"] else ""))
    if report.status != "ok":
        return f"{head}\nmeasurement {report.status}: {report.detail}"
    return lines_table(head, f"on {report.gpu}; peak at {report.estimate.peak_phase}", report.lines)


class EdgeReport(Frozen):
    model: str
    what: str
    case: dict[str, Any]
    largest_ok: int | None
    smallest_oom: int | None
    predicted_fits: dict[int, bool] = Field(default_factory=dict)  # value -> the estimate's verdict
    trials: list[dict[str, Any]] = Field(default_factory=list)

    def agrees(self) -> bool:
        """Every trial's verdict matches what the GPU did."""
        return all(self.predicted_fits.get(t["case"][findmax.FIELD[self.what]]) == (t.get("status") == "ok")
                   for t in self.trials if t.get("status") in ("ok", "oom"))


def find_max(model: str, workload: Workload, what: str, *, precision: str, allocator: str, layers: int | None,
             revision: str | None, out: Path | None) -> EdgeReport:
    """Bisect the largest batch or prompt length on this GPU, one fresh process per trial; each
    trial is also estimated, so the report says where the verdict and the GPU agree."""
    _require_gpu_stack()
    source = resolve(model, revision)
    config = shrink_config(source.config, layers)
    arch = architecture_from_config(config, source.name)
    if precision == "auto":
        precision = load_dtype(arch.config_dtype, arch.quantization is not None, source.stored_tensors)[0] or "bf16"
    workload = resolve_attention(arch, workload).model_copy(update={"allocator": allocator})
    case = {"model": model, "layers": layers, "precision": precision, "attn": workload.attn,
            "batch": workload.batch, "prompt_len": workload.prompt_len, "new_tokens": workload.new_tokens,
            "allocator": allocator}
    field = findmax.FIELD[what]
    predicted: dict[int, bool] = {}

    def record(row: dict[str, Any]) -> None:
        gpu = _gpu_for(row)
        value = row["case"][field]
        est = estimate_architecture(arch, model, workload.model_copy(update={field: value}),
                                    PrecisionChoice(name=precision), gpu)
        predicted[value] = bool(est.verdict and est.verdict.fits)
        if out is not None:
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    result = findmax.find_max(source.config, case, what, getattr(workload, field), on_trial=record,
                              quantum=64 if what == "prompt-len" else 1)
    if out is not None:
        with out.open("a") as fh:
            fh.write(json.dumps({k: v for k, v in result.items() if k != "trials"}) + "\n")
    return EdgeReport(model=model, what=what, case=case, largest_ok=result["largest_ok"],
                      smallest_oom=result["smallest_oom"], predicted_fits=predicted, trials=result["trials"])


def edge_report_text(report: EdgeReport) -> str:
    lines = [f"{report.model}: largest {report.what} on this GPU ({report.case['allocator']} allocator): "
             f"{report.largest_ok} runs, {report.smallest_oom} runs out of memory", ""]
    for trial in report.trials:
        value = trial["case"][findmax.FIELD[report.what]]
        verdict = report.predicted_fits.get(value)
        lines.append(f"  {report.what} {value}: {trial.get('status')}, estimate says "
                     f"{'fits' if verdict else 'does not fit'}"
                     + (f", failed allocating {trial['oom']['tried_to_allocate_bytes'] / 2**20:.0f} MiB"
                        if trial.get("oom", {}).get("tried_to_allocate_bytes") else ""))
    return "\n".join(lines)
