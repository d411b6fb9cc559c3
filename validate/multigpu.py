"""Validation on several GPUs: what runs where, and what each GPU should hold. Torch-free.

* pipeline (`--pp N`): one process, the model loaded with a `device_map` that puts each
  decoder layer on the GPU of its planner stage (parallel.stage_layers), the embeddings on
  the first GPU and the final norm and head on the last, as `vramplan plan` assumes;
* tensor (`--tp N`): `torchrun --nproc-per-node N`, each rank loading the checkpoint with
  transformers' `tp_plan="auto"`.

The GPU side is `vramplan.validate.parallel_worker`; the comparison is with the per-stage
estimates `vramplan plan` makes for the same layout (transformers runtime).
"""

from __future__ import annotations

import re
import sys
from typing import Any

from ..errors import WorkloadError
from ..model import Architecture
from ..parallel import stage_layers
from ..request import PlanRequest, Workload
from ..result import Estimate
from ..runtimes.transformers.serve import transformers_layout

_LAYER = re.compile(r"^(?P<stack>.+?)\.\{i\}\.")


def layer_stack_prefix(arch: Architecture) -> str:
    """The module path of the decoder layer list ("model.layers", "transformer.h", ...)."""
    for tensor in arch.tensors:
        match = _LAYER.match(tensor.name)
        if match:
            return match.group("stack")
    raise WorkloadError(f"{arch.model_type}: no per-layer parameters to place on GPUs.")


def device_map_for_stages(arch: Architecture, pp: int) -> dict[str, int]:
    """accelerate-style device_map: module name -> GPU index, one pipeline stage per GPU."""
    stack = layer_stack_prefix(arch)
    device_map: dict[str, int] = {}
    for stage in range(pp):
        for layer in stage_layers(arch.num_layers, pp, stage):
            device_map[f"{stack}.{layer}"] = stage
    for tensor in arch.tensors:
        if tensor.layers is not None:
            continue
        module = tensor.name.rsplit(".", 1)[0]
        first = tensor.kind in ("embedding", "position_embedding") or "embed" in module
        device_map[module] = 0 if first else pp - 1
    for buffer in arch.buffers:
        if buffer.layers is None:
            device_map.setdefault(buffer.name.rsplit(".", 1)[0], 0)
    return device_map


def covers_every_parameter(device_map: dict[str, int], names: list[str]) -> list[str]:
    """Parameter names no device_map entry places (empty when the map is complete)."""
    missing = []
    for name in names:
        parts = name.split(".")
        if not any(".".join(parts[:i]) in device_map for i in range(1, len(parts) + 1)):
            missing.append(name)
    return missing


def predicted_per_gpu(arch: Architecture, model: str, workload: Workload, precision: str, gpu, tp: int,
                      pp: int) -> list[Estimate]:
    """One estimate per pipeline stage (every tensor-parallel rank of a stage is alike)."""
    request = PlanRequest(context=workload.prompt_len + max(workload.new_tokens, 1),
                          new_tokens=max(workload.new_tokens, 1), concurrency=workload.batch,
                          precisions=(precision,), attn=workload.attn)
    return transformers_layout(arch, model, request, precision, gpu, tp, pp, workload.batch)


def torchrun_command(nproc: int, job: str, out: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "vramplan.validate.parallel_worker", job, out]


def check_layout(tp: int, pp: int, visible_gpus: int) -> None:
    if tp > 1 and pp > 1:
        raise WorkloadError("validate measures tensor or pipeline parallelism, one at a time: give --tp or --pp.")
    if max(tp, pp) > visible_gpus:
        raise WorkloadError(f"--tp/--pp {max(tp, pp)} needs as many GPUs; {visible_gpus} visible here.")


def job(config: dict[str, Any], case: dict[str, Any], device_map: dict[str, int] | None) -> dict[str, Any]:
    return {"config": config, "case": case, "device_map": device_map}
