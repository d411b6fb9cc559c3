"""Data-parallel fine-tuning with sharded states: what one rank holds under ZeRO-1/2/3 or FSDP.

The single-GPU step (estimate.py) lists every moment's tensors by name; sharding divides the
ones a scheme partitions across the `ranks` data-parallel ranks and adds what the scheme
gathers or buffers:

* zero1 (DeepSpeed stage 1): optimizer states and the step's temporaries;
* zero2 (stage 2; FSDP SHARD_GRAD_OP): and the gradients (reduce-scattered);
* zero3 (stage 3; FSDP FULL_SHARD): and the parameters, with one layer gathered at a time.

None of this is measured (no multi-GPU machine has been lent): the figures are the measured
single-GPU step with the scheme's partitioning applied, and the plan says so.
"""

from __future__ import annotations

from typing import Literal

from ...model.spec import Architecture
from ...result import BreakdownTerm
from ...result.training import Moment, TrainingEstimate

Sharding = Literal["none", "zero1", "zero2", "zero3", "fsdp"]
# the tensor names estimate.py gives, by what a scheme partitions
_STATES = ("optimizer states", "optimizer step temporary")
_GRADS = ("grads:", "grad of the embedding output")
_PARAMS = ("weights", "adapter weights")
SHARDED: dict[str, tuple[str, ...]] = {
    "none": (), "zero1": _STATES, "zero2": _STATES + _GRADS, "zero3": _STATES + _GRADS + _PARAMS,
    "fsdp": _STATES + _GRADS + _PARAMS,
}


def _sharded(name: str, scheme: Sharding) -> bool:
    return any(name.startswith(prefix) for prefix in SHARDED[scheme])


def gathered_layer_bytes(arch: Architecture, element_bytes: int) -> int:
    """A zero3/FSDP rank all-gathers one decoder layer's parameters before running it."""
    per_layer: dict[int, int] = {}
    for tensor in arch.tensors:
        for index in tensor.layers or ():
            per_layer[index] = per_layer.get(index, 0) + tensor.elements_each * element_bytes
    return max(per_layer.values(), default=0)


def rank_moments(est: TrainingEstimate, scheme: Sharding, ranks: int, gathered: int) -> list[Moment]:
    """Each moment of the step as one of `ranks` ranks holds it."""
    out = []
    for moment in est.moments:
        tensors = [t.model_copy(update={"bytes": -(-t.bytes // ranks)}) if _sharded(t.name, scheme) else t
                   for t in moment.tensors]
        if scheme in ("zero3", "fsdp") and ranks > 1 and gathered:
            tensors.append(tensors[0].model_copy(update={"name": "gathered layer parameters", "bytes": gathered}))
        out.append(moment.model_copy(update={"tensors": tensors, "bytes": sum(t.bytes for t in tensors)}))
    return out


def rank_breakdown(est: TrainingEstimate, scheme: Sharding, ranks: int, gathered: int,
                   communication_bytes: int) -> tuple[int, list[BreakdownTerm]]:
    """(per-rank device peak, terms) for one rank: the sharded peak moment, the single-GPU
    step's device terms (reserve, outside torch) and the collective's buffers."""
    moments = rank_moments(est, scheme, ranks, gathered)
    peak = max(moments, key=lambda m: m.bytes)
    whys = {t.name: t.why for t in est.breakdown}
    whys["gathered layer parameters"] = f"{scheme} all-gathers one decoder layer's parameters before it runs"
    terms = [BreakdownTerm(name=t.name, bytes=t.bytes, scope="allocated", group="runtime",
                           why=(f"1/{ranks} of it: {scheme} partitions it across the data-parallel ranks"
                                if _sharded(t.name, scheme) and ranks > 1 else whys.get(t.name, "as on one GPU")))
             for t in peak.tensors]
    # the allocator's reserve grows with the requests it serves: scaled with the sharded peak
    scale = peak.bytes / max(est.peak_allocated_bytes, 1)
    device = [t.model_copy(update={"bytes": int(t.bytes * scale)}) if t.name == "allocator reserve" and ranks > 1
              else t for t in est.breakdown if t.scope == "outside"]
    if ranks > 1:
        device.append(BreakdownTerm(name="communication buffers", bytes=communication_bytes, scope="outside",
                                    group="device", why="NCCL's per-rank buffers (from its defaults; not measured)"))
    total = peak.bytes + sum(t.bytes for t in device)
    return total, [*terms, *device]
