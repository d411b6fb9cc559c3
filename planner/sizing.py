"""`vramplan plan`: workload + GPU catalog -> plans: how many of which GPU, in which tp x pp layout.

Each candidate layout is estimated per GPU with the single-GPU engine on the rank's own
architecture (parallel.shard), so every per-GPU number is the same breakdown `estimate`
prints. Two runtimes:

* transformers: `generate()` on each replica; tensor parallel through torchrun and the
  model's tp_plan (one process per GPU, NCCL buffers on each), pipeline parallel through a
  device_map split (one process, its layers on each GPU). A replica serves `concurrency`
  sequences as one batch, or the batch is split across replicas.
* vllm: the V1 engine's start-up accounting (vllm/v1/worker/gpu_worker.py,
  determine_available_memory): it takes gpu_memory_utilization x total memory, subtracts the
  weights, the activation peak of a profile run of max_num_batched_tokens tokens, what
  appeared outside torch since start and the CUDA graphs, and gives the rest to the paged KV
  cache; a plan fits when that pool holds `concurrency` sequences of `context` tokens.

Plans are ranked by GPU count, then cost per hour where the catalog knows a price, then
headroom.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field

from .architecture import Architecture
from .base import Frozen, block_bytes
from .catalog import DTYPE_BYTES, Gpu, calibration, gpu_catalog, runtime_profile
from .errors import VramplanError, WorkloadError
from .estimate import (
    BreakdownTerm,
    Estimate,
    PrecisionChoice,
    Workload,
    check_workload,
    estimate_architecture,
    resolve_attention,
    resolve_precision,
    run_spec,
)
from .parallel import kv_heads_per_rank, shard, stage_layers
from .runtime.activations import prefill_points
from .weights import weight_breakdown

Runtime = Literal["transformers", "vllm"]


class PlanRequest(Frozen):
    context: int = Field(4096, ge=2, le=1 << 24)  # tokens per sequence: prompt + generated
    new_tokens: int = Field(256, ge=1, le=1 << 24)
    concurrency: int = Field(1, ge=1, le=1 << 20)
    precisions: tuple[str, ...] = ("bf16",)
    runtime: Runtime = "transformers"
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # vllm
    max_num_batched_tokens: int | None = None  # vllm; None: its default
    max_num_seqs: int | None = None  # vllm; None: its default
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"  # vllm stores fp8 when asked
    tensor_parallel_size: int | None = None  # fixed tp, or None to search
    pipeline_parallel_size: int | None = None
    max_gpus: int = Field(64, ge=1)
    allow_multi_node: bool = False  # tp across nodes
    attn: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"


class GpuShare(Frozen):
    """What one GPU of a pipeline stage holds (all tensor-parallel ranks of a stage are alike)."""

    stage: int
    layers: int
    peak_bytes: int
    breakdown: list[BreakdownTerm]


class Plan(Frozen):
    gpu: str
    gpus: int
    tp: int
    pp: int
    replicas: int
    precision: str
    runtime: Runtime
    per_gpu_peak_bytes: int
    gpu_memory_bytes: int
    headroom_bytes: int
    cost_per_hour: float | None = None
    batch_per_replica: int | None = None  # transformers
    kv_cache_bytes: int | None = None  # vllm: the KV pool per GPU
    max_concurrent_sequences: int | None = None  # vllm: per replica, at `context` tokens each
    per_gpu: list[GpuShare]


class PlanResult(Frozen):
    model: str
    request: PlanRequest
    plans: list[Plan]
    considered: int
    rejected: dict[str, int]  # reason -> how many layouts


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


def _stage_estimate(arch: Architecture, model: str, workload: Workload, choice: PrecisionChoice, gpu: Gpu,
                    tp: int, pp: int, stage: int, replicate_kv: bool) -> Estimate:
    """A rank's estimate; it depends on the GPU only through its memory-outside-torch figure,
    so one estimate serves every GPU kind that shares it."""
    return _cached_stage_estimate(arch, model, workload, choice, gpu.outside_torch_key, tp, pp, stage,
                                  replicate_kv)


@lru_cache(maxsize=4096)
def _cached_stage_estimate(arch: Architecture, model: str, workload: Workload, choice: PrecisionChoice,
                           outside_key: str, tp: int, pp: int, stage: int, replicate_kv: bool) -> Estimate:
    representative = next(g for g in gpu_catalog().gpus if g.outside_torch_key == outside_key)
    rank = shard(arch, tp, pp, stage, replicate_kv=replicate_kv)
    est = estimate_architecture(rank, model, workload, choice, representative).model_copy(
        update={"verdict": None})
    if tp == 1:
        return est
    comm = runtime_profile().serving["nccl_buffers_bytes"]
    term = BreakdownTerm(name="communication buffers", bytes=comm.value, why=comm.why, scope="outside")
    return est.model_copy(update={"breakdown": [*est.breakdown, term],
                                  "peak_device_bytes": est.peak_device_bytes + comm.value})


def transformers_layout(arch: Architecture, model: str, request: PlanRequest, precision: str, gpu: Gpu,
                        tp: int, pp: int, batch: int) -> list[Estimate]:
    """One estimate per pipeline stage for a replica running `batch` sequences."""
    prompt = request.context - request.new_tokens
    if prompt < 1:
        raise WorkloadError("--context must exceed --new-tokens.")
    workload = Workload(batch=batch, prompt_len=prompt, new_tokens=request.new_tokens, attn=request.attn)
    choice = PrecisionChoice(name=precision)
    return [_stage_estimate(arch, model, workload, choice, gpu, tp, pp, s, replicate_kv=False)
            for s in range(pp)]


def _plan_from_stages(stages: list[Estimate], gpu: Gpu, tp: int, pp: int, replicas: int, precision: str,
                      runtime: Runtime, arch: Architecture, **extra) -> Plan:
    peak = max(e.peak_device_bytes for e in stages)
    gpus = tp * pp * replicas
    return Plan(
        gpu=gpu.name, gpus=gpus, tp=tp, pp=pp, replicas=replicas, precision=stages[0].precision, runtime=runtime,
        per_gpu_peak_bytes=peak, gpu_memory_bytes=gpu.memory_bytes, headroom_bytes=gpu.memory_bytes - peak,
        cost_per_hour=gpu.price_per_hour_usd * gpus if gpu.price_per_hour_usd else None,
        per_gpu=[GpuShare(stage=i, layers=len(stage_layers(arch.num_layers, pp, i)), peak_bytes=e.peak_device_bytes,
                          breakdown=e.breakdown) for i, e in enumerate(stages)],
        **extra,
    )


def plan_transformers(arch: Architecture, model: str, request: PlanRequest, precision: str, gpu: Gpu,
                      tp: int, pp: int) -> Plan | str:
    """The fewest replicas whose batches fit (more replicas, smaller batches), or why none does."""
    k = request.concurrency

    def attempt(replicas: int) -> Plan | None:
        batch = -(-k // replicas)
        stages = transformers_layout(arch, model, request, precision, gpu, tp, pp, batch)
        if all(e.peak_device_bytes <= gpu.memory_bytes for e in stages):
            return _plan_from_stages(stages, gpu, tp, pp, replicas, precision, "transformers", arch,
                                     batch_per_replica=batch)
        return None

    most = min(k, request.max_gpus // (tp * pp))
    if most < 1:
        return "needs more GPUs than --max-gpus"
    best = attempt(most)
    if best is None:
        return "one sequence does not fit" if -(-k // most) == 1 else "needs more GPUs than --max-gpus"
    low, high = 0, most  # attempt(high) fits; find the fewest replicas that do
    while high - low > 1:
        middle = (low + high) // 2
        found = attempt(middle)
        if found is None:
            low = middle
        else:
            high, best = middle, found
    return best


class VllmBudget(Frozen):
    """vLLM's start-up accounting on one GPU of one stage."""

    requested_bytes: int
    weights_bytes: int
    activation_bytes: int
    non_torch_bytes: int
    cudagraph_bytes: int
    kv_pool_bytes: int
    kv_bytes_per_block: int
    blocks: int


def vllm_budget(rank: Architecture, gpu: Gpu, request: PlanRequest, precision: str) -> VllmBudget:
    serving = runtime_profile().serving
    tokens = request.max_num_batched_tokens or serving["vllm_max_num_batched_tokens"].value
    seqs = request.max_num_seqs or serving["vllm_max_num_seqs"].value
    # the profile run: one forward of `tokens` tokens, flattened (vLLM has no batch dimension)
    # and without a KV cache; only the sampled positions get logits (the sampler's dummy run)
    # only the weights and the activation points are needed: not estimate_architecture's
    # allocator replay, which is the expensive part of an estimate
    if rank.encoder is not None:
        raise WorkloadError(f"{rank.model_type}: vLLM serving of encoder-decoder models is not modelled.")
    if rank.recurrent is not None:
        raise WorkloadError(f"{rank.model_type}: vLLM keeps {rank.recurrent.kind} states in its own cache layout and "
                            "runs its own scan kernels; vramplan does not model that yet (use --runtime transformers).")
    workload = resolve_attention(rank, Workload(batch=1, prompt_len=tokens, new_tokens=0, mode="forward"))
    # vLLM's dummy run spreads the tokens over min(tokens, max_num_seqs) requests, so position
    # limits apply to one request's share (gpt2's 1024 learned positions against 8192 tokens)
    share = -(-tokens // min(tokens, seqs))
    check_workload(rank, workload.model_copy(update={"prompt_len": share}))
    if rank.max_positions is not None and request.context > rank.max_positions:
        raise WorkloadError(f"{rank.model_type} can address {rank.max_positions} positions; vLLM refuses a "
                            f"max_model_len of {request.context}.")
    chosen, compute, choice = resolve_precision(rank, PrecisionChoice(name=precision))
    loaded = weight_breakdown(rank, chosen, compute, choice.double_quant)
    weights = loaded.allocated_bytes
    spec = run_spec(rank, workload, loaded, chosen, compute)
    layout = runtime_profile().families[rank.family]
    inner = rank.model_copy(update={"computes_logits": False})
    activation = max(p.total for p in prefill_points(inner, layout, spec))
    if rank.computes_logits:
        activation += block_bytes(seqs * rank.vocab_size * 4) * 2  # sampler dummy run: fp32 logits, probs
    requested = int(gpu.memory_bytes * request.gpu_memory_utilization)
    non_torch = calibration().outside_torch_growth_bytes
    graphs = serving["vllm_cudagraph_bytes"].value
    kv_element = 1 if request.kv_cache_dtype == "fp8" else DTYPE_BYTES[compute]
    block = serving["vllm_block_size"].value
    # keys + values per token and layer (latent attention: its latent and rotary key, once)
    per_block = rank.num_layers * (rank.cache_width("key") + rank.cache_width("value")) * kv_element * block
    pool = requested - weights - activation - non_torch - graphs
    return VllmBudget(requested_bytes=requested, weights_bytes=weights, activation_bytes=activation,
                      non_torch_bytes=non_torch, cudagraph_bytes=graphs, kv_pool_bytes=max(pool, 0),
                      kv_bytes_per_block=per_block, blocks=max(pool, 0) // per_block if per_block else 0)


def plan_vllm(arch: Architecture, model: str, request: PlanRequest, precision: str, gpu: Gpu,
              tp: int, pp: int) -> Plan | str:
    block = runtime_profile().serving["vllm_block_size"].value
    blocks_per_sequence = -(-request.context // block)
    budgets = [vllm_budget(shard(arch, tp, pp, stage, replicate_kv=True), gpu, request, precision)
               for stage in range(pp)]
    if any(b.kv_pool_bytes <= 0 for b in budgets):
        return "weights and activations exceed gpu_memory_utilization"
    concurrent = min(b.blocks for b in budgets) // blocks_per_sequence
    if concurrent < 1:
        return "the KV pool cannot hold one sequence of --context tokens"
    replicas = -(-request.concurrency // concurrent)
    if tp * pp * replicas > request.max_gpus:
        return "needs more GPUs than --max-gpus"
    outside = calibration().outside_torch.get(gpu.outside_torch_key) or calibration().outside_torch["default"]
    comm = runtime_profile().serving["nccl_buffers_bytes"].value if tp * pp > 1 else 0
    shares = []
    for stage, b in enumerate(budgets):
        base_context = outside.bytes - calibration().outside_torch_growth_bytes
        terms = [
            BreakdownTerm(name="weights", bytes=b.weights_bytes, scope="allocated", why="this rank's share"),
            BreakdownTerm(name="profile-run activations", bytes=b.activation_bytes, scope="allocated",
                          why="peak of vLLM's start-up forward at max_num_batched_tokens"),
            BreakdownTerm(name="KV cache pool", bytes=b.kv_pool_bytes, scope="allocated",
                          why=f"{b.blocks} blocks of {block} tokens: what vLLM allocates for the KV cache"),
            BreakdownTerm(name="outside torch since start", bytes=b.non_torch_bytes, scope="outside",
                          why="cuBLAS and kernels loaded by the profile run"),
            BreakdownTerm(name="CUDA graphs", bytes=b.cudagraph_bytes, scope="outside",
                          why=runtime_profile().serving["vllm_cudagraph_bytes"].why),
            BreakdownTerm(name="CUDA context", bytes=base_context, scope="outside",
                          why="before vLLM's first snapshot; not part of gpu_memory_utilization"),
            BreakdownTerm(name="communication buffers", bytes=comm, scope="outside",
                          why=runtime_profile().serving["nccl_buffers_bytes"].why),
        ]
        peak = b.requested_bytes + base_context + comm
        shares.append(GpuShare(stage=stage, layers=len(stage_layers(arch.num_layers, pp, stage)),
                               peak_bytes=peak, breakdown=[t for t in terms if t.bytes]))
    peak = max(s.peak_bytes for s in shares)
    if peak > gpu.memory_bytes:
        return "gpu_memory_utilization x memory plus the CUDA context exceeds the GPU"
    gpus = tp * pp * replicas
    label = resolve_precision(arch, PrecisionChoice(name=precision))[0].name
    return Plan(gpu=gpu.name, gpus=gpus, tp=tp, pp=pp, replicas=replicas, precision=label, runtime="vllm",
                per_gpu_peak_bytes=peak, gpu_memory_bytes=gpu.memory_bytes, headroom_bytes=gpu.memory_bytes - peak,
                cost_per_hour=gpu.price_per_hour_usd * gpus if gpu.price_per_hour_usd else None,
                kv_cache_bytes=min(b.kv_pool_bytes for b in budgets), max_concurrent_sequences=concurrent,
                per_gpu=shares)


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
                    fn = plan_vllm if request.runtime == "vllm" else plan_transformers
                    result = fn(arch, model, request, precision, gpu, tp, pp)
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
            fn = plan_vllm if request.runtime == "vllm" else plan_transformers
            result = fn(arch, model, req.model_copy(update={"max_gpus": tp * pp}), precision, gpu, tp, pp)
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


def kv_heads_note(arch: Architecture, tp: int) -> str | None:
    if arch.num_kv_heads % tp and tp % arch.num_kv_heads == 0:
        return (f"{arch.num_kv_heads} key/value heads at tp {tp}: vLLM keeps a replica of one head "
                f"on each rank ({kv_heads_per_rank(arch, tp, True)} per rank)")
    return None
