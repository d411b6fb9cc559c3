"""SDPA's math kernel as torch 2.11 runs it (the fallback for fp32, and for Falcon, which calls
SDPA itself), replayed request by request through the caching allocator."""

from __future__ import annotations

from typing import Any

Tracer = Any  # tracer.Tracer: new(), drop(), temp(), at(), matmul()


def math_sdpa(tr: Tracer, b: int, heads: int, kv_heads: int, q_len: int, kv_len: int, d: int, s: int,
              masked: bool, enable_gqa: bool = False, float_mask: bool = False, strided_kv: bool = False,
              query_contiguous: bool = False) -> int:
    """SDPA's math kernel (torch 2.11 _scaled_dot_product_attention_math, read against the H200
    trace of Falcon-7B's 71 query heads on one key/value head): the boolean mask converted to
    the query's dtype; q, k and v upcast to fp32 (half types); q scaled, k transposed and
    scaled; matmul's copies of the query (its heads are not the outer dimension: a view of the
    projection) and of k broadcast to every head; the fp32 scores; _safe_softmax (the output,
    the -inf flags, the all-masked rows); the weights cast back; v broadcast, the fp32 output
    and its cast. With enable_gqa, k and v are first repeated to every query head
    (repeat_interleave) instead. A `float_mask` (T5's position bias) is used as it is; keys and
    values that are transposed views of their projections (`strided_kv`: T5's encoder, read
    against its H200 trace) are copied by matmul like broadcast ones; a `query_contiguous` (built by
    a cat: Qwen3-Next's partial rotary, its fp32 H200 trace) is not. Returns the output; the rest
    goes when the kernel returns."""
    upcast = s < 4
    mask = tr.new(b * q_len * kv_len * s, "SDPA mask .to(dtype)") if masked and not float_mask else None
    accumulators = [tr.new(b * heads * q_len * d * 4, "q .float()") if upcast else None]
    if upcast:
        accumulators += [tr.new(b * kv_heads * kv_len * d * 4, f"{name} .float()") for name in ("k", "v")]
    query = tr.new(b * heads * q_len * d * 4, "q * scale")
    if not masked:  # is_causal: the kernel builds its own lower-triangular mask
        mask = tr.new(q_len * kv_len * 4, "causal mask")
    repeated = [tr.new(b * heads * kv_len * d * 4, f"{name} repeat_interleave") for name in ("k", "v")] \
        if enable_gqa and kv_heads != heads else []
    if repeated:
        kv_heads = heads
    key = tr.new(b * kv_heads * kv_len * d * 4, "k^T * scale")
    query_copy = tr.new(b * heads * q_len * d * 4, "matmul: q reshaped") if q_len > 1 and not query_contiguous \
        else None
    copied = kv_heads != heads or strided_kv  # matmul materializes a broadcast or strided k and v
    key_copy = tr.new(b * heads * kv_len * d * 4, "matmul: k copy") if copied else None
    scores = tr.new(b * heads * q_len * kv_len * 4, "q @ k^T (fp32)")
    tr.drop(key_copy, query_copy, key)
    soft = tr.new(b * heads * q_len * kv_len * 4, "_safe_softmax")
    flags = tr.new(b * heads * q_len * kv_len, "scores == -inf")
    tr.drop(tr.new(b * heads * q_len, "all-masked rows"), flags, scores)
    weights = tr.new(b * heads * q_len * kv_len * s, "weights .to(dtype)") if upcast else None
    value_copy = tr.new(b * heads * kv_len * d * 4, "matmul: v copy") if copied else None
    out = tr.new(b * heads * q_len * d * 4, "weights @ v (fp32)")
    tr.drop(value_copy)
    if upcast:
        wide, out = out, tr.new(b * heads * q_len * d * s, "output .to(dtype)")
        tr.drop(wide)
    tr.drop(soft, *repeated[::-1], query, *accumulators[::-1], weights, mask)
    return out
