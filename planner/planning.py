"""`vramplan plan`: workload + GPU catalog -> plans: how many of which GPU, in which tp x pp layout.

Planning knows no runtime: it enumerates layouts, asks the chosen runtime whether (and how) a
layout serves the request, and ranks what fits: by default the fewest GPUs, then the smallest
GPU that suffices (least memory), then cost per hour where the catalog knows a price, then
headroom. The types of the plan, `--max` and `plot` reports live here beside the search.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Frozen, largest_passing
from .catalog import Gpu
from .errors import VramplanError
from .model.spec import Architecture
from .request import PlanRequest, Workload
from .result import Plan, PlanResult
from .runtimes import largest_value, plan_layout

SortKey = Literal["gpus", "memory", "cost", "headroom"]
INFINITY = float("inf")


class PlanReport(PlanResult):
    """Ranked plans, with what they rest on: the caveats estimate would print, and the GPUs
    no committed row measured (their memory outside torch is assumed)."""

    sort: SortKey = "gpus"
    unmeasured_gpus: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class LayoutMaximum(Frozen):
    gpu: str
    gpus: int
    tp: int
    pp: int
    value: int  # the largest context or concurrency one replica fits; 0: none
    capped: bool = False  # the value is the model's position limit, not the GPU's


class MaximumReport(Frozen):
    """`plan --max`: for each tp x pp layout of one GPU, the largest context or concurrency."""

    model: str
    gpu: str
    what: Literal["context", "concurrency"]
    request: PlanRequest
    limit: int | None  # the model's positions, when `what` is context and it has a limit
    layouts: list[LayoutMaximum]
    notes: list[str] = Field(default_factory=list)


class SeriesLine(Frozen):
    precision: str
    peak_device_bytes: list[int | None]  # per x value; None where that workload is refused
    refused: list[str | None]  # the reason, per x value, where refused


class MemorySeries(Frozen):
    """`plot`: peak device memory against context (or batch), per precision."""

    model: str
    axis: Literal["context", "batch"]
    values: list[int]
    workload: Workload  # the fixed part of each run (prompt_len or batch varies)
    attn: str  # the attention implementation the runs resolve to
    lines: list[SeriesLine]
    gpus: list[Gpu]
    notes: list[str] = Field(default_factory=list)


def plan_order(sort: SortKey):
    """The ranking key of `--sort`; ties fall through to the default order."""

    def cost(p: Plan) -> float:
        return p.cost_per_hour if p.cost_per_hour is not None else INFINITY

    def default(p: Plan) -> tuple:
        return (p.gpus, p.gpu_memory_bytes, cost(p), -p.headroom_bytes)

    keys = {
        "gpus": default,
        "memory": lambda p: (p.gpu_memory_bytes * p.gpus, *default(p)),
        "cost": lambda p: (cost(p), *default(p)),
        "headroom": lambda p: (-p.headroom_bytes, *default(p)),
    }
    return keys[sort]


def _power_of_two_divisors(n: int, limit: int) -> list[int]:
    out, x = [], 1
    while x <= limit:
        if n % x == 0:
            out.append(x)
        x *= 2
    return out


def candidate_layouts(arch: Architecture, gpu: Gpu, request: PlanRequest) -> list[tuple[int, int]]:
    tp_limit = request.max_gpus if request.allow_multi_node else gpu.gpus_per_node
    fixed = request.tensor_parallel_size
    tps = ([fixed] if fixed <= tp_limit else []) if fixed else _power_of_two_divisors(arch.num_heads, tp_limit)
    pps = [request.pipeline_parallel_size] if request.pipeline_parallel_size else \
        [p for p in (1, 2, 3, 4, 6, 8, 12, 16) if p <= arch.num_layers]
    return [(tp, pp) for tp in tps for pp in pps if tp * pp <= request.max_gpus]



def _no_layout_reason(gpu: Gpu, request: PlanRequest) -> str:
    tp = request.tensor_parallel_size
    if tp and not request.allow_multi_node and tp > gpu.gpus_per_node:
        return f"tensor parallel size {tp} exceeds a node's GPUs (pass --multi-node to allow it)"
    return f"no tp x pp layout within --max-gpus {request.max_gpus}"

def make_plans(arch: Architecture, model: str, gpus: list[Gpu], request: PlanRequest, top: int = 10,
               sort: SortKey = "gpus") -> PlanReport:
    plans: list[Plan] = []
    rejected: dict[str, int] = {}
    considered = 0
    for gpu in gpus:
        layouts = sorted(candidate_layouts(arch, gpu, request), key=lambda layout: layout[0] * layout[1])
        if not layouts:
            reason = _no_layout_reason(gpu, request)
            rejected[reason] = rejected.get(reason, 0) + 1
        for precision in request.precisions:
            fewest = request.max_gpus + 1
            for tp, pp in layouts:
                if tp * pp > fewest:  # cannot need fewer GPUs than a layout already found
                    break
                considered += 1
                try:
                    result = plan_layout(arch, model, request, precision, gpu, tp, pp)
                except VramplanError as exc:
                    result = str(exc).split(";")[0].rstrip(".") or type(exc).__name__
                if isinstance(result, Plan):
                    plans.append(result)
                    fewest = min(fewest, result.gpus)
                else:
                    reason = result or "does not fit"
                    rejected[reason] = rejected.get(reason, 0) + 1
    plans.sort(key=plan_order(sort))
    shown = plans[:top]
    by_name = {g.name: g for g in gpus}
    unmeasured = sorted({p.gpu for p in shown if not by_name[p.gpu].measured})
    return PlanReport(model=model, request=request, plans=shown, considered=considered, rejected=rejected,
                      sort=sort, unmeasured_gpus=unmeasured)


def largest_fitting(arch: Architecture, model: str, gpu: Gpu, request: PlanRequest, what: str,
                    tp: int, pp: int, limit: int = 1 << 22) -> int:
    """`--max`: the largest context or concurrency one replica of tp x pp fits (0: none)."""
    precision = request.precisions[0]
    try:
        direct = largest_value(arch, model, request, precision, gpu, tp, pp, what, limit)
    except VramplanError:
        return 0
    if direct is not None:
        return direct

    def fits(value: int) -> bool:
        req = request.model_copy(update={what: value, "concurrency": value if what == "concurrency" else 1})
        if what == "context":
            req = req.model_copy(update={"new_tokens": min(request.new_tokens, value - 1),
                                         "concurrency": request.concurrency})
        try:
            result = plan_layout(arch, model, req.model_copy(update={"max_gpus": tp * pp}), precision, gpu, tp, pp)
        except VramplanError:
            return False
        return isinstance(result, Plan) and result.replicas == 1

    return largest_passing(fits, 1 if what == "concurrency" else 2, limit)

