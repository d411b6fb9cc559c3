"""vLLM's start-up accounting on each GPU of a layout (vllm/v1/worker/gpu_worker.py,
determine_available_memory): it takes gpu_memory_utilization x total memory, subtracts the
weights, the activation peak of a profile run of max_num_batched_tokens tokens, what appeared
outside torch since start and the CUDA graphs, and gives the rest to the paged KV cache; a
plan fits when that pool holds `concurrency` sequences of `context` tokens.
"""

from __future__ import annotations

from ..base import Frozen, block_bytes
from ..catalog import DTYPE_BYTES, Gpu, calibration, runtime_profile
from ..errors import WorkloadError
from ..model.spec import Architecture
from ..parallel import kv_heads_per_rank, shard, stage_layers
from ..request import PlanRequest, PrecisionChoice, Workload
from ..result import BreakdownTerm, GpuShare, Plan
from ..weights import resolve_precision, weight_breakdown
from .transformers.activations import prefill_points
from .transformers.estimate import check_workload, resolve_attention, run_spec


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
    requested = int(gpu.memory_bytes * (request.gpu_memory_utilization or 0.9))
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
            BreakdownTerm(name="weights", group="model", bytes=b.weights_bytes, scope="allocated",
                          why="this rank's share"),
            BreakdownTerm(name="profile-run activations", group="runtime", bytes=b.activation_bytes, scope="allocated",
                          why="peak of vLLM's start-up forward at max_num_batched_tokens"),
            BreakdownTerm(name="KV cache pool", group="runtime", bytes=b.kv_pool_bytes, scope="allocated",
                          why=f"{b.blocks} blocks of {block} tokens: what vLLM allocates for the KV cache"),
            BreakdownTerm(name="outside torch since start", group="device", bytes=b.non_torch_bytes, scope="outside",
                          why="cuBLAS and kernels loaded by the profile run"),
            BreakdownTerm(name="CUDA graphs", group="device", bytes=b.cudagraph_bytes, scope="outside",
                          why=runtime_profile().serving["vllm_cudagraph_bytes"].why),
            BreakdownTerm(name="CUDA context", group="device", bytes=base_context, scope="outside",
                          why="before vLLM's first snapshot; not part of gpu_memory_utilization"),
            BreakdownTerm(name="communication buffers", group="device", bytes=comm, scope="outside",
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



def kv_heads_note(arch: Architecture, tp: int) -> str | None:
    if arch.num_kv_heads % tp and tp % arch.num_kv_heads == 0:
        return (f"{arch.num_kv_heads} key/value heads at tp {tp}: vLLM keeps a replica of one head "
                f"on each rank ({kv_heads_per_rank(arch, tp, True)} per rank)")
    return None
