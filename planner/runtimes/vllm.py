"""vLLM's start-up accounting on each GPU of a layout, release by release.

Every worker of vLLM takes gpu_memory_utilization x total memory, subtracts the weights as it
loaded them, the torch peak of a profile run of max_num_batched_tokens tokens (attention
skipped in V1) followed by a sampler warm-up, the non-torch memory charged by the version, and
from 0.20 an estimate of the CUDA graphs; the rest is the paged KV cache, counted in blocks of
16 tokens that every layer group shares, with the fewest blocks of any worker applied to all.
The rules per release are data (profiles/vllm.yaml); this module applies them and fills the
figures vLLM prints (result.vllm.VllmStartup) into each GpuShare.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

from ..base import Frozen
from ..catalog import DTYPE_BYTES, Gpu, _read_yaml, _validate, calibration
from ..errors import UnsupportedModelError, WorkloadError
from ..model.spec import Architecture, TensorSpec
from ..parallel import kv_heads_per_rank, shard, stage_layers
from ..quantized import QuantScheme
from ..request import PlanRequest, PrecisionChoice
from ..result import BreakdownTerm, GpuShare, Plan, VllmStartup
from ..weights import resolve_precision, weight_breakdown

GIB = 1 << 30
Sampler = Literal["torch", "flashinfer", "triton"]


class BatchDefault(Frozen):
    min_memory_gib: float
    names: tuple[str, ...] = ()  # device names that qualify whatever their memory (0.8.0: h100, h200)
    exclude: tuple[str, ...]
    serve: tuple[int | None, int]  # (max_num_batched_tokens, max_num_seqs); None: from max_model_len
    offline: tuple[int | None, int]


class Release(Frozen):
    """The rules of one release range (profiles/vllm.yaml, `releases`, merged up to a version)."""

    since: str
    engine: Literal["v0", "v1"]
    accounting: Literal["absolute", "delta"]
    gpu_memory_utilization: float
    chunked_prefill: Literal["long_context", "always"]
    chunked_budget: int
    unchunked_minimum: int
    batch_defaults: str
    sampler: Sampler
    sampler_rows: Literal["max_num_seqs", "min_seqs_tokens"]
    sampler_bytes: dict[Sampler, float]
    kv_tokens: Literal["blocks", "blocks_per_group", "concurrency"]
    concurrency: Literal["tokens", "blocks"]
    sliding_window: Literal["full", "own_group"]
    cudagraph_subtracted: bool
    mxfp4_triton_from_sm: int
    provenance: str


class ActivationRule(Frozen):
    hidden_copies: int
    fused_moe_chunk: int
    provenance: str


class NonTorch(Frozen):
    absolute_bytes: int
    absolute_v1_bytes: int
    delta_bytes: int
    comm_bytes: dict[Literal["pcie", "nvswitch"], dict[int, int]]
    provenance: str

    def per_rank(self, gpu: Gpu, tp: int) -> int:
        """Communication buffers one rank adds at this tensor-parallel size on this GPU's links."""
        if tp < 2:
            return 0
        table = self.comm_bytes["nvswitch" if gpu.interconnect.startswith("NVLink ") else "pcie"]
        return table[max(k for k in table if k <= tp)]


class VllmProfile(Frozen):
    default_version: str
    default_why: str
    block_size: int
    releases: list[dict]
    batch_tables: dict[str, list[BatchDefault]]
    activation: ActivationRule
    non_torch: NonTorch
    cudagraph_estimate_bytes: int
    cudagraph_provenance: str


@lru_cache(maxsize=1)
def vllm_profile() -> VllmProfile:
    return _validate(VllmProfile, _read_yaml("vllm.yaml"), "vllm.yaml")


NEWEST_READ = (0, 33, 0)  # the newest wheel whose start-up code was read (profiles/vllm.yaml)


def version_key(version: str) -> tuple[int, int, int]:
    """'0.10.1.1', '0.9.1.dev705+g01220ce89', '0.29.1rc1' -> (major, minor, patch)."""
    found = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    if not found:
        raise WorkloadError(f"--vllm-version must look like 0.11.0, not {version[:40]!r}.")
    return int(found[1]), int(found[2]), int(found[3] or 0)


@lru_cache(maxsize=64)
def release_rules(version: str | None) -> tuple[str, Release]:
    """The version applied (the default when None) and its merged rules."""
    profile = vllm_profile()
    chosen = version or profile.default_version
    key = version_key(chosen)
    merged: dict = {}
    for change in sorted(profile.releases, key=lambda c: version_key(c["since"])):
        if version_key(change["since"]) <= key:
            merged.update(change)
    if not merged:
        raise WorkloadError(f"vLLM {chosen} is older than the first release modelled "
                            f"({profile.releases[0]['since']}); choose a later --vllm-version.")
    if key[:2] > NEWEST_READ[:2]:
        raise WorkloadError(f"vLLM {chosen} is newer than the last release whose source was read "
                            f"({'.'.join(map(str, NEWEST_READ[:2]))}.x); choose --vllm-version 0.33 or earlier.")
    return chosen, _validate(Release, merged, f"vllm.yaml releases up to {chosen}")


def _sm(gpu: Gpu) -> int:
    """The compute capability's major x 10 from the device name, as far as mxfp4 cares."""
    name = gpu.name.lower()
    if any(k in name for k in ("b200", "b300", "gb200", "gb300")):
        return 100
    if any(k in name for k in ("h100", "h200", "gh200", "h20")):
        return 90
    return 80


def batch_defaults(rules: Release, gpu: Gpu, request: PlanRequest) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) of the profile run: the request's, else the
    version's defaults for this entry point and GPU (rules §4)."""
    name = gpu.name.lower()
    table = vllm_profile().batch_tables[rules.batch_defaults]
    row = next(r for r in table
               if (any(n in name for n in r.names) if r.names else gpu.memory_bytes >= r.min_memory_gib * GIB)
               and not any(x in name for x in r.exclude))
    tokens, seqs = row.serve if request.entrypoint == "serve" else row.offline
    seqs = request.max_num_seqs or seqs
    if request.max_num_batched_tokens:
        return request.max_num_batched_tokens, seqs
    if tokens is None:  # V0: chunked prefill only for long contexts, else the whole max_model_len
        long = rules.chunked_prefill == "long_context" and request.context > 32768
        tokens = rules.chunked_budget if long else max(request.context, rules.unchunked_minimum)
    return tokens, seqs


def _mxfp4_expert_bytes(t: TensorSpec, sm: int, rules: Release) -> int:
    """gpt-oss experts as vLLM keeps them (mxfp4.py): 4-bit values and one uint8 scale per 32,
    padded per backend: Marlin (below the version's Triton threshold) rounds the intermediate to
    128 and the hidden size to 256; Triton on Hopper only the hidden size to 256; biases bf16."""
    experts, first, second = t.shape if len(t.shape) == 3 else (*t.shape, 0)
    field = t.name.rsplit(".", 1)[-1]
    triton = rules.mxfp4_triton_from_sm and sm >= rules.mxfp4_triton_from_sm
    pad_i = 64 if triton else 128

    def up(n: int, m: int) -> int:
        return -(-n // m) * m

    if field == "gate_up_proj":  # [E, H, 2I]
        rows, cols = 2 * up(second // 2, pad_i), up(first, 256)
    elif field == "down_proj":  # [E, I, H]
        rows, cols = up(second, 256), up(first, pad_i)
    else:  # biases [E, out]
        return t.elements * 2
    return experts * rows * (cols // 2 + cols // 32) * t.count


def _quantized_expert_bytes(t: TensorSpec, scheme: QuantScheme) -> int:
    """GPTQ / AWQ / int compressed-tensors experts through vLLM's fused MoE (moe_wna16, Marlin
    repack: same size): packed weights, fp16 scales per group, AWQ zero points."""
    if t.name.endswith("_bias"):
        return t.elements * 2
    experts, first, second = t.shape
    n_in, n_out = (first, second) if t.transposed else (second, first)
    groups = -(-n_in // scheme.group_size) if scheme.group_size else 1
    weight = experts * n_in * n_out * scheme.bits // 8
    scales = experts * groups * n_out * 2
    zeros = experts * groups * n_out * scheme.bits // 8 if scheme.method == "awq" or not scheme.symmetric else 0
    return (weight + scales + zeros) * t.count


def vllm_weights(rank: Architecture, precision: str, gpu: Gpu, rules: Release) -> tuple[int, str, str]:
    """(bytes "Model loading took" counts, precision label, activation dtype) of one rank: the
    parameters as vLLM keeps them after process_weights_after_loading; transformers' own buffers
    (rotary inv_freq, masks) are not vLLM's."""
    scheme = rank.quantization
    if precision == "auto" and scheme is not None and scheme.method == "mxfp4":
        sm = _sm(gpu)
        total = sum(_mxfp4_expert_bytes(t, sm, rules) if t.kind == "expert" else t.elements * 2
                    for t in rank.tensors)
        return total, "mxfp4", "bf16"
    experts_quantized = precision == "auto" and scheme is not None and rank.moe is not None and \
        scheme.method in ("gptq", "awq", "compressed-tensors") and not scheme.float_weights
    if experts_quantized and scheme is not None:
        # transformers cannot quantize fused experts, vLLM can: take the dense part from the
        # inventory with the experts set aside, and the experts in the fused-MoE layout
        dense = rank.model_copy(update={"tensors": tuple(t for t in rank.tensors if t.kind != "expert"),
                                        "moe": None})
        chosen, compute, choice = resolve_precision(dense, PrecisionChoice(name="auto"))
        loaded = weight_breakdown(dense, chosen, compute, choice.double_quant)
        experts = sum(_quantized_expert_bytes(t, scheme) for t in rank.tensors if t.kind == "expert")
        return loaded.weight_bytes + loaded.quant_state_bytes + experts, chosen.name, compute
    try:
        chosen, compute, choice = resolve_precision(rank, PrecisionChoice(name=precision))
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"vLLM: {exc}") from None
    if chosen.kind in ("bnb_int8", "bnb_4bit"):
        raise UnsupportedModelError(f"vLLM's bitsandbytes loading of {rank.model_type} is not modelled; plan it "
                                    "with --precision bf16 (an upper bound) or --runtime transformers.")
    loaded = weight_breakdown(rank, chosen, compute, choice.double_quant)
    return loaded.weight_bytes + loaded.quant_state_bytes, chosen.name, compute


def profile_activation(rank: Architecture, tokens: int, rows: int, sampler_bytes: float, element: int) -> int:
    """Torch's peak above the weights in the profile run (rules §3): the larger of one layer's
    MLP (or fused-MoE workspace, or attention projections) over `tokens` tokens, and the sampler
    warm-up on [rows, vocab] logits beside the kept hidden states."""
    rule = vllm_profile().activation
    hidden = rank.hidden_size
    stream = rule.hidden_copies * tokens * hidden * element
    width = rank.intermediate_size
    mlp = tokens * width * (3 if rank.gated_mlp else 2) * element if rank.dense_mlp_layers else 0
    moe = rank.moe
    if moe is not None and moe.sparse_layers:
        routed = min(tokens, rule.fused_moe_chunk) * moe.top_k
        inner = moe.expert_intermediate
        workspace = routed * (max(2 * inner, hidden) + inner) * element + tokens * moe.num_experts * 4
        shared = tokens * 3 * moe.shared_intermediate * element
        mlp = max(mlp, workspace + shared)
    heads, kv = rank.num_heads * rank.head_dim, rank.num_kv_heads * rank.head_dim
    attention = tokens * (2 * heads + 2 * kv) * element  # fused qkv output and the attention output
    forward = stream + max(mlp, attention)
    if not rank.computes_logits:
        return forward
    sampler = tokens * hidden * element + int(rows * rank.vocab_size * sampler_bytes)
    return max(forward, sampler)


class KvLayout(Frozen):
    page_bytes: int  # one layer's block: block_size tokens of keys and values (MLA: the latent)
    layers_per_block: int  # tensors one block id spans (layers per group; all layers in V0 / 0.8)
    groups: int
    blocks_per_request: int  # blocks one max_model_len request takes across the groups


def kv_layout(rank: Architecture, element: int, rules: Release, context: int, tokens: int) -> KvLayout:
    """Pages, groups and blocks per request (rules §5)."""
    block = vllm_profile().block_size
    page = block * (rank.cache_width("key") + rank.cache_width("value")) * element
    attention = [k for k in rank.layer_types if k != "none"]
    full_blocks = -(-context // block)
    sliding = [k for k in attention if k == "sliding"] if rules.sliding_window == "own_group" else []
    if not sliding or len(sliding) == len(attention):
        if sliding and rank.sliding_window:  # every layer sliding: one group of windows
            window = -(-min(rank.sliding_window - 1 + tokens, context) // block) + 1
            return KvLayout(page_bytes=page, layers_per_block=len(attention), groups=1, blocks_per_request=window)
        return KvLayout(page_bytes=page, layers_per_block=len(attention), groups=1, blocks_per_request=full_blocks)
    full = len(attention) - len(sliding)
    size = min(full, len(sliding))
    full_groups, sliding_groups = -(-full // size), -(-len(sliding) // size)
    window = -(-min((rank.sliding_window or context) - 1 + tokens, context) // block) + 1
    return KvLayout(page_bytes=page, layers_per_block=size, groups=full_groups + sliding_groups,
                    blocks_per_request=full_groups * full_blocks + sliding_groups * window)


def vllm_startup(rank: Architecture, gpu: Gpu, request: PlanRequest, precision: str, tp: int) -> VllmStartup:
    """The start-up figures one worker of a tp-way layout prints (before the cross-worker
    minimum of blocks, which plan_vllm applies)."""
    version, rules = release_rules(request.vllm_version)
    if rank.encoder is not None:
        raise WorkloadError(f"{rank.model_type}: vLLM serving of encoder-decoder models is not modelled.")
    if rank.recurrent is not None:
        raise WorkloadError(f"{rank.model_type}: vLLM keeps {rank.recurrent.kind} states in its own cache pages "
                            "(the attention block size grows to match them); vramplan does not model that yet.")
    tokens, seqs = batch_defaults(rules, gpu, request)
    rows = seqs if rules.sampler_rows == "max_num_seqs" else min(seqs, tokens)
    rows = min(rows, tokens)
    # the dummy run spreads the tokens over `rows` requests: position limits apply to one share
    share = -(-tokens // rows)
    if rank.max_positions is not None and share > rank.max_positions:
        raise WorkloadError(f"{rank.model_type} can address {rank.max_positions} positions; vLLM's profile run "
                            f"gives each of {rows} requests {share} tokens (lower --max-num-batched-tokens).")
    if rank.max_positions is not None and request.context > rank.max_positions:
        raise WorkloadError(f"{rank.model_type} can address {rank.max_positions} positions; vLLM refuses a "
                            f"max_model_len of {request.context}.")
    sampler: Sampler = rules.sampler if request.sampler == "auto" else request.sampler
    weights, _label, dtype = vllm_weights(rank, precision, gpu, rules)
    element = DTYPE_BYTES[dtype]
    activation = profile_activation(rank, tokens, rows, rules.sampler_bytes[sampler], element)
    nt = vllm_profile().non_torch
    charged = {"delta": nt.delta_bytes, "absolute": nt.absolute_bytes if rules.engine == "v0" else nt.absolute_v1_bytes}
    non_torch = charged[rules.accounting] + nt.per_rank(gpu, tp)
    graphs = vllm_profile().cudagraph_estimate_bytes
    utilization = request.gpu_memory_utilization or rules.gpu_memory_utilization
    requested = int(gpu.memory_bytes * utilization)
    subtracted = graphs if rules.cudagraph_subtracted else 0
    available = requested - weights - activation - non_torch - subtracted
    kv_element = 1 if request.kv_cache_dtype == "fp8" else element
    layout = kv_layout(rank, kv_element, rules, request.context, tokens)
    per_block = layout.page_bytes * layout.layers_per_block
    blocks = max(available, 0) // per_block if per_block else 0
    return VllmStartup(
        vllm_version=version, engine=rules.engine, entrypoint=request.entrypoint, sampler=sampler,
        gpu_memory_utilization=utilization, total_memory_bytes=gpu.memory_bytes, requested_bytes=requested,
        max_num_seqs=seqs, max_num_batched_tokens=tokens, max_model_len=request.context,
        model_loading_bytes=weights, activation_peak_bytes=activation, non_torch_bytes=non_torch,
        cudagraph_bytes=subtracted, cudagraph_outside_bytes=graphs - subtracted, kv_cache_bytes=available,
        kv_block_bytes=per_block, kv_groups=layout.groups, gpu_blocks=blocks,
        blocks_per_request=layout.blocks_per_request,
        **_capacity(blocks, layout, rules, request.context))


def _capacity(blocks: int, layout: KvLayout, rules: Release, context: int) -> dict:
    """"GPU KV cache size: N tokens" and "Maximum concurrency ...: K x" as the version computes them."""
    block = vllm_profile().block_size
    if rules.concurrency == "tokens":
        concurrency = blocks * block / context
    else:
        concurrency = blocks / layout.blocks_per_request
    if rules.kv_tokens == "blocks":
        tokens = blocks * block
    elif rules.kv_tokens == "blocks_per_group":
        tokens = blocks // layout.groups * block
    else:
        tokens = int(concurrency * context)
    return {"kv_cache_tokens": tokens, "max_concurrency": concurrency}


def with_blocks(startup: VllmStartup, blocks: int) -> VllmStartup:
    """A worker's figures after vLLM applies the fewest blocks of any worker to all of them."""
    if blocks == startup.gpu_blocks:
        return startup
    _, rules = release_rules(startup.vllm_version)
    layout = KvLayout(page_bytes=0, layers_per_block=0, groups=startup.kv_groups,
                      blocks_per_request=startup.blocks_per_request)
    return startup.model_copy(update={"gpu_blocks": blocks, **_capacity(blocks, layout, rules, startup.max_model_len)})


def plan_vllm(arch: Architecture, model: str, request: PlanRequest, precision: str, gpu: Gpu,
              tp: int, pp: int) -> Plan | str:
    ranks = [shard(arch, tp, pp, stage, replicate_kv=True) for stage in range(pp)]
    startups = [vllm_startup(rank, gpu, request, precision, tp) for rank in ranks]
    if any(s.kv_cache_bytes <= 0 for s in startups):
        return "weights and activations exceed gpu_memory_utilization"
    _, rules = release_rules(request.vllm_version)
    per_request = max(s.blocks_per_request for s in startups)
    blocks = min(s.gpu_blocks for s in startups)
    concurrent = blocks // per_request
    if concurrent < 1:
        return "the KV pool cannot hold one sequence of --context tokens"
    replicas = -(-request.concurrency // concurrent)
    if tp * pp * replicas > request.max_gpus:
        return "needs more GPUs than --max-gpus"
    outside = calibration().outside_torch.get(gpu.outside_torch_key) or calibration().outside_torch["default"]
    shares = []
    for stage, s in enumerate(startups):
        s = with_blocks(s, blocks)
        # the CUDA context sits outside the budget where the version's snapshot excludes it
        context = outside.bytes - calibration().outside_torch_growth_bytes if rules.accounting == "delta" else 0
        terms = [
            BreakdownTerm(name="weights", group="model", bytes=s.model_loading_bytes, scope="allocated",
                          why="Model loading took: this rank's parameters as vLLM keeps them"),
            BreakdownTerm(name="profile-run activations", group="runtime", bytes=s.activation_peak_bytes,
                          scope="allocated", why=f"torch peak of the profile run at {s.max_num_batched_tokens} tokens "
                          f"and the sampler on {min(s.max_num_seqs, s.max_num_batched_tokens)} rows"),
            BreakdownTerm(name="KV cache pool", group="runtime", bytes=s.kv_cache_bytes, scope="allocated",
                          why=f"Available KV cache memory: {s.gpu_blocks} blocks of {vllm_profile().block_size} "
                          "tokens (and what is left under one block)"),
            BreakdownTerm(name="non-torch memory", group="device", bytes=s.non_torch_bytes, scope="outside",
                          why="what vLLM charges outside torch (cuBLAS, kernels; NCCL at tp > 1)"),
            BreakdownTerm(name="CUDA graphs", group="device", bytes=s.cudagraph_bytes + s.cudagraph_outside_bytes,
                          scope="outside", why="subtracted before the KV cache from 0.20; earlier, captured after "
                          "it out of the (1 - util) headroom"),
            BreakdownTerm(name="CUDA context", group="device", bytes=context, scope="outside",
                          why="before vLLM's first snapshot; not part of gpu_memory_utilization"),
        ]
        peak = s.requested_bytes + context + s.cudagraph_outside_bytes
        shares.append(GpuShare(stage=stage, layers=len(stage_layers(arch.num_layers, pp, stage)), peak_bytes=peak,
                               breakdown=_balanced(terms, peak), vllm=s))
    peak = max(s.peak_bytes for s in shares)
    if peak > gpu.memory_bytes:
        return "gpu_memory_utilization x memory plus the CUDA context exceeds the GPU"
    gpus = tp * pp * replicas
    label = vllm_weights(ranks[-1], precision, gpu, rules)[1]
    return Plan(gpu=gpu.name, gpus=gpus, tp=tp, pp=pp, replicas=replicas, precision=label, runtime="vllm",
                per_gpu_peak_bytes=peak, gpu_memory_bytes=gpu.memory_bytes, headroom_bytes=gpu.memory_bytes - peak,
                cost_per_hour=gpu.price_per_hour_usd * gpus if gpu.price_per_hour_usd else None,
                kv_cache_bytes=min(s.kv_cache_bytes for s in startups), max_concurrent_sequences=concurrent,
                per_gpu=shares)


def _balanced(terms: list[BreakdownTerm], peak: int) -> list[BreakdownTerm]:
    """The non-zero terms; int(total x util) makes them sum to the peak exactly."""
    kept = [t for t in terms if t.bytes]
    assert sum(t.bytes for t in kept) == peak, "vLLM's budget terms must sum to requested memory"
    return kept


def kv_heads_note(arch: Architecture, tp: int) -> str | None:
    if arch.num_kv_heads % tp and tp % arch.num_kv_heads == 0:
        return (f"{arch.num_kv_heads} key/value heads at tp {tp}: vLLM keeps a replica of one head "
                f"on each rank ({kv_heads_per_rank(arch, tp, True)} per rank)")
    return None
