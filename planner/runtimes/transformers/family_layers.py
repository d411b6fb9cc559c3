"""Decoder layers read from their family's modeling code (StableLM, GPT-NeoX with the sequential
residual, OLMo-2, Phi-3, Cohere) as request sequences, in the order transformers 5.17 allocates
and frees, with the helpers every coded layer shares (the LayerNorm, the cache cat and SDPA);
GPT-2's, StarCoder2's, OPT's and Falcon's are in layernorm_layers.py, the choice in coded_layers.py.

Written from their modeling code in the terms of the llama-shaped layer that the H200 traces
confirmed (layer_replay.py: its rotary helper, the KV cache's cat, SDPA's output); held to the
committed H100 rows of stablelm-2-zephyr-1_6b, RedPajama-INCITE-3B, OLMo-2-7B, Phi-3.5-mini
and Aya-23-8B (tests/test_accuracy.py).
"""

from __future__ import annotations

from ...catalog import FamilyLayout
from ...model.spec import Architecture
from . import attention, eager
from .activations import RunSpec
from .layer_replay import Tracer, gated_mlp, layer_norm, prefill_cache, traced_norm, traced_rope


def layer_norm_fused(tr: Tracer, hidden_bytes: int, rows: int) -> int:
    """nn.LayerNorm on CUDA: the output, then native_layer_norm's fp32 mean and rstd per row,
    which F.layer_norm drops at once."""
    out = tr.new(hidden_bytes, "LayerNorm")
    tr.drop(tr.new(rows * 4), tr.new(rows * 4))
    return out


def cache_and_attend(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, kernel: str,
                      masked: bool, generate: bool, key: int | None, value: int | None,
                      query_heads_first: bool = False) -> tuple[int | None, list[int | None], int | None, int | None,
                                                                int | None]:
    """The KV cache's cat (the key and value it copies go, when they are tensors of their own),
    then SDPA: K and V repeated where the kernel needs it, the additive mask, the output; or
    eager attention (eager_attention).
    `query_heads_first`: the query is a cat's output, contiguous in (batch, heads, tokens, dim)
    order; flash and the efficient kernel write their output in the query's layout, so
    transformers' transpose(1, 2).contiguous() copies it (H200 traces: Phi-4-mini unmasked,
    flash; Phi-3-mini under its sliding-window mask, efficient). The rotary of the other layers
    keeps the projection's (batch, tokens, heads, dim) order: no copy.
    Returns the output, the cache, the key and value still held and eager's softmax weights."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    cache: list[int | None] = []
    if generate:
        cache, key, value = prefill_cache(tr, arch, spec, key, value), None, None
    tr.at(op=f"attention ({kernel})")
    heads, d = arch.num_heads, arch.head_dim
    if kernel == "eager":
        out, weights = eager.eager_attention(tr, spec, heads, arch.num_kv_heads, n, n, d, query_heads_first)
        return out, cache, key, value, weights
    repeats = [tr.new(b * heads * n * d * s, "repeat_kv") for _ in range(2)] \
        if attention.repeats_kv(arch, layout, kernel, masked) else []
    additive = tr.new(b * n * n * s, "SDPA additive mask") if masked else None
    out = tr.new(b * n * heads * d * s, "SDPA output")
    tr.drop(additive, *repeats)
    if query_heads_first and kernel in ("flash", "efficient"):
        merged = tr.new(b * n * heads * d * s, "attention output (contiguous)")
        tr.drop(out)
        out = merged
    return out, cache, key, value, None


def partial_rotary_with_cats(tr: Tracer, q_bytes: int, kv_bytes: int,
                             fraction: float) -> tuple[int | None, int | None, int | None, int | None]:
    """The rotary of the first `fraction` of each query and key head, then torch.cat back with
    the pass-through slices, query first (StableLM, Phi-2). Returns the rotated halves and the
    cats; the caller's code decides when each goes."""
    tr.at(op="rotary embedding (query)")
    q_rot = traced_rope(tr, int(q_bytes * fraction))
    tr.at(op="rotary embedding (key)")
    k_rot = traced_rope(tr, int(kv_bytes * fraction))
    return (q_rot, k_rot, tr.new(q_bytes, "cat(query_rot, query_pass)"),
            tr.new(kv_bytes, "cat(key_rot, key_pass)"))


def stablelm_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
                   kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None]]:
    """StableLmDecoderLayer (transformers 5.17, sequential residual, no qk-norm), read from its
    code in the traced llama layer's terms: LayerNorm; rotary on the first rotary_dim of each head
    (the pass-through slices are views that keep the projections alive until the attention
    returns, and the rotated halves stay in locals too); the cat back; the attention output and
    the input norm stay referenced until the layer returns (neither name is reassigned)."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    heads, kv_heads, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    tokens = b * n
    hidden = tokens * arch.hidden_size * s
    q_bytes, kv_bytes = tokens * heads * d * s, tokens * kv_heads * d * s
    fraction = (arch.rotary_dim or d) / d
    normed = layer_norm_fused(tr, hidden, tokens)
    q, k, v = (tr.new(q_bytes, "self_attn.q_proj"), tr.new(kv_bytes, "self_attn.k_proj"),
               tr.new(kv_bytes, "self_attn.v_proj"))
    q_rot, k_rot, q_cat, k_cat = partial_rotary_with_cats(tr, q_bytes, kv_bytes, fraction)
    out, cache, k_cat, v, _ = cache_and_attend(tr, arch, layout, spec, kernel, masked, generate, k_cat, v,
                                           query_heads_first=True)
    attn_out = tr.new(hidden, "self_attn.o_proj")
    tr.drop(out, q_cat, k_cat, v, q, k, q_rot, k_rot)
    residual = tr.new(hidden, "residual add")
    tr.at(op="post_attention_layernorm")
    normed_mlp = layer_norm_fused(tr, hidden, tokens)
    tr.at(op="mlp")
    down = gated_mlp(tr, tokens, arch.intermediate_size, arch.hidden_size, s)
    tr.drop(normed_mlp)
    output = tr.new(hidden, "residual add")
    tr.drop(down, residual, attn_out, normed)
    return output, cache


def gpt_neox_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
                   kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None]]:
    """GPTNeoXLayer with the sequential residual (transformers 5.17), read from its code in the
    traced llama layer's terms: the input LayerNorm is an argument (it goes when the attention
    returns); one fused query_key_value output, chunked into views that keep it alive until the
    attention returns; rotary on the first rotary_dim, each rotated half cat back to a full head
    (the cat goes into a new tensor even when the rotary covers the head); then dense, the
    residual add, the second LayerNorm and the two-matrix MLP."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    heads, d = arch.num_heads, arch.head_dim
    tokens = b * n
    hidden = tokens * arch.hidden_size * s
    q_bytes = tokens * heads * d * s
    kv_bytes = tokens * arch.num_kv_heads * d * s
    fraction = (arch.rotary_dim or d) / d
    normed = layer_norm_fused(tr, hidden, tokens)
    qkv = tr.new(q_bytes + 2 * kv_bytes, "attention.query_key_value")
    tr.at(op="rotary embedding (query)")
    q_rope = traced_rope(tr, int(q_bytes * fraction))
    tr.at(op="rotary embedding (key)")
    k_rope = traced_rope(tr, int(kv_bytes * fraction))
    q_embed = tr.new(q_bytes, "cat(q_embed, q_pass)")
    tr.drop(q_rope)
    k_embed = tr.new(kv_bytes, "cat(k_embed, k_pass)")
    tr.drop(k_rope)
    out, cache, k_embed, _, _ = cache_and_attend(tr, arch, layout, spec, kernel, masked, generate, k_embed, None,
                                           query_heads_first=True)
    dense = tr.new(hidden, "attention.dense")
    tr.drop(out, q_embed, k_embed, qkv, normed)
    attn_output = tr.new(hidden, "residual add")
    tr.drop(dense)
    tr.at(op="post_attention_layernorm")
    normed_mlp = layer_norm_fused(tr, hidden, tokens)
    tr.at(op="mlp")
    inter = tokens * arch.intermediate_size * s
    up = tr.new(inter, "mlp.dense_h_to_4h")
    act = tr.new(inter, "mlp.act")
    tr.drop(up)
    down = tr.new(hidden, "mlp.dense_4h_to_h")
    tr.drop(act, normed_mlp)
    output = tr.new(hidden, "residual add")
    tr.drop(down, attn_output)
    return output, cache


def olmo2_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
                kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None]]:
    """Olmo2DecoderLayer: no pre-norm (the layer input feeds the projections), q_norm and k_norm
    over the whole projection, rotary against fp32 tables (fp32 products, cast back at return),
    then a norm on the attention output and on the MLP output before each residual add."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    heads, kv_heads, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    tokens = b * n
    hidden = tokens * arch.hidden_size * s
    q_bytes, kv_bytes = tokens * heads * d * s, tokens * kv_heads * d * s
    norm = layer_norm(layout)
    q = tr.new(q_bytes, "self_attn.q_proj")
    tr.at(op="self_attn.q_norm")
    q_normed = norm(tr, q_bytes, tokens, s)
    tr.drop(q)
    k = tr.new(kv_bytes, "self_attn.k_proj")
    tr.at(op="self_attn.k_norm")
    k_normed = norm(tr, kv_bytes, tokens, s)
    tr.drop(k)
    v = tr.new(kv_bytes, "self_attn.v_proj")
    tr.at(op="rotary embedding (fp32 tables)")
    q_wide = traced_rope(tr, q_bytes, q_bytes * 4 // s)
    k_wide = traced_rope(tr, kv_bytes, kv_bytes * 4 // s)
    if s < 4:
        q_rot, k_rot = tr.new(q_bytes, "q_embed.to(dtype)"), tr.new(kv_bytes, "k_embed.to(dtype)")
        tr.drop(q_wide, k_wide)
    else:
        q_rot, k_rot = q_wide, k_wide
    tr.drop(q_normed, k_normed)
    out, cache, k_rot, v, _ = cache_and_attend(tr, arch, layout, spec, kernel, masked, generate, k_rot, v)
    projected = tr.new(hidden, "self_attn.o_proj")
    tr.drop(out, q_rot, k_rot, v)
    tr.at(op="post_attention_layernorm")
    normed = norm(tr, hidden, tokens, s)
    tr.drop(projected)
    residual = tr.new(hidden, "residual add")
    tr.drop(normed)
    tr.at(op="mlp")
    down = gated_mlp(tr, tokens, arch.intermediate_size, arch.hidden_size, s)
    tr.at(op="post_feedforward_layernorm")
    normed_down = norm(tr, hidden, tokens, s)
    tr.drop(down)
    output = tr.new(hidden, "residual add")
    tr.drop(normed_down, residual)
    return output, cache


def phi3_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
               kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None]]:
    """Phi3DecoderLayer: llama's norms; one fused qkv_proj whose slices are views (it lives until
    the attention returns); each rotated head cat back with its pass-through part; one fused
    gate_up_proj, up * act(gate), the fused output kept by the gate view until the MLP returns."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    heads, kv_heads, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    tokens = b * n
    hidden = tokens * arch.hidden_size * s
    q_bytes, kv_bytes = tokens * heads * d * s, tokens * kv_heads * d * s
    fraction = (arch.rotary_dim or d) / d
    normed = traced_norm(tr, hidden, tokens, s)
    qkv = tr.new(q_bytes + 2 * kv_bytes, "self_attn.qkv_proj")
    tr.at(op="rotary embedding (query)")
    q_rope = traced_rope(tr, int(q_bytes * fraction))
    q_embed = tr.new(q_bytes, "cat(q rotated, q_pass)")
    tr.drop(q_rope)
    tr.at(op="rotary embedding (key)")
    k_rope = traced_rope(tr, int(kv_bytes * fraction))
    k_embed = tr.new(kv_bytes, "cat(k rotated, k_pass)")
    tr.drop(k_rope)
    out, cache, k_embed, _, _ = cache_and_attend(tr, arch, layout, spec, kernel, masked, generate, k_embed, None,
                                           query_heads_first=True)
    projected = tr.new(hidden, "self_attn.o_proj")
    tr.drop(out, q_embed, k_embed, qkv, normed)
    residual = tr.new(hidden, "residual add")
    tr.drop(projected)
    tr.at(op="post_attention_layernorm")
    normed_mlp = traced_norm(tr, hidden, tokens, s)
    tr.at(op="mlp")
    inter = tokens * arch.intermediate_size * s
    gate_up = tr.new(2 * inter, "mlp.gate_up_proj")
    act = tr.new(inter, "mlp.activation_fn(gate)")
    product = tr.new(inter, "up * act(gate)")
    tr.drop(act)
    down = tr.new(hidden, "mlp.down_proj")
    tr.drop(product, gate_up, normed_mlp)
    output = tr.new(hidden, "residual add")
    tr.drop(down, residual)
    return output, cache


def cohere_norm(tr: Tracer, hidden_bytes: int, rows: int, s: int) -> int:
    """CohereLayerNorm, computed in fp32 op by op: x.float(), mean, (x - mean).pow(2).mean (the
    difference goes once squared), (x - mean) again times rsqrt(variance + eps), weight.float() *
    that, .to(dtype); mean and variance stay locals until the norm returns."""
    wide = hidden_bytes * 4 // s
    upcast = tr.new(wide, "LayerNorm upcast") if s < 4 else None
    mean = tr.new(rows * 4)
    centered = tr.new(wide, "LayerNorm x - mean")
    squared = tr.new(wide, "LayerNorm pow(2)")
    tr.drop(centered)
    variance = tr.new(rows * 4)
    tr.drop(squared)
    centered = tr.new(wide, "LayerNorm x - mean")
    shifted = tr.new(rows * 4)
    root = tr.new(rows * 4)
    tr.drop(shifted)
    normed = tr.new(wide, "LayerNorm (x - mean) * rsqrt")
    tr.drop(centered, root, upcast)
    weighted = tr.new(wide, "LayerNorm weight * x")
    tr.drop(normed)
    if s >= 4:
        tr.drop(mean, variance)
        return weighted
    out = tr.new(hidden_bytes, "LayerNorm cast")
    tr.drop(weighted, mean, variance)
    return out


def cohere_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
                 kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None]]:
    """CohereDecoderLayer (no qk-norm): its fp32 LayerNorm; rotary on fp32 copies of q and k with
    interleaved halves, cast back at return (the bf16 projections go then); attention and the
    gated MLP both read the normed input, and residual + attention + MLP is summed at the end."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    heads, kv_heads, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    tokens = b * n
    hidden = tokens * arch.hidden_size * s
    q_bytes, kv_bytes = tokens * heads * d * s, tokens * kv_heads * d * s
    normed = cohere_norm(tr, hidden, tokens, s)
    q, k, v = (tr.new(q_bytes, "self_attn.q_proj"), tr.new(kv_bytes, "self_attn.k_proj"),
               tr.new(kv_bytes, "self_attn.v_proj"))
    tr.at(op="rotary embedding (fp32 copies)")
    upcasts = [tr.new(q_bytes * 4 // s), tr.new(kv_bytes * 4 // s)] if s < 4 else []
    # on the fp32 copies: q * cos, -x2 and the stack of the interleaved halves (rotate_half), * sin,
    # the sum; the same requests as the llama rotary, all fp32
    q_wide, k_wide = traced_rope(tr, q_bytes * 4 // s), traced_rope(tr, kv_bytes * 4 // s)
    if s < 4:
        q_rot, k_rot = tr.new(q_bytes, "q_embed.to(dtype)"), tr.new(kv_bytes, "k_embed.to(dtype)")
        tr.drop(q_wide, k_wide, *upcasts)
    else:
        q_rot, k_rot = q_wide, k_wide
    tr.drop(q, k)
    out, cache, k_rot, v, _ = cache_and_attend(tr, arch, layout, spec, kernel, masked, generate, k_rot, v)
    attention_out = tr.new(hidden, "self_attn.o_proj")
    tr.drop(out, q_rot, k_rot, v)
    tr.at(op="mlp")
    down = gated_mlp(tr, tokens, arch.intermediate_size, arch.hidden_size, s)
    partial = tr.new(hidden, "residual + attention")
    output = tr.new(hidden, "+ mlp")
    tr.drop(partial, normed, attention_out, down)
    return output, cache
