"""Fixed costs around the model: cuBLAS workspace, inputs, memory outside torch."""

from __future__ import annotations

from ...base import block_bytes
from ...catalog import Calibration, RuntimeProfile
from ...model.spec import Architecture


def cublas_workspaces(arch: Architecture, profile: RuntimeProfile) -> list[int]:
    """The workspaces cuBLAS takes from the caching allocator at the run's first matmul: its own
    32 MiB, and cuBLASLt's 1 MiB for the bias epilogue when a Linear has a bias."""
    workspaces = [profile.constant("cublas_workspace_bytes")]
    if any(t.kind == "bias" for t in arch.tensors):
        workspaces.append(profile.constant("cublaslt_bias_workspace_bytes"))
    return workspaces


def cublas_workspace(arch: Architecture, profile: RuntimeProfile) -> int:
    return sum(cublas_workspaces(arch, profile))


def input_bytes(batch: int, prompt_len: int) -> int:
    """input_ids and attention_mask, int64, on the GPU before generate() starts."""
    return 2 * block_bytes(batch * prompt_len * 8)


def outside_torch(calibration: Calibration, gpu_key: str, bitsandbytes: bool) -> tuple[int, str]:
    """CUDA context and kernels: NVML's figure for the process minus torch's reserved memory."""
    key = gpu_key if gpu_key in calibration.outside_torch else "default"
    entry = calibration.outside_torch[key]
    extra = calibration.bitsandbytes_outside_torch_bytes if bitsandbytes else 0
    if key == "default":
        why = "no committed rows for this GPU: the default, not a measurement"
    else:
        why = (f"median of {entry.samples} {key} rows (range {entry.low / 2**20:.0f}-"
               f"{entry.high / 2**20:.0f} MiB)")
    if extra:
        why += f", plus {extra / 2**20:.0f} MiB for bitsandbytes' CUDA library"
    return entry.bytes + extra, why
