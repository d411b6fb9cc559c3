"""gpt-oss's decoder layer under eager attention (transformers 5.17 has no SDPA for it) as a request
sequence in the order modeling_gpt_oss.py allocates and frees, held to the H200 trace of
gpt-oss-20b (4 layers) at batch 62 of 2048-token prompts, the edge of the GPU
(tests/test_edge_traces.py).

What differs from the llama-shaped layer: its RMSNorm multiplies by the weight in fp32 before the
cast (OLMo-2's order); the rotary runs over the two halves of each head; the attention appends a
learned sink column to the masked scores, subtracts the row maximum and takes softmax in the model
dtype, so at most three score-sized tensors are alive at once (+ mask, then the cat's shifted copy
and the softmax); the softmax output, returned as the attention weights, stays referenced in the
layer until the MLP returns (`hidden_states, _ = ...`); the router's top-k softmax scores stay
until the layer returns; and the experts' gate is its own clamped GLU (mlp_layers.apply_gate).
"""

from __future__ import annotations

from ...catalog import FamilyLayout
from ...model.spec import Architecture
from .activations import RunSpec
from .layer_replay import Tracer, halves_rotary, olmo2_norm, prefill_cache
from .mlp_layers import moe_block


def _sink_attention(tr: Tracer, arch: Architecture, b: int, n: int, s: int) -> tuple[int | None, int | None]:
    """eager_attention_forward with sinks: repeat_kv of keys and values, q @ k^T, * scaling (the
    product goes), + mask (the scaled goes), cat with the sinks, its row max (values and indices)
    and the cat minus it (the cat goes), softmax (the masked scores go as attn_weights is
    reassigned), probs @ v and its transpose(1, 2).contiguous(). Returns the output and the
    softmax, which the caller holds."""
    heads, d = arch.num_heads, arch.head_dim
    queries = b * n * heads * d * s
    scores, with_sink = b * heads * n * n * s, b * heads * n * (n + 1) * s
    repeated = [tr.new(queries, "repeat_kv (keys)"), tr.new(queries, "repeat_kv (values)")]
    product = tr.new(scores, "q @ k^T")
    scaled = tr.new(scores, "* scaling")
    tr.drop(product)
    masked = tr.new(scores, "+ attention_mask")
    tr.drop(scaled)
    combined = tr.new(with_sink, "cat(scores, sinks)")
    maximum = tr.new(b * heads * n * s, "max values")
    tr.drop(tr.new(b * heads * n * 8, "max indices"), tr.new(b * heads * n * 16, "max scratch"))
    shifted = tr.new(with_sink, "combined - max")
    tr.drop(maximum, combined)
    probs = tr.new(with_sink, "softmax")
    tr.drop(masked)
    out = tr.new(queries, "probs @ v")
    merged = tr.new(queries, "attention output (contiguous)")
    tr.drop(out, *repeated, shifted)
    return merged, probs


def gpt_oss_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
                  kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None]]:
    """GptOssDecoderLayer over the prompt: the norm, q, k and v projections, the rotary of each
    (q and k go once both are rotated), the cache cats, the sink attention, o_proj, the residual
    add, the norm, the router and the experts, the residual add."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    heads, kv, d, h = arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.hidden_size
    tokens = b * n
    hidden = tokens * h * s
    normed = olmo2_norm(tr, hidden, tokens, s)
    tr.at(op="self_attn projections")
    q = tr.new(tokens * heads * d * s, "self_attn.q_proj")
    k, v = tr.new(tokens * kv * d * s, "self_attn.k_proj"), tr.new(tokens * kv * d * s, "self_attn.v_proj")
    tr.at(op="rotary embedding")
    q_rot, k_rot = halves_rotary(tr, tokens * heads * d * s, tokens * kv * d * s)
    tr.drop(q, k)
    cache: list[int | None] = []
    if generate:
        cache, k_rot, v = prefill_cache(tr, arch, spec, k_rot, v), None, None
    tr.at(op="attention (eager, sinks)")
    merged, probs = _sink_attention(tr, arch, b, n, s)
    projected = tr.new(hidden, "self_attn.o_proj")
    tr.drop(merged, q_rot, k_rot, v, normed)
    residual = tr.new(hidden, "residual add")
    tr.drop(projected)
    tr.at(op="post_attention_layernorm")
    normed_mlp = olmo2_norm(tr, hidden, tokens, s)
    tr.at(op="experts (grouped_mm)")
    routed = moe_block(tr, arch, layout, tokens, s, grouped=True, upcast_softmax=spec.softmax_upcasts)
    tr.drop(normed_mlp, probs)
    output = tr.new(hidden, "residual add")
    tr.drop(routed, residual)
    return output, cache
