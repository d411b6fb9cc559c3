"""Qwen3-Next's generate(), replayed request by request in the order transformers 5.17's
modeling_qwen3_next.py allocates and frees when the flash-linear-attention and causal-conv1d
kernels are absent (its torch paths: causal_conv1d_fn / causal_conv1d_update,
torch_chunk_gated_delta_rule in the prefill, torch_recurrent_gated_delta_rule per decode step),
held to the H200 traces of Qwen3-Next-80B-A3B (4 layers, bf16: SDPA at batch 210 and 214 of
2048-token prompts, eager at batch 8 of 1024; fp32 SDPA at batch 250 and 260 of 1024; 8 layers at
batch 373 and 380 of 1024; tests/test_edge_traces.py).

The prefill's chunked delta rule is where the memory goes: queries, keys and values upcast to
fp32 and copied again by the l2 norm, the scaling and the padding to whole chunks (each
batch x value heads x padded prompt x 128 x 4 bytes: 6.6 GiB at batch 210), the decay tables of
chunk x chunk per chunk, both triangular solves, then a loop over the chunks whose state updates
are batch x heads x 128 x 128 fp32 each. The mixture of experts (512 experts, top-10, a gated
shared expert) runs through mlp_layers.moe_block: grouped_mm in the prefill (its routed rows,
16.4 GiB at batch 210, are the largest single requests), batched_mm in the decode steps.

dtype rules that decide whether a cast allocates: `.to(torch.float32, memory_format=
torch.contiguous_format)` of a transposed fp32 tensor aliases it (suggest_memory_format of a
3-D or 4-D strided tensor is contiguous), so in fp32 runs only the copies that change layout
remain; the decay `g` is always fp32. What fp32 keeps instead is the projections' token-major
layout: over whole chunks F.pad copies nothing new in layout (no padding: a strided clone), so bmm
copies both operands of the rule's products and the query and key of every chunk, and the output's
reshape copies it; a padded prompt comes out of F.pad contiguous.
"""

from __future__ import annotations

from ...catalog import FamilyLayout
from ...model.spec import Architecture, RecurrentSpec
from . import attention, eager, kv_cache, sdpa_math
from .activations import RunSpec
from .decode_replay import generate_steps
from .layer_replay import (
    Tracer,
    causal_mask_pieces,
    gemma_norm,
    traced_mask_check,
    traced_position_ids,
    traced_rope,
    traced_rotary_tables,
)
from .mlp_layers import gated_mlp, moe_block

FP32 = 4
INT64 = 8
SDPA_SEED = 8  # the two 8-byte tensors SDPA's kernel takes on the H200 (its philox seed and offset)
SDPA_PREFILL_SCRATCH = 256  # and the 256 bytes it takes and lets go over a whole prompt (H200 trace)


def replays(arch: Architecture, spec: RunSpec) -> bool:
    """Qwen3-Next without bitsandbytes, generating with its cache under SDPA or eager attention,
    over prompts at least as long as the conv kernel (shorter ones pad the conv state: not
    replayed)."""
    m = arch.recurrent
    return (arch.model_type == "qwen3_next" and m is not None and m.kind == "gated_delta"
            and spec.quantization == "none" and spec.mode == "generate" and spec.keeps_cache
            and spec.attn in ("sdpa", "eager") and spec.prompt_len >= m.conv_kernel
            and arch.activation in (None, "silu"))


def _norm(tr: Tracer, rows: int, width: int, s: int) -> int:
    """Qwen3NextRMSNorm: Gemma's code ((x * (1 + weight.float())).type_as(x))."""
    return gemma_norm(tr, rows * width * s, rows, s)


def _l2norm(tr: Tracer, x: int | None, rows: int, width: int) -> int | None:
    """l2norm over fp32 rows: x * x, its sum, + eps, rsqrt (each goes once the next exists), then
    x * inv_norm; the input goes once the norm exists (its caller reassigns it)."""
    squared = tr.new(rows * width * FP32, "l2norm x * x")
    total = tr.new(rows * FP32, "l2norm sum")
    tr.drop(squared)
    shifted = tr.new(rows * FP32, "l2norm + eps")
    tr.drop(total)
    inverse = tr.new(rows * FP32, "l2norm rsqrt")
    tr.drop(shifted)
    out = tr.new(rows * width * FP32, "l2norm x * inv_norm")
    tr.drop(inverse, x)
    return out


def _upcast(tr: Tracer, elements: int, s: int, name: str) -> int | None:
    """x.transpose(1, 2).to(torch.float32, memory_format=contiguous): a copy unless x is fp32."""
    return tr.new(elements * FP32, name) if s < FP32 else None


def _decay(tr: Tracer, tokens: int, heads: int, s: int) -> int | None:
    """g = -A_log.float().exp() * softplus(a.float() + dt_bias), fp32 (the head-sized steps first)."""
    upcast = tr.new(heads * FP32, "A_log.float()") if s < FP32 else None
    exp = tr.new(heads * FP32, "A_log.exp()")
    tr.drop(upcast)
    negated = tr.new(heads * FP32, "-A_log.exp()")
    tr.drop(exp)
    wide = tr.new(tokens * heads * FP32, "a.float()") if s < FP32 else None
    shifted = tr.new(tokens * heads * FP32, "a + dt_bias")
    tr.drop(wide)
    soft = tr.new(tokens * heads * FP32, "softplus")
    tr.drop(shifted)
    g = tr.new(tokens * heads * FP32, "g")
    tr.drop(negated, soft)
    return g


def _rule_inputs(tr: Tracer, m: RecurrentSpec, tokens: int, s: int) -> tuple[int | None, ...]:
    """How both gated delta rules start: query, key, value and beta upcast to fp32 (head-major),
    the query and key l2-normalized, the query scaled by 1 / sqrt(key width). Returns the scaled
    query, the key, the value's and beta's upcasts (None in fp32: they alias)."""
    h, dk, dv = m.heads, m.state_size, m.head_dim
    query = _upcast(tr, tokens * h * dk, s, "query.float()")
    key = _upcast(tr, tokens * h * dk, s, "key.float()")
    value = _upcast(tr, tokens * h * dv, s, "value.float()")
    beta = _upcast(tr, tokens * h, s, "beta.float()")
    query = _l2norm(tr, query, tokens * h, dk)
    key = _l2norm(tr, key, tokens * h, dk)
    scaled = tr.new(tokens * h * dk * FP32, "query * scale")
    tr.drop(query)
    return scaled, key, value, beta


def _chunk_rule(tr: Tracer, m: RecurrentSpec, b: int, n: int, s: int) -> tuple[int | None, int | None]:
    """torch_chunk_gated_delta_rule over the prompt (no initial state); returns its output
    (batch x prompt x heads x head_dim in the model dtype) and the final state."""
    h, dk, dv, cs = m.heads, m.state_size, m.head_dim, m.chunk_size
    tokens = b * n
    padded = -(-n // cs) * cs
    chunks = padded // cs
    tr.at(op="gated delta rule (chunked)")
    scaled, key, value, beta = _rule_inputs(tr, m, tokens, s)
    long = b * h * padded
    padded_q, padded_k = tr.new(long * dk * FP32, "F.pad(query)"), tr.new(long * dk * FP32, "F.pad(key)")
    padded_v = tr.new(long * dv * FP32, "F.pad(value)")
    tr.drop(scaled, key, value)
    padded_beta, padded_decay = tr.new(long * FP32, "F.pad(beta)"), tr.new(long * FP32, "F.pad(g)")
    tr.drop(beta)
    v_beta = tr.new(long * dv * FP32, "value * beta")
    k_beta = tr.new(long * dk * FP32, "key * beta")
    ones = tr.new(cs * cs, "ones(chunk, chunk)")
    upper = tr.new(cs * cs, "triu")
    tr.drop(ones)
    cum_decay = tr.new(long * FP32, "decay.cumsum")
    tr.temp(long * FP32)
    square = b * h * chunks * cs * cs * FP32
    pairwise = tr.new(square, "pairwise decay")
    masked = tr.new(square, "pairwise masked_fill")
    tr.drop(pairwise)
    pairwise = tr.new(square, "pairwise exp")
    tr.drop(masked)
    # in fp32 over whole chunks the queries and keys keep the projections' token-major layout (the
    # upcasts alias, F.pad without padding clones strides): bmm copies both operands of each product
    token_major = s == FP32 and n % cs == 0
    products = []
    for name in ("k_beta @ key^T", "query @ key^T"):
        operands = [tr.new(long * dk * FP32, f"{name} operand copy") for _ in range(2)] if token_major else []
        product = tr.new(square, name)
        tr.drop(*reversed(operands))
        products.append(tr.new(square, f"({name}) * pairwise decay"))
        tr.drop(product)
    ut_system, intra = products
    exp = tr.new(long * FP32, "cum_decay.exp()")
    decayed_k_beta = tr.new(long * dk * FP32, "k_beta * exp")
    tr.drop(exp)
    solved = []
    for name, width in (("new values", dv), ("k_cumdecay", dk)):
        solved.append(tr.new(long * width * FP32, f"solve_triangular ({name})"))
        work = [tr.new(b * h * chunks * INT64, "solve_triangular info"), tr.new(b * h * chunks * INT64)]
        tr.drop(*reversed(work))
    new_values, k_cumdecay = solved
    state_bytes = b * h * dk * dv * FP32
    state = tr.new(state_bytes, "initial state (zeros)")
    core = tr.new(long * dv * FP32, "core_attn_out (zeros_like)")
    exp = tr.new(long * FP32, "cum_decay.exp()")
    decayed_q = tr.new(long * dk * FP32, "query * exp")
    tr.drop(exp, padded_q)
    difference = tr.new(long * FP32, "cum_decay[-1] - cum_decay")
    exp = tr.new(long * FP32, "exp")
    tr.drop(difference)
    decayed_k = tr.new(long * dk * FP32, "key * exp")
    tr.drop(exp, padded_k)
    chunk_decay = tr.new(b * h * chunks * FP32, "chunk decay")
    piece, v_new, inter = b * h * cs * dv * FP32, None, None
    for chunk in range(chunks):
        tr.at(op=f"gated delta rule chunk {chunk}")
        read = tr.new(piece, "k_cumdecay @ state")
        fresh = tr.new(piece, "v_new")
        tr.drop(read, v_new)
        v_new = fresh
        operand = tr.new(b * h * cs * dk * FP32, "query chunk copy") if token_major else None
        fresh = tr.new(piece, "query @ state")
        tr.drop(operand, inter)
        inter = fresh
        tr.drop(tr.new(piece, "intra @ v_new"), tr.new(piece, "inter + intra"))
        decayed = tr.new(state_bytes, "state * chunk decay")
        operand = tr.new(b * h * cs * dk * FP32, "key chunk copy") if token_major else None
        terms = [decayed, tr.new(state_bytes, "key^T @ v_new")]
        tr.drop(operand)
        fresh = tr.new(state_bytes, "state update")
        tr.drop(*terms, state)
        state = fresh
    reshaped = tr.new(long * dv * FP32, "core_attn_out.reshape")  # zeros_like kept solve's layout
    tr.drop(core)
    out = tr.new(tokens * h * dv * s, "core_attn_out .to(dtype)") if s < FP32 else None
    if out is None:
        out, reshaped = reshaped, None
    tr.drop(reshaped, decayed_q, decayed_k, padded_v, padded_beta, padded_decay, v_beta, k_beta, upper,
            cum_decay, pairwise, ut_system, intra, decayed_k_beta, new_values, k_cumdecay, chunk_decay, v_new,
            inter)
    return out, state


def _recurrent_rule(tr: Tracer, m: RecurrentSpec, b: int, s: int) -> tuple[int | None, int | None]:
    """torch_recurrent_gated_delta_rule over one token from the cached state; returns its output
    and leaves the new state to the caller (returned as `state`)."""
    h, dk, dv = m.heads, m.state_size, m.head_dim
    tr.at(op="gated delta rule (recurrent)")
    scaled, key, value, beta = _rule_inputs(tr, m, b, s)
    core = tr.new(b * h * dv * FP32, "core_attn_out (zeros_like)")
    state_bytes = b * h * dk * dv * FP32
    decay = tr.new(b * h * FP32, "decay.exp()")
    decayed = tr.new(state_bytes, "state * decay")
    product = tr.new(state_bytes, "state * k")
    kv_mem = tr.new(b * h * dv * FP32, "kv_mem")
    tr.drop(product)
    difference = tr.new(b * h * dv * FP32, "v - kv_mem")
    delta = tr.new(b * h * dv * FP32, "delta")
    tr.drop(difference)
    outer = tr.new(state_bytes, "k * delta")
    state = tr.new(state_bytes, "state + k * delta")
    tr.drop(outer, decayed)
    tr.drop(tr.new(state_bytes, "state * q"), tr.new(b * h * dv * FP32, "sum"))
    out = tr.new(b * h * dv * s, "core_attn_out .to(dtype)") if s < FP32 else None
    if out is None:
        out, core = core, None
    tr.drop(core, scaled, key, value, decay, beta, kv_mem, delta)
    return out, state


def _gated_norm(tr: Tracer, out: int | None, rows: int, width: int, s: int) -> int | None:
    """Qwen3NextRMSNormGated(core_attn_out, z): x.to(fp32), pow(2), mean (kept to the end),
    + eps, rsqrt, x * rsqrt, .to(dtype), weight *, gate.to(fp32), silu, the product (fp32), its
    cast back; the attention output goes as the norm's result replaces it."""
    wide = rows * width * FP32
    upcast = tr.new(wide, "gated norm x.float()") if s < FP32 else None
    squared = tr.new(wide, "gated norm pow(2)")
    mean = tr.new(rows * FP32, "gated norm mean")
    tr.drop(squared)
    shifted = tr.new(rows * FP32, "+ eps")
    root = tr.new(rows * FP32, "rsqrt")
    tr.drop(shifted)
    scaled = tr.new(wide, "x * rsqrt")
    tr.drop(root, upcast)
    cast = tr.new(rows * width * s, "gated norm .to(dtype)") if s < FP32 else None
    weighted = tr.new(rows * width * s, "weight * x")
    tr.drop(cast, scaled)
    gate = tr.new(wide, "gate.float()") if s < FP32 else None
    act = tr.new(wide, "silu(gate)")
    tr.drop(gate)
    gated = tr.new(wide, "x * silu(gate)")
    tr.drop(act, weighted)
    result = tr.new(rows * width * s, "gated norm .to(dtype)") if s < FP32 else gated
    tr.drop(gated if result != gated else None, mean, out)
    return result


def _linear_attention(tr: Tracer, arch: Architecture, b: int, n: int, s: int, cache: dict,
                      layer: int) -> int | None:
    """Qwen3NextGatedDeltaNet.forward over n tokens (n == 1: a decode step from the cache)."""
    m = arch.recurrent
    assert m is not None
    tokens = b * n
    h, kh, dk, dv = m.heads, m.groups, m.state_size, m.head_dim
    key_width, value_width = kh * dk, h * dv
    conv_dim = 2 * key_width + value_width
    tr.at(op="linear_attn.in_proj")
    held = [tr.new(tokens * m.in_proj * s, "in_proj_qkvz"), tr.new(tokens * 2 * h * s, "in_proj_ba")]
    value = tr.new(tokens * value_width * s, "value.reshape")
    z = tr.new(tokens * value_width * s, "z.reshape")
    held += [z, tr.new(tokens * h * s, "b.reshape"), tr.new(tokens * h * s, "a.reshape")]
    query, key = tr.new(tokens * key_width * s, "query.reshape"), tr.new(tokens * key_width * s, "key.reshape")
    mixed = tr.new(tokens * conv_dim * s, "cat(q, k, v)")
    tr.at(op="conv1d")
    if n == 1:  # causal_conv1d_update: cat(conv_state, x), conv1d over kernel + 1 positions, silu
        window = tr.new(b * conv_dim * (m.conv_kernel + 1) * s, "cat(conv_state, x)")
        conv = tr.new(b * conv_dim * 2 * s, "conv1d")
        act = tr.new(tokens * conv_dim * s, "silu")
        tr.drop(conv, window)
    else:  # the cache's conv state (zeros, then copy_), the conv over a contiguous input
        cache[f"conv {layer}"] = tr.new(b * conv_dim * m.conv_kernel * s, "conv state (lazy init)")
        contiguous = tr.new(tokens * conv_dim * s, "conv1d input (contiguous)")
        conv = tr.new(b * conv_dim * (n + m.conv_kernel - 1) * s, "conv1d")
        tr.drop(contiguous)
        act = tr.new(tokens * conv_dim * s, "silu")
        tr.drop(conv)
    tr.drop(mixed, query, key, value)
    held += [act, tr.new(tokens * h * s, "beta = b.sigmoid()")]
    held.append(_decay(tr, tokens, h, s))
    if h // kh > 1:
        held += [tr.new(tokens * h * dk * s, f"{name}.repeat_interleave") for name in ("query", "key")]
    if n == 1:
        out, state = _recurrent_rule(tr, m, b, s)
    else:
        out, state = _chunk_rule(tr, m, b, n, s)
        cache[f"state {layer}"] = tr.new(b * h * dk * dv * FP32, "recurrent state (lazy init)")
    if s == FP32 and n > 1:  # reshape(-1, head_dim) of the rule's token-major fp32 view copies it
        flat = tr.new(tokens * h * dv * FP32, "core_attn_out.reshape")
        tr.drop(out)
        out = flat
    out = _gated_norm(tr, out, tokens * h, dv, s)
    tr.at(op="linear_attn.out_proj")
    projected = tr.new(tokens * arch.hidden_size * s, "out_proj")
    tr.drop(*held, out, state)
    return projected


def _attention(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, n: int, step: int,
               cache: dict, layer: int) -> tuple[int | None, int | None]:
    """Qwen3NextAttention.forward: q_proj twice as wide (query and gate), the gate's reshape copy,
    per-head q_norm and k_norm, the partial rotary, the cache, SDPA or eager, output * sigmoid(gate).
    Returns the output and eager's softmax weights (the decoder layer's `_` to its end)."""
    b, s = spec.batch, spec.activation_bytes
    heads, kv_heads, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    tokens = b * n
    tr.at(op="self_attn.q_proj")
    both = tr.new(tokens * heads * d * 2 * s, "q_proj (query and gate)")
    gate = tr.new(tokens * heads * d * s, "gate.reshape")
    tr.at(op="self_attn.q_norm")
    query = _norm(tr, tokens * heads, d, s)
    tr.drop(both)
    projected = tr.new(tokens * kv_heads * d * s, "k_proj")
    tr.at(op="self_attn.k_norm")
    key = _norm(tr, tokens * kv_heads, d, s)
    tr.drop(projected)
    value = tr.new(tokens * kv_heads * d * s, "v_proj")
    tr.at(op="rotary embedding")
    rotary = arch.rotary_dim or d
    q_rot = traced_rope(tr, tokens * heads * rotary * s)
    k_rot = traced_rope(tr, tokens * kv_heads * rotary * s)
    if rotary < d:  # cat([q_embed, q_pass]), then the key's
        rotated = tr.new(tokens * heads * d * s, "cat(q_embed, q_pass)")
        tr.drop(q_rot)
        q_rot = rotated
        rotated = tr.new(tokens * kv_heads * d * s, "cat(k_embed, k_pass)")
        tr.drop(k_rot)
        k_rot = rotated
    tr.drop(query, key)
    tr.at(op="KV cache (torch.cat)")
    length = n if step == 0 else spec.prompt_len + step
    parts = []
    for part, fresh in (("key", k_rot), ("value", value)):
        grown = tr.new(kv_cache.layer_bytes(arch, b, length, spec.kv, step, part), f"KV cache {part}s (torch.cat)")
        tr.drop(cache.get(f"{part} {layer}"))
        cache[f"{part} {layer}"] = grown
        parts.append(fresh)
    tr.drop(*parts)
    tr.at(op=f"attention ({spec.attn})")
    weights = None
    if spec.attn == "eager":  # the rotary's cat left the query contiguous
        out, weights = eager.eager_attention(tr, spec, heads, kv_heads, n, length, d, query_contiguous=True)
    elif attention.sdpa_kernel(arch, layout, s, masked=False) == "math":  # fp32: enable_gqa's repeats
        one_query = n == 1  # a decode step passes neither a mask nor is_causal
        out = sdpa_math.math_sdpa(tr, b, heads, kv_heads, n, length, d, s, masked=one_query, float_mask=one_query,
                                  enable_gqa=True, query_contiguous=True)
        if n > 1:
            merged = tr.new(tokens * heads * d * s, "attention output (contiguous)")
            tr.drop(out)
            out = merged
    else:
        seeds = [tr.new(SDPA_SEED, "SDPA seed"), tr.new(SDPA_SEED, "SDPA offset")]
        out = tr.new(tokens * heads * d * s, "SDPA output")
        if n > 1:
            tr.temp(SDPA_PREFILL_SCRATCH)
        tr.drop(*seeds)
        if n > 1:  # transpose(1, 2).contiguous(): the kernel wrote (batch, heads, tokens, dim)
            merged = tr.new(tokens * heads * d * s, "attention output (contiguous)")
            tr.drop(out)
            out = merged
    sigmoid = tr.new(tokens * heads * d * s, "sigmoid(gate)")
    gated = tr.new(tokens * heads * d * s, "attention * sigmoid(gate)")
    tr.drop(sigmoid, out)
    tr.at(op="self_attn.o_proj")
    projected = tr.new(tokens * arch.hidden_size * s, "o_proj")
    tr.drop(gated, q_rot, gate)
    return projected, weights


def _layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int, n: int, step: int,
           cache: dict, layer_input: int | None) -> int | None:
    """Qwen3NextDecoderLayer: input norm, the mixer, residual, post-attention norm, the MLP
    (sparse with the shared expert first, or dense), residual."""
    b, s = spec.batch, spec.activation_bytes
    tokens, h = b * n, arch.hidden_size
    tr.at(op="input_layernorm")
    normed = _norm(tr, tokens, h, s)
    weights = None
    if arch.layer_types[layer] == "full":
        mixed, weights = _attention(tr, arch, layout, spec, n, step, cache, layer)
    else:
        mixed = _linear_attention(tr, arch, b, n, s, cache, layer)
    tr.drop(normed)
    residual = tr.new(tokens * h * s, "residual add")
    tr.drop(mixed)
    tr.at(op="post_attention_layernorm")
    normed = _norm(tr, tokens, h, s)
    moe = arch.moe
    if moe is not None and layer in moe.sparse_layers and layout.experts is not None:
        tr.at(op="experts (grouped_mm)" if n > 1 else "experts (batched_mm)")
        down = moe_block(tr, arch, layout, tokens, s, grouped=n > 1, upcast_softmax=spec.softmax_upcasts)
    else:
        down = gated_mlp(tr, tokens, arch.intermediate_size, h, s)
    tr.drop(normed)
    output = tr.new(tokens * h * s, "residual add")
    tr.drop(down, residual, weights)
    return output


def _model(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, n: int, step: int,
           cache: dict) -> int | None:
    """Qwen3NextModel.forward over n tokens and the lm_head on the last; returns the logits."""
    b, s = spec.batch, spec.activation_bytes
    tokens = b * n
    where = "prefill" if step == 0 else f"decode step {step}"
    tr.at(where, "embed_tokens")
    embeddings = tr.new(tokens * arch.hidden_size * s, "embed_tokens")
    held = []
    kv_length = n if step == 0 else spec.prompt_len + step
    if spec.attn == "sdpa":
        traced_mask_check(tr, b, kv_length)
    else:  # eager: the causal mask's pieces, the batch's boolean mask, its additive copy
        pieces = causal_mask_pieces(tr, n) if n > 1 else None
        boolean = tr.new(b * n * kv_length, "causal mask (bool)")
        tr.drop(pieces)
        held.append(tr.new(b * n * kv_length * s, "causal mask"))
        tr.drop(boolean)
    # create_recurrent_attention_mask: the padding mask's all() (None when nothing is padded)
    tr.drop(tr.new(b * kv_length, "recurrent mask"), *(tr.new(size, "recurrent mask all()") for size in (1, 53, 4)))
    held += traced_rotary_tables(tr, b, n, arch.rotary_dim or arch.head_dim, s)
    layer_input = embeddings
    for layer in range(arch.num_layers):
        tr.at(f"{where} layer {layer}")
        output = _layer(tr, arch, layout, spec, layer, n, step, cache, layer_input)
        if layer_input is not embeddings:
            tr.drop(layer_input)
        layer_input = output
    tr.at(where, "final norm")
    final = _norm(tr, tokens, arch.hidden_size, s)
    tr.drop(layer_input, embeddings, *held)
    tr.at(op="lm_head (logits)")
    vocab = arch.vocab_size if arch.computes_logits else 0
    logits = tr.new(b * vocab * s, "lm_head")
    tr.drop(final)
    return logits


def replay(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec) -> None:
    """generate(): position ids, the prompt's forward (filling the cache), then
    decode_replay.generate_steps with position ids, the model inputs holding the previous mask
    (the H200 trace's order)."""
    b, n = spec.batch, spec.prompt_len
    vocab = arch.vocab_size if arch.computes_logits else 0
    tr.at("prefill", "position ids")
    traced_position_ids(tr, b, n, prepared=False)
    cache: dict = {}
    unfinished = tr.new(b * INT64, "unfinished_sequences")
    prompt_inputs = tr.new(b * n * INT64, "input_ids (prepare_inputs_for_generation)")
    logits = _model(tr, arch, layout, spec, n, 0, cache)
    tr.drop(prompt_inputs)
    generate_steps(tr, b, n, vocab, spec.new_tokens, arch.num_layers, logits, unfinished,
                   lambda step: _model(tr, arch, layout, spec, 1, step, cache),
                   position_ids=True, inputs_hold_mask=True)
    tr.drop(*cache.values())
