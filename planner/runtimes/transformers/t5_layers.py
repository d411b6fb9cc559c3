"""T5's generate() (an encoder-decoder), replayed request by request in the order transformers 5.17's
modeling_t5.py allocates and frees, held to the H200 trace of Flan-T5-base (bf16, SDPA, batch 2,
2048-token prompts, 16 new tokens: tests/test_edge_traces.py).

The encoder runs once over the prompt: its first layer computes the relative position bias (a
heads x tokens x tokens table, shared by every layer), and SDPA, handed that bias as a float mask
whose last dimension is not contiguous (a permuted embedding lookup), runs its math kernel over
keys and values that are transposed views of their projections (matmul copies both). generate()
keeps the encoder's output; every decoder step then runs one token through the decoder: its
self-attention (math kernel again, over a growing cache, with its own position bias per step),
the cross-attention (keys and values projected from the encoder output and cached at the first
step only), the feed-forward, the lm_head and generate()'s bookkeeping."""

from __future__ import annotations

from ...catalog import FamilyLayout
from ...model.spec import Architecture
from . import sdpa_math
from .activations import RunSpec
from .decode_replay import replayed_steps
from .layer_replay import Tracer, rms_scaled
from .layernorm_layers import SINGLE_KERNEL_ACTIVATIONS, new_gelu


def replays(arch: Architecture, spec: RunSpec) -> bool:
    """Whether this run's requests are the ones written here: T5 under SDPA, generating with its
    cache, bf16 or fp32 (fp16 would keep the feed-forward's wo in fp32: not replayed), no
    bitsandbytes, no forced end-of-sequence processor."""
    enc = arch.encoder
    return (enc is not None and arch.family == "t5" and enc.relative_bias and not enc.forced_eos
            and spec.attn == "sdpa" and spec.quantization == "none" and spec.mode == "generate"
            and spec.keeps_cache and spec.activation_bytes in (2, 4) and arch.kv_groups == 1
            and arch.activation in (*SINGLE_KERNEL_ACTIVATIONS, "gelu_new"))


def t5_norm(tr: Tracer, rows: int, width: int, s: int) -> int | None:
    """T5LayerNorm: x.to(float32).pow(2).mean(-1) (the upcast a temporary of pow), + eps, rsqrt,
    x * that (fp32), cast back to the weight's dtype, weight * x; the variance goes last."""
    normed, variance = rms_scaled(tr, rows * width * s, rows, s, keep_mean=True, keep_upcast=False)
    if s < 4:
        cast = tr.new(rows * width * s, "layer_norm .to(weight dtype)")
        tr.drop(normed)
        normed = cast
    out = tr.new(rows * width * s, "layer_norm weight * x")
    tr.drop(normed, variance)
    return out


def relative_bias(tr: Tracer, q_len: int, k_len: int, heads: int, s: int, bidirectional: bool) -> int | None:
    """T5Attention.compute_bias: the positions (int64), their difference, _relative_position_bucket
    op by op (the encoder's two-sided buckets, the decoder's one-sided), then the bias embedding's
    lookup, q_len x k_len x heads in the model dtype, which the caller holds."""
    cells = q_len * k_len
    arange = tr.new(q_len * 8, "compute_bias arange(query)")
    context = tr.new(q_len * 8, "compute_bias context position")
    tr.drop(arange)
    memory = tr.new(k_len * 8, "compute_bias arange(key)")
    relative = tr.new(cells * 8, "compute_bias memory - context")
    buckets = None
    if bidirectional:
        positive = tr.new(cells, "bucket relative > 0")
        as_long = tr.new(cells * 8, "bucket .to(long)")
        tr.drop(positive)
        scaled = tr.new(cells * 8, "bucket * num_buckets")
        tr.drop(as_long)
        buckets = tr.new(cells * 8, "bucket 0 + that")
        tr.drop(scaled)
        distance = tr.new(cells * 8, "bucket abs")
    else:
        zeros = tr.new(cells * 8, "bucket zeros_like")
        smaller = tr.new(cells * 8, "bucket min")
        tr.drop(zeros)
        distance = tr.new(cells * 8, "bucket -min")
        tr.drop(smaller)
    small = tr.new(cells, "bucket is_small")
    step = tr.new(cells * 4, "bucket .float()")
    for op in ("/ max_exact", "log", "/ log(max_distance / max_exact)", "* (num_buckets - max_exact)"):
        following = tr.new(cells * 4, f"bucket {op}")
        tr.drop(step)
        step = following
    as_long = tr.new(cells * 8, "bucket .to(long)")
    tr.drop(step)
    large = tr.new(cells * 8, "bucket max_exact + that")
    tr.drop(as_long)
    full = tr.new(cells * 8, "bucket full_like")
    capped = tr.new(cells * 8, "bucket min(large, full)")
    tr.drop(full, large)
    chosen = tr.new(cells * 8, "bucket where(is_small)")
    if buckets is None:  # 0 += where(...): a new tensor
        buckets = tr.new(cells * 8, "bucket 0 + where")
    tr.drop(chosen)  # (the encoder's += is in place)
    tr.drop(distance, small, capped)
    values = tr.new(cells * heads * s, "relative_attention_bias lookup")
    tr.drop(context, memory, relative, buckets)
    return values


def feed_forward(tr: Tracer, arch: Architecture, rows: int, width: int, s: int, gated: bool,
                 residual: int | None) -> int | None:
    """T5LayerFF: the norm; wi_0, its activation (gelu_new op by op), wi_0's output goes, wi_1,
    the product (gated; else wi and its activation), wo; the norm goes, the residual add, wo's
    output and the residual's input go."""
    hidden = arch.hidden_size
    normed = t5_norm(tr, rows, hidden, s)
    inner = rows * width * s

    def activation() -> int | None:
        return new_gelu(tr, inner) if arch.activation == "gelu_new" else tr.new(inner, f"{arch.activation}")

    first = tr.new(inner, "DenseReluDense.wi_0" if gated else "DenseReluDense.wi")
    act = activation()
    tr.drop(first)
    alive = [act]
    if gated:
        linear = tr.new(inner, "DenseReluDense.wi_1")
        alive = [tr.new(inner, "gelu * linear"), act, linear]
    down = tr.new(rows * hidden * s, "DenseReluDense.wo")
    tr.drop(*alive, normed)
    out = tr.new(rows * hidden * s, "feed-forward residual add")
    tr.drop(down, residual)
    return out


def _encoder_layer(tr: Tracer, arch: Architecture, b: int, n: int, s: int,
                   bias: int | None) -> tuple[int | None, int | None]:
    """One encoder block: returns its output and the position bias (made by the first)."""
    rows, inner, heads = b * n, arch.num_heads * arch.head_dim, arch.num_heads
    normed = t5_norm(tr, rows, arch.hidden_size, s)
    q = tr.new(rows * inner * s, "SelfAttention.q")
    tr.matmul()
    k, v = tr.new(rows * inner * s, "SelfAttention.k"), tr.new(rows * inner * s, "SelfAttention.v")
    if bias is None:
        tr.at(op="relative position bias")
        bias = relative_bias(tr, n, n, heads, s, bidirectional=True)
    tr.at(op="attention (math)")
    out = sdpa_math.math_sdpa(tr, b, heads, heads, n, n, arch.head_dim, s, masked=True,
                              float_mask=True, strided_kv=True)
    merged = tr.new(rows * inner * s, "attention output (contiguous)")
    tr.drop(out)
    projected = tr.new(rows * arch.hidden_size * s, "SelfAttention.o")
    tr.drop(merged, q, k, v)
    attended = tr.new(rows * arch.hidden_size * s, "attention residual add")
    tr.drop(projected, normed)
    tr.at(op="feed-forward")
    output = feed_forward(tr, arch, rows, arch.encoder.ffn, s, arch.encoder.gated_ffn, attended)
    return output, bias


def _encode(tr: Tracer, arch: Architecture, b: int, n: int, s: int) -> int | None:
    """The encoder over the prompt; returns its output (generate() keeps it to the end)."""
    tr.at("encoder", "generation special tokens")
    tr.new(8, "eos token id")
    tr.new(8, "pad token id")
    embeddings = tr.new(b * n * arch.hidden_size * s, "embed_tokens")
    tr.drop(tr.new(b * n, "bidirectional mask (ignored by sdpa)"))
    bias = None
    hidden = embeddings
    for layer in range(arch.encoder.layers):
        tr.at(f"encoder layer {layer}", "layer_norm")
        output, bias = _encoder_layer(tr, arch, b, n, s, bias)
        if hidden is not embeddings:
            tr.drop(hidden)
        hidden = output
    tr.at("encoder", "final_layer_norm")
    encoded = t5_norm(tr, b * n, arch.hidden_size, s)
    tr.drop(hidden, embeddings, bias)
    return encoded


def _decoder_step(tr: Tracer, arch: Architecture, spec: RunSpec, step: int, self_cache: list[int | None],
                  cross_cache: list[int | None]) -> int | None:
    """One decoder forward over one new token (`step` counts from 1: the cache then holds `step`
    positions); returns the final norm's output."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    hidden, heads, d = arch.hidden_size, arch.num_heads, arch.head_dim
    inner = heads * d
    embeddings = tr.new(b * hidden * s, "embed_tokens")
    tr.drop(tr.new(b * n, "encoder attention mask (ignored by sdpa)"))
    layer_input = embeddings
    self_bias = cross_bias = None
    for layer in range(arch.num_layers):
        tr.at(f"decode step {step} layer {layer}", "self-attention")
        normed = t5_norm(tr, b, hidden, s)
        q = tr.new(b * inner * s, "SelfAttention.q")
        k, v = tr.new(b * inner * s, "SelfAttention.k"), tr.new(b * inner * s, "SelfAttention.v")
        old_key, old_value = self_cache[2 * layer:2 * layer + 2]
        key = tr.new(b * inner * step * s, "self-attention cache keys (torch.cat)")
        tr.drop(old_key)
        value = tr.new(b * inner * step * s, "self-attention cache values (torch.cat)")
        tr.drop(old_value, k, v)
        self_cache[2 * layer:2 * layer + 2] = [key, value]
        if self_bias is None:
            self_bias = relative_bias(tr, 1, step, heads, s, bidirectional=False)
        out = sdpa_math.math_sdpa(tr, b, heads, heads, 1, step, d, s, masked=True, float_mask=True)
        projected = tr.new(b * hidden * s, "SelfAttention.o")
        tr.drop(out, q)
        attended = tr.new(b * hidden * s, "self-attention residual add")
        tr.drop(projected, normed)

        tr.at(op="cross-attention")
        normed = t5_norm(tr, b, hidden, s)
        q = tr.new(b * inner * s, "EncDecAttention.q")
        if step == 1:  # the encoder output's keys and values, cached for every later step
            k, v = (tr.new(b * n * inner * s, f"EncDecAttention.{name}") for name in ("k", "v"))
            cross_cache += [tr.new(b * n * inner * s, f"cross-attention cache {name} (torch.cat)")
                            for name in ("keys", "values")]
            tr.drop(k, v)
        if cross_bias is None:
            cross_bias = tr.new(heads * n * s, "zero position bias")
        seeds = [tr.new(8, "sdpa philox seed"), tr.new(8, "sdpa philox offset")]
        out = tr.new(b * inner * s, "cross-attention output")
        tr.drop(tr.new(b * heads * n, "cross-attention kernel scratch"), *seeds)
        projected = tr.new(b * hidden * s, "EncDecAttention.o")
        tr.drop(out, q)
        crossed = tr.new(b * hidden * s, "cross-attention residual add")
        tr.drop(normed, projected, attended)

        tr.at(op="feed-forward")
        output = feed_forward(tr, arch, b, arch.intermediate_size, s, arch.encoder.gated_ffn, crossed)
        if layer_input is not embeddings:
            tr.drop(layer_input)
        layer_input = output
    tr.at(f"decode step {step}", "final_layer_norm")
    final = t5_norm(tr, b, hidden, s)
    tr.drop(layer_input, embeddings, self_bias, cross_bias)
    return final


def generate(tr: Tracer, arch: Architecture, spec: RunSpec) -> None:
    """generate() of a T5 model: the encoder, then one decoder forward per new token with its
    logits and bookkeeping (the fp32 copy of the logits, the next tokens, the decoder ids' cat,
    the unfinished flags; each replacing the previous step's)."""
    b, s = spec.batch, spec.activation_bytes
    vocab = arch.vocab_size if arch.computes_logits else 0
    encoded = _encode(tr, arch, b, spec.prompt_len, s)
    tr.at("decode step 1", "decoder_input_ids")
    tr.drop(tr.new(b * 8, "decoder start ids"))
    ids = tr.new(b * 8, "decoder_input_ids")
    unfinished = tr.new(b * 8, "unfinished_sequences")
    self_cache: list[int | None] = [None] * (2 * arch.num_layers)
    cross_cache: list[int | None] = []
    copy = next_tokens = inputs = None
    # the first decoder forward runs with no self-attention cache and fills the cross-attention one
    for step in range(1, replayed_steps(tr.at_capacity, spec.new_tokens - 1, arch.num_layers) + 2):
        if step > 1:  # a cached decoder forward
            tr.decode_step()
        sliced = tr.new(b * 8, "prepare_inputs_for_generation")
        tr.drop(inputs)
        inputs = sliced
        final = _decoder_step(tr, arch, spec, step, self_cache, cross_cache)
        tr.at(f"decode step {step}", "lm_head (logits)")
        if arch.encoder.scaled_decoder_output:  # sequence_output * d_model**-0.5
            scaled = tr.new(b * arch.hidden_size * s, "decoder output * d_model^-0.5")
            tr.drop(final)
            final = scaled
        logits = tr.new(b * vocab * s, "lm_head")
        tr.drop(final)
        fresh = tr.new(b * vocab * 4, "next-token logits (fp32 copy)")
        tr.drop(copy)
        copy = fresh
        fresh = tr.new(b * 8, "next tokens")
        tr.drop(next_tokens)
        next_tokens = fresh
        fresh = tr.new(b * (step + 1) * 8, "decoder_input_ids (torch.cat)")
        tr.drop(ids)
        ids = fresh
        fresh = tr.new(b * 8, "unfinished_sequences & ~is_done")
        tr.drop(unfinished, logits)
        unfinished = fresh
    tr.drop(copy, next_tokens, ids, unfinished, inputs, *self_cache, *cross_cache, encoded)


def replay(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec) -> None:
    generate(tr, arch, spec)
