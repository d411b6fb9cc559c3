"""vramplan: how much GPU memory a Hugging Face model needs, term by term.

The public API is small:

    from vramplan import estimate, Workload
    est = estimate("llama-3.1-8b", Workload(batch=8, prompt_len=2048, new_tokens=256))
    est.peak_allocated_bytes, est.peak_device_bytes, est.breakdown

`estimate` reads the model's config (bundled profile, local path or Hub id) and returns a
frozen `Estimate`; nothing here imports torch or transformers.
"""

from __future__ import annotations

from pathlib import Path

from .architecture import Architecture, architecture_from_config
from .catalog import gpu_catalog
from .estimate import Estimate, PrecisionChoice, Workload, estimate_architecture
from .source import ModelSource, resolve

__all__ = ["Architecture", "Estimate", "ModelSource", "PrecisionChoice", "Workload", "estimate",
           "estimate_precisions", "load_model"]

# `--precision all`: the comparison of the seed post, for any model
ALL_PRECISIONS = (("fp32", False), ("fp16", False), ("bf16", False), ("int8", False), ("nf4", False),
                  ("nf4", True), ("fp4", False))
__version__ = "0.1.0"


def load_model(model: str, revision: str | None = None) -> tuple[ModelSource, Architecture]:
    """Resolve a model reference and normalize its config."""
    source = resolve(model, revision)
    return source, architecture_from_config(source.config, source.name)


def estimate_precisions(model: str, workload: Workload | None = None, gpu: str | None = None, *,
                        compute_dtype: str = "bf16", revision: str | None = None,
                        gpu_catalog_file: Path | None = None) -> list[Estimate]:
    """One estimate per precision vramplan knows (bitsandbytes 4-bit with and without double
    quantization), for the same workload and GPU."""
    source, arch = load_model(model, revision)
    chosen_gpu = gpu_catalog(gpu_catalog_file).find(gpu) if gpu else None
    return [estimate_architecture(arch, source.name, workload or Workload(),
                                  PrecisionChoice(name=name, double_quant=dq, compute_dtype=compute_dtype),
                                  chosen_gpu)
            for name, dq in ALL_PRECISIONS]


def estimate(model: str, workload: Workload | None = None, precision: str = "auto",
             gpu: str | None = None, *, double_quant: bool = False, compute_dtype: str = "bf16",
             revision: str | None = None, gpu_catalog_file: Path | None = None) -> Estimate:
    """Estimate one run of `model` (a bundled name, local path or Hub id)."""
    source, arch = load_model(model, revision)
    choice = PrecisionChoice(name=precision, double_quant=double_quant, compute_dtype=compute_dtype)
    chosen_gpu = gpu_catalog(gpu_catalog_file).find(gpu) if gpu else None
    return estimate_architecture(arch, source.name, workload or Workload(), choice, chosen_gpu)
