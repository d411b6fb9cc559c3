"""The result of estimating one fine-tuning step (runtimes/training fills it)."""

from __future__ import annotations

from ..base import Frozen
from ..request import Training
from . import BreakdownTerm, Verdict


class AliveTensor(Frozen):
    """A tensor (or a group of like tensors) alive at a moment, as the allocator holds it."""

    name: str
    bytes: int


class Moment(Frozen):
    """One candidate peak of the two steps: every tensor alive then, explicitly."""

    name: str
    step: int  # 1: the first step (it creates the optimizer states), 2: a steady step
    tensors: list[AliveTensor]
    bytes: int  # the sum of the tensors' bytes


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
    moments: list[Moment]  # every candidate; the peak is the largest
    notes: list[str]
    verdict: Verdict | None = None
    calibrated_with: dict[str, str]


class TrainingMaximum(Frozen):
    """`estimate --train ... --max batch|seq-len`: the largest value whose step fits the GPU."""

    model: str
    gpu: str
    what: str  # batch or seq_len
    largest: int  # 0: not even the smallest fits
    estimate: TrainingEstimate | None = None  # the step at the largest value


class TrainingPlan(Frozen):
    """One GPU kind and data-parallel width for a fine-tuning job, per rank."""

    gpu: str
    gpus: int  # data-parallel ranks (one replica of the model step per rank, sharded as asked)
    sharding: str
    per_gpu_peak_bytes: int
    gpu_memory_bytes: int
    headroom_bytes: int
    cost_per_hour: float | None = None
    breakdown: list[BreakdownTerm]


class TrainingPlanResult(Frozen):
    model: str
    training: Training
    sharding: str
    plans: list[TrainingPlan]
    notes: list[str]
