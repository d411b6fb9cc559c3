"""The training gate: every committed fine-tuning step measured on a GPU, predicted within tolerance.

Rows come from `vramplan validate --train` / scripts/train_sweep.py (kind "train"); each
records the allocated peak of every phase of both steps, so a failure names the phase the
model puts the peak in and the phase the GPU did.
"""

from __future__ import annotations

import pytest
from vramplan.catalog import gpu_catalog
from vramplan.config import shrink_config
from vramplan.model import architecture_from_config
from vramplan.request import PrecisionChoice, Training
from vramplan.runtimes.training import estimate_training
from vramplan.source import resolve

from .conftest import committed_rows

ALLOCATED_TOLERANCE = 0.05  # every row
TIGHT_TOLERANCE = 0.03  # 90% of the rows
ROWS = [r for r in committed_rows() if r.get("kind") == "train" and r.get("status") == "ok"]


def _id(row) -> str:
    c = row["case"]
    return (f"{c['model']}-{c['method']}-{c['precision']}{'-gc' if c['gradient_checkpointing'] else ''}-"
            f"{c['optimizer']}{'-ac' + c['autocast'] if c['autocast'] != 'none' else ''}-b{c['batch']}-n{c['seq_len']}"
            f"{'-dq' if c.get('double_quant') else ''}")


def predict(row):
    c = row["case"]
    arch = architecture_from_config(shrink_config(resolve(c["model"]).config, c.get("layers")), c["model"])
    training = Training(method=c["method"], batch=c["batch"], seq_len=c["seq_len"], lora_rank=c["lora_rank"],
                        gradient_checkpointing=c["gradient_checkpointing"], optimizer=c["optimizer"],
                        autocast=c["autocast"], double_quant=c["double_quant"], attn=c["attn"])
    precision = "nf4" if c["method"] == "qlora" else c["precision"]
    gpu = gpu_catalog().find("H200")
    return estimate_training(arch, c["model"], training, PrecisionChoice(name=precision,
                                                                         double_quant=c["double_quant"]), gpu)


def test_enough_training_rows():
    """Issue 13: at least 40 rows over at least five families, one with a 256k vocabulary, full,
    LoRA and QLoRA, checkpointing on and off, AdamW and 8-bit AdamW, mixed precision."""
    assert len(ROWS) >= 40
    cases = [r["case"] for r in ROWS]
    types = {architecture_from_config(resolve(c["model"]).config).model_type for c in cases}
    assert len(types) >= 5
    assert any(architecture_from_config(resolve(c["model"]).config).vocab_size >= 256_000 for c in cases)
    assert {c["method"] for c in cases} == {"full", "lora", "qlora"}
    assert {c["gradient_checkpointing"] for c in cases} == {True, False}
    assert {"adamw", "adamw8bit"} <= {c["optimizer"] for c in cases}
    assert any(c["autocast"] != "none" for c in cases)
    assert max(r["peak_allocated_bytes"] / r["env"]["gpu_total_bytes"] for r in ROWS) >= 0.5


@pytest.mark.parametrize("row", ROWS, ids=[_id(r) for r in ROWS])
def test_training_step_allocated_within_tolerance(row):
    est = predict(row)
    error = est.peak_allocated_bytes / row["peak_allocated_bytes"] - 1
    measured_at = max(row["phases"], key=lambda p: p["peak_allocated_bytes"])
    assert abs(error) <= ALLOCATED_TOLERANCE, (
        f"{_id(row)}: predicted {est.peak_allocated_bytes / 2**20:.0f} MiB at {est.peak_phase}, measured "
        f"{row['peak_allocated_bytes'] / 2**20:.0f} MiB at step {measured_at['step']} {measured_at['phase']} "
        f"({error:+.2%}); terms: " + ", ".join(f"{t.name} {t.bytes / 2**20:.0f}" for t in est.breakdown))


def test_ninety_percent_within_three_percent():
    errors = [abs(predict(row).peak_allocated_bytes / row["peak_allocated_bytes"] - 1) for row in ROWS]
    assert sum(e <= TIGHT_TOLERANCE for e in errors) >= 0.9 * len(errors)


def test_the_peak_sits_in_the_measured_phase():
    """Where the model says the peak is (loss spike of step 2, optimizer step of step 1...) is
    where the GPU had it, on every row whose measured phases are not within 1% of each other."""
    phase_of = {"forward": "forward", "loss": "forward", "backward": "backward", "end of backward": "backward",
                "optimizer.step()": "step"}
    for row in ROWS:
        est = predict(row)
        phases = sorted(row["phases"], key=lambda p: -p["peak_allocated_bytes"])
        if phases[1]["peak_allocated_bytes"] > 0.99 * phases[0]["peak_allocated_bytes"]:
            continue
        step, rest = est.peak_phase.split(": ", 1)
        predicted = phase_of[rest.split(",")[0].strip()]
        assert (int(step.split()[-1]), predicted) == (phases[0]["step"], phases[0]["phase"]), _id(row)
