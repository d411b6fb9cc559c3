"""The order in which a run allocates and frees, replayed through the caching allocator.

The point model (activations.py) says what is alive at the peak; what the allocator keeps
*reserved* also depends on the order of requests, because each layer's new KV-cache blocks
are carved out of the blocks the previous layer's temporaries freed, and the next temporary
of that size then needs a fresh segment. This module emits a run's requests in the order
transformers makes them (load, prefill layer by layer, logits, decode steps), following the
family's layout and attention kernel, into `allocator.CachingAllocator`, and reports the
reserved peak. The sequence is a model of the code, not a trace: it reproduces the measured
reserve of llama-shaped eager runs to within a few MiB, and is coarser for other families.
Mixture-of-experts layers replay their router and experts op by op (grouped_mm in the prefill,
batched_mm's weight gathers in every decode step), which is where most of their reserve comes
from.
"""

from __future__ import annotations

from typing import Literal

from ...base import Frozen
from ...catalog import FamilyLayout
from ...model.spec import Architecture
from ..allocator import EXPANDABLE_RANGE, Capacity, OutOfMemory
from . import (
    attention,
    coded_layers,
    kv_cache,
    layer_replay,
    mamba1_layers,
    mamba2_layers,
    mla_layers,
    mlp_layers,
    own_attention_layers,
    qwen3_next_layers,
    sdpa_math,
    t5_layers,
)
from .activations import RunSpec
from .decode_replay import MIN_REPLAYED_DECODE_STEPS, decode, last_token_logits
from .tracer import Tracer

# Families whose decoder layer is replayed request by request in transformers 5.17's order
# (layer_replay.traced_layer), read from a dispatch-level trace of generate() on CPU (every tensor's
# allocation and the moment its last reference goes). The others keep the coarser order below.
TRACED_LAYER_ORDER = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                                "gemma", "gemma2", "gemma3_text"})


# Models replayed whole from their code (replays(arch, spec): for which runs; replay(tr, arch, layout, spec))
WHOLE_MODEL_REPLAYS = (t5_layers, mamba1_layers, mamba2_layers, qwen3_next_layers)


class SimulatedRun(Frozen):
    peak_allocated: int
    peak_reserved: int
    reserved_before_run: int
    # at a capacity: whether every request was served, and if not, which one failed
    completed: bool = True
    failed_at: str | None = None  # "prefill layer 12, mlp.up_proj (9.19 GiB)"
    failed_request_bytes: int | None = None  # what torch's message says it tried to allocate
    reserved_unusable_bytes: int | None = None  # reserved but unallocated when it failed
    shortfall_bytes: int | None = None  # the failed segment less what the driver still had free
    alloc_retries: int = 0  # times the allocator released its cache and retried
    least_spare_bytes: int | None = None  # at a capacity: the least room ever left beyond the reserve
    # how the decoder layers were replayed: in an order held to a GPU trace, read op by op from the
    # family's modeling code, the coarse generic order, or not request by request at all
    layer_order: Literal["traced", "code", "coarse", "none"] = "coarse"

    @property
    def run_reserve(self) -> int:
        """What the allocator holds beyond the allocated peak."""
        return max(0, self.peak_reserved - self.peak_allocated)


def _load(tr: Tracer, arch: Architecture, weight_allocations: list[int]) -> None:
    for nbytes in weight_allocations:
        tr.new(nbytes)


def _norm(tr: Tracer, hidden_bytes: int, s: int, rms: bool) -> int:
    """RMSNorm upcasts to fp32 (x.float(), x.pow(2), x * rsqrt(...)), then casts back;
    LayerNorm is one fused kernel."""
    if not rms:
        return tr.new(hidden_bytes)
    wide = hidden_bytes * 4 // s
    upcast = tr.new(wide) if s < 4 else None
    tr.temp(wide)  # pow(2)
    scaled = tr.new(wide)
    tr.drop(upcast)
    cast = tr.new(hidden_bytes) if s < 4 else None
    if cast is not None:
        tr.drop(scaled)
        out = tr.new(hidden_bytes)
        tr.drop(cast)
    else:
        out = tr.new(hidden_bytes)
        tr.drop(scaled)
    return out


def _rope(tr: Tracer, nbytes: int, rotary_fraction: float) -> int:
    """q * cos + rotate_half(q) * sin: a product, a half negated, the cat (then the negated half
    goes: the traced order, falcon's trace too), a product, a sum."""
    rotated = int(nbytes * rotary_fraction)
    a = tr.new(rotated)
    negated = tr.new(rotated // 2)
    half = tr.new(rotated)
    tr.drop(negated)
    b = tr.new(rotated)
    tr.drop(half)
    out = tr.new(nbytes)
    tr.drop(a, b)
    return out


def simulate(arch: Architecture, layout: FamilyLayout, spec: RunSpec, weight_allocations: list[int],
             workspaces: list[int], capacity: Capacity | None = None, expandable: bool = False) -> SimulatedRun:
    """Replay the run; with a `capacity`, the allocator releases its cache and retries as torch
    does, and a request it still cannot serve ends the replay (completed False, and where)."""
    tr = Tracer(capacity.bytes if capacity else None, expandable,
                 capacity.address_space if capacity else EXPANDABLE_RANGE, workspaces,
                 capacity.per_decode_step if capacity else 0)
    try:
        return _replay(tr, arch, layout, spec, weight_allocations)
    except OutOfMemory as oom:
        return SimulatedRun(peak_allocated=tr.alloc.peak_allocated, peak_reserved=tr.alloc.peak_reserved,
                            reserved_before_run=0, completed=False,
                            failed_at=f"{oom.label} ({oom.requested / 2**30:.2f} GiB)",
                            failed_request_bytes=oom.tried, reserved_unusable_bytes=oom.reserved_unusable,
                            shortfall_bytes=oom.tried - (oom.capacity - oom.reserved),
                            alloc_retries=tr.alloc.num_alloc_retries, layer_order=tr.layer_order)


def _replay(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec,
            weight_allocations: list[int]) -> SimulatedRun:
    _load(tr, arch, weight_allocations)
    tr.at("inputs", "input_ids")
    b, n = spec.batch, spec.prompt_len
    generate = spec.mode == "generate" and spec.keeps_cache
    tr.new(b * n * 8)
    tr.new(b * n * 8)  # input_ids, attention_mask
    reserved_before = tr.alloc.reserved
    whole_model = next((module for module in WHOLE_MODEL_REPLAYS if module.replays(arch, spec)), None)
    if whole_model is not None:  # a model whose generate() is replayed from its own code
        tr.layer_order = "code"
        whole_model.replay(tr, arch, layout, spec)
    elif arch.recurrent is not None or arch.encoder is not None:
        # the other torch-fallback scans (the hybrids' mixers), encoder-decoders: not replayed op by op
        tr.layer_order = "none"
        tr.matmul()
    else:
        # without a cache (use_cache: false) generate() runs the whole sequence again at every step,
        # one token longer each time: the shorter passes come first (the last ones, up to the bound)
        for length in range(max(n - spec.reruns, n - MIN_REPLAYED_DECODE_STEPS), n):
            tr.drop(*_pass(tr, arch, layout, spec.model_copy(update={"prompt_len": length}), generate))
        _pass(tr, arch, layout, spec, generate)
    return SimulatedRun(peak_allocated=tr.alloc.peak_allocated, peak_reserved=tr.alloc.peak_reserved,
                        reserved_before_run=reserved_before, alloc_retries=tr.alloc.num_alloc_retries,
                        least_spare_bytes=tr.alloc.least_spare, layer_order=tr.layer_order)


def _pass(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, generate: bool) -> list[int | None]:
    """One forward over spec.prompt_len tokens (filling the cache and then decoding when
    `generate`); returns what it leaves allocated that generate() lets go before its next pass."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    last_token = spec.mode == "generate"  # generate() asks for the last position's logits only
    hidden = b * n * arch.hidden_size * s
    inter = b * n * arch.intermediate_size * s
    q_bytes = b * n * arch.num_heads * arch.head_dim * s
    kv_bytes = b * n * arch.num_kv_heads * arch.head_dim * s
    # RMSNorm unless the norms carry a bias; MPT's LayerNorms have none (its config's no_bias)
    rms = not any(t.kind == "norm" and t.name.endswith(".bias") for t in arch.tensors) and arch.model_type != "mpt"
    rotary_fraction = arch.rotary_dim / arch.head_dim if arch.rotary_dim else 0.0
    fused_gate_up = any(".gate_up_proj." in t.name for t in arch.tensors)

    masked_last = spec.attn == "sdpa" and attention.needs_mask(arch, arch.layer_types[-1], n)
    kernel = "eager" if spec.attn == "eager" else (
        attention.sdpa_kernel(arch, layout, s, masked_last) if spec.attn == "sdpa" else "flash")
    pre_norm = layout.attention_point.hidden >= 3
    traced = (arch.model_type in TRACED_LAYER_ORDER and rms and pre_norm and rotary_fraction == 1.0
              and not layout.attention_point.fused_qkv and not fused_gate_up
              and (arch.gated_mlp or arch.moe is not None)
              and kernel in ("flash", "efficient", "eager")
              and (spec.quantization == "none"
                   or (spec.quantization == "4bit" and arch.moe is None and not arch.qk_norm)))
    # families replayed from their modeling code (coded_layers.py)
    coded_layer = coded_layers.layer_for(arch, rms, kernel, spec)
    tr.layer_order = "traced" if traced else "code" if coded_layer is not None else "coarse"

    tr.at("prefill", "position ids")
    # generate()'s position ids, kept to its end, and prepare_inputs_for_generation's copy, which
    # goes once the prompt's logits exist
    positions = layer_replay.traced_position_ids(tr, b, n) if generate else []
    held_model = [tr.new(hidden, "embed_tokens")]  # embeddings (inputs_embeds stays referenced)
    if traced and layout.scaled_embeddings:  # hidden_states = inputs_embeds * normalizer
        scaled = tr.new(hidden, "embed_tokens * sqrt(hidden_size)")
        tr.drop(held_model[0])
        held_model = [scaled]
    first_input = None
    learned_positions = coded_layer is not None and arch.positions == "learned"

    def add_positions() -> int:
        """inputs_embeds + position_embeds: both stay referenced until the model's final norm ran."""
        held_model.append(tr.new(hidden, "position embeddings"))
        return tr.new(hidden, "embeddings + positions")

    if learned_positions and not layout.mask_before_positions:
        first_input = add_positions()
    if coded_layer is not None and arch.model_type == "bloom":  # its embedding norm and ALiBi
        first_input, alibi = own_attention_layers.bloom_embeddings(tr, arch, b, n, s)
        held_model.append(alibi)
    extra_copies = 0 if coded_layer is not None else max(0, layout.mlp_point.hidden - 4)
    for _ in range(extra_copies):  # the coarse order's extra model-level copies (gpt2)
        held_model.append(tr.new(hidden))
    sdpa_unmasked = spec.attn == "sdpa" and not any(attention.needs_mask(arch, k, n) for k in arch.layer_types)
    if (traced or coded_layer is not None) and sdpa_unmasked:
        layer_replay.traced_mask_check(tr, b, n)
    if spec.attn == "eager":
        # sdpa_mask's tokens x tokens pieces, the batch's boolean mask (the pieces go), then
        # eager_mask's additive copy in the model dtype (the boolean goes): H200 traces of
        # Llama-3.2-1B, Qwen3-0.6B, SantaCoder, GPT-J and OctoCoder, all eager
        # one mask per attention kind, the causal one first (the models' causal_mask_mapping); a
        # sliding window's mask functions leave more pieces (H200 trace of gpt-oss-20b eager)
        kinds = sorted(set(arch.layer_types), key=layer_replay.MASK_ORDER.index)
        for kind in [*kinds, *(["unused sliding"] if arch.unused_sliding_mask else [])]:
            pieces = layer_replay.sliding_mask_pieces(tr, n) if kind == "sliding" else \
                layer_replay.causal_mask_pieces(tr, n)
            boolean = tr.new(b * n * n, "causal mask (bool)")
            tr.drop(pieces)
            additive = tr.new(b * n * n * s, "causal mask")
            tr.drop(boolean)
            if layout.bool_causal_mask:  # .to(torch.bool): the additive one goes
                held_model.append(tr.new(b * n * n, "causal mask .to(bool)"))
                tr.drop(additive)
            else:
                held_model.append(additive)
    elif spec.attn == "sdpa" and (layout.sdpa_kernel == "math" or layout.materialized_mask or not sdpa_unmasked):
        piece = None
        if not sdpa_unmasked and (traced or coded_layer is not None):
            piece = layer_replay.sliding_mask_pieces(tr, n)
        elif coded_layer is not None:  # Falcon's own causal mask
            piece = layer_replay.causal_mask_pieces(tr, n)
        held_model.append(tr.new(b * n * n, "causal mask"))  # the masks exist before the rotary tables
        tr.drop(piece)
    if arch.unused_sliding_mask and spec.attn == "sdpa":  # built and held, never read
        piece = layer_replay.sliding_mask_pieces(tr, n)
        held_model.append(tr.new(b * n * n, "sliding mask nothing reads"))
        tr.drop(piece)
    if learned_positions and layout.mask_before_positions:
        first_input = add_positions()
    if arch.rotary_dim and layout.complex_rotary and coded_layer is not None:
        held_model.append(mla_layers.complex_rotary_table(tr, b, n, arch.rotary_dim))
    elif arch.rotary_dim and layout.rope_tables and (traced or coded_layer is not None):
        held_model += layer_replay.shared_rotary_tables(tr, arch, layout, b, n, s)
    elif arch.rotary_dim and not traced and coded_layer is None:  # (a coded GPT-J builds its own per layer)
        element = 4 if layout.rope_fp32 else s
        held_model += [tr.new(b * n * arch.rotary_dim * element, "rotary cos/sin") for _ in range(layout.rope_tables)]
        tr.matmul()

    cache: list[int | None] = []
    layer_input = held_model[0] if first_input is None else first_input
    previous_weights = None
    for layer in range(arch.num_layers):
        tr.at(f"prefill layer {layer}", "input_layernorm")
        if coded_layer is not None:
            # a layer may return what its caller holds until the next layer returns (GPT-J's
            # attention weights, in the model loop's `outputs`)
            output, cache_kv, *held = coded_layer(tr, arch, layout, spec, layer, kernel, masked_last, generate)
            cache += cache_kv
            tr.drop(previous_weights)
            previous_weights = held[0] if held else None
            if layer_input is not held_model[0]:
                tr.drop(layer_input)
            layer_input = output
            continue
        if traced:
            masked = masked_last if arch.layer_types[layer] == arch.layer_types[-1] else \
                attention.needs_mask(arch, arch.layer_types[layer], n)
            layer_kernel = kernel if kernel == "eager" else attention.sdpa_kernel(arch, layout, s, masked)
            output, cache_kv = layer_replay.traced_layer(tr, arch, layout, spec, layer, layer_kernel, masked,
                                                         arch.qk_norm, generate, layer_input)
            cache += cache_kv
            if layer_input is not held_model[0]:
                tr.drop(layer_input)
            layer_input = output
            continue
        normed = _norm(tr, hidden, s, rms) if pre_norm else None
        if layout.attention_point.fused_qkv:
            fused = tr.new(b * n * (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim * s, "self_attn.qkv_proj")
            q = k = v = None
        else:
            fused = None
            q = tr.new(q_bytes, "self_attn.q_proj")
            tr.matmul()
            k, v = tr.new(kv_bytes, "self_attn.k_proj"), tr.new(kv_bytes, "self_attn.v_proj")
        tr.matmul()  # a model without rotary tables: its first projection
        if rotary_fraction:
            tr.at(op="rotary embedding (query)")
            q_rot = _rope(tr, q_bytes, rotary_fraction)
            tr.at(op="rotary embedding (key)")
            k_rot = _rope(tr, kv_bytes, rotary_fraction)
            tr.drop(q, k)
        else:
            q_rot, k_rot = q, k
        current = []
        if generate:
            kc = tr.new(kv_cache.layer_bytes(arch, b, n, spec.kv, part="key"), "KV cache keys (torch.cat)")
            tr.drop(k_rot)
            vc = tr.new(kv_cache.layer_bytes(arch, b, n, spec.kv, part="value"), "KV cache values (torch.cat)")
            tr.drop(v)
            cache += [kc, vc]
        else:
            current = [k_rot, v]
        tr.at(op=f"attention ({kernel})")
        repeats = [tr.new(b * arch.num_heads * n * arch.head_dim * s, "repeat_kv") for _ in range(2)] \
            if attention.repeats_kv(arch, layout, kernel, masked_last) else []
        out, weights = _attention(tr, arch, layout, kernel, b, n, s, masked_last, spec.softmax_upcasts)
        tr.drop(*repeats, q_rot, fused, *current)
        merged = tr.new(q_bytes, "attention output (contiguous)")  # transpose(1, 2).contiguous()
        tr.drop(out)
        projected = tr.new(hidden, "self_attn.o_proj")
        tr.drop(merged)
        residual = tr.new(hidden, "residual add")
        tr.drop(projected, normed)
        tr.at(op="post_attention_layernorm")
        normed_mlp = _norm(tr, hidden, s, rms)
        tr.at(op="mlp")
        if arch.moe is not None and layer in arch.moe.sparse_layers and layout.experts is not None:
            tr.at(op="experts (grouped_mm)")
            down = mlp_layers.moe_block(tr, arch, layout, b * n, s, grouped=True,
                                          upcast_softmax=spec.softmax_upcasts)
            tr.drop(normed_mlp)
        else:
            intermediates = _mlp(tr, layout.mlp_point.intermediate, inter, fused_gate_up, arch.gated_mlp)
            down = tr.new(hidden, "mlp.down_proj")
            tr.drop(*intermediates, normed_mlp)
        output = tr.new(hidden, "residual add")
        tr.drop(down, residual, previous_weights)
        if layout.eager_scores.weights_held == "next_layer":
            previous_weights = weights
        else:
            tr.drop(weights)
        if layer_input is not held_model[0]:
            tr.drop(layer_input)
        layer_input = output
    if coded_layer is None:
        tr.drop(previous_weights)
        previous_weights = None  # a coded layer's go with what the model held, after the final norm

    vocab = arch.vocab_size if arch.computes_logits else 0
    tr.at("prefill", "final norm")
    copy = None
    leftovers: list[int | None] = []
    if (traced or coded_layer is not None) and last_token:
        # the traced order: the final norm, then the last layer's output and what the model held
        # (embeddings, rotary tables) go before the lm_head runs on the last token
        final = layer_replay.layer_norm(layout)(tr, hidden, b * n, s) if rms else \
            coded_layers.final_norm(tr, arch, hidden, b * n, s)
        tr.drop(layer_input, *held_model, previous_weights)
        tr.at(op="lm_head (logits)")
        logits = last_token_logits(tr, layout, b * vocab * s)
        tr.drop(final, *positions[1:])
        defer = generate and spec.new_tokens > 1 and traced  # decode's first bookkeeping copies them
        copy = None if defer else tr.new(b * vocab * 4, "next-token logits (fp32 copy)")
        tr.drop(None if defer else logits)
    else:
        final = tr.new(hidden)
        tr.at(op="lm_head (logits)")
        if last_token:
            logits = tr.new(b * vocab * s)
            tr.drop(final, *positions[1:])
            copy = tr.new(b * vocab * 4, "next-token logits (fp32 copy)")
            tr.drop(logits)
        else:
            leftovers = [tr.new(b * n * vocab * s) for _ in range(layout.forward_logit_copies)]
            tr.drop(final)
        tr.drop(layer_input, *held_model, previous_weights)

    if generate and spec.new_tokens > 1:
        decode(tr, arch, layout, spec, cache, copy, traced or coded_layer is not None or kernel == "math",
               traced_layers=traced, prompt_logits=logits if traced else None)
    else:
        tr.drop(copy)
    return leftovers


def _attention(tr: Tracer, arch: Architecture, layout: FamilyLayout, kernel: str, b: int, n: int,
               s: int, masked: bool, softmax_upcast: bool) -> tuple[int | None, int | None]:
    """The kernel's own allocations; returns (output, weights kept by the layer)."""
    heads, d = arch.num_heads, arch.head_dim
    scores = b * heads * n * n
    if kernel in ("flash", "efficient"):
        out = tr.new(b * n * heads * d * s)
        tr.temp(b * heads * (-(-n // 32) * 32) * 4)
        return out, None
    if kernel == "math":
        # transformers passes enable_gqa when there is no mask; Falcon calls SDPA itself
        # (the matmul broadcasts its one key/value head)
        masked = masked or layout.sdpa_kernel == "math"
        return sdpa_math.math_sdpa(tr, b, heads, arch.num_kv_heads, n, n, d, s, masked,
                                      enable_gqa=layout.repeats_kv and not masked), None
    eager = layout.eager_scores
    chain = _score_chain(tr, scores * (4 if eager.dtype_copies == 0 else s))  # q@k^T, scale, mask
    kept = [tr.new(scores * s) for _ in range(max(0, eager.dtype_copies - 1))]
    if eager.dtype_copies == 0 or (eager.upcast_copies and softmax_upcast) or eager.fp32_copies:
        # softmax in fp32 (an upcast copy first, unless the scores already are fp32), then the
        # weights are cast back to the model dtype
        upcast = tr.new(scores * 4) if eager.upcast_copies and softmax_upcast else None
        soft = [tr.new(scores * 4) for _ in range(max(1, eager.fp32_copies - (eager.dtype_copies == 0)))]
        tr.drop(upcast)
        weights = tr.new(scores * s)
        tr.drop(*soft, chain, *kept)
    else:  # softmax in the model dtype: its output is the weights
        weights = tr.new(scores * s)
        tr.drop(chain, *kept)
    out = tr.new(b * n * heads * d * s)
    return out, weights


def _score_chain(tr: Tracer, nbytes: int) -> int:
    """q @ k^T, then one new tensor replacing it. The code reads `* scale` then `+ mask`, but
    a single replacement is what reproduces the measured reserve of the llama-shaped eager
    rows (llama-3.2-1b, mistral-7b at b8 n960 and b1 n2048: within 30 MiB of 0.6-1.5 GiB)."""
    current = tr.new(nbytes, "q @ k^T")
    following = tr.new(nbytes, "scores * scaling + mask")
    tr.drop(current)
    return following


def _mlp(tr: Tracer, copies: int, inter: int, fused_gate_up: bool, gated: bool) -> list[int | None]:
    """Intermediates in the order the family's MLP makes them; returns those still alive
    when the down projection runs (freed after it)."""
    if copies >= 4 and not gated and not fused_gate_up:
        # gelu_new: 0.5 * x * (1 + tanh(c * (x + 0.044715 * x^3))): x stays alive while each
        # step replaces the previous one; the last product needs two operands beside x
        fc = tr.new(inter)
        step = tr.new(inter)
        for _ in range(4):
            following = tr.new(inter)
            tr.drop(step)
            step = following
        half = tr.new(inter)
        product = tr.new(inter)
        tr.drop(half, step, fc)
        return [product]
    if fused_gate_up:  # phi3: one 2*I output, chunked into views; act(gate); act * up
        both = tr.new(2 * inter)
        act = tr.new(inter)
        product = tr.new(inter)
        tr.drop(act)
        return [product, both]
    if copies >= 3:  # gated: gate, act(gate), up, act*up (gelu_new: fc and its temporaries)
        first = tr.new(inter, "mlp.gate_proj")
        act = tr.new(inter, "mlp.act_fn")
        tr.drop(first)
        extra = [tr.new(inter, "mlp.up_proj") for _ in range(copies - 2)]
        product = tr.new(inter, "mlp act * up")
        tr.drop(act, *extra)
        return [product]
    fc = tr.new(inter)
    act = tr.new(inter) if copies == 2 else None
    tr.drop(fc)
    return [act]
