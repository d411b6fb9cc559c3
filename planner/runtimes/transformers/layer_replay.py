"""Decoder layers as request sequences, in the order transformers 5.17 allocates and frees.

sequence.py runs the model-level flow (load, embeddings, masks, the layer loop, logits, decode
steps); the layers it replays request by request live here: the llama-shaped layer
(`traced_layer`, read from a dispatch-level trace of generate() on CPU: every tensor's
allocation and the moment its last reference goes) and the mixture-of-experts block
(`moe_block`, from transformers' experts code; experts.py describes the kernels).

Each function takes the replay's tracer (`new(nbytes, name)`, `drop(*handles)`, `temp(nbytes)`,
`at(where, op)`) and returns the handles the caller keeps.
"""

from __future__ import annotations

from typing import Any

from ...catalog import FamilyLayout
from ...model.spec import Architecture
from . import attention, eager, kv_cache, sdpa_math
from .activations import RunSpec
from .routers import router

Tracer = Any  # sequence._Tracer: new(), drop(), temp(), at(), matmul()


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


def traced_position_ids(tr: Tracer, b: int, n: int) -> None:
    """generate()'s position ids (_prepare_position_ids_for_generation: cumsum of the mask,
    minus one, masked_fill where the mask is 0), then prepare_inputs_for_generation's copy;
    both int64. Read from the H200 traces (profiles/measurements/h200-edge-traces.jsonl.gz)."""
    cumsum = tr.new(b * n * 8, "position ids (cumsum)")
    shifted = tr.new(b * n * 8, "position ids (- 1)")
    tr.drop(cumsum)
    padding = tr.new(b * n, "attention_mask == 0")
    tr.new(b * n * 8, "position ids (masked_fill)")
    tr.drop(padding, shifted)
    tr.new(b * n * 8, "position ids (prepare_inputs_for_generation)")


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
    tr.matmul()
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


def traced_layer(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, layer: int,
                  kernel: str, masked: bool, qk_norm: bool, generate: bool,
                  layer_input: int | None) -> tuple[int | None, list[int | None]]:
    """One decoder layer of the llama-shaped families in the order transformers 5.17 allocates
    and frees (LlamaDecoderLayer / Qwen3DecoderLayer, sdpa_attention_forward,
    eager_attention_forward, DynamicLayer.update); returns the layer output and the cache."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    heads, kv_heads, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    tokens = b * n
    h = arch.hidden_size
    hidden = tokens * h * s
    q_bytes, kv_bytes = tokens * heads * d * s, tokens * kv_heads * d * s

    dequantized = spec.quantization == "4bit"

    def linear(out_features: int, in_features: int, name: str) -> int | None:
        return projection(tr, tokens, out_features, in_features, s, name, dequantized)

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
    if generate:
        cache = prefill_cache(tr, arch, spec, k_rot, v)
        k_rot = v = None
    tr.at(op=f"attention ({kernel})")
    repeats: list[int | None] = []
    weights = None
    if kernel == "eager":  # the rotated query keeps the projection's layout: not contiguous
        out, weights = eager.eager_attention(tr, spec, heads, kv_heads, n, n, d, query_contiguous=False)
    else:
        repeats = [tr.new(b * heads * n * d * s, "repeat_kv") for _ in range(2)] \
            if attention.repeats_kv(arch, layout, kernel, masked) else []
        # SDPA makes a boolean mask additive in the query's dtype; flash and efficient write
        # their output in (batch, tokens, heads, dim) order, so transformers' transpose back is free.
        # On the H200 (torch 2.11, no grad) neither allocates its log-sum-exp: the traces show
        # only the output (and 256 bytes) besides the mask
        additive = tr.new(b * n * n * s, "SDPA additive mask") if masked else None
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
        tr.at(op="experts (grouped_mm)")
        down = moe_block(tr, arch, layout, tokens, s, grouped=True, upcast_softmax=spec.softmax_upcasts)
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


def projection(tr: Tracer, rows: int, out_features: int, in_features: int, s: int, name: str,
               dequantized: bool = False) -> int | None:
    """A linear layer's output; under bitsandbytes 4-bit (`dequantized`) the weight is first
    dequantized to the compute dtype (bitsandbytes 0.50 _dequant_linear_fallback) and goes once
    the output exists, in the prefill as in every decode step."""
    weight = tr.new(out_features * in_features * s, f"{name} (dequantized weight)") if dequantized else None
    out = tr.new(rows * out_features * s, name)
    tr.drop(weight)
    return out


def gated_mlp(tr: Tracer, tokens: int, width: int, hidden: int, s: int, dequantized: bool = False) -> int | None:
    """down(act(gate(x)) * up(x)), each input going once the next op has read it: returns the output."""
    gate = projection(tr, tokens, width, hidden, s, "mlp.gate_proj", dequantized)
    act = tr.new(tokens * width * s, "mlp.act_fn")
    tr.drop(gate)
    up = projection(tr, tokens, width, hidden, s, "mlp.up_proj", dequantized)
    product = tr.new(tokens * width * s, "mlp act * up")
    tr.drop(act, up)
    out = projection(tr, tokens, hidden, width, s, "mlp.down_proj", dequantized)
    tr.drop(product)
    return out


def _apply_gate(tr: Tracer, nbytes: int, copies: int, clamped_glu: bool) -> int | None:
    """The experts' activation over the routed rows' gate and up halves; returns its output.
    gpt-oss (H200 trace of gpt-oss-20b): gate.clamp and up.clamp, gate * alpha and its sigmoid
    (the product goes), glu = gate * sigmoid (the sigmoid goes), up + 1 and (up + 1) * glu (the sum
    goes), then the clamps and glu as the function returns. The others: act(gate) and the
    product, beside the copies their layout names."""
    if clamped_glu:
        gate, up = tr.new(nbytes, "gate.clamp"), tr.new(nbytes, "up.clamp")
        scaled = tr.new(nbytes, "gate * alpha")
        sigmoid = tr.new(nbytes, "sigmoid(gate * alpha)")
        tr.drop(scaled)
        glu = tr.new(nbytes, "gate * sigmoid")
        tr.drop(sigmoid)
        shifted = tr.new(nbytes, "up + 1")
        out = tr.new(nbytes, "(up + 1) * glu")
        tr.drop(shifted, gate, up, glu)
        return out
    temps = [tr.new(nbytes) for _ in range(max(copies - 1, 0))]
    out = tr.new(nbytes)
    tr.drop(*temps)
    return out


INT32_MAX = 2**31 - 1
ONESWEEP_TILE_ITEMS = 4608  # cub's onesweep tile for 64-bit keys on the H200 (fitted below)
CUB_ALIGN = 256


def radix_sort_scratch(pairs: int) -> int:
    """cub::DeviceRadixSort::SortPairs' temporary storage for int64 keys and values, all 64 bits
    sorted (torch.sort of the routed expert ids): the onesweep layout of DispatchRadixSort, each
    piece aligned to 256 bytes plus 255 for the base: the bins (8 passes x 256 digits, int64), the
    look-back counters (256 uint32 per tile of ONESWEEP_TILE_ITEMS), the alternate keys and values,
    the pass counters. Holds to the byte on the H200 traces of Qwen3-MoE (5.9M and 6.0M pairs),
    Qwen1.5-MoE (4.75M, 4.8M) and Qwen3-Next (4.3M), which fix the tile size."""
    def aligned(nbytes: int) -> int:
        return -(-nbytes // CUB_ALIGN) * CUB_ALIGN

    passes, digits, offset = 8, 256, 8
    tiles = -(-pairs // ONESWEEP_TILE_ITEMS)
    pieces = (passes * digits * offset, tiles * digits * 4, pairs * 8, pairs * 8, passes * offset)
    return sum(aligned(piece) for piece in pieces) + CUB_ALIGN - 1


def moe_block(tr: Tracer, arch: Architecture, layout: FamilyLayout, tokens: int, s: int,
               grouped: bool, upcast_softmax: bool) -> int:
    """One sparse MLP in the order transformers runs it (experts.py describes the kernels);
    returns its output (tokens x hidden)."""
    moe, experts = arch.moe, layout.experts
    assert moe is not None and experts is not None
    h, i, k = arch.hidden_size, moe.expert_intermediate, moe.top_k
    shared_first = None
    if moe.shared_first and moe.shared_intermediate:
        shared_first = gated_mlp(tr, tokens, moe.shared_intermediate, h, s)
    kept = router(tr, arch, tokens, s, upcast_softmax)
    if moe.all_experts:
        e = moe.num_experts
        routed_in = tr.new(e * tokens * h * s)
        scaled = tr.new(e * tokens * h * s)
        tr.drop(routed_in)
        gate_up = tr.new(e * tokens * 2 * i * s)
        act = tr.new(e * tokens * i * s)
        product = tr.new(e * tokens * i * s)
        tr.drop(act)
        routed_out = tr.new(e * tokens * h * s)
        tr.drop(product, gate_up, scaled)
    else:
        routed = tokens * k
        r = 4 if moe.routing_fp32 else s
        bias = moe.expert_bias
        if grouped:
            order = [tr.new(routed * 8), tr.new(routed * 8)]  # sorted ids, permutation
            # torch.sort's pairs: the input indices, then cub's scratch (its alternate key and value
            # buffers and the onesweep radix sort's counters)
            tr.drop(tr.new(routed * 8), tr.new(radix_sort_scratch(routed)))
            token_index = tr.new(routed * 8)  # perm // top_k, gone once the rows are gathered
            rows = tr.new(routed * h * s)
            tr.drop(token_index)
            # sorted weights, histc's int32 copy of the ids (a local to the end), sentinel mask
            order += [tr.new(routed * r), tr.new(routed * 4), tr.new(routed)]
            up_bias = tr.new(routed * 2 * i * s) if bias else None
            up = tr.new(routed * 2 * i * s)
            masked = tr.new(routed * 2 * i * s)
            tr.drop(up)
        else:  # batched_mm: each routed token gets a copy of its expert's weights
            rows = tr.new(routed * h * s)  # repeat_interleave, then the clamped ids (out of place)
            order = [tr.new(routed * 8)]
            gathered_up = tr.new(routed * 2 * i * h * s)
            up_bias = tr.new(routed * 2 * i * s) if bias else None
            masked = tr.new(routed * 2 * i * s)
        gated = _apply_gate(tr, routed * i * s, experts.gate_copies, experts.clamped_glu)
        tr.drop(masked)
        if not grouped:
            gathered_down = tr.new(routed * h * i * s)
            tr.drop(gathered_up)
        down_bias = tr.new(routed * h * s) if bias else None
        tr.drop(up_bias)
        down = tr.new(routed * h * s)
        tr.drop(gated)
        if not grouped:  # the gathered weights stay a local to the end (H200 trace of Qwen3-Next)
            order.append(gathered_down)
        if grouped:
            masked_down = tr.new(routed * h * s)
            tr.drop(down)
            down = masked_down
        weighted = tr.new(routed * h * r)
        if grouped:
            order.append(tr.new(routed * 8))  # inverse permutation
            tr.temp(routed * 8)
            reordered = tr.new(routed * h * r)
            tr.drop(weighted)
            weighted = reordered
        routed_out = tr.new(tokens * h * r)
        if r < 4 and routed * h * r > INT32_MAX:
            # a half-precision sum over the top-k whose input passes 32-bit byte offsets: the reduction
            # is split and accumulates in an fp32 buffer (the prefills of the H200 traces; not their
            # decode steps)
            tr.temp(tokens * h * 4)
        if r != s:  # the fp32 sum's cast back is the function's return value: before its locals go
            summed = routed_out
            routed_out = tr.new(tokens * h * s)
            tr.drop(summed)
        tr.drop(weighted, down, rows, down_bias, *order)
    out = routed_out
    if moe.shared_intermediate and not moe.shared_first:
        shared = gated_mlp(tr, tokens, moe.shared_intermediate, h, s)
        out = tr.new(tokens * h * s)  # routed + shared
        tr.drop(shared, routed_out)
    if shared_first is not None:
        scaled_shared = tr.new(tokens * h * s)  # sigmoid(shared_expert_gate(x)) * shared
        tr.drop(shared_first)
        out = tr.new(tokens * h * s)
        tr.drop(scaled_shared, routed_out)
    tr.drop(*kept)
    return out
