"""Mamba-2's generate() and forward, replayed request by request in the order transformers 5.17's
modeling_mamba2.py allocates and frees when the mamba-ssm and causal-conv1d kernels are absent
(its torch paths: causal_conv1d_fn, mamba2_chunk_scan, mamba2_selective_state_update), held to
the H200 trace of Mamba-Codestral (16 layers, bf16, batch 1, 128-token prompt, 32 new tokens;
tests/test_edge_traces.py).

The prefill's chunked scan is where the memory goes: C x B before its sum over the state
(batch x padded prompt x chunk x heads x state, fp32: 4 GiB for Mamba-Codestral at one 256-token
chunk), the decayed inputs against every state (1 GiB), and the inter-chunk recurrence over
(chunks + 1)^2 states. The order matters as much as the sizes: each layer's cache states are
created lazily when the layer first runs, carved out of whatever the previous layer's scan
freed, and a split 4 GiB block can no longer serve the next layer's product (the trace's second
4 GiB segment). A decode step runs one token through the conv-state update and the recurrent
state update (fp32 batch x heads x head_dim x state temporaries).

dtype rules that decide whether a cast allocates: the scan runs in fp32 whatever the model dtype;
the residual stream is fp32 when the config's residual_in_fp32 is (the default), so every layer
but the first casts its input back to the model dtype for the norm; a `.to()` or `.float()` to
the dtype a tensor already has allocates nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from ...catalog import FamilyLayout
from ...model.spec import Architecture, RecurrentSpec
from .activations import RunSpec
from .decode_replay import generate_steps
from .layer_replay import Tracer, rms_scaled
from .layernorm_layers import SINGLE_KERNEL_ACTIVATIONS

FP32 = 4
INT64 = 8


def replays(arch: Architecture, spec: RunSpec) -> bool:
    """Mamba-2 without bitsandbytes, generating with its cache or running one forward without it,
    over prompts at least as long as the conv kernel (shorter ones pad the conv state: not
    replayed)."""
    m = arch.recurrent
    return (arch.model_type == "mamba2" and m is not None and m.kind == "mamba2"
            and spec.quantization == "none" and spec.prompt_len >= m.conv_kernel
            and (spec.mode == "forward" or spec.keeps_cache)
            and (arch.activation is None or arch.activation in SINGLE_KERNEL_ACTIVATIONS))


def _norm_output(tr: Tracer, scaled: int | None, mean: int | None, elements: int, in_bytes: int,
                 weight_bytes: int) -> int | None:
    """The end every RMSNorm here shares: x.to(input dtype) (none when that is fp32), weight * x
    (in the wider of the two dtypes); the scaled fp32 tensor and the mean go last."""
    cast = tr.new(elements * in_bytes, "RMSNorm cast") if in_bytes < FP32 else None
    out = tr.new(elements * max(in_bytes, weight_bytes), "RMSNorm weight *")
    tr.drop(cast, scaled, mean)
    return out


def rms_norm(tr: Tracer, rows: int, width: int, in_bytes: int, weight_bytes: int) -> int | None:
    """Mamba2RMSNorm over an input of `in_bytes` per element (the fp32 residual at the final norm)."""
    scaled, mean = rms_scaled(tr, rows * width * in_bytes, rows, in_bytes, keep_mean=True)
    return _norm_output(tr, scaled, mean, rows * width, in_bytes, weight_bytes)


def gated_norm(tr: Tracer, rows: int, width: int, in_bytes: int, s: int) -> int | None:
    """MambaRMSNormGated(x, gate): x.float() (none for the prefill's fp32 scan output),
    x * silu(gate.float()) (the gate's upcast and the silu go as the product exists, then the
    upcast x), then the RMSNorm steps over the fp32 product and the cast back to x's dtype."""
    wide = rows * width * FP32
    upcast = tr.new(wide, "gated norm x.float()") if in_bytes < FP32 else None
    gate = tr.new(wide, "gated norm gate.float()") if s < FP32 else None
    act = tr.new(wide, "gated norm silu(gate)")
    tr.drop(gate)
    gated = tr.new(wide, "gated norm x * silu(gate)")
    tr.drop(act, upcast)
    scaled, mean = rms_scaled(tr, wide, rows, FP32, keep_mean=True)
    tr.drop(gated)
    return _norm_output(tr, scaled, mean, rows * width, in_bytes, s)


def _a_matrix(tr: Tracer, heads: int, s: int) -> int | None:
    """A = -torch.exp(self.A_log.float()): kept until the mixer returns."""
    upcast = tr.new(heads * FP32, "A_log.float()") if s < FP32 else None
    exp = tr.new(heads * FP32, "exp(A_log)")
    tr.drop(upcast)
    a = tr.new(heads * FP32, "A = -exp(A_log)")
    tr.drop(exp)
    return a


def _segment_sum(tr: Tracer, rows: int, size: int, owned: int | None) -> int | None:
    """segment_sum over `rows` sequences of `size`: the input expanded to size x size, a boolean
    lower triangle (ones, tril) and its inverse, masked_fill, cumsum, then the second triangle and
    masked_fill with -inf. `owned` is an input only this function references (it goes at the
    first reassignment)."""
    square = size * size
    table = rows * square * FP32

    def triangle() -> int | None:
        ones = tr.new(square, "segment_sum ones")
        mask = tr.new(square, "segment_sum tril")
        tr.drop(ones)
        return mask

    mask = triangle()
    inverse = tr.new(square, "segment_sum ~mask")
    masked = tr.new(table, "segment_sum masked_fill")
    tr.drop(inverse, owned)
    summed = tr.new(table, "segment_sum cumsum")
    second = triangle()
    tr.drop(mask)
    inverse = tr.new(square, "segment_sum ~mask")
    out = tr.new(table, "segment_sum masked_fill(-inf)")
    tr.drop(inverse, summed, masked, second)
    return out


def chunk_scan(tr: Tracer, m: RecurrentSpec, b: int, n: int, s: int,
               keep_final_state: bool) -> tuple[int | None, int | None]:
    """mamba2_chunk_scan over the prompt: returns its output (batch x padded prompt x heads x
    head_dim, fp32) and, when the cache takes the final state, the new states it is a view of."""
    h, hd, state, groups, cs = m.heads, m.head_dim, m.state_size, m.groups, m.chunk_size
    inner = h * hd
    padded = -(-n // cs) * cs
    chunks = padded // cs
    rows = b * n
    upcasts = s < FP32

    tr.at(op="scan time steps")
    dt = tr.new(rows * h * s, "dt + dt_bias")
    soft = tr.new(rows * h * s, "softplus(dt)")
    tr.drop(dt)
    dt = tr.new(rows * h * s, "clamp(dt)")
    tr.drop(soft)
    x32 = tr.new(rows * inner * FP32, "x.float()") if upcasts else None

    def repeated(name: str) -> int | None:  # B or C, .float() then repeated to every head
        upcast = tr.new(rows * groups * state * FP32, f"{name}.float()") if upcasts else None
        out = tr.new(rows * h * state * FP32, f"{name} repeat_interleave")
        tr.drop(upcast)
        return out

    b_heads, c_heads = repeated("B"), repeated("C")
    pad = tr.new(b * padded * inner * FP32, "pad(x)")
    d_residual = tr.new(b * padded * inner * FP32, "D * x")
    tr.drop(pad)
    dt32 = tr.new(rows * h * FP32, "dt.float()") if upcasts else None
    x_dt = tr.new(rows * inner * FP32, "x * dt")
    tr.drop(dt32, x32)
    dt32 = tr.new(rows * h * FP32, "dt.float()") if upcasts else None
    a_dt = tr.new(rows * h * FP32, "A * dt")
    tr.drop(dt32)
    tr.at(op="scan chunks")
    x_chunks = tr.new(b * padded * inner * FP32, "x chunks (pad)")
    a_chunks = tr.new(b * padded * h * FP32, "A chunks (pad)")
    b_chunks = tr.new(b * padded * h * state * FP32, "B chunks (pad)")
    c_chunks = tr.new(b * padded * h * state * FP32, "C chunks (pad)")
    tr.drop(x_dt, a_dt, b_heads, c_heads)
    a_cumsum = tr.new(b * h * padded * FP32, "cumsum(A)")
    tr.temp(b * h * padded * FP32)  # the permuted input's contiguous copy

    tr.at(op="scan intra-chunk (diagonal blocks)")
    square = b * chunks * cs * cs * h * FP32  # batch x chunks x chunk x chunk x heads
    segsum = _segment_sum(tr, b * h * chunks, cs, owned=None)
    decay = tr.new(square, "L = exp(segment_sum(A))")
    tr.drop(segsum)
    product = tr.new(square * state, "C x B product")
    g = tr.new(square, "G = (C x B).sum(-1)")
    tr.drop(product)
    product = tr.new(square, "G x L")
    weights = tr.new(square, "M = (G x L).sum(-1)")
    tr.drop(product)
    product = tr.new(square * hd, "M x x")
    y_diag = tr.new(b * padded * inner * FP32, "Y_diag")
    tr.drop(product)

    tr.at(op="scan chunk states")
    shifted = tr.new(b * h * padded * FP32, "A_cumsum[-1] - A_cumsum")
    decay_states = tr.new(b * h * padded * FP32, "decay_states")
    tr.drop(shifted)
    b_decay = tr.new(b * padded * h * state * FP32, "B * decay_states")
    states_each = b * h * hd * state * FP32
    product = tr.new(b * padded * inner * state * FP32, "B_decay x x")
    states = tr.new(chunks * states_each, "states")
    tr.drop(product)
    previous = tr.new(states_each, "zeros_like(states[:, :1])")
    joined = tr.new((chunks + 1) * states_each, "cat(previous, states)")
    tr.drop(states)

    tr.at(op="scan inter-chunk recurrence")
    last = tr.new(b * h * (chunks + 1) * FP32, "pad(A_cumsum[..., -1])")
    segsum = _segment_sum(tr, b * h, chunks + 1, owned=last)
    decay_chunk = tr.new(b * h * (chunks + 1) ** 2 * FP32, "decay_chunk")
    tr.drop(segsum)
    product = tr.new((chunks + 1) ** 2 * states_each, "decay_chunk x states")
    new_states = tr.new((chunks + 1) * states_each, "new_states")
    tr.drop(product, joined)

    tr.at(op="scan state -> output")
    decay_out = tr.new(b * h * padded * FP32, "exp(A_cumsum)")
    c_states = tr.new(b * padded * inner * state * FP32, "C x states")
    summed = tr.new(b * padded * inner * FP32, "(C x states).sum(-1)")
    y_off = tr.new(b * padded * inner * FP32, "Y_off")
    tr.drop(summed)
    total = tr.new(b * padded * inner * FP32, "Y_diag + Y_off")
    output = tr.new(b * padded * inner * FP32, "+ D residual")
    tr.drop(total)
    # the function's locals go as it returns; the output and the final state's storage stay
    tr.drop(x_chunks, dt, a_chunks, b_chunks, c_chunks, d_residual, a_cumsum, decay, g, weights, y_diag,
            decay_states, b_decay, previous, decay_chunk, decay_out, c_states, y_off)
    if not keep_final_state:
        tr.drop(new_states)
        new_states = None
    return output, new_states


def _prefill_mixer(tr: Tracer, m: RecurrentSpec, hidden: int, b: int, n: int, s: int,
                   cache: list[int | None] | None) -> int | None:
    """Mamba2Mixer over the prompt: in_proj, A, the causal conv (a contiguous copy of its
    transposed input, the padded conv output, silu of the prompt's part), the chunk scan, the
    lazily created cache states, the gated norm, the cast back and out_proj."""
    rows = b * n
    tr.at(op="mixer.in_proj")
    projected = tr.new(rows * m.in_proj * s, "mixer.in_proj")
    tr.matmul()
    a = _a_matrix(tr, m.heads, s)
    if cache is not None:  # update_conv_state's lazy_initialization: zeros for the conv state
        cache.append(tr.new(b * m.conv_dim * m.conv_kernel * s, "conv state (cache)"))
    tr.at(op="causal conv1d")
    contiguous = tr.new(rows * m.conv_dim * s, "conv1d input (contiguous)")
    conv = tr.new(b * m.conv_dim * (n + m.conv_kernel - 1) * s, "conv1d")
    tr.drop(contiguous)
    conv_act = tr.new(rows * m.conv_dim * s, "silu(conv1d)")
    tr.drop(conv)
    scanned, new_states = chunk_scan(tr, m, b, n, s, keep_final_state=cache is not None)
    if cache is not None:  # update_recurrent_state's lazy_initialization: zeros_like(final state)
        cache.append(tr.new(b * m.heads * m.head_dim * m.state_size * FP32, "recurrent state (cache)"))
    tr.at(op="mixer.norm (gated)")
    normed = gated_norm(tr, rows, m.inner, FP32, s)
    cast = tr.new(rows * m.inner * s, "scan output .to(dtype)") if s < FP32 else None
    tr.at(op="mixer.out_proj")
    out = tr.new(rows * hidden * s, "mixer.out_proj")
    tr.drop(cast, a, projected, conv_act, normed, scanned, new_states)
    return out


def state_update(tr: Tracer, m: RecurrentSpec, b: int, s: int) -> int | None:
    """mamba2_selective_state_update for one token: the time steps, dA = exp(dt * A) and the
    state's new value in fp32, dB, dB * x and the cast state in the model dtype, C, bmm and the D
    skip; returns the output (batch x heads x head_dim)."""
    each = b * m.heads * m.head_dim
    full = each * m.state_size
    dt = tr.new(each * s, "dt + dt_bias")
    soft = tr.new(each * s, "softplus(dt)")
    tr.drop(dt)
    dt32 = tr.new(each * FP32, "dt.float()") if s < FP32 else None
    product = tr.new(full * FP32, "dt * A")
    tr.drop(dt32)
    d_a = tr.new(full * FP32, "dA = exp(dt * A)")
    tr.drop(product)
    b_heads = tr.new(b * m.heads * m.state_size * s, "B expanded (contiguous)")
    d_b = tr.new(full * s, "dB = dt * B")
    d_bx = tr.new(full * s, "dB * x")
    decayed = tr.new(full * FP32, "state * dA")
    new_state = tr.new(full * FP32, "state * dA + dBx")
    tr.drop(decayed)
    c_heads = tr.new(b * m.heads * m.state_size * s, "C expanded (contiguous)")
    if s < FP32:  # ssm_states.to(C.dtype) replaces the fp32 one
        cast = tr.new(full * s, "state .to(dtype)")
        tr.drop(new_state)
        new_state = cast
    out = tr.new(each * s, "bmm(state, C)")
    skip = tr.new(each * s, "x * D")
    total = tr.new(each * s, "out + x * D")
    tr.drop(skip, out)
    tr.drop(soft, b_heads, d_a, d_b, d_bx, new_state, c_heads)
    return total


def _decode_mixer(tr: Tracer, m: RecurrentSpec, hidden: int, b: int, s: int) -> int | None:
    """Mamba2Mixer for one token over its cache: in_proj, A, causal_conv1d_update (the cat onto
    the conv state, the conv, silu of its last position), the state update, the gated norm over
    its model-dtype output, out_proj."""
    projected = tr.new(b * m.in_proj * s, "mixer.in_proj")
    a = _a_matrix(tr, m.heads, s)
    tr.at(op="causal_conv1d_update")
    joined = tr.new(b * m.conv_dim * (m.conv_kernel + 1) * s, "cat(conv state, x)")
    conv = tr.new(b * m.conv_dim * 2 * s, "conv1d")
    conv_act = tr.new(b * m.conv_dim * s, "silu(conv1d)")
    tr.drop(conv, joined)
    tr.at(op="selective_state_update")
    scanned = state_update(tr, m, b, s)
    tr.at(op="mixer.norm (gated)")
    normed = gated_norm(tr, b, m.inner, s, s)
    tr.drop(scanned)
    out = tr.new(b * hidden * s, "mixer.out_proj")
    tr.drop(a, projected, conv_act, normed)
    return out


class Mixers(NamedTuple):
    """A Mamba family's mixer over the prompt (tr, m, hidden, b, n, s, cache) and over one cached
    token (tr, m, hidden, b, s), each returning out_proj's output; and whether its model checks the
    attention mask with create_recurrent_attention_mask (Mamba-2) or not (Mamba)."""

    prefill: Callable[..., int | None]
    decode: Callable[..., int | None]
    recurrent_mask: bool


def _model(tr: Tracer, arch: Architecture, b: int, n: int, s: int, cache: list[int | None] | None,
           step: int, logits_rows: int, mixers: Mixers) -> int | None:
    """Mamba2Model then the lm_head: the embeddings, every block (norm, mixer, the residual add in
    fp32 when the config says so), the final norm; returns the fp32 logits (`logits_rows` per
    sequence: the last token's in generate())."""
    m = arch.recurrent
    assert m is not None
    rows, hidden = b * n, arch.hidden_size
    decoding = step > 0
    phase = f"decode step {step}" if decoding else "prefill"
    tr.at(phase, "embeddings")
    embeddings = tr.new(rows * hidden * s, "embeddings")
    if not decoding and mixers.recurrent_mask:  # create_recurrent_attention_mask: the all-ones mask checked
        tr.drop(tr.new(rows, "attention_mask.bool()"), tr.new(1, "all()"))
    stream, stream_bytes = embeddings, s
    residual_bytes = FP32 if m.residual_in_fp32 else s
    for layer in range(arch.num_layers):
        tr.at(f"{phase} layer {layer}", "norm")
        cast = tr.new(rows * hidden * s, "hidden .to(norm dtype)") if stream_bytes != s else None
        normed = rms_norm(tr, rows, hidden, s, s)
        tr.drop(cast)
        residual = tr.new(rows * hidden * FP32, "residual .to(fp32)") \
            if m.residual_in_fp32 and stream_bytes != FP32 else None
        out = mixers.decode(tr, m, hidden, b, s) if decoding else mixers.prefill(tr, m, hidden, b, n, s, cache)
        tr.drop(normed)
        tr.at(op="residual add")
        added = tr.new(rows * hidden * residual_bytes, "residual + mixer")
        tr.drop(out, residual, stream if stream != embeddings else None)
        stream, stream_bytes = added, residual_bytes
    tr.at(phase, "norm_f")
    final_bytes = max(stream_bytes, s)
    final = rms_norm(tr, rows, hidden, stream_bytes, s)
    tr.drop(stream, embeddings)
    tr.at(op="lm_head (logits)")
    kept = b * logits_rows
    cast = tr.new(kept * hidden * s, "hidden .to(lm_head dtype)") if final_bytes != s else None
    vocab = arch.vocab_size if arch.computes_logits else 0
    logits = tr.new(kept * vocab * s, "lm_head")
    tr.drop(cast)
    if s < FP32:
        wide = tr.new(kept * vocab * FP32, "logits.float()")
        tr.drop(logits)
        logits = wide
    tr.drop(final)
    return logits


def forward(tr: Tracer, arch: Architecture, spec: RunSpec, mixers: Mixers) -> None:
    """One forward without a cache (use_cache=False): logits for every position."""
    tr.drop(_model(tr, arch, spec.batch, spec.prompt_len, spec.activation_bytes, None, 0, spec.prompt_len, mixers))


def generate(tr: Tracer, arch: Architecture, spec: RunSpec, mixers: Mixers) -> None:
    """generate(): the special tokens and unfinished flags, the prompt's forward (filling the
    cache), then decode_replay.generate_steps (no position ids)."""
    b, n, s = spec.batch, spec.prompt_len, spec.activation_bytes
    tr.at("generate", "special tokens")
    held = [tr.new(INT64, "special token"), tr.new(INT64, "special token")]
    unfinished = tr.new(b * INT64, "unfinished_sequences")
    prompt_inputs = tr.new(b * n * INT64, "prepare_inputs_for_generation")
    cache: list[int | None] = []
    logits = _model(tr, arch, b, n, s, cache, 0, 1, mixers)
    tr.drop(prompt_inputs)
    vocab = arch.vocab_size if arch.computes_logits else 0
    generate_steps(tr, b, n, vocab, spec.new_tokens, arch.num_layers, logits, unfinished,
                   lambda step: _model(tr, arch, b, 1, s, cache, step, 1, mixers),
                   position_ids=False, inputs_hold_mask=False)
    tr.drop(*held, *cache)


MAMBA2 = Mixers(prefill=_prefill_mixer, decode=_decode_mixer, recurrent_mask=True)


def replay(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec) -> None:
    (generate if spec.mode == "generate" else forward)(tr, arch, spec, MAMBA2)
