"""Decoder layers of LayerNorm families written from their modeling code and held to their H200
traces (GPT-2 medium, SantaCoder, OctoCoder, StarCoder2-7B, OPT-125m, Falcon-7B and Falcon's new
decoder, Phi-2: tests/test_edge_traces.py), as request sequences in the order transformers 5.17
allocates and frees. The families with attention code of their own (GPT-J, BLOOM, MPT) are in
own_attention_layers.py."""

from __future__ import annotations

from ...catalog import FamilyLayout
from ...model.spec import Architecture
from . import sdpa_math
from .activations import RunSpec
from .family_layers import cache_and_attend, layer_norm_fused, partial_rotary_with_cats
from .layer_replay import Tracer, prefill_cache, projection, traced_rope

# activations that are one kernel, one output tensor (ACT2FN in transformers 5.17)
SINGLE_KERNEL_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "relu", "silu")


def new_gelu(tr: Tracer, nbytes: int) -> int:
    """NewGELUActivation, 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))): 0.5 * x,
    then each step of the tanh argument replaces the one before, 1 + tanh, the product."""
    half = tr.new(nbytes, "gelu_new 0.5 * x")
    chained = tr.new(nbytes, "gelu_new x^3")
    for op in ("0.044715 * x^3", "x + that", "sqrt(2 / pi) * that", "tanh", "1 + tanh"):
        step = tr.new(nbytes, f"gelu_new {op}")
        tr.drop(chained)
        chained = step
    out = tr.new(nbytes, "gelu_new product")
    tr.drop(half, chained)
    return out


def two_matrix_mlp(tr: Tracer, arch: Architecture, tokens: int, s: int, names: tuple[str, str],
                   dequantized: bool = False) -> int | None:
    """The LayerNorm families' MLP: the first matrix, its activation (gelu_new op by op, any other
    one kernel), the first matrix's output goes, the second matrix (under bitsandbytes 4-bit each
    weight dequantized first), the activation goes. Returns the second matrix's output."""
    width = tokens * arch.intermediate_size * s
    first = projection(tr, tokens, arch.intermediate_size, arch.hidden_size, s, names[0], dequantized)
    if arch.activation == "gelu_new":
        act = new_gelu(tr, width)
    else:
        act = tr.new(width, f"{arch.activation or 'act'}({names[0]})")
    tr.drop(first)
    down = projection(tr, tokens, arch.hidden_size, arch.intermediate_size, s, names[1], dequantized)
    tr.drop(act)
    return down


def gpt2_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
               kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None]]:
    """GPT2Block and GPTBigCodeBlock (transformers 5.17), as the H200 traces of GPT-2 medium at
    batch 906 and SantaCoder at batch 32 (eager) show them: ln_1; one c_attn whose split heads
    are views (it goes after c_proj); the cache cats; SDPA (the heads-last query keeps flash's
    output heads-last, so no copy) or eager attention (its weights stay in the block's `_` until
    it returns); c_proj; the residual add (ln_1's output goes); ln_2; c_fc, the activation
    (GPT-2's gelu_new op by op; c_fc's output goes after it), mlp.c_proj; the residual add; then
    ln_2, both residuals and the attention output go."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    tokens = b * n
    hidden = tokens * arch.hidden_size * s
    normed = layer_norm_fused(tr, hidden, tokens)
    qkv = tr.new(hidden + 2 * tokens * arch.num_kv_heads * arch.head_dim * s, "attn.c_attn")
    tr.matmul()  # no rotary tables: the first layer's c_attn is the run's first matmul
    out, cache, _, _, weights = cache_and_attend(tr, arch, layout, spec, kernel, masked, generate, None, None)
    projected = tr.new(hidden, "attn.c_proj")
    tr.drop(out, qkv)
    residual = tr.new(hidden, "residual add")
    tr.drop(normed)
    tr.at(op="ln_2")
    normed_mlp = layer_norm_fused(tr, hidden, tokens)
    tr.at(op="mlp")
    down = two_matrix_mlp(tr, arch, tokens, s, ("mlp.c_fc", "mlp.c_proj"))
    output = tr.new(hidden, "residual add")
    tr.drop(normed_mlp, residual, projected, weights, down)
    return output, cache


def starcoder2_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
                     kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None]]:
    """Starcoder2DecoderLayer (transformers 5.17), as the H200 trace of StarCoder2-7B at batch 235
    shows it: the llama layer with LayerNorms and a two-matrix MLP: input LayerNorm; q, k, v; the
    rotary of each (the projections go after both); the cache cats, then the rotated key and v
    go; SDPA; o_proj (the rotated query and the norm go); the residual add; LayerNorm; c_fc, its
    activation (c_fc's output goes), c_proj; the residual add."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    tokens = b * n
    hidden = tokens * arch.hidden_size * s
    q_bytes = tokens * arch.num_heads * arch.head_dim * s
    kv_bytes = tokens * arch.num_kv_heads * arch.head_dim * s
    normed = layer_norm_fused(tr, hidden, tokens)
    q, k, v = (tr.new(q_bytes, "self_attn.q_proj"), tr.new(kv_bytes, "self_attn.k_proj"),
               tr.new(kv_bytes, "self_attn.v_proj"))
    tr.at(op="rotary embedding (query)")
    q_rot = traced_rope(tr, q_bytes)
    tr.at(op="rotary embedding (key)")
    k_rot = traced_rope(tr, kv_bytes)
    tr.drop(q, k)
    out, cache, k_rot, v, _ = cache_and_attend(tr, arch, layout, spec, kernel, masked, generate, k_rot, v)
    projected = tr.new(hidden, "self_attn.o_proj")
    tr.drop(out, q_rot, normed, k_rot, v)
    return _residual_and_mlp(tr, arch, s, tokens, projected, "post_attention_layernorm", ("mlp.c_fc", "mlp.c_proj"),
                             norm_goes_first=False), cache


def opt_pre_norm(arch: Architecture) -> bool:
    """OPT with do_layer_norm_before (a model-level final norm exists only then) and without
    the project_in/out pair of a narrower embedding (OPT-350m has both the other way)."""
    names = [t.name for t in arch.tensors]
    return any(n.startswith("model.decoder.final_layer_norm") for n in names) and \
        not any(".project_in." in n for n in names)


def opt_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
              kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None]]:
    """OPTDecoderLayer with do_layer_norm_before (transformers 5.17), as the H200 trace of
    OPT-125m at batch 1256 shows it: the LayerNorm; q_proj then its product with the scaling (the
    projection goes); k_proj, v_proj; the cache cats, then k and v go; SDPA; out_proj (the output,
    the scaled query and the norm go); the residual add; the LayerNorm, fc1 (the norm goes), the
    activation (fc1 goes), fc2 (the activation goes); the residual add."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    tokens = b * n
    hidden = tokens * arch.hidden_size * s
    kv_bytes = tokens * arch.num_kv_heads * arch.head_dim * s
    normed = layer_norm_fused(tr, hidden, tokens)
    projected_q = tr.new(tokens * arch.num_heads * arch.head_dim * s, "self_attn.q_proj")
    tr.matmul()  # no rotary tables: the first layer's q_proj is the run's first matmul
    q = tr.new(tokens * arch.num_heads * arch.head_dim * s, "q_proj * scaling")
    tr.drop(projected_q)
    k, v = tr.new(kv_bytes, "self_attn.k_proj"), tr.new(kv_bytes, "self_attn.v_proj")
    out, cache, k, v, _ = cache_and_attend(tr, arch, layout, spec, kernel, masked, generate, k, v)
    projected = tr.new(hidden, "self_attn.out_proj")
    tr.drop(out, q, normed, k, v)
    return _residual_and_mlp(tr, arch, s, tokens, projected, "final_layer_norm", ("fc1", "fc2"),
                             norm_goes_first=True), cache


def _residual_and_mlp(tr: Tracer, arch: Architecture, s: int, tokens: int, projected: int, norm_name: str,
                      names: tuple[str, str], norm_goes_first: bool) -> int:
    """The residual add (the attention's projection goes), a LayerNorm, two matrices with one
    activation kernel between (each goes once the next exists), the residual add. The norm's
    output goes once the first matrix read it when the MLP reassigns one name (OPT), else when the
    MLP returns (StarCoder2). Returns the layer's output."""
    hidden = tokens * arch.hidden_size * s
    residual = tr.new(hidden, "residual add")
    tr.drop(projected)
    tr.at(op=norm_name)
    normed = layer_norm_fused(tr, hidden, tokens)
    tr.at(op="mlp")
    first = tr.new(tokens * arch.intermediate_size * s, names[0])
    if norm_goes_first:
        tr.drop(normed)
    act = tr.new(tokens * arch.intermediate_size * s, f"{arch.activation}({names[0]})")
    tr.drop(first)
    down = tr.new(hidden, names[1])
    tr.drop(act, None if norm_goes_first else normed)
    output = tr.new(hidden, "residual add")
    tr.drop(down, residual)
    return output


def falcon_parallel(arch: Architecture) -> bool:
    """Falcon's old decoder with parallel_attn: one input LayerNorm that attention and MLP read."""
    return not any(".post_attention_layernorm." in t.name or ".ln_attn." in t.name for t in arch.tensors)


def falcon_parallel_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
                          kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None]]:
    """FalconDecoderLayer, old decoder with parallel_attn (transformers 5.17), as the H200 trace of
    Falcon-7B at batch 20 shows it: the LayerNorm; the fused query_key_value, whose key and value
    _split_heads copies (the query stays a view); the rotary of each (the key copy goes); the cache
    cats, then the rotated key and the value go; SDPA's math kernel (Falcon passes its own mask);
    the output's permute-reshape copy; dense (the copy, the fused projection and the rotated query
    go); dense_h_to_4h, the activation, dense_4h_to_h; mlp + attention added in place, then
    dropout_add with the residual; the norm, the attention and MLP outputs go."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    tokens = b * n
    hidden = tokens * arch.hidden_size * s
    heads, kv_heads, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    q_bytes, kv_bytes = tokens * heads * d * s, tokens * kv_heads * d * s
    normed = layer_norm_fused(tr, hidden, tokens)
    qkv = tr.new(q_bytes + 2 * kv_bytes, "self_attention.query_key_value")
    key, value = tr.new(kv_bytes, "_split_heads key"), tr.new(kv_bytes, "_split_heads value")
    tr.at(op="rotary embedding (query)")
    q_rot = traced_rope(tr, q_bytes)
    tr.at(op="rotary embedding (key)")
    k_rot = traced_rope(tr, kv_bytes)
    tr.drop(key)
    cache: list[int | None] = []
    if generate:
        cache = prefill_cache(tr, arch, spec, k_rot, value)
        k_rot = value = None
    tr.at(op="attention (math)")
    out = sdpa_math.math_sdpa(tr, b, heads, kv_heads, n, n, d, s, masked=True)
    merged = tr.new(hidden, "attn_output permute + reshape")
    tr.drop(out)
    dense = tr.new(hidden, "self_attention.dense")
    tr.drop(merged, qkv, q_rot, k_rot, value)
    tr.at(op="mlp")
    down = two_matrix_mlp(tr, arch, tokens, s, ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
    output = tr.new(hidden, "dropout_add(mlp + attention, residual)")
    tr.drop(normed, dense, down)
    return output, cache


def phi_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
              kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None]]:
    """PhiDecoderLayer (transformers 5.17), as the H200 trace of Phi-2 in nf4 at batch 8 shows
    it: one LayerNorm that attention and MLP both read; q, k, v (under bitsandbytes 4-bit each
    weight dequantized first); the rotary of the first rotary_dim of each head; the cats back
    (the pass-through slices keep q and k alive until the attention returns); the cache cats
    (the key cat and v go); SDPA (the heads-first query: its output is copied by
    transpose().contiguous()) or eager attention; dense (the attention's locals go); fc1,
    gelu_new op by op (fc1's output goes after it), fc2; attention + MLP, + residual; the norm,
    dense and fc2 go."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    heads, kv_heads, d, h = arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.hidden_size
    tokens = b * n
    hidden = tokens * h * s
    q_bytes, kv_bytes = tokens * heads * d * s, tokens * kv_heads * d * s
    fraction = (arch.rotary_dim or d) / d
    dequantized = spec.quantization == "4bit"

    def linear(out_features: int, in_features: int, name: str) -> int | None:
        return projection(tr, tokens, out_features, in_features, s, name, dequantized)

    normed = layer_norm_fused(tr, hidden, tokens)
    q, k, v = (linear(heads * d, h, "self_attn.q_proj"), linear(kv_heads * d, h, "self_attn.k_proj"),
               linear(kv_heads * d, h, "self_attn.v_proj"))
    q_rot, k_rot, q_cat, k_cat = partial_rotary_with_cats(tr, q_bytes, kv_bytes, fraction)
    out, cache, k_cat, v, weights = cache_and_attend(tr, arch, layout, spec, kernel, masked, generate, k_cat, v,
                                                     query_heads_first=True)
    dense = linear(h, heads * d, "self_attn.dense")
    tr.drop(out, q_cat, q_rot, q, k_rot, k, k_cat, v, weights)
    tr.at(op="mlp")
    fc2 = two_matrix_mlp(tr, arch, tokens, s, ("mlp.fc1", "mlp.fc2"), dequantized)
    summed = tr.new(hidden, "attention + mlp")
    output = tr.new(hidden, "+ residual")
    tr.drop(summed, normed, dense, fc2)
    return output, cache


def falcon_new_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
                     kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None]]:
    """FalconDecoderLayer with new_decoder_architecture (transformers 5.17), as the H200 trace of
    the falcon new-decoder test config at batch 8 shows it: ln_attn and ln_mlp (or one input
    LayerNorm); the fused query_key_value; _split_heads indexes each group's key and value (two
    small copies), broadcasts them to every query head and flattens query, key and value into
    three copies (the indexed ones go); the rotary of query and key (their flattened copies go);
    the cache cats of the broadcast key and value (the rotated key and the value go); SDPA with
    Falcon's own mask, made additive per layer (the efficient kernel, heads-last output: the
    permute-reshape is a view); dense (the fused projection and the rotated query go); the MLP;
    mlp_output += attention in place, dropout_add with the residual."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    heads, kv_heads, d, h = arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.hidden_size
    tokens = b * n
    hidden = tokens * h * s
    q_bytes = tokens * heads * d * s
    ln_attn = layer_norm_fused(tr, hidden, tokens)
    ln_mlp = layer_norm_fused(tr, hidden, tokens) if not falcon_parallel(arch) else ln_attn
    qkv = tr.new(tokens * (heads + 2 * kv_heads) * d * s, "self_attention.query_key_value")
    tr.at(op="_split_heads")
    picked = [tr.new(tokens * kv_heads * d * s, f"qkv[..., [{i}]] (copy)") for i in (-2, -1)]
    query, key, value = (tr.new(q_bytes, f"{name} flatten (copy)") for name in ("query", "key", "value"))
    tr.drop(*picked)
    tr.at(op="rotary embedding (query)")
    q_rot = traced_rope(tr, q_bytes)
    tr.at(op="rotary embedding (key)")
    k_rot = traced_rope(tr, q_bytes)
    tr.drop(query, key)
    cache: list[int | None] = []
    if generate:
        cache, k_rot, value = prefill_cache(tr, arch, spec, k_rot, value), None, None
    tr.at(op="attention (efficient, Falcon's mask)")
    additive = tr.new(b * n * n * s, "SDPA additive mask")
    out = tr.new(q_bytes, "SDPA output")
    tr.drop(additive)
    dense = tr.new(hidden, "self_attention.dense")
    tr.drop(out, qkv, q_rot, k_rot, value)
    tr.at(op="mlp")
    down = two_matrix_mlp(tr, arch, tokens, s, ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
    output = tr.new(hidden, "dropout_add(mlp + attention, residual)")
    tr.drop(ln_attn, ln_mlp if ln_mlp is not ln_attn else None, dense, down)
    return output, cache
