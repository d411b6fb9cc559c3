"""DeepSeek-V2's and V3's decoder layer (multi-head latent attention, then a dense or
mixture-of-experts MLP) as a request sequence in the order transformers 5.17 allocates and frees,
written from modeling_deepseek_v2.py and modeling_deepseek_v3.py and held to the H200 traces of
DeepSeek-V2-Lite (4 layers) at batch 309 and 2048 tokens and of DeepSeek-V3 (4 layers: three
dense, one with 256 routed experts) at batch 142 and 144 of 1024 tokens, each the edge of the GPU
(tests/test_edge_traces.py). V3 differs in its rotary (interleaved pairs, in the model dtype,
from the cos and sin tables LlamaRotaryEmbedding builds) and its router (routers.py)."""

from __future__ import annotations

from ...catalog import FamilyLayout
from ...model.spec import Architecture
from .activations import RunSpec
from .layer_replay import Tracer, halves_rotary, prefill_cache, traced_norm
from .mlp_layers import gated_mlp, moe_block


def complex_rotary_table(tr: Tracer, b: int, n: int, rope_dim: int) -> int:
    """DeepseekV2RotaryEmbedding.forward: the positions as fp32, inv_freq @ positions (the run's first matmul),
    torch.polar(ones_like(freqs), freqs) in complex64, * attention_scaling; the freqs, the ones
    and the polar go. Returns the table the layers share."""
    half = b * n * (rope_dim // 2)
    expanded = tr.new(b * n * 4, "rotary positions (fp32)")
    freqs = tr.new(half * 4, "rotary inv_freq @ positions")
    tr.matmul()
    ones = tr.new(half * 4, "rotary ones_like(freqs)")
    polar = tr.new(half * 8, "rotary torch.polar")
    tr.drop(ones)
    table = tr.new(half * 8, "rotary * attention_scaling")
    tr.drop(polar, expanded, freqs)
    return table


def _rotary(tr: Tracer, q_fp32: int, k_fp32: int, s: int) -> tuple[int | None, int | None]:
    """apply_rotary_emb: xq.float() and xk.float() (copies of the slices), then for each the
    complex product with the table and view_as_real(...).type_as(x) (the product goes); the
    upcasts go after both. Returns the rotated q_pe and k_pe."""
    upcasts = [tr.new(q_fp32, "rotary xq.float()"), tr.new(k_fp32, "rotary xk.float()")] if s < 4 else []
    rotated = []
    for nbytes, name in ((q_fp32, "q_pe"), (k_fp32, "k_pe")):
        out = tr.new(nbytes, f"rotary {name} * freqs_cis")
        if s < 4:
            product, out = out, tr.new(nbytes * s // 4, f"rotary {name} type_as")
            tr.drop(product)
        rotated.append(out)
    tr.drop(*upcasts)
    return rotated[0], rotated[1]


def deepseek_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
                   kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None]]:
    """DeepseekV2DecoderLayer and DeepseekV3DecoderLayer: RMSNorm; q_proj (or q_a_proj, its
    RMSNorm, q_b_proj); the compressed kv_a_proj_with_mqa; kv_a_layernorm on its latent slice; the
    rotary of q_pe and k_pe (V2: each upcast, multiplied in complex64, cast back, the upcasts
    going after both; V3: over interleaved pairs in the model dtype); the cache
    cats of the latent and the rotated k_pe (both go); cat(q_nope, q_pe); expand_kv: kv_b_proj
    over the cached latent and the key assembled in a new tensor; SDPA (the efficient kernel: the
    value heads are narrower) writing the heads-first query's layout, which
    transpose().contiguous() copies; o_proj (the attention's locals and the input norm go); the
    residual add; RMSNorm; the MLP or the experts; the residual add."""
    mla = arch.mla
    assert mla is not None
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    heads, h = arch.num_heads, arch.hidden_size
    tokens = b * n
    hidden = tokens * h * s
    qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    rope = mla.qk_rope_head_dim
    normed = traced_norm(tr, hidden, tokens, s)
    if mla.q_lora_rank:
        compressed_q = tr.new(tokens * mla.q_lora_rank * s, "self_attn.q_a_proj")
        tr.at(op="self_attn.q_a_layernorm")
        normed_q = traced_norm(tr, tokens * mla.q_lora_rank * s, tokens, s)
        tr.drop(compressed_q)
        q = tr.new(tokens * heads * qk * s, "self_attn.q_b_proj")
        tr.drop(normed_q)
    else:
        q = tr.new(tokens * heads * qk * s, "self_attn.q_proj")
    compressed = tr.new(tokens * (mla.kv_lora_rank + rope) * s, "self_attn.kv_a_proj_with_mqa")
    tr.at(op="self_attn.kv_a_layernorm")
    latent = traced_norm(tr, tokens * mla.kv_lora_rank * s, tokens, s)
    tr.at(op="rotary embedding")
    if mla.rope_interleave:
        q_pe, k_pe = halves_rotary(tr, tokens * heads * rope * s, tokens * rope * s)
    else:
        q_pe, k_pe = _rotary(tr, tokens * heads * rope * 4, tokens * rope * 4, s)
    cache: list[int | None] = []
    if generate:
        cache, latent, k_pe = prefill_cache(tr, arch, spec, latent, k_pe), None, None
    query = tr.new(tokens * heads * qk * s, "cat(q_nope, q_pe)")
    tr.at(op="expand_kv")
    kv = tr.new(tokens * heads * (mla.qk_nope_head_dim + mla.v_head_dim) * s, "self_attn.kv_b_proj")
    key = tr.new(tokens * heads * qk * s, "key_states (new_empty)")
    tr.at(op=f"attention ({kernel})")
    additive = tr.new(b * n * n * s, "SDPA additive mask") if masked else None
    out = tr.new(tokens * heads * mla.v_head_dim * s, "SDPA output")
    tr.drop(additive)
    merged = tr.new(tokens * heads * mla.v_head_dim * s, "attention output (contiguous)")
    tr.drop(out)
    projected = tr.new(hidden, "self_attn.o_proj")
    tr.drop(merged, q, q_pe, compressed, query, key, kv, normed, latent, k_pe)
    residual = tr.new(hidden, "residual add")
    tr.drop(projected)
    tr.at(op="post_attention_layernorm")
    normed_mlp = traced_norm(tr, hidden, tokens, s)
    tr.at(op="mlp")
    if arch.moe is not None and layer in arch.moe.sparse_layers and layout.experts is not None:
        tr.at(op="experts (grouped_mm)")
        down = moe_block(tr, arch, layout, tokens, s, grouped=True, upcast_softmax=spec.softmax_upcasts)
    else:
        down = gated_mlp(tr, tokens, arch.intermediate_size, h, s)
    tr.drop(normed_mlp)
    output = tr.new(hidden, "residual add")
    tr.drop(down, residual)
    return output, cache


def mla_decode_attention(tr: Tracer, arch: Architecture, spec: RunSpec, kv_length: int) -> None:
    """One decode step's expand_kv over the whole cached latent (the H200 trace of
    DeepSeek-V2-Lite: kv_b_proj's output and the assembled key dominate the step) and SDPA's
    one-token output; they go when the attention returns."""
    mla = arch.mla
    assert mla is not None
    b, s, heads = spec.batch, spec.activation_bytes, arch.num_heads
    kv = tr.new(b * kv_length * heads * (mla.qk_nope_head_dim + mla.v_head_dim) * s, "self_attn.kv_b_proj")
    key = tr.new(b * heads * kv_length * (mla.qk_nope_head_dim + mla.qk_rope_head_dim) * s, "key_states")
    tr.drop(tr.new(b * heads * mla.v_head_dim * s, "SDPA output"), kv, key)
