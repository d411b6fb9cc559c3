"""Mamba (v1)'s generate() and forward, replayed request by request in the order transformers
5.17's modeling_mamba.py allocates and frees when the mamba-ssm and causal-conv1d kernels are
absent (its torch paths: causal_conv1d_fn / causal_conv1d_update, mamba_selective_scan's
recurrent loop over every prompt token, mamba_selective_state_update per decode step), held to
the H200 trace of Mamba-2.8B (16 layers, bf16, batch 127 of 1024-token prompts; tests/
test_edge_traces.py). The model around the mixer (norms, the fp32 residual stream, logits,
generate()'s bookkeeping) is Mamba-2's (mamba2_layers.generate, with these mixers).

The prefill's scan is where the memory goes: the discretized A, B x dt and B x dt x u, each
batch x inner x prompt x state in fp32 (42.6 GB apiece for Mamba-2.8B at batch 127), alive
through the loop, which then adds one state update and one output column per token (the outputs
are stacked at the end). generate() passes the prompt's attention mask to the prefill, so the
mixer's input and its conv output are each multiplied by it (a copy); the decode steps pass none.
"""

from __future__ import annotations

from ...catalog import FamilyLayout
from ...model.spec import Architecture, RecurrentSpec
from .activations import RunSpec
from .layer_replay import Tracer
from .layernorm_layers import SINGLE_KERNEL_ACTIVATIONS
from .mamba2_layers import Mixers, _a_matrix, forward, generate

FP32 = 4


# the scan's loop makes a handful of requests per prompt token and layer: longer runs keep the
# point model's rule (fast, and held at the edge in edge-h200-24) instead of a replay of minutes
MAX_REPLAYED_SCAN_STEPS = 65536  # layers x prompt tokens (Mamba-2.8B's 64 layers at 1024 tokens)


def replays(arch: Architecture, spec: RunSpec) -> bool:
    """Mamba without bitsandbytes, generating with its cache or running one forward without it,
    over prompts at least as long as the conv kernel, up to MAX_REPLAYED_SCAN_STEPS."""
    m = arch.recurrent
    return (arch.model_type == "mamba" and m is not None and m.kind == "mamba"
            and spec.quantization == "none" and spec.prompt_len >= m.conv_kernel
            and arch.num_layers * spec.prompt_len <= MAX_REPLAYED_SCAN_STEPS
            and (spec.mode == "forward" or spec.keeps_cache)
            and (arch.activation is None or arch.activation in SINGLE_KERNEL_ACTIVATIONS))


def _softplus_time_steps(tr: Tracer, rows: int, inner: int, s: int) -> int | None:
    """softplus(dt + bias.to(dt.dtype)), as the scan and the state update both start: the bias's
    cast (none in fp32) goes once the sum exists, the sum once the softplus does."""
    cast = tr.new(inner * s, "dt bias .to(dt.dtype)") if s < FP32 else None
    dt = tr.new(rows * inner * s, "dt + bias")
    tr.drop(cast)
    soft = tr.new(rows * inner * s, "softplus(dt)")
    tr.drop(dt)
    return soft


def _selective_scan(tr: Tracer, m: RecurrentSpec, b: int, n: int, s: int) -> tuple[int | None, int | None]:
    """mamba_selective_scan's recurrent loop; returns its fp32 output and final state."""
    rows, inner, state = b * n, m.inner, m.state_size
    wide = s < FP32
    d = tr.new(inner * FP32, "D.float()") if wide else None  # an argument: goes as the scan returns
    soft = _softplus_time_steps(tr, rows, inner, s)
    big = rows * inner * state * FP32
    product = tr.new(big, "A * dt")
    discrete_a = tr.new(big, "discrete_A = exp(A * dt)")
    tr.drop(product)
    upcast = tr.new(rows * state * FP32, "B.float()") if wide else None
    discrete_b = tr.new(big, "discrete_B = dt * B")
    tr.drop(upcast)
    upcast = tr.new(rows * inner * FP32, "u.float()") if wide else None
    delta_bu = tr.new(big, "deltaB_u")
    tr.drop(upcast)
    step = b * inner * state
    ssm_state = tr.new(step * s, "ssm_state (zeros)")
    columns = []
    tr.at(op="selective scan (per token)")
    for _ in range(n):
        decayed = tr.new(step * FP32, "discrete_A * ssm_state")
        fresh = tr.new(step * FP32, "+ deltaB_u")
        tr.drop(decayed, ssm_state)
        ssm_state = fresh
        cast = tr.new(step * s, "ssm_state.to(dtype)") if wide else None
        columns.append(tr.new(b * inner * s, "ssm_state @ C"))
        tr.drop(cast)
    stacked = tr.new(rows * inner * s, "stack(scan_outputs)")
    skip = tr.new(rows * inner * FP32, "u * D")
    summed = tr.new(rows * inner * FP32, "scan_output + u * D")
    tr.drop(skip, stacked)
    act = tr.new(rows * inner * s, "silu(z)")
    gated = tr.new(rows * inner * FP32, "scan_output * silu(z)")
    tr.drop(act, summed, soft, discrete_a, discrete_b, delta_bu, *columns, d)
    return gated, ssm_state


def _prefill_mixer(tr: Tracer, m: RecurrentSpec, hidden: int, b: int, n: int, s: int,
                   cache: list[int | None] | None) -> int | None:
    """MambaMixer over the prompt: the masked input, in_proj, A, the causal conv (a contiguous
    copy of its transposed input, the padded output, silu), the masked conv output, x_proj over a
    contiguous copy, dt_proj, the scan, the cache's states, the cast and out_proj."""
    rows, inner = b * n, m.inner
    wide = s < FP32
    tr.at(op="mixer.in_proj")
    masked_input = tr.new(rows * hidden * s, "hidden * attention_mask")
    projected = tr.new(rows * m.in_proj * s, "mixer.in_proj")
    tr.matmul()
    a = _a_matrix(tr, inner * m.state_size, s)
    if cache is not None:  # update_conv_state's lazy_initialization: zeros for the conv state
        cache.append(tr.new(b * m.conv_dim * m.conv_kernel * s, "conv state (cache)"))
    tr.at(op="causal conv1d")
    contiguous = tr.new(rows * inner * s, "conv1d input (contiguous)")
    conv = tr.new(b * inner * (n + m.conv_kernel - 1) * s, "conv1d")
    tr.drop(contiguous)
    act = tr.new(rows * inner * s, "silu(conv1d)")
    tr.drop(conv)
    x = tr.new(rows * inner * s, "conv output * attention_mask")
    tr.drop(act)
    tr.at(op="x_proj, dt_proj")
    contiguous = tr.new(rows * inner * s, "x_proj input (contiguous)")
    x_projected = tr.new(rows * (m.dt_rank + 2 * m.state_size) * s, "x_proj")
    tr.drop(contiguous)
    first = tr.new(rows * inner * s, "dt_proj.weight @ time_step")
    time_step = tr.new(rows * inner * s, "time_step")
    tr.drop(first)
    bias = tr.new(inner * FP32, "dt_proj.bias.float()") if wide else None
    tr.at(op="selective scan")
    scanned, final_state = _selective_scan(tr, m, b, n, s)
    if cache is not None:  # update_recurrent_state's lazy_initialization: zeros_like(final state)
        cache.append(tr.new(b * inner * m.state_size * FP32, "recurrent state (cache)"))
    tr.at(op="mixer.out_proj")
    cast = tr.new(rows * inner * s, "scan output .to(dtype)") if wide else None
    contiguous = tr.new(rows * inner * s, "out_proj input (contiguous)")
    out = tr.new(rows * hidden * s, "mixer.out_proj")
    tr.drop(contiguous, cast, masked_input, a, x, projected, time_step, x_projected, bias, scanned, final_state)
    return out


def _decode_mixer(tr: Tracer, m: RecurrentSpec, hidden: int, b: int, s: int) -> int | None:
    """MambaMixer for one token over its cache: in_proj, A, causal_conv1d_update, x_proj,
    dt_proj, mamba_selective_state_update (dt, dA, dB, dB x, the state in fp32, C, the D skip, the
    gate), out_proj."""
    inner, state = m.inner, m.state_size
    wide = s < FP32
    projected = tr.new(b * m.in_proj * s, "mixer.in_proj")
    a = _a_matrix(tr, inner * state, s)
    tr.at(op="causal_conv1d_update")
    joined = tr.new(b * inner * (m.conv_kernel + 1) * s, "cat(conv state, x)")
    conv = tr.new(b * inner * 2 * s, "conv1d")
    act = tr.new(b * inner * s, "silu(conv1d)")
    tr.drop(conv, joined)
    x_projected = tr.new(b * (m.dt_rank + 2 * state) * s, "x_proj")
    time_step = tr.new(b * inner * s, "time_step")
    bias = tr.new(inner * FP32, "dt_proj.bias.float()") if wide else None
    tr.at(op="selective_state_update")
    soft = _softplus_time_steps(tr, b, inner, s)
    full = b * inner * state * FP32
    upcast = tr.new(b * inner * FP32, "dt.float()") if wide else None
    product = tr.new(full, "dt * A")
    tr.drop(upcast)
    d_a = tr.new(full, "dA = exp(dt * A)")
    tr.drop(product)
    upcasts = [tr.new(b * inner * FP32, "dt.float()"), tr.new(b * state * FP32, "B.float()")] if wide else []
    d_b = tr.new(full, "dB = dt * B")
    tr.drop(*upcasts)
    upcast = tr.new(b * inner * FP32, "x.float()") if wide else None
    d_bx = tr.new(full, "dB * x")
    tr.drop(upcast)
    decayed = tr.new(full, "state * dA")
    new_state = tr.new(full, "state * dA + dBx")
    tr.drop(decayed)
    cast = tr.new(b * inner * state * s, "ssm_state.to(C.dtype)") if wide else None
    read = tr.new(b * inner * s, "ssm_state @ C")
    tr.drop(cast)
    skip = tr.new(b * inner * s, "x * D")
    total = tr.new(b * inner * s, "out + x * D")
    tr.drop(skip, read)
    gate = tr.new(b * inner * s, "silu(z)")
    out = tr.new(b * inner * s, "out * silu(z)")
    tr.drop(gate, total, soft, d_a, d_b, d_bx, new_state)
    projected_out = tr.new(b * hidden * s, "mixer.out_proj")
    tr.drop(a, act, projected, time_step, x_projected, bias, out)
    return projected_out


MAMBA = Mixers(prefill=_prefill_mixer, decode=_decode_mixer, recurrent_mask=False)


def replay(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec) -> None:
    (generate if spec.mode == "generate" else forward)(tr, arch, spec, MAMBA)
