"""The constants of a training step, read from profiles/training.yaml and validated once.

Like catalog.py's loaders, this reads package data through importlib.resources (no network,
no user files): every constant carries its provenance in the YAML.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from ...base import Frozen
from ...catalog import Constant, MeasuredWith, _read_yaml, _validate
from ...errors import UnsupportedModelError
from ...model.spec import Architecture


class Dropout(Frozen):
    embedding: float = 0.0
    attention: float = 0.0
    residual: float = 0.0


class TrainingFamily(Frozen):
    """What a family's layer does that Architecture does not say."""

    applies_to: list[str]
    norm: Literal["rms", "gemma_rms", "layernorm"]
    activation: Literal["silu", "gelu_tanh", "gelu_new"]
    dropout: Dropout = Dropout()
    logit_softcapping: bool = False
    provenance: str


class OpsConstant(Frozen):
    value: list[str]
    why: str
    provenance: str


class CudaOps(Frozen):
    dropout_mask_bytes: Constant
    layer_norm_stats_bytes: Constant
    autocast_fp32_ops: OpsConstant
    cublas_workspaces: Constant


class TrainingProfile(Frozen):
    measured_with: MeasuredWith
    families: dict[str, TrainingFamily]
    cuda: CudaOps
    bitsandbytes: dict[str, Constant]
    peft: dict[str, Constant]

    def family(self, arch: Architecture) -> TrainingFamily:
        for layout in self.families.values():
            if arch.model_type in layout.applies_to:
                return layout
        if arch.family in self.families:
            return self.families[arch.family]
        known = ", ".join(sorted(m for f in self.families.values() for m in f.applies_to))
        raise UnsupportedModelError(
            f"a training step of {arch.model_type} is not modelled yet (training.yaml knows: {known}).")


@lru_cache(maxsize=1)
def training_profile() -> TrainingProfile:
    return _validate(TrainingProfile, _read_yaml("training.yaml"), "training.yaml")
