"""Decoder layers of LayerNorm families written from their modeling code and held to their H200
traces (GPT-2 medium, SantaCoder, OctoCoder, StarCoder2-7B, OPT-125m, Falcon-7B, Phi-2, GPT-J-6B:
tests/test_edge_traces.py), as request sequences in the order transformers 5.17 allocates and frees."""

from __future__ import annotations

from ...catalog import FamilyLayout
from ...model.spec import Architecture
from . import sdpa_math
from .activations import RunSpec
from .family_layers import cache_and_attend, layer_norm_fused
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
    fc = tr.new(tokens * arch.intermediate_size * s, "mlp.c_fc")
    if arch.activation == "gelu_new":
        act = new_gelu(tr, tokens * arch.intermediate_size * s)
    else:
        act = tr.new(tokens * arch.intermediate_size * s, f"{arch.activation}(mlp.c_fc)")
    tr.drop(fc)
    down = tr.new(hidden, "mlp.c_proj")
    tr.drop(act)
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
    up = tr.new(tokens * arch.intermediate_size * s, "mlp.dense_h_to_4h")
    act = tr.new(tokens * arch.intermediate_size * s, "mlp.act")
    tr.drop(up)
    down = tr.new(hidden, "mlp.dense_4h_to_h")
    tr.drop(act)
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
    tr.at(op="rotary embedding (query)")
    q_rot = traced_rope(tr, int(q_bytes * fraction))
    tr.at(op="rotary embedding (key)")
    k_rot = traced_rope(tr, int(kv_bytes * fraction))
    q_cat = tr.new(q_bytes, "cat(query_rot, query_pass)")
    k_cat = tr.new(kv_bytes, "cat(key_rot, key_pass)")
    out, cache, k_cat, v, weights = cache_and_attend(tr, arch, layout, spec, kernel, masked, generate, k_cat, v,
                                                     query_heads_first=True)
    dense = linear(h, heads * d, "self_attn.dense")
    tr.drop(out, q_cat, q_rot, q, k_rot, k, k_cat, v, weights)
    tr.at(op="mlp")
    fc1 = linear(arch.intermediate_size, h, "mlp.fc1")
    if arch.activation == "gelu_new":
        act = new_gelu(tr, tokens * arch.intermediate_size * s)
    else:
        act = tr.new(tokens * arch.intermediate_size * s, f"{arch.activation}(mlp.fc1)")
    tr.drop(fc1)
    fc2 = linear(h, arch.intermediate_size, "mlp.fc2")
    tr.drop(act)
    summed = tr.new(hidden, "attention + mlp")
    output = tr.new(hidden, "+ residual")
    tr.drop(summed, normed, dense, fc2)
    return output, cache


def _gptj_rope(tr: Tracer, nbytes: int, table_bytes: int) -> int:
    """GPT-J's apply_rotary_pos_emb on the rotary slice: sin and cos repeat_interleave'd, x * cos,
    rotate_every_two (-x2, the stack; -x2 goes), its product with sin (the stack goes), the sum
    (both products go), then the repeated tables go."""
    sin, cos = tr.new(table_bytes, "sin repeat_interleave"), tr.new(table_bytes, "cos repeat_interleave")
    product = tr.new(nbytes, "x * cos")
    negated = tr.new(nbytes // 2, "rotate_every_two -x2")
    stacked = tr.new(nbytes, "rotate_every_two stack")
    tr.drop(negated)
    rotated = tr.new(nbytes, "rotate_every_two(x) * sin")
    tr.drop(stacked)
    out = tr.new(nbytes, "rotary sum")
    tr.drop(product, rotated, sin, cos)
    return out


def gptj_position_table(tr: Tracer, arch: Architecture, b: int) -> int:
    """_get_embed_positions: the fp32 sin/cos table repeated once per sequence, in every layer
    and every step (it goes when the attention returns)."""
    return tr.new(b * (arch.max_positions or 0) * (arch.rotary_dim or arch.head_dim) * 4, "embed_positions.repeat")


def gptj_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
               kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None], int | None]:
    """GPTJBlock with GPT-J's own eager attention (transformers 5.17), as the H200 trace of
    GPT-J-6B at batch 32 shows it: ln_1 (attention and MLP both read it); q, k, v; the position
    table repeated per sequence, the position ids repeated, gathered (fp32) and cast; the rotary
    of the key's then the query's first rotary_dim; the cats back (key first); the cache cats
    (the key cat and v go); _attn in fp32: the query and key upcast, matmul's copy of the
    permuted query, the scores, / scale, + mask, softmax, the cast back (each replaces the one
    before), weights @ v (the upcasts go); _merge_heads' copy, out_proj (the attention's locals
    go); fc_in, gelu_new op by op, fc_out; attention + MLP + residual. The softmax weights are
    returned with the block's output and held until the next block returns."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    heads, d, h = arch.num_heads, arch.head_dim, arch.hidden_size
    r = arch.rotary_dim or d
    tokens = b * n
    hidden = tokens * h * s
    q_bytes = kv_bytes = tokens * heads * d * s
    normed = layer_norm_fused(tr, hidden, tokens)
    q = tr.new(q_bytes, "attn.q_proj")
    tr.matmul()  # no rotary tables at the model level: the first layer's q_proj is the first matmul
    k, v = tr.new(kv_bytes, "attn.k_proj"), tr.new(kv_bytes, "attn.v_proj")
    tr.at(op="rotary embedding")
    table = gptj_position_table(tr, arch, b)
    ids = tr.new(tokens * r * 8, "position ids repeated")
    gathered = tr.new(tokens * r * 4, "gather(embed_positions)")
    sincos = gathered
    if s < 4:
        sincos = tr.new(tokens * r * s, "sincos .to(dtype)")
        tr.drop(gathered)
    k_rot = _gptj_rope(tr, tokens * heads * r * s, tokens * r * s)
    q_rot = _gptj_rope(tr, tokens * heads * r * s, tokens * r * s)
    k_cat = tr.new(kv_bytes, "cat(k_rot, k_pass)") if r < d else k_rot
    q_cat = tr.new(q_bytes, "cat(q_rot, q_pass)") if r < d else q_rot
    cache: list[int | None] = []
    if generate:
        cache, k_cat, v = prefill_cache(tr, arch, spec, k_cat, v), None, None
    tr.at(op="attention (eager, fp32)")
    scores = b * heads * n * n
    query = tr.new(q_bytes * 4 // s, "query .to(float32)") if s < 4 else None
    key = tr.new(kv_bytes * 4 // s, "key .to(float32)") if s < 4 else None
    copy = tr.new(q_bytes * 4 // s, "query copy for q @ k^T") if b > 1 else None
    chain = tr.new(scores * 4, "q @ k^T")
    tr.drop(copy)
    for op in ("/ scale_attn", "+ mask", "softmax"):
        step = tr.new(scores * 4, f"scores {op}")
        tr.drop(chain)
        chain = step
    weights = chain
    if s < 4:
        weights = tr.new(scores * s, "weights .to(dtype)")
        tr.drop(chain)
    raw = tr.new(q_bytes, "weights @ v")
    tr.drop(query, key)
    merged = tr.new(q_bytes, "_merge_heads (contiguous)")
    tr.drop(raw)
    attended = tr.new(hidden, "attn.out_proj")
    tr.drop(merged, q_cat if q_cat is not q_rot else None, table, ids, sincos, k_rot, k, q_rot, q, k_cat, v)
    tr.at(op="mlp")
    fc_in = tr.new(tokens * arch.intermediate_size * s, "mlp.fc_in")
    if arch.activation == "gelu_new":
        act = new_gelu(tr, tokens * arch.intermediate_size * s)
    else:
        act = tr.new(tokens * arch.intermediate_size * s, f"{arch.activation}(mlp.fc_in)")
    tr.drop(fc_in)
    fc_out = tr.new(hidden, "mlp.fc_out")
    tr.drop(act)
    summed = tr.new(hidden, "attention + mlp")
    output = tr.new(hidden, "+ residual")
    tr.drop(summed, normed, attended, fc_out)
    return output, cache, weights


def gptj_decode_attention(tr: Tracer, arch: Architecture, spec: RunSpec, kv_length: int) -> None:
    """One decode step's _attn (the H200 trace of GPT-J-6B): the one-token query and the whole
    cached key upcast to fp32 (the key's copy dominates), the fp32 score chain, the cast, weights
    @ v; the upcasts go when _attn returns."""
    b, s = spec.batch, spec.activation_bytes
    heads, d = arch.num_heads, arch.head_dim
    query = tr.new(b * heads * d * 4, "query .to(float32)") if s < 4 else None
    key = tr.new(b * heads * kv_length * d * 4, "key .to(float32)") if s < 4 else None
    chain = tr.new(b * heads * kv_length * 4, "q @ k^T")
    for op in ("/ scale_attn", "+ mask", "softmax"):
        step = tr.new(b * heads * kv_length * 4, f"scores {op}")
        tr.drop(chain)
        chain = step
    weights = chain
    if s < 4:
        weights = tr.new(b * heads * kv_length * s, "weights .to(dtype)")
        tr.drop(chain)
    tr.drop(tr.new(b * heads * d * s, "weights @ v"), query, key, weights)


def bloom_embeddings(tr: Tracer, arch: Architecture, b: int, n: int, s: int) -> tuple[int | None, int | None]:
    """BloomModel before its blocks: word_embeddings_layernorm over the embeddings (the first
    block's input), then build_alibi_tensor (the fp32 slopes x positions, cast to the model
    dtype: the fp32 one goes). Returns the norm's output and the ALiBi tensor."""
    normed = layer_norm_fused(tr, b * n * arch.hidden_size * s, b * n)
    wide = tr.new(b * arch.num_heads * n * 4, "alibi (fp32)")
    alibi = tr.new(b * arch.num_heads * n * s, "alibi .to(dtype)") if s < 4 else wide
    if s < 4:
        tr.drop(wide)
    return normed, alibi


def _bloom_gelu(tr: Tracer, nbytes: int) -> int:
    """bloom_gelu_forward, x * 0.5 * (1.0 + tanh(0.79788456 * x * (1 + 0.044715 * x * x))),
    left to right: x * 0.5 stays to the end; 0.79788456 * x waits for (1 + 0.044715 * x * x)."""
    half = tr.new(nbytes, "bloom_gelu x * 0.5")
    scaled = tr.new(nbytes, "bloom_gelu 0.79788456 * x")
    inner = tr.new(nbytes, "bloom_gelu 0.044715 * x")
    for op in ("* x", "1 + that"):
        step = tr.new(nbytes, f"bloom_gelu {op}")
        tr.drop(inner)
        inner = step
    chained = tr.new(nbytes, "bloom_gelu product")
    tr.drop(scaled, inner)
    for op in ("tanh", "1.0 + tanh"):
        step = tr.new(nbytes, f"bloom_gelu {op}")
        tr.drop(chained)
        chained = step
    out = tr.new(nbytes, "bloom_gelu out")
    tr.drop(half, chained)
    return out


def _bloom_scores(tr: Tracer, b: int, heads: int, q_len: int, kv_len: int, s: int) -> list[int | None]:
    """BloomAttention's scores: alibi.baddbmm(q, k^T), + mask, softmax in fp32 (upcast and output;
    the upcast goes), .to(dtype) (the fp32 softmax goes). Returns the scores, the masked scores
    (locals to the end of the attention) and the weights (returned)."""
    scores = b * heads * q_len * kv_len
    raw = tr.new(scores * s, "alibi.baddbmm(q, k^T)")
    masked = tr.new(scores * s, "scores + mask")
    upcast = tr.new(scores * 4, "softmax upcast") if s < 4 else None
    soft = tr.new(scores * 4, "softmax")
    tr.drop(upcast)
    weights = soft
    if s < 4:
        weights = tr.new(scores * s, "softmax .to(dtype)")
        tr.drop(soft)
    return [raw, masked, weights]


def bloom_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
                kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None], int | None]:
    """BloomBlock (transformers 5.17, residual before the norms), as the H200 trace of
    BLOOMZ-560m at batch 16 shows it: input LayerNorm; query_key_value, whose key and value views
    the cache cats copy; the query's reshape copy; the ALiBi score chain (_bloom_scores); bmm
    with the values, _merge_heads' copy; dense and dropout_add with the residual (the fused
    projection, the query copy, both score tensors and the merged heads go); the post-attention
    LayerNorm (the input norm goes); dense_h_to_4h, bloom_gelu op by op (the projection goes
    after it), dense_4h_to_h, dropout_add. The softmax weights are returned with the block's
    output and held until the next block returns."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    heads, d, h = arch.num_heads, arch.head_dim, arch.hidden_size
    tokens = b * n
    hidden = tokens * h * s
    normed = layer_norm_fused(tr, hidden, tokens)
    qkv = tr.new(3 * hidden, "self_attention.query_key_value")
    tr.matmul()  # no rotary tables: the first block's projection is the run's first matmul
    cache: list[int | None] = []
    if generate:
        cache = prefill_cache(tr, arch, spec, None, None)
    tr.at(op="attention (eager, alibi)")
    query = tr.new(tokens * heads * d * s, "query reshape (copy)")
    raw, masked_scores, weights = _bloom_scores(tr, b, heads, n, n, s)
    context = tr.new(tokens * heads * d * s, "bmm(weights, v)")
    merged = tr.new(hidden, "_merge_heads (copy)")
    tr.drop(context)
    dense = tr.new(hidden, "self_attention.dense")
    attention_output = tr.new(hidden, "dropout_add")
    tr.drop(dense, qkv, query, raw, masked_scores, merged)
    tr.at(op="post_attention_layernorm")
    normed_mlp = layer_norm_fused(tr, hidden, tokens)
    tr.drop(normed)
    tr.at(op="mlp")
    up = tr.new(tokens * arch.intermediate_size * s, "mlp.dense_h_to_4h")
    act = _bloom_gelu(tr, tokens * arch.intermediate_size * s)
    tr.drop(up)
    down = tr.new(hidden, "mlp.dense_4h_to_h")
    output = tr.new(hidden, "dropout_add")
    tr.drop(act, down, normed_mlp, attention_output)
    return output, cache, weights


def bloom_decode_attention(tr: Tracer, arch: Architecture, spec: RunSpec, kv_length: int) -> None:
    """One decode step's ALiBi score chain over the cache (the one-token query's copy and the
    output are a few kilobytes); everything goes by the step's end."""
    b, s = spec.batch, spec.activation_bytes
    tr.drop(*_bloom_scores(tr, b, arch.num_heads, 1, kv_length, s), tr.new(b * arch.hidden_size * s, "bmm(weights, v)"))


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
    up = tr.new(tokens * arch.intermediate_size * s, "mlp.dense_h_to_4h")
    act = tr.new(tokens * arch.intermediate_size * s, "mlp.act")
    tr.drop(up)
    down = tr.new(hidden, "mlp.dense_4h_to_h")
    tr.drop(act)
    output = tr.new(hidden, "dropout_add(mlp + attention, residual)")
    tr.drop(ln_attn, ln_mlp if ln_mlp is not ln_attn else None, dense, down)
    return output, cache
