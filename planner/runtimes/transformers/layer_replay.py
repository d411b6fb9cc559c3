"""Decoder layers as request sequences, in the order transformers 5.17 allocates and frees.

sequence.py runs the model-level flow (load, embeddings, masks, the layer loop, logits, decode
steps); the pieces shared by the layers it replays request by request live here (norms, masks,
rotary, position ids) with the llama-shaped layer (`traced_layer`, read from a dispatch-level
trace of generate() on CPU: every tensor's allocation and the moment its last reference goes);
the MLP and mixture-of-experts side is mlp_layers.py.

Each function takes the replay's tracer (`new(nbytes, name)`, `drop(*handles)`, `temp(nbytes)`,
`at(where, op)`) and returns the handles the caller keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ...catalog import FamilyLayout
from ...model.spec import Architecture
from . import attention, eager, kv_cache, sdpa_math
from .activations import RunSpec
from .mlp_layers import gated_mlp, moe_block, projection

Tracer = Any  # tracer.Tracer: new(), drop(), temp(), at(), matmul(), at_capacity
MASK_ORDER = ("full", "sliding", "chunked", "none")  # the order in which a model builds its kinds' masks


def rms_scaled(tr: Tracer, hidden_bytes: int, rows: int, s: int,
                keep_mean: bool, keep_upcast: bool = True) -> tuple[int | None, int | None]:
    """The RMSNorm steps every family shares: x.float() (none in fp32), pow(2), mean (the square
    goes), + eps, rsqrt (the sum goes), x * rsqrt (the root and the upcast go). Returns the scaled
    fp32 tensor and the mean, which stays a local until the norm returns unless `keep_mean` is
    False (Gemma's _norm drops it once + eps exists). Without `keep_upcast` the upcast is a
    temporary of pow(2) alone (T5LayerNorm scales the input as it came) and goes once the square
    exists."""
    wide = hidden_bytes * 4 // s
    upcast = tr.new(wide, "RMSNorm upcast") if s < 4 else None
    squared = tr.new(wide, "RMSNorm pow(2)")
    if not keep_upcast:
        tr.drop(upcast)
        upcast = None
    mean = tr.new(rows * 4)
    tr.drop(squared)
    shifted = tr.new(rows * 4)
    if not keep_mean:
        tr.drop(mean)
        mean = None
    root = tr.new(rows * 4)
    tr.drop(shifted)
    scaled = tr.new(wide, "RMSNorm x * rsqrt")
    tr.drop(root, upcast)
    return scaled, mean


def traced_norm(tr: Tracer, hidden_bytes: int, rows: int, s: int) -> int:
    """RMSNorm as transformers 5.17 runs it: x.float(), pow(2), mean, + eps, rsqrt, x * rsqrt,
    .to(dtype), weight * x; each temporary goes when the next expression no longer needs it."""
    if s >= 4:
        squared = tr.new(hidden_bytes)
        mean = tr.new(rows * 4)
        tr.drop(squared)
        tr.temp(rows * 4)
        out = tr.new(hidden_bytes)
        tr.drop(mean)
        return out
    scaled, mean = rms_scaled(tr, hidden_bytes, rows, s, keep_mean=True)
    cast = tr.new(hidden_bytes, "RMSNorm cast")
    out = tr.new(hidden_bytes, "RMSNorm weight *")
    tr.drop(cast, scaled, mean)
    return out


def gemma_norm(tr: Tracer, hidden_bytes: int, rows: int, s: int) -> int:
    """Gemma's RMSNorm: _norm(x.float()) (pow(2), mean, + eps, rsqrt, x * rsqrt; each goes once
    the next exists), then * (1 + weight.float()) in fp32 (the weight's upcast and the sum are
    weight-sized temporaries) and .type_as(x) (H200 traces of Gemma-2 and Qwen3-Next, whose norm
    is the same code)."""
    scaled, _ = rms_scaled(tr, hidden_bytes, rows, s, keep_mean=False)
    width = hidden_bytes // (rows * s)
    upcast = tr.new(width * 4, "RMSNorm weight.float()") if s < 4 else None
    shifted = tr.new(width * 4, "RMSNorm 1 + weight")
    tr.drop(upcast)
    weighted = tr.new(hidden_bytes * 4 // s, "RMSNorm * (1 + weight)")
    tr.drop(shifted, scaled)
    if s >= 4:
        return weighted
    out = tr.new(hidden_bytes, "RMSNorm cast")
    tr.drop(weighted)
    return out


def olmo2_norm(tr: Tracer, hidden_bytes: int, rows: int, s: int) -> int:
    """Olmo2RMSNorm: x.to(float32), pow(2).mean, x * rsqrt(variance + eps) (the upcast goes once
    the product exists), then (weight * x) in fp32 and .to(input_dtype); the variance stays a
    local until the norm returns."""
    scaled, mean = rms_scaled(tr, hidden_bytes, rows, s, keep_mean=True)
    weighted = tr.new(hidden_bytes * 4 // s, "RMSNorm weight * x")
    if s >= 4:
        tr.drop(scaled, mean)
        return weighted
    out = tr.new(hidden_bytes, "RMSNorm cast")
    tr.drop(weighted, scaled, mean)
    return out


def sliding_mask_pieces(tr: Tracer, n: int) -> int:
    """sdpa_mask of a sliding-window causal mask (masking_utils, transformers 5.17): before the
    batch's mask, the vmapped mask functions build tokens x tokens booleans, each and_mask
    replacing the one before; the last goes once the batch's mask exists (H200 traces of
    Mistral-7B, StarCoder2-7B and Phi-3-mini). Returns that last one."""
    inner = tr.new(n * n, "sliding mask: inner_mask")
    first = tr.new(n * n, "sliding mask: and_mask")
    tr.drop(inner)
    causal = tr.new(n * n, "sliding mask: causal_mask_function")
    second = tr.new(n * n, "sliding mask: and_mask")
    tr.drop(causal, first)
    third = tr.new(n * n, "sliding mask: and_mask")
    tr.drop(second)
    return third


def causal_mask_pieces(tr: Tracer, n: int) -> int:
    """sdpa_mask of a plain causal mask that is materialized (Falcon passes one to SDPA, eager
    attention's mask starts from it): the causal mask function's tokens x tokens booleans,
    and_mask's; the first goes at once, the second once the batch's mask exists (H200 traces of
    Falcon-7B and of the eager runs). Returns the second."""
    causal = tr.new(n * n, "causal mask: causal_mask_function")
    combined = tr.new(n * n, "causal mask: and_mask")
    tr.drop(causal)
    return combined


def layer_norm(layout: FamilyLayout):
    """The family's RMSNorm request order."""
    return {"gemma": gemma_norm, "olmo2": olmo2_norm}.get(layout.norm_order, traced_norm)


def traced_rope(tr: Tracer, nbytes: int, product_bytes: int | None = None) -> int:
    """q * cos + rotate_half(q) * sin: the product, -x2, the cat (then -x2 goes), its product
    (then the cat goes), the sum (then both products go). Against fp32 tables (OLMo-2) the
    products and the sum are `product_bytes` wide while -x2 and the cat keep q's dtype."""
    wide = product_bytes or nbytes
    product = tr.new(wide)
    negated = tr.new(nbytes // 2)
    rotated = tr.new(nbytes)
    tr.drop(negated)
    rotated_product = tr.new(wide)
    tr.drop(rotated)
    out = tr.new(wide)
    tr.drop(product, rotated_product)
    return out


def halves_rotary(tr: Tracer, q_bytes: int, k_bytes: int) -> tuple[int | None, int | None]:
    """A rotary written over two halves of each head, in the model dtype (DeepSeek-V3's
    apply_rotary_pos_emb_interleave over the even and odd elements, gpt-oss's _apply_rotary_emb over
    the chunks): for the query, then the key, x1 * cos and x2 * sin, their difference (both
    products go), x2 * cos and x1 * sin, their sum (both go), the cat of the two (the difference and
    the sum go). The H200 traces of DeepSeek-V3 and gpt-oss-20b."""
    rotated = []
    for nbytes, name in ((q_bytes, "q_rot"), (k_bytes, "k_rot")):
        half = nbytes // 2
        first = [tr.new(half, f"rotary {name} x1 * cos"), tr.new(half, f"rotary {name} x2 * sin")]
        difference = tr.new(half, f"rotary {name} difference")
        tr.drop(*first)
        second = [tr.new(half, f"rotary {name} x2 * cos"), tr.new(half, f"rotary {name} x1 * sin")]
        total = tr.new(half, f"rotary {name} sum")
        tr.drop(*second)
        rotated.append(tr.new(nbytes, f"rotary {name} cat"))
        tr.drop(total, difference)
    return rotated[0], rotated[1]


def traced_position_ids(tr: Tracer, b: int, n: int, prepared: bool = True) -> list[int | None]:
    """generate()'s position ids (_prepare_position_ids_for_generation: cumsum of the mask,
    minus one, masked_fill where the mask is 0), then (`prepared`) prepare_inputs_for_generation's
    copy; both int64. Read from the H200 traces (profiles/measurements/h200-edge-traces.jsonl.gz).
    Returns what stays: the position ids, and the copy."""
    cumsum = tr.new(b * n * 8, "position ids (cumsum)")
    shifted = tr.new(b * n * 8, "position ids (- 1)")
    tr.drop(cumsum)
    padding = tr.new(b * n, "attention_mask == 0")
    kept = [tr.new(b * n * 8, "position ids (masked_fill)")]
    tr.drop(padding, shifted)
    if prepared:
        kept.append(tr.new(b * n * 8, "position ids (prepare_inputs_for_generation)"))
    return kept


def traced_mask_check(tr: Tracer, b: int, n: int) -> None:
    """create_causal_mask under SDPA when no mask is needed: the padding mask as booleans and
    _ignore_causal_mask_sdpa's all() over it (an int64 copy)."""
    padding = tr.new(b * n, "padding mask")
    tr.temp(b * n * 8)
    tr.drop(padding)


def traced_rotary_tables(tr: Tracer, b: int, n: int, rotary_dim: int, s: int,
                         half: bool = False) -> list[int | None]:
    """LlamaRotaryEmbedding.forward: positions as fp32, inv_freq @ positions, cat(freqs, freqs)
    (`half`: none, the tables are the frequencies' own width: gpt-oss), cos() and sin() each
    times attention_scaling, then cast to the model's dtype; the fp32 intermediates go once both
    casts exist. Returns the cos and sin tables the layers share."""
    positions = tr.new(b * n * 4, "rotary positions (fp32)")
    freqs = tr.new(b * n * (rotary_dim // 2) * 4, "rotary inv_freq @ positions")
    tr.matmul(biased=False)
    width = rotary_dim // 2 if half else rotary_dim
    emb = None if half else tr.new(b * n * rotary_dim * 4, "rotary cat(freqs, freqs)")
    tables = []
    for name in ("cos", "sin"):
        raw = tr.new(b * n * width * 4, f"rotary {name}()")
        scaled = tr.new(b * n * width * 4, f"rotary {name} * attention_scaling")
        tr.drop(raw)
        tables.append(scaled)
    if s == 4:  # .to(float32) is the tensor itself
        tr.drop(positions, freqs, emb)
        return tables
    casts = [tr.new(b * n * width * s, f"rotary {name} .to(dtype)") for name in ("cos", "sin")]
    tr.drop(positions, freqs, emb, *tables)
    return casts


class DecodingLayer(NamedTuple):
    """A decode step through a layer: one query token per sequence attending to `kv_length` keys,
    and its cache update in place of the prefill's (takes the rotated keys and the values, and
    lets them go once they are copied into the cache)."""
    kv_length: int
    update_cache: Callable[[int | None, int | None], None]


def shared_rotary_tables(tr: Tracer, arch: Architecture, layout: FamilyLayout, b: int, n: int,
                         s: int) -> list[int | None]:
    """The cos and sin tables a forward over `n` tokens builds once for all its layers (a pair per
    kind of layer where each kind has its own rotary embedding: Gemma-3); fp32 tables where the
    family keeps them so (OLMo-2)."""
    tables: list[int | None] = []
    for _ in set(arch.layer_types) if layout.rotary_per_layer_type else [None]:
        tables += traced_rotary_tables(tr, b, n, arch.rotary_dim, 4 if layout.rope_fp32 else s, layout.rope_half)
    return tables


def decode_step_masks(tr: Tracer, arch: Architecture, spec: RunSpec, kv_length: int) -> list[int | None]:
    """The masks a traced model's decode step builds over its `kv_length` keys before the layers;
    returns those the layers read (held until the step's final norm). SDPA without a mask: the
    padding mask and _ignore_causal_mask_sdpa's all() (the H200 trace of Qwen2.5-0.5B's long
    generation); eager: the padding mask, sdpa_mask's int64 pieces and its boolean, the and_mask
    and eager_mask's additive copy, per kind of layer (the H200 trace of Llama-3.2-1B eager);
    SDPA with a sliding window past its keys: the boolean mask of the one query row."""
    b, s = spec.batch, spec.activation_bytes
    kinds = sorted(set(arch.layer_types) - {"none"}, key=MASK_ORDER.index)
    masked = [k for k in kinds if attention.needs_mask(arch, k, kv_length)]
    if spec.attn == "sdpa" and not masked:
        traced_mask_check(tr, b, kv_length)
        return []
    held: list[int | None] = []
    for _ in kinds if spec.attn == "eager" else masked:
        padding = tr.new(b * kv_length, "padding mask")
        if spec.attn == "eager":
            pieces = [tr.new(b * kv_length * 8, "sdpa_mask pieces") for _ in range(2)]
            inner = tr.new(b * kv_length, "sdpa_mask (bool)")
            tr.drop(*pieces)
            combined = tr.new(b * kv_length, "and_mask")
            tr.drop(inner)
            held.append(tr.new(b * kv_length * s, "causal mask (eager_mask)"))
            tr.drop(combined, padding)
        else:
            held.append(tr.new(b * kv_length, "sliding mask (bool)"))
            tr.drop(padding)
    return held


def traced_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
                  kernel: str, masked: bool, qk_norm: bool, generate: bool,
                  layer_input: int | None,
                  decoding: DecodingLayer | None = None) -> tuple[int | None, list[int | None]]:
    """One decoder layer of the llama-shaped families in the order transformers 5.17 allocates
    and frees (LlamaDecoderLayer / Qwen3DecoderLayer, sdpa_attention_forward,
    eager_attention_forward, DynamicLayer.update); returns the layer output and the cache. With
    `decoding`, a decode step's pass: the same requests over one token (the H200 trace of
    Qwen2.5-0.5B's 384-token generation at batch 14,095 shows every decode layer so)."""
    b, s = spec.batch, spec.activation_bytes
    n = 1 if decoding else spec.prompt_len
    kv_length = decoding.kv_length if decoding else n
    heads, kv_heads, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    tokens = b * n
    h = arch.hidden_size
    hidden = tokens * h * s
    q_bytes, kv_bytes = tokens * heads * d * s, tokens * kv_heads * d * s

    dequantized = spec.quantization == "4bit"

    def linear(out_features: int, in_features: int, name: str) -> int | None:
        out = projection(tr, tokens, out_features, in_features, s, name, dequantized)
        if tr.pending_workspaces and any(t.name.endswith(f"{name}.bias") for t in arch.tensors):
            tr.matmul()  # the first Linear with a bias: cuBLASLt's workspace, after its output (Qwen2's q_proj)
        return out

    norm = layer_norm(layout)
    normed = norm(tr, hidden, tokens, s)
    def head_normed(projected: int | None, nbytes: int, rows: int, name: str) -> int:
        """q_norm / k_norm over each head: the projection goes once normed."""
        tr.at(op=f"self_attn.{name}")
        out = norm(tr, nbytes, rows, s)
        tr.drop(projected)
        return out

    if qk_norm and layout.qk_norm_after_projections:  # Gemma-3: q, k, v, then q_norm(q), k_norm(k)
        q, k, v = (linear(heads * d, h, "self_attn.q_proj"), linear(kv_heads * d, h, "self_attn.k_proj"),
                   linear(kv_heads * d, h, "self_attn.v_proj"))
        q = head_normed(q, q_bytes, tokens * heads, "q_norm")
        k = head_normed(k, kv_bytes, tokens * kv_heads, "k_norm")
    elif qk_norm:  # Qwen3: q_norm(q_proj(x).view(...)), then k's, then v_proj
        q = head_normed(linear(heads * d, h, "self_attn.q_proj"), q_bytes, tokens * heads, "q_norm")
        k = head_normed(linear(kv_heads * d, h, "self_attn.k_proj"), kv_bytes, tokens * kv_heads, "k_norm")
        v = linear(kv_heads * d, h, "self_attn.v_proj")
    else:
        q, k, v = (linear(heads * d, h, "self_attn.q_proj"), linear(kv_heads * d, h, "self_attn.k_proj"),
                   linear(kv_heads * d, h, "self_attn.v_proj"))
    tr.at(op="rotary embedding (query)")
    q_rot = traced_rope(tr, q_bytes)
    tr.at(op="rotary embedding (key)")
    k_rot = traced_rope(tr, kv_bytes)
    tr.drop(q, k)
    cache: list[int | None] = []
    if decoding is not None:
        decoding.update_cache(k_rot, v)
        k_rot = v = None
    elif generate:
        cache = prefill_cache(tr, arch, spec, k_rot, v)
        k_rot = v = None
    tr.at(op=f"attention ({kernel})")
    repeats: list[int | None] = []
    weights = None
    if kernel == "eager":  # the rotated query keeps the projection's layout: not contiguous, unless
        # it is one token (its heads fold into bmm's batch as a view)
        out, weights = eager.eager_attention(tr, spec, heads, kv_heads, n, kv_length, d,
                                             query_contiguous=decoding is not None)
    else:
        repeats = [tr.new(b * heads * kv_length * d * s, "repeat_kv") for _ in range(2)] \
            if attention.repeats_kv(arch, layout, kernel, masked) else []
        if kernel == "math":  # a decode step's kernel only: the prefill's is not replayed so
            out = sdpa_math.math_sdpa(tr, b, heads, kv_heads, n, kv_length, d, s, masked)
        else:
            # SDPA makes a boolean mask additive in the query's dtype; flash and efficient write
            # their output in (batch, tokens, heads, dim) order, so transformers' transpose back is
            # free. On the H200 (torch 2.11, no grad) neither allocates its log-sum-exp: the traces
            # show only the output (and 256 bytes) besides the mask
            additive = tr.new(b * n * kv_length * s, "SDPA additive mask") if masked else None
            out = tr.new(q_bytes, "SDPA output")
            tr.drop(additive)
    tr.drop(*repeats, k_rot, v)
    projected = linear(h, heads * d, "self_attn.o_proj")
    tr.drop(out, q_rot, normed)
    if layout.sandwich_norms:  # post_attention_layernorm on the attention output
        tr.at(op="post_attention_layernorm")
        normed_out = norm(tr, hidden, tokens, s)
        tr.drop(projected)
        projected = normed_out
    residual = tr.new(hidden, "residual add")
    tr.drop(projected)
    tr.at(op="pre_feedforward_layernorm" if layout.sandwich_norms else "post_attention_layernorm")
    normed_mlp = norm(tr, hidden, tokens, s)
    tr.at(op="mlp")
    if arch.moe is not None and layer in arch.moe.sparse_layers and layout.experts is not None:
        grouped = decoding is None  # a decode step's few tokens take batched_mm
        tr.at(op=f"experts ({'grouped_mm' if grouped else 'batched_mm'})")
        down = moe_block(tr, arch, layout, tokens, s, grouped=grouped, upcast_softmax=spec.softmax_upcasts)
    else:
        down = gated_mlp(tr, tokens, arch.intermediate_size, h, s, dequantized)
    tr.drop(normed_mlp)
    if layout.sandwich_norms:  # post_feedforward_layernorm on the MLP output
        tr.at(op="post_feedforward_layernorm")
        normed_down = norm(tr, hidden, tokens, s)
        tr.drop(down)
        down = normed_down
    output = tr.new(hidden, "residual add")
    tr.drop(down, residual, weights)
    return output, cache


def decode_attention(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, kind: str,
                     kv_length: int) -> None:
    """One decode step's attention temporaries in a traced layer (one query token per sequence):
    K and V copied to every query head when the kernel cannot take grouped heads (eager, or SDPA
    with a mask), and eager's score chain (H200 traces: the repeats dominate, 256 MiB each for
    Llama-3.2-1B at batch 16 and 4096 tokens, 2.4 GiB for Mistral's sliding window at batch 78)."""
    b, s = spec.batch, spec.activation_bytes
    heads, d = arch.num_heads, arch.head_dim
    masked = spec.attn == "sdpa" and attention.needs_mask(arch, kind, kv_length)
    kernel = "eager" if spec.attn == "eager" else attention.sdpa_kernel(arch, layout, s, masked)
    if kernel == "eager":  # one query token: its heads fold into bmm's batch as a view
        tr.drop(*eager.eager_attention(tr, spec, heads, arch.num_kv_heads, 1, kv_length, d, query_contiguous=True))
        return
    repeats = [tr.new(b * heads * kv_length * d * s, "repeat_kv") for _ in range(2)] \
        if attention.repeats_kv(arch, layout, kernel, masked) else []
    if kernel == "math":
        tr.drop(sdpa_math.math_sdpa(tr, b, heads, arch.num_kv_heads, 1, kv_length, d, s, masked))
    tr.drop(*repeats)


def prefill_cache(tr: Tracer, arch: Architecture, spec: RunSpec, key: int | None,
                  value: int | None) -> list[int | None]:
    """DynamicLayer.update onto the empty cache in the prefill: torch.cat copies the keys, then the
    values; the layer's own key and value go once both exist. Returns the layer's cache."""
    cache = [tr.new(kv_cache.layer_bytes(arch, spec.batch, spec.prompt_len, spec.kv, part=part),
                    f"KV cache {part}s (torch.cat)") for part in ("key", "value")]
    tr.drop(key, value)
    return cache
