"""Mixture-of-experts routers as request sequences, in the order transformers 5.17 allocates and
frees (the block around them is mlp_layers.moe_block): softmax top-k (Mixtral, Qwen-MoE, OLMoE),
Llama-4's sigmoid over the top-k logits, gpt-oss's softmax over its top-k logits, DeepSeek-V2's
fp32 softmax and DeepSeek-V3's sigmoid scores routed within the best expert groups."""

from __future__ import annotations

from typing import Any

from ...model.spec import Architecture

Tracer = Any  # tracer.Tracer: new(), drop(), temp(), at(), matmul()

RADIX_DIGITS = 256  # TensorTopK.cu's radix select: 8 bits per pass
TOP_K_BLOCK_ITEMS = 4 * 256  # its fewest items per block (MIN_ITEMS_PER_THREAD x BLOCK_THREADS)
# cub's inclusive_sum_by_key scratch, twice per multi-block top-k: 1,279 bytes at 8,192 slices and
# 3,071 at 430,080 in the H200 traces of Qwen3-Next; not derived (the larger is used: a small-pool
# request either way)
CUB_SCAN_SCRATCH = 3071


def multiblock_top_k(slices: int, slice_size: int) -> bool:
    """torch.topk's choice of its multi-block radix select (should_use_multiblock in torch 2.11's
    TensorTopK.cu: many slices of a few hundred elements or more, as a router over 512 experts)."""
    return ((slices <= 20 and slice_size >= 20000) or (20 < slices <= 40 and slice_size >= 10000)
            or (40 < slices <= 80 and slice_size >= 8000) or (80 < slices < 200 and slice_size >= 5000)
            or (200 <= slices < 800 and slice_size >= 3000) or (800 <= slices <= 4000 and slice_size >= 800)
            or (slices > 4000 and slice_size >= 400))


def top_k_scratch(tr: Tracer, slices: int, slice_size: int, value_bytes: int) -> None:
    """The multi-block top-k's buffers, after its outputs and gone before it returns (mbtopk::launch):
    the k-th values, ks_to_find and desired (two per slice each), the per-block digit counts (int16),
    the digit cumulative sums (uint32 per slice), the within-k and k-th counts, then two cub scans'
    scratch. Sizes as the H200 trace of Qwen3-Next's router (430,080 slices of 512) shows them, one
    block per slice up to TOP_K_BLOCK_ITEMS (more items per thread on larger slices: a lower bound)."""
    if not multiblock_top_k(slices, slice_size):
        return
    blocks = slices * -(-slice_size // TOP_K_BLOCK_ITEMS)
    sizes = (slices * value_bytes, slices * 2 * 4, slices * 2 * 4, blocks * RADIX_DIGITS * 2,
             slices * RADIX_DIGITS * 4, blocks * 4, blocks * 4)
    held = [tr.new(nbytes, "top-k scratch") for nbytes in sizes]
    tr.temp(CUB_SCAN_SCRATCH)
    tr.temp(CUB_SCAN_SCRATCH)
    tr.drop(*reversed(held))


def router(tr: Tracer, arch: Architecture, tokens: int, s: int, upcast_softmax: bool) -> list[int | None]:
    """A mixture-of-experts router's requests; returns what the block keeps (logits, top-k weights, indices)."""
    moe = arch.moe
    assert moe is not None
    e, k, h = moe.num_experts, moe.top_k, arch.hidden_size
    if moe.all_experts:  # Llama-4: top-k of the logits, scattered into -inf scores, sigmoid in fp32
        logits = tr.new(tokens * e * s)
        top = [tr.new(tokens * k * s), tr.new(tokens * k * 8)]
        scores = tr.new(tokens * e * s)
        wide = tr.new(tokens * e * 4)
        sig = tr.new(tokens * e * 4)
        tr.drop(wide)
        cast = tr.new(tokens * e * s)
        tr.drop(sig, scores, *top)
        return [logits, cast]
    if moe.sigmoid_groups:
        return _sigmoid_group_router(tr, arch, tokens)
    if moe.softmax_after_top_k:  # GptOssTopKRouter: the logits (with bias), their top-k, softmax of those
        logits = tr.new(tokens * e * s, "router logits")
        values, indices = tr.new(tokens * k * s, "top-k logits"), tr.new(tokens * k * 8, "top-k ids")
        scores = tr.new(tokens * k * s, "softmax(top-k)")
        tr.drop(values)
        return [logits, scores, indices]
    if moe.router_fp32:  # DeepSeek: inputs and weight upcast, fp32 logits and scores
        upcast = [tr.new(tokens * h * 4), tr.new(e * h * 4)]
        logits = tr.new(tokens * e * 4)
        tr.drop(*upcast)
        probs = tr.new(tokens * e * 4)
    else:  # softmax(dtype=float32) of bf16 logits upcasts them into a copy first (H200 trace, Qwen3-MoE)
        logits = tr.new(tokens * e * s)
        upcast = tr.new(tokens * e * 4) if upcast_softmax else None
        probs = tr.new(tokens * e * 4)
        tr.drop(upcast)
    weights = tr.new(tokens * k * 4)
    indices = tr.new(tokens * k * 8)
    top_k_scratch(tr, tokens, e, 4)
    if moe.normalized_top_k:  # router_top_value /= its sum (in place)
        tr.temp(tokens * 4)
    if moe.router_fp32:  # topk_weights * routed_scaling_factor: a new tensor, even times 1.0
        scaled = tr.new(tokens * k * 4)
        tr.drop(weights)
        weights = scaled
    if not moe.routing_fp32:
        cast = tr.new(tokens * k * s)
        tr.drop(weights)
        weights = cast
    tr.drop(probs)
    return [logits, weights, indices]


def _sigmoid_group_router(tr: Tracer, arch: Architecture, tokens: int) -> list[int | None]:
    """DeepseekV3TopkRouter, all in fp32 (H200 trace of DeepSeek-V3 at batch 142): the upcast
    inputs and weight, the logits, sigmoid, + the correction bias, each group's top-2 summed, the
    top groups' indices, their mask scattered into zeros and expanded into a copy, the experts of
    the other groups masked with -inf (bool, ~, masked_fill), the top-k indices, the weights
    gathered from the sigmoid scores, renormalized (sum + 1e-20, divided in place) and times the
    routed scaling factor. Returns the logits, weights and indices the block keeps."""
    moe = arch.moe
    assert moe is not None and moe.sigmoid_groups is not None
    e, k, h = moe.num_experts, moe.top_k, arch.hidden_size
    groups, kept = moe.sigmoid_groups
    upcast = [tr.new(tokens * h * 4, "router input .float()"), tr.new(e * h * 4, "router weight .float()")]
    logits = tr.new(tokens * e * 4, "router logits")
    tr.drop(*upcast)
    scores = tr.new(tokens * e * 4, "router sigmoid")
    choice = tr.new(tokens * e * 4, "scores + e_score_correction_bias")
    pair = tr.new(tokens * groups * 2 * 4, "group top-2")
    pair_index = tr.new(tokens * groups * 2 * 8, "group top-2 ids")
    tr.drop(pair_index)
    group_scores = tr.new(tokens * groups * 4, "group scores")
    tr.drop(pair)
    best, best_index = tr.new(tokens * kept * 4, "top groups"), tr.new(tokens * kept * 8, "top group ids")
    tr.drop(best)
    group_mask = tr.new(tokens * groups * 4, "group mask")
    score_mask = tr.new(tokens * e * 4, "score mask (expanded copy)")
    boolean = tr.new(tokens * e, "score_mask.bool()")
    inverse = tr.new(tokens * e, "~score_mask")
    tr.drop(boolean)
    masked = tr.new(tokens * e * 4, "masked_fill(-inf)")
    tr.drop(inverse, choice)
    top, indices = tr.new(tokens * k * 4, "top-k"), tr.new(tokens * k * 8, "top-k ids")
    tr.drop(top)
    weights = tr.new(tokens * k * 4, "scores.gather")
    denominator = None
    if moe.normalized_top_k:
        summed = tr.new(tokens * 4, "weights.sum()")
        denominator = tr.new(tokens * 4, "+ 1e-20")
        tr.drop(summed)
    scaled = tr.new(tokens * k * 4, "weights * routed_scaling_factor")
    tr.drop(weights)
    tr.drop(scores, masked, group_scores, best_index, group_mask, score_mask, denominator)
    return [logits, scaled, indices]
