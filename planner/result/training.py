"""The result of estimating one fine-tuning step (runtimes/training fills it)."""

from __future__ import annotations

from ..base import Frozen
from ..request import Training
from . import BreakdownTerm, Verdict


class TrainingEstimate(Frozen):
    model: str
    model_type: str
    precision: str  # the weights' precision (nf4 for qlora)
    compute_dtype: str
    training: Training
    parameters: int
    trainable_parameters: int
    peak_phase: str  # where in the two steps the peak sits
    peak_allocated_bytes: int
    peak_device_bytes: int
    breakdown: list[BreakdownTerm]
    notes: list[str]
    verdict: Verdict | None = None
    calibrated_with: dict[str, str]
