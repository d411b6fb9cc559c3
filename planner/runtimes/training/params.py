"""What trains: the trainable tensors (all weights, or peft's LoRA adapters), their gradients,
and each optimizer's states and step temporaries, tensor by tensor (one allocation each)."""

from __future__ import annotations

import math

from ...base import Frozen, block_bytes
from ...errors import WorkloadError
from ...model.spec import Architecture, TensorSpec
from ...request import Training
from .profile import TrainingProfile


class Param(Frozen):
    """`count` tensors of `elements` each (one per layer), of `nbytes` per element."""

    name: str
    shape: tuple[int, ...]
    count: int
    nbytes: int
    place: str  # "embedding", "layer", "head" (final norm, lm_head)

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def allocated(self) -> int:
        return block_bytes(self.elements * self.nbytes) * self.count


def _place(tensor: TensorSpec) -> str:
    if tensor.layers is not None:
        return "layer"
    return "embedding" if tensor.kind in ("embedding", "position_embedding") else "head"


def full_parameters(arch: Architecture, nbytes: int) -> list[Param]:
    """Every parameter trains, in the weights' dtype (a tied head is the embedding itself)."""
    return [Param(name=t.name, shape=t.shape, count=t.count, nbytes=nbytes, place=_place(t)) for t in arch.tensors]


def layer_module(tensor: TensorSpec) -> str:
    """`model.layers.{i}.self_attn.q_proj.weight` -> `self_attn.q_proj`."""
    return tensor.name.split("{i}.", 1)[-1].removesuffix(".weight")


def lora_targets(arch: Architecture, targets: tuple[str, ...]) -> list[TensorSpec]:
    """peft's "all-linear": every nn.Linear / Conv1D but the output embedding; else module names
    matched as peft does, by the end of the module's name."""
    linears = [t for t in arch.tensors if t.kind == "linear" and t.layers is not None]
    if targets == ("all-linear",):
        return linears
    chosen = [t for t in linears if any(layer_module(t) == n or layer_module(t).endswith("." + n) for n in targets)]
    if not chosen:
        known = ", ".join(sorted({layer_module(t).rsplit(".", 1)[-1] for t in linears}))
        raise WorkloadError(f"--lora-targets {','.join(targets)} matches no Linear of {arch.model_type}; "
                            f"its Linear layers are: {known}.")
    return chosen


def adapters(arch: Architecture, training: Training, profile: TrainingProfile) -> list[Param]:
    """lora_A [r, in] and lora_B [out, r] per adapted Linear, fp32 (peft's autocast_adapter_dtype)."""
    r, nbytes = training.lora_rank, profile.peft["adapter_bytes"].value
    out = []
    for t in lora_targets(arch, training.lora_targets):
        out_features, in_features = (t.shape[1], t.shape[0]) if t.transposed else (t.shape[0], t.shape[1])
        module = t.name.removesuffix(".weight")
        out.append(Param(name=f"{module}.lora_A", shape=(r, in_features), count=t.count, nbytes=nbytes, place="layer"))
        out.append(Param(name=f"{module}.lora_B", shape=(out_features, r), count=t.count, nbytes=nbytes, place="layer"))
    return out


class OptimizerCost(Frozen):
    state_bytes: int  # allocated on the GPU, counted by torch
    paged_bytes: int  # in CUDA managed memory: on the device, not in torch's allocated bytes
    temporary_bytes: int  # the step's largest temporary
    state_why: str
    temporary_why: str


def optimizer_cost(params: list[Param], optimizer: str, profile: TrainingProfile) -> OptimizerCost:
    if optimizer == "sgd":
        return OptimizerCost(state_bytes=0, paged_bytes=0, temporary_bytes=0,
                             state_why="SGD(lr=1e-4) without momentum keeps no state",
                             temporary_why="_foreach_add_ updates in place")
    if optimizer == "adamw":
        states = sum(2 * p.allocated for p in params)
        by_dtype: dict[int, int] = {}
        for p in params:
            by_dtype[p.nbytes] = by_dtype.get(p.nbytes, 0) + p.allocated
        return OptimizerCost(
            state_bytes=states, paged_bytes=0, temporary_bytes=max(by_dtype.values(), default=0),
            state_why="exp_avg and exp_avg_sq, zeros_like each trainable parameter (its dtype); step: a CPU scalar",
            temporary_why="foreach AdamW: _foreach_sqrt(exp_avg_sq) copies the whole (device, dtype) group at once")
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        bnb = profile.bitsandbytes
        small, block = bnb["optimizer_min_8bit_size"].value, bnb["optimizer_block_size"].value
        paged_min = bnb["paged_min_elements"].value if optimizer == "paged_adamw8bit" else None
        gpu = paged = 0
        quantized = False
        for p in params:
            n = p.elements
            if n < small:
                gpu += 2 * block_bytes(4 * n) * p.count
                continue
            quantized = True
            gpu += 2 * block_bytes(4 * -(-n // block)) * p.count  # absmax1, absmax2
            if paged_min is not None and n >= paged_min:
                paged += 2 * n * p.count
            else:
                gpu += 2 * block_bytes(n) * p.count
        gpu += 2 * block_bytes(bnb["qmap_bytes"].value // 2) if quantized else 0
        why = (f"uint8 state1/state2 with an fp32 absmax per {block} elements; fp32 states below {small} elements")
        if paged_min is not None:
            why += f"; states of tensors of {paged_min:,}+ elements are paged (managed memory)"
        return OptimizerCost(state_bytes=gpu, paged_bytes=paged, temporary_bytes=0, state_why=why,
                             temporary_why="bitsandbytes' 8-bit update kernels work in place")
    if optimizer == "adafactor":
        states = temp = 0
        for p in params:
            if len(p.shape) >= 2:
                row = math.prod(p.shape[:-1])
                col = math.prod(p.shape[:-2]) * p.shape[-1]
                states += (block_bytes(4 * row) + block_bytes(4 * col)) * p.count
            else:
                states += block_bytes(4 * p.elements) * p.count
            states += block_bytes(4) * p.count  # RMS, a 0-d tensor on the device
            temp = max(temp, (16 if p.nbytes < 4 else 8) * p.elements)
        return OptimizerCost(
            state_bytes=states, paged_bytes=0, temporary_bytes=temp,
            state_why="factored fp32 second moments (row, column) for 2-D tensors, full fp32 for 1-D; no first moment",
            temporary_why="per parameter, one at a time: fp32 copies of the grad and the weight and the update "
                          "(~16 bytes per element of the largest 16-bit parameter, ~8 for fp32)")
    raise WorkloadError(f"Unknown optimizer {optimizer!r}.")
