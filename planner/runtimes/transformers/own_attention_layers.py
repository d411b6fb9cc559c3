"""Decoder layers of the LayerNorm families whose attention is their own code rather than
transformers' shared eager/SDPA functions (GPT-J's fp32 _attn, BLOOM's and MPT's ALiBi scores),
written from their modeling code and held to their H200 traces (GPT-J-6B, BLOOMZ-560m, MPT-7B:
tests/test_edge_traces.py), as request sequences in the order transformers 5.17 allocates and
frees. Each block returns its softmax weights too: the model loop's `outputs` holds them until
the next block returns."""

from __future__ import annotations

from ...catalog import FamilyLayout
from ...model.spec import Architecture
from .activations import RunSpec
from .eager import fp32_softmax
from .family_layers import layer_norm_fused
from .layer_replay import Tracer, prefill_cache
from .layernorm_layers import two_matrix_mlp


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
    fc_out = two_matrix_mlp(tr, arch, tokens, s, ("mlp.fc_in", "mlp.fc_out"))
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


def _bloom_scores(tr: Tracer, b: int, heads: int, q_len: int, kv_len: int, s: int,
                  upcast: bool) -> list[int | None]:
    """BloomAttention's scores: alibi.baddbmm(q, k^T), + mask, softmax in fp32 (upcast and output;
    the upcast goes), .to(dtype) (the fp32 softmax goes). Returns the scores, the masked scores
    (locals to the end of the attention) and the weights (returned)."""
    scores = b * heads * q_len * kv_len
    raw = tr.new(scores * s, "alibi.baddbmm(q, k^T)")
    masked = tr.new(scores * s, "scores + mask")
    return [raw, masked, fp32_softmax(tr, scores, s, upcast)]


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
    raw, masked_scores, weights = _bloom_scores(tr, b, heads, n, n, s, spec.softmax_upcasts)
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
    scores = _bloom_scores(tr, b, arch.num_heads, 1, kv_length, s, spec.softmax_upcasts)
    tr.drop(*scores, tr.new(b * arch.hidden_size * s, "bmm(weights, v)"))



def mpt_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
              kernel: str, masked: bool, generate: bool) -> tuple[int | None, list[int | None], int | None]:
    """MptBlock (transformers 5.17), as the H200 trace of MPT-7B (4 layers, no KV cache: its
    config's use_cache is false) at batch 8 shows it: norm_1; Wqkv; q @ k^T with matmul's copies
    of the transposed query and key, * softmax_scale; + the fp32 ALiBi bias (the scores become
    fp32), masked_fill, softmax in fp32 and the cast (each replaces the one before; the masked
    scores stay a local); weights @ v (the value's copy), permute().contiguous(), out_proj (Wqkv,
    the masked scores and the context go); the residual add; norm_2 (norm_1's output goes); up,
    GELU (up goes), down, + residual. The weights are returned with the block's output."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    heads, d, h = arch.num_heads, arch.head_dim, arch.hidden_size
    tokens = b * n
    hidden = tokens * h * s
    q_bytes = tokens * heads * d * s
    scores = b * heads * n * n
    normed = layer_norm_fused(tr, hidden, tokens)
    qkv = tr.new(3 * hidden, "attn.Wqkv")
    tr.matmul()  # no rotary tables: the first block's projection is the run's first matmul
    cache: list[int | None] = []
    if generate:
        cache = prefill_cache(tr, arch, spec, None, None)
    tr.at(op="attention (eager, alibi)")
    copies = [tr.new(q_bytes, "query copy for q @ k^T"), tr.new(q_bytes, "key copy for q @ k^T")]
    chain = tr.new(scores * s, "q @ k^T")
    tr.drop(*copies)
    for op, width in (("* softmax_scale", s), ("+ alibi (fp32)", 4), ("masked_fill", 4)):
        step = tr.new(scores * width, f"scores {op}")
        tr.drop(chain)
        chain = step
    weights = fp32_softmax(tr, scores, s, upcast_input=False)  # the scores are fp32 already
    value = tr.new(q_bytes, "value copy for weights @ v")
    context = tr.new(q_bytes, "weights @ v")
    tr.drop(value)
    merged = tr.new(hidden, "permute().contiguous()")
    tr.drop(context)
    attended = tr.new(hidden, "attn.out_proj")
    tr.drop(qkv, chain, merged)
    residual = tr.new(hidden, "residual add")
    tr.at(op="norm_2")
    normed_mlp = layer_norm_fused(tr, hidden, tokens)
    tr.drop(normed)
    tr.at(op="ffn")
    up = tr.new(tokens * arch.intermediate_size * s, "ffn.up_proj")
    act = tr.new(tokens * arch.intermediate_size * s, "ffn.act")
    tr.drop(up)
    down = tr.new(hidden, "ffn.down_proj")
    output = tr.new(hidden, "+ residual")
    tr.drop(act, down, normed_mlp, residual, attended)
    return output, cache, weights
