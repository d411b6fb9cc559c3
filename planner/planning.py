"""`vramplan plan`: workload + GPU catalog -> plans: how many of which GPU, in which tp x pp layout.

Planning knows no runtime: it enumerates layouts, asks the chosen runtime whether (and how) a
layout serves the request, and ranks what fits by GPU count, then cost per hour where the
catalog knows a price, then headroom.
"""

from __future__ import annotations

from .catalog import Gpu
from .errors import VramplanError
from .model.spec import Architecture
from .request import PlanRequest
from .result import Plan, PlanResult
from .runtimes import plan_layout


def _power_of_two_divisors(n: int, limit: int) -> list[int]:
    out, x = [], 1
    while x <= limit:
        if n % x == 0:
            out.append(x)
        x *= 2
    return out


def candidate_layouts(arch: Architecture, gpu: Gpu, request: PlanRequest) -> list[tuple[int, int]]:
    tp_limit = request.max_gpus if request.allow_multi_node else gpu.gpus_per_node
    tps = [request.tensor_parallel_size] if request.tensor_parallel_size else \
        _power_of_two_divisors(arch.num_heads, tp_limit)
    pps = [request.pipeline_parallel_size] if request.pipeline_parallel_size else \
        [p for p in (1, 2, 3, 4, 6, 8, 12, 16) if p <= arch.num_layers]
    return [(tp, pp) for tp in tps for pp in pps if tp * pp <= request.max_gpus]



def make_plans(arch: Architecture, model: str, gpus: list[Gpu], request: PlanRequest, top: int = 10
               ) -> PlanResult:
    plans: list[Plan] = []
    rejected: dict[str, int] = {}
    considered = 0
    for gpu in gpus:
        for precision in request.precisions:
            fewest = request.max_gpus + 1
            for tp, pp in sorted(candidate_layouts(arch, gpu, request), key=lambda layout: layout[0] * layout[1]):
                if tp * pp > fewest:  # cannot need fewer GPUs than a layout already found
                    break
                considered += 1
                try:
                    result = plan_layout(arch, model, request, precision, gpu, tp, pp)
                except VramplanError as exc:
                    result = str(exc).split(";")[0].rstrip(".")
                if isinstance(result, Plan):
                    plans.append(result)
                    fewest = min(fewest, result.gpus)
                else:
                    rejected[result] = rejected.get(result, 0) + 1
    plans.sort(key=lambda p: (p.gpus, p.cost_per_hour if p.cost_per_hour is not None else float("inf"),
                              -p.headroom_bytes))
    return PlanResult(model=model, request=request, plans=plans[:top], considered=considered, rejected=rejected)


def largest_fitting(arch: Architecture, model: str, gpu: Gpu, request: PlanRequest, what: str,
                    tp: int, pp: int, limit: int = 1 << 22) -> int:
    """`--max`: the largest context or concurrency one replica of tp x pp fits (0: none)."""
    precision = request.precisions[0]

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

    low, high = (1, 2) if what == "concurrency" else (2, 4)
    if not fits(low):
        return 0
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low

