"""Decoder layers of the LayerNorm families (StableLM, GPT-NeoX with the sequential residual) as
request sequences, in the order transformers 5.17 allocates and frees.

Written from their modeling code in the terms of the llama-shaped layer that the H200 traces
confirmed (layer_replay.py: its rotary helper, the KV cache's cat, SDPA's output); held to the
committed H100 rows of stablelm-2-zephyr-1_6b and RedPajama-INCITE-3B (tests/test_accuracy.py).
"""

from __future__ import annotations

from ...catalog import FamilyLayout
from ...model.spec import Architecture
from . import attention, kv_cache
from .activations import RunSpec
from .layer_replay import Tracer, traced_rope


def layer_norm_fused(tr: Tracer, hidden_bytes: int, rows: int) -> int:
    """nn.LayerNorm on CUDA: the output, then native_layer_norm's fp32 mean and rstd per row,
    which F.layer_norm drops at once."""
    out = tr.new(hidden_bytes, "LayerNorm")
    tr.drop(tr.new(rows * 4), tr.new(rows * 4))
    return out


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
    tr.at(op="rotary embedding (query)")
    q_rot = traced_rope(tr, int(q_bytes * fraction))
    tr.at(op="rotary embedding (key)")
    k_rot = traced_rope(tr, int(kv_bytes * fraction))
    q_cat = tr.new(q_bytes, "cat(query_rot, query_pass)")
    k_cat = tr.new(kv_bytes, "cat(key_rot, key_pass)")
    cache: list[int | None] = []
    if generate:
        kc = tr.new(kv_cache.layer_bytes(arch, b, n, spec.kv, part="key"), "KV cache keys (torch.cat)")
        vc = tr.new(kv_cache.layer_bytes(arch, b, n, spec.kv, part="value"), "KV cache values (torch.cat)")
        tr.drop(k_cat, v)
        cache = [kc, vc]
        k_cat = v = None
    tr.at(op=f"attention ({kernel})")
    repeats = [tr.new(b * heads * n * d * s, "repeat_kv") for _ in range(2)] \
        if attention.repeats_kv(arch, layout, kernel, masked) else []
    additive = tr.new(b * n * n * s, "SDPA additive mask") if masked else None
    out = tr.new(q_bytes, "SDPA output")
    tr.drop(additive, *repeats)
    attn_out = tr.new(hidden, "self_attn.o_proj")
    tr.drop(out, q_cat, k_cat, v, q, k, q_rot, k_rot)
    residual = tr.new(hidden, "residual add")
    tr.at(op="post_attention_layernorm")
    normed_mlp = layer_norm_fused(tr, hidden, tokens)
    tr.at(op="mlp")
    inter = tokens * arch.intermediate_size * s
    gate = tr.new(inter, "mlp.gate_proj")
    act = tr.new(inter, "mlp.act_fn")
    tr.drop(gate)
    up = tr.new(inter, "mlp.up_proj")
    product = tr.new(inter, "mlp act * up")
    tr.drop(act, up)
    down = tr.new(hidden, "mlp.down_proj")
    tr.drop(product, normed_mlp)
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
    cache: list[int | None] = []
    if generate:
        kc = tr.new(kv_cache.layer_bytes(arch, b, n, spec.kv, part="key"), "KV cache keys (torch.cat)")
        vc = tr.new(kv_cache.layer_bytes(arch, b, n, spec.kv, part="value"), "KV cache values (torch.cat)")
        tr.drop(k_embed)
        cache = [kc, vc]
        k_embed = None
    tr.at(op=f"attention ({kernel})")
    repeats = [tr.new(b * heads * n * d * s, "repeat_kv") for _ in range(2)] \
        if attention.repeats_kv(arch, layout, kernel, masked) else []
    additive = tr.new(b * n * n * s, "SDPA additive mask") if masked else None
    out = tr.new(q_bytes, "SDPA output")
    tr.drop(additive, *repeats)
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
