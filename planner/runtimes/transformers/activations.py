"""The candidate peaks of one generate() or forward() call, each as the tensors alive then.

The allocated peak of a forward is reached inside the last decoder layer, where the KV cache
is complete: either in the MLP (gate/up/product intermediates alive together) or in
attention (scores, masks, repeated K/V), whichever is larger. After the layers come the
logits; in generate() each decode step then adds one token to every layer. The family layouts
in profiles/runtimes.yaml say how many hidden-size and intermediate-size tensors each family
keeps alive at these points; they were counted in the measured live sets.
"""

from __future__ import annotations

from typing import Literal

from ...base import Frozen, block_bytes
from ...catalog import FamilyLayout
from ...model.spec import Architecture
from . import attention, experts, kv_cache, recurrent


class Term(Frozen):
    name: str
    bytes: int
    why: str


class Point(Frozen):
    """One moment of the run, with the runtime tensors alive at it."""

    phase: str
    kind: str  # what dominates: mlp, attention:<kernel>, logits, decode, int8, dequantize
    terms: tuple[Term, ...]

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)


class RunSpec(Frozen):
    """The workload in the units the runtime terms need."""

    batch: int
    prompt_len: int
    new_tokens: int
    mode: Literal["generate", "forward"]
    attn: Literal["sdpa", "eager", "flash_attention_2"]  # resolved: never "auto"
    activation_bytes: int
    kv: kv_cache.KvFormat
    quantization: Literal["none", "int8", "4bit"] = "none"
    largest_linear_elements: int = 0
    # False when the config says use_cache: false (mpt-7b-instruct): generate() then re-runs
    # the whole sequence every step, with no KV cache (prompt_len is then the longest step)
    keeps_cache: bool = True
    # the first decode step that runs over a fresh cache (kv_cache.restart_step: Phi-3 past its
    # original positions); the prompt's cache stops growing the step before
    cache_restart_step: int | None = None
    # generate() without a cache: the earlier, shorter passes before the longest (prompt_len)
    reruns: int = 0
    # the compute dtype is fp16: torch's softmax(x, dtype=float32) of a CUDA half tensor is one
    # fused kernel (half_to_float), where bf16 is first upcast into an fp32 copy
    # (aten/src/ATen/native/SoftMax.cpp; the H200 edge search of Llama-3.2-1B fp16 eager)
    fp16: bool = False

    @property
    def softmax_upcasts(self) -> bool:
        """Whether softmax(x, dtype=torch.float32) of this run's activations copies x to fp32 first."""
        return self.activation_bytes < 4 and not self.fp16

    @property
    def cache_growth_steps(self) -> int:
        """Decode steps that grow the prompt's cache."""
        steps = max(self.new_tokens - 1, 0)
        return steps if self.cache_restart_step is None else self.cache_restart_step - 1

    @property
    def restarted_steps(self) -> int:
        """Decode steps that run over a fresh one-token cache."""
        return max(self.new_tokens - 1, 0) - self.cache_growth_steps


def _terms(*items: tuple[str, int, str]) -> tuple[Term, ...]:
    return tuple(Term(name=n, bytes=b, why=w) for n, b, w in items if b > 0)


def _rope_tables(arch: Architecture, layout: FamilyLayout, spec: RunSpec, tokens: int) -> int:
    if arch.rotary_dim == 0:
        return 0
    element = 4 if layout.rope_fp32 else spec.activation_bytes
    return layout.rope_tables * block_bytes(spec.batch * tokens * arch.rotary_dim * element)


def _masks(arch: Architecture, layout: FamilyLayout, spec: RunSpec, kernel_masked: bool) -> int:
    """Masks built once per forward and alive through all layers."""
    b, n = spec.batch, spec.prompt_len
    kinds = set(arch.layer_types) - {"none"}
    if not kinds:
        return 0
    if spec.attn == "eager":
        return len(kinds) * block_bytes(b * n * n * spec.activation_bytes)
    if spec.attn == "sdpa" and (kernel_masked or layout.sdpa_kernel == "math"):
        masked_kinds = [k for k in kinds if attention.needs_mask(arch, k, n)] or ["full"]
        return len(masked_kinds) * block_bytes(b * n * n)
    return 0


def _latent_expansion(arch: Architecture, b: int, n: int, s: int) -> int:
    mla = arch.mla
    if mla is None:
        return 0
    per_head = mla.qk_nope_head_dim + mla.v_head_dim
    return (block_bytes(b * n * arch.num_heads * per_head * s)
            + block_bytes(b * n * arch.num_heads * arch.head_dim * s))


def prefill_points(arch: Architecture, layout: FamilyLayout, spec: RunSpec) -> list[Point]:
    """MLP, attention and logits points of the prefill forward (or of a plain forward)."""
    if arch.encoder is not None:
        return _encoder_points(arch, spec)
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    generate = spec.mode == "generate"
    hidden = block_bytes(b * n * arch.hidden_size * s)
    inter = block_bytes(b * n * arch.intermediate_size * s)
    query = block_bytes(b * n * arch.num_heads * arch.head_dim * s)

    last_kind = arch.layer_types[-1]
    masked = spec.attn == "sdpa" and attention.needs_mask(arch, last_kind, n)
    kernel = "eager" if spec.attn == "eager" else (
        attention.sdpa_kernel(arch, layout, s, masked) if spec.attn == "sdpa" else "flash")
    any_masked = spec.attn == "sdpa" and any(attention.needs_mask(arch, k, n) for k in arch.layer_types)

    def common_at(layer_count: int | None) -> tuple[tuple[str, int, str], ...]:
        """Tensors alive through the forward, with the KV cache of the layers run so far."""
        cache = kv_cache.cache_bytes(arch, b, n, 0, spec.kv, layers=layer_count,
                                     activation_bytes=s) if generate and spec.keeps_cache else 0
        return (
            ("KV cache", cache, f"keys and values of the {layer_count or arch.num_layers} layers run "
                                "so far, at the prompt length"),
            ("rotary tables", _rope_tables(arch, layout, spec, n), "cos and sin for every prompt position"),
            ("attention masks", _masks(arch, layout, spec, any_masked),
             "B x N x N masks built once per forward"),
            ("position ids", 2 * block_bytes(b * n * 8) if generate else 0,
             "generate() keeps two int64 copies of the position ids"),
        )

    common = common_at(None)
    _, held_in_mlp = attention.held_weights(layout, kernel, b, arch.num_heads, n, n, s)
    mlp = layout.mlp_point
    layer_level = [
        ("attention weights", held_in_mlp, "eager attention's softmax weights, still referenced"),
        ("hidden states", mlp.hidden * hidden,
         f"{mlp.hidden} B x N x hidden tensors (embeddings, residuals, norm output)"),
    ]
    phase = "prefill" if generate else "forward"
    points = []
    moe = arch.moe
    dense_layers = [] if arch.mlp_free else [
        i for i in range(arch.num_layers) if moe is None or i not in moe.sparse_layers]
    if dense_layers:
        mlp_terms = [*layer_level, ("MLP intermediates", mlp.intermediate * inter,
                                    f"{mlp.intermediate} B x N x intermediate tensors alive inside the MLP")]
        points.append(Point(phase=f"{phase}, inside the MLP", kind="mlp",
                            terms=_terms(*common_at(dense_layers[-1] + 1), *mlp_terms)))
    if moe is not None and moe.sparse_layers and layout.experts is not None:
        tokens = b * n
        at_layer = common_at(max(moe.sparse_layers) + 1)
        routing = [("router outputs", experts.router_outputs(arch, tokens, s),
                    "router logits and the selected experts' weights and indices"),
                   ("shared expert output", experts.shared_output(arch, tokens, s),
                    "computed before the routed experts and kept")]
        points.append(Point(phase=f"{phase}, inside the experts", kind="experts", terms=_terms(
            *at_layer, *layer_level, *routing, *experts.prefill_terms(arch, layout.experts, tokens, s))))
        shared = experts.shared_phase_terms(arch, tokens, s)
        if shared:
            points.append(Point(phase=f"{phase}, in the shared expert", kind="experts", terms=_terms(
                *at_layer, *layer_level, *routing, *shared)))
    if spec.quantization == "int8" and dense_layers:
        # LLM.int8 peaks inside the MLP's first matmul: the int8 input and its row scales, the
        # int32 product, and the result in fp16 then cast to the compute dtype (measured on
        # llama-3.2-1b and phi-2: one more intermediate-size tensor for a gated MLP's act(gate))
        gated = 1 if arch.gated_mlp else 0
        points.append(Point(phase="prefill, in an int8 matmul", kind="int8", terms=_terms(
            *common,
            ("hidden states", mlp.hidden * hidden, f"{mlp.hidden} B x N x hidden tensors"),
            ("MLP intermediates", (gated + 2) * inter, "act(gate) and the matmul's fp16 and cast outputs"),
            ("int8 matmul buffers", block_bytes(b * n * arch.intermediate_size * 4)
             + block_bytes(b * n * arch.hidden_size) + block_bytes(b * n * 4),
             "int32 product, int8 input and its row scales"),
        )))
    if spec.quantization == "4bit":
        points.append(Point(phase="prefill, dequantizing the largest Linear", kind="dequantize",
                            terms=_terms(
            *common,
            ("hidden states", mlp.hidden * hidden, f"{mlp.hidden} B x N x hidden tensors"),
            ("MLP intermediates", max(mlp.intermediate - 1, 0) * inter if dense_layers else 0,
             "intermediates alive at that call"),
            ("dequantized weight", block_bytes(spec.largest_linear_elements * s),
             "bitsandbytes 4-bit dequantizes a layer's weight to the compute dtype for each matmul"),
        )))

    if arch.recurrent is not None:
        points.append(_scan_point(arch, spec, common_at, phase))
    if not arch.attention_layers:
        return points + _logit_points(arch, layout, spec, common, hidden)
    # one attention moment per kind of layer, at the last layer of that kind (its cache and the
    # layers' before it): Gemma-2's sliding layers pass SDPA a mask past the window, its full ones not
    last_of_kind = {arch.layer_types[index]: index for index in arch.attention_layers}
    for kind, index in sorted(last_of_kind.items(), key=lambda item: item[1]):
        where = f" ({kind} layers)" if len(last_of_kind) > 1 else ""
        points.append(_attention_point(arch, layout, spec, kind, common_at(index + 1), f"{phase}, in", where,
                                       hidden, query))
    return points + _logit_points(arch, layout, spec, common, hidden)


def _attention_point(arch: Architecture, layout: FamilyLayout, spec: RunSpec, kind: str,
                     common: tuple[tuple[str, int, str], ...], phase: str, where: str, hidden: int,
                     query: int) -> Point:
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    generate = spec.mode == "generate"
    masked = spec.attn == "sdpa" and attention.needs_mask(arch, kind, n)
    kernel = "eager" if spec.attn == "eager" else (
        attention.sdpa_kernel(arch, layout, s, masked) if spec.attn == "sdpa" else "flash")
    held_in_attention, _ = attention.held_weights(layout, kernel, b, arch.num_heads, n, n, s)
    att = layout.attention_point
    repeats = attention.repeats_kv(arch, layout, kernel, masked)
    kv_len = n
    attn_terms = [
        ("hidden states", att.hidden * hidden, f"{att.hidden} B x N x hidden tensors"),
        ("query", att.query * query, "the rotated queries"),
        ("fused qkv output", block_bytes(b * n * (arch.num_heads + 2 * arch.num_kv_heads)
                                         * arch.head_dim * s) if att.fused_qkv else 0,
         "q, k and v are views of one fused projection output"),
        ("repeated keys/values", 2 * block_bytes(b * arch.num_heads * kv_len * arch.head_dim * s)
         if repeats else 0, "K and V copied to every query head (repeat_kv)"),
        ("expanded latent keys/values", _latent_expansion(arch, b, n, s) if att.latent_kv else 0,
         "kv_b_proj's per-head keys and values, and the keys assembled with the rotary part"),
        ("partial-rotary pieces", att.partial_rotary_copies
         * block_bytes(b * arch.num_heads * n * arch.rotary_dim * s),
         "rotated and pass-through halves of q and k"),
        ("fp32 query/key", 2 * block_bytes(b * arch.num_heads * n * arch.head_dim * 4)
         if att.fp32_query_key else 0, "q and k upcast to fp32 for the scores"),
        ("current keys/values", 0 if generate and spec.keeps_cache else 2 * block_bytes(
            b * arch.num_kv_heads * n * arch.head_dim * s), "this layer's K and V (no cache)"),
        ("attention weights", held_in_attention, "the previous layer's eager weights, still referenced"),
        ("attention workspace", attention.kernel_workspace(arch, layout, kernel, b, n, kv_len, s, masked,
                                                           spec.softmax_upcasts),
         f"{kernel} attention: output" + (" and B x heads x N x N scores" if kernel in ("eager", "math")
                                          else " and softmax statistics")),
    ]
    return Point(phase=f"{phase} {kernel} attention{where}", kind=f"attention:{kernel}",
                 terms=_terms(*common, *attn_terms))


def _scan_point(arch: Architecture, spec: RunSpec, common_at, phase: str) -> Point:
    """Inside the last mixer layer's scan: the states of the mixer layers before it (its own
    conv window is already cached), the KV of the attention layers before it."""
    mixer = arch.recurrent
    assert mixer is not None
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    last = max(mixer.layers)
    generate = spec.mode == "generate"
    before = [t for t in common_at(last) if t[0] != "KV cache"]
    cache = 0
    if generate:
        cache = kv_cache.cache_bytes(arch, b, n, 0, spec.kv, layers=last, activation_bytes=s)
        cache += recurrent.layer_state_bytes(mixer, b, s)[0]
    copies, wide = recurrent.scan_hidden_copies(arch, generate)
    hidden = [("hidden states", copies * block_bytes(b * n * arch.hidden_size * s)
               + wide * block_bytes(b * n * arch.hidden_size * 4),
               "embeddings, the residual stream and the normed input"
               + (" (the residual in fp32)" if wide else ""))]
    return Point(phase=f"{phase}, in the {mixer.kind} scan", kind=f"scan:{mixer.kind}", terms=_terms(
        ("KV cache and states", cache, "KV of the attention layers and states of the mixer layers run so far"),
        *before, *hidden, *recurrent.scan_terms(arch, b, n, s)))


def _logit_points(arch: Architecture, layout: FamilyLayout, spec: RunSpec, common, hidden: int
                  ) -> list[Point]:
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    generate = spec.mode == "generate"
    points: list[Point] = []
    vocab = arch.vocab_size
    if not arch.computes_logits:  # a pipeline stage before the last
        return points
    if generate:
        points.append(Point(phase="prefill, computing logits", kind="logits", terms=_terms(
            *common,
            ("hidden states", 2 * hidden, "the last layer's output and the final norm"),
            ("logits", block_bytes(b * vocab * s) + block_bytes(b * vocab * 4),
             "generate() keeps last-token logits only, then copies them to fp32"),
        )))
    else:
        points.append(Point(phase="forward, computing logits", kind="logits", terms=_terms(
            *common,
            ("hidden states", hidden, "the final norm output"),
            ("logits", layout.forward_logit_copies * block_bytes(b * n * vocab * s),
             "forward() returns logits for every position"),
        )))
    return points


def _encoder_points(arch: Architecture, spec: RunSpec) -> list[Point]:
    """The encoder's pass over the prompt (its attention, its feed-forward). T5's relative
    position bias (heads x N x N, computed once and shared by the layers) is a float mask, so
    SDPA runs the math kernel in fp32: fp32 q, k, v and scaled q, fp32 scores and their masked
    copy, a byte per score (measured on Flan-T5-base at batch 8, prompt 512: the encoder's
    attention is the run's peak). BART's encoder attention needs no mask (efficient kernel)."""
    enc = arch.encoder
    assert enc is not None
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    h, heads, d = arch.hidden_size, arch.num_heads, arch.head_dim
    hidden = 3 * block_bytes(b * n * h * s)
    query = block_bytes(b * n * heads * d * s)
    bias = block_bytes(heads * n * n * s) if enc.relative_bias else 0
    common = (("encoder hidden states", hidden, "embeddings, the residual stream and the normed input"),
              ("relative position bias", bias, "heads x N x N, computed by the first layer, used by all"))
    scores = b * heads * n * n
    if spec.attn == "eager":  # T5 and BART: softmax in the model dtype (measured on t5-small, bart-large)
        workspace = 2 * block_bytes(scores * s)
        kernel = "eager attention: the scores (bias added in place) and their softmax, both in the model dtype"
    elif enc.relative_bias:
        copies = 4 if s < 4 else 1  # q, k, v upcast and the scaled q; in fp32 only the scaled q
        workspace = (copies * block_bytes(b * heads * n * d * 4) + 2 * block_bytes(scores * 4)
                     + block_bytes(scores) + block_bytes(b * heads * n))
        kernel = "math attention: fp32 q, k, v and scaled q, fp32 scores and masked scores, a byte per score"
    else:
        workspace = query + block_bytes(b * heads * (-(-n // 32) * 32) * 4)
        kernel = "efficient attention: output and softmax statistics"
    width = enc.ffn
    ffn = (3 if enc.gated_ffn else 2) * block_bytes(b * n * width * s)
    phase = "encoder" if spec.mode == "generate" else "forward, encoder"
    return [
        Point(phase=f"{phase}, in attention", kind="attention:encoder", terms=_terms(
            *common, ("query, key, value", 3 * query, "the projections"),
            ("attention workspace", workspace, kernel))),
        Point(phase=f"{phase}, in the feed-forward", kind="mlp", terms=_terms(
            *common, ("feed-forward intermediates", ffn,
                      "act(wi_0), wi_1 and their product" if enc.gated_ffn else "fc1 and its activation"))),
    ]


def _seq2seq_decode_point(arch: Architecture, spec: RunSpec) -> Point | None:
    """The last decode step: encoder output, both caches at their longest, the step's logits
    (a forced-EOS processor adds two fp32 copies: measured on BART-large)."""
    enc = arch.encoder
    assert enc is not None
    if spec.mode != "generate" or spec.new_tokens < 1:
        return None
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    decoded = max(spec.new_tokens - 1, 0)
    cache = kv_cache.cache_bytes(arch, b, n, decoded, spec.kv, activation_bytes=s)
    vocab = arch.vocab_size
    logits = block_bytes(b * vocab * s) + (3 if enc.forced_eos else 1) * block_bytes(b * vocab * 4)
    copy = kv_cache.decode_update_transient(arch, b, decoded, spec.kv)
    if enc.relative_bias:  # T5's float-bias math kernel upcasts the cross-attention keys and values
        copy = max(copy, 2 * block_bytes(b * arch.num_heads * max(n, decoded + 1) * arch.head_dim * 4))
    return Point(phase=f"decode step {decoded}", kind="decode", terms=_terms(
        ("KV cache", cache, f"decoder self-attention keys and values ({decoded + 1} tokens) and "
                            f"cross-attention keys and values of the {n}-token prompt, every decoder layer"),
        ("encoder output", block_bytes(b * n * arch.hidden_size * s), "kept by generate() for every step"),
        ("step transient", max(logits, copy), "the larger of the step's logits with their fp32 copies"
         + (" (forced EOS processor)" if enc.forced_eos else "") + " and a layer's attention temporaries"
         + (" (T5: cross-attention keys and values upcast to fp32)" if enc.relative_bias else "")),
        ("generated ids", 2 * block_bytes(b * (decoded + 1) * 8), "the decoder ids and their mask"),
    ))


def decode_point(arch: Architecture, spec: RunSpec) -> Point | None:
    """The last decode step: the cache at its longest plus one layer's old tensor being copied."""
    if arch.encoder is not None:
        return _seq2seq_decode_point(arch, spec)
    if spec.mode != "generate" or spec.new_tokens < 2 or not spec.keeps_cache:
        return None
    b, n, t = spec.batch, spec.prompt_len, spec.new_tokens
    decoded = spec.cache_growth_steps  # the last step that grows the cache (0: it never grows)
    restarted = spec.restarted_steps > 0
    cache = kv_cache.held_cache_bytes(arch, b, n, decoded, spec.restarted_steps, spec.kv,
                                      activation_bytes=spec.activation_bytes)
    held = {k: kv_cache.stored_length(k, arch.sliding_window, n, decoded - 1)
            for k in set(arch.layer_types) - {"none"}} if decoded else {}
    copy = max([kv_cache.decode_update_transient(arch, b, length, spec.kv, k) for k, length in held.items()]
               + [recurrent.decode_transient(arch, b, spec.activation_bytes)])
    vocab = arch.vocab_size if arch.computes_logits else 0
    # generate()'s bookkeeping after the last forward: its logits, the previous step's fp32 copy and
    # the new one (the H200's Qwen2.5-0.5B at batch 14727, 384 new tokens: 108.19 GiB, those 20.9 GiB on
    # the full cache), and the new attention mask and position ids beside the old mask (the replay's order,
    # decode_replay.decode). During the last forward, when a layer's cat copies its cache, the previous
    # step's fp32 copy is still held (next_token_logits until generate() reassigns it): Qwen3-0.6B at
    # 512 + 512 tokens, batch 1054, peaked 0.52% (640 MiB) above a point without it
    held_copy = block_bytes(b * vocab * 4)
    logits = block_bytes(b * vocab * spec.activation_bytes) + 2 * held_copy
    # input_ids, attention_mask and position_ids during the last forward (n + t - 1 each), and the
    # prompt's position ids, which generate() keeps to its end (the H200 trace of Qwen2.5-0.5B at 128 + 384)
    ids = 3 * block_bytes(b * (n + t - 1) * 8) + block_bytes(b * n * 8)
    ids_after = 2 * block_bytes(b * (n + t) * 8) - block_bytes(b * (n + t - 1) * 8)
    gathered = experts.decode_transient(arch, b, spec.activation_bytes)
    if gathered + held_copy > max(copy + held_copy, logits + ids_after):
        all_experts = arch.moe is not None and arch.moe.all_experts
        step = ("all-expert rows" if all_experts else "gathered expert weights",
                gathered + experts.router_outputs(arch, b, spec.activation_bytes) + held_copy,
                ("every expert runs on the step's tokens" if all_experts else
                 "batched_mm copies the selected experts' gate_up and down weights for every routed token")
                + ", beside the previous step's fp32 logits")
    else:
        step = ("cache update", max(copy + held_copy, logits + ids_after),
                "a layer's cache update during the step: torch.cat copies its keys, a quantized cache dequantizes "
                "them, beside the previous step's fp32 logits (or after the last step its logits beside the "
                "previous and the new fp32 copy and the new mask and positions, whichever is larger)")
    return Point(phase=f"decode step {t - 1 if restarted else decoded}", kind="decode", terms=_terms(
        ("KV cache", cache, f"keys and values after {decoded} decode steps" + (
            f"; from step {spec.cache_restart_step} generate() drops it for a fresh one-token cache every "
            "step (Phi-3 past original_max_position_embeddings), the old one still allocated" if restarted else "")),
        step,
        ("generated ids", ids, "the growing input ids, attention mask and position ids, and the prompt's "
                               "position ids"),
    ))
