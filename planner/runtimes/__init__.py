"""What a runtime allocates on top of the weights, one module (or package) per runtime.

allocator.py     PyTorch's caching allocator, shared by every runtime
transformers/    generate() and forward(): each op's peak term, the allocation replay, serving
vllm.py          vLLM's start-up accounting of its KV-cache pool

Every runtime answers planning's one question through `plan_layout`: does this tp x pp layout
of this GPU serve the request, and with what per-GPU breakdown (a `Plan`), or why not.
"""

from __future__ import annotations

from collections.abc import Callable

from ..catalog import Gpu
from ..model.spec import Architecture
from ..request import PlanRequest, RuntimeName
from ..result import Plan
from . import vllm
from .transformers import serve

LayoutPlanner = Callable[[Architecture, str, PlanRequest, str, Gpu, int, int], "Plan | str"]
RUNTIMES: dict[RuntimeName, LayoutPlanner] = {
    "transformers": serve.plan_transformers,
    "vllm": vllm.plan_vllm,
}


# runtimes that answer `plan --max` directly (the others are bisected through plan_layout)
LARGEST = {"transformers": serve.largest_transformers}


def largest_value(arch: Architecture, model: str, request: PlanRequest, precision: str, gpu: Gpu, tp: int, pp: int,
                  what: str, limit: int) -> int | None:
    """The runtime's own largest concurrency or context for one replica, or None to bisect."""
    fn = LARGEST.get(request.runtime)
    return None if fn is None else fn(arch, model, request, precision, gpu, tp, pp, what, limit)


def plan_layout(arch: Architecture, model: str, request: PlanRequest, precision: str, gpu: Gpu,
                tp: int, pp: int) -> Plan | str:
    """The request's runtime sizes one layout: a Plan, or the reason it does not fit."""
    return RUNTIMES[request.runtime](arch, model, request, precision, gpu, tp, pp)
