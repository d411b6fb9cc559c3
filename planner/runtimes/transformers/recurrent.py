"""State-space and linear-attention mixers: their cached state and their prefill transient.

transformers 5.17 keeps a mixer layer's state in its cache (cache_utils.LinearAttentionLayer):
the causal conv1d's last `conv_kernel` inputs (B x conv_dim x kernel, activation dtype) and the
scan state (fp32: Mamba B x inner x N; Mamba-2 B x heads x head_dim x N; gated DeltaNet
B x value_heads x key_dim x value_dim). Both are allocated when the layer first runs and never
grow.

Without the mamba-ssm, causal-conv1d and flash-linear-attention kernels, transformers runs
torch fallbacks whose prefill materializes large fp32 tensors; the peak of a prefill sits in
the last mixer layer's scan. The tensors alive there, counted from the measured live sets
(profiles/measurements/h100-hybrid.jsonl, diagnose rows) and the code they name:

* Mamba (modeling_mamba.mamba_selective_scan, sequential loop): discretized A, B and B*u,
  B x inner x N x 4 bytes for every prompt position (three of them); the loop's per-step
  outputs; the stacked output and the D skip in fp32.
* Mamba-2 (mamba2_chunk_scan): the C*B product before its sum over the state,
  B x padded_N x chunk x heads x N x 4 bytes, which dwarfs everything else (4 GiB for
  Mamba-Codestral at batch 1, prompt 128: one 256-token chunk). Mamba-2's requests, in order,
  are replayed through the allocator by mamba2_layers.py.
* Gated DeltaNet (torch_chunk_gated_delta_rule): ten padded fp32 copies of queries, keys and
  values (chunked, beta-weighted, decayed, solved) and three B x heads x padded_N x 64 decay
  and attention matrices.
"""

from __future__ import annotations

from collections.abc import Callable

from ...base import block_bytes
from ...model.spec import Architecture, RecurrentSpec

Terms = list[tuple[str, int, str]]
STATE_BYTES = 4  # scan states are fp32 (measured on every family above)


def _spec(arch: Architecture) -> RecurrentSpec:
    assert arch.recurrent is not None
    return arch.recurrent


def layer_state_bytes(spec: RecurrentSpec, batch: int, s: int) -> tuple[int, int]:
    """(conv state, scan state) of one mixer layer."""
    return (block_bytes(spec.conv_state_elements(batch) * s),
            block_bytes(spec.recurrent_state_elements(batch) * STATE_BYTES))


def state_bytes(arch: Architecture, batch: int, s: int, layers: int | None = None) -> int:
    """Conv and scan states of the mixer layers among the first `layers` (all when None)."""
    if arch.recurrent is None:
        return 0
    spec = arch.recurrent
    count = sum(1 for i in spec.layers if layers is None or i < layers)
    return count * sum(layer_state_bytes(spec, batch, s))


def _padded(n: int, chunk: int) -> int:
    return -(-n // chunk) * chunk


def scan_terms(arch: Architecture, b: int, n: int, s: int) -> Terms:
    """The mixer's own tensors at the last mixer layer's scan (prefill or forward)."""
    spec = _spec(arch)
    projected = [("mixer input projection", block_bytes(b * n * spec.in_proj * s),
                  "in_proj output (gate, conv input, time steps)")]
    return projected + SCAN_TERMS[spec.kind](spec, b, n, s)


def _mamba_terms(spec: RecurrentSpec, b: int, n: int, s: int) -> Terms:
    d, state = spec.inner, spec.state_size
    return [
        ("discretized scan inputs", 3 * block_bytes(b * d * n * state * 4),
         "exp(A*dt), dt*B and dt*B*u for every position, fp32 (B x inner x N x state each)"),
        ("scan outputs", n * block_bytes(b * d * s) + block_bytes(b * d * n * s) + 2 * block_bytes(b * d * n * 4),
         "one output per step of the sequential loop, their stack, the D skip and sum in fp32"),
        ("gate and conv tensors", spec.gate_copies * block_bytes(b * n * d * s),
         "gate, conv output, masked copies: B x N x inner"),
        ("time step and B, C", block_bytes(b * n * (spec.dt_rank + 2 * state) * s),
         "x_proj output"),
        ("scan state and A", block_bytes(b * d * state * 4) + block_bytes(d * state * 4) + 2 * block_bytes(d * 4),
         "the running state, -exp(A_log), D and the dt bias in fp32"),
    ]


def _mamba2_terms(spec: RecurrentSpec, b: int, n: int, s: int) -> Terms:
    h, state, cs, d = spec.heads, spec.state_size, spec.chunk_size, spec.inner
    p = _padded(n, cs)
    return [
        ("C x B product", block_bytes(b * p * cs * h * state * 4),
         "C[..., None, :] * B[..., None, :, :] before .sum(-1): B x padded_N x chunk x heads x state, fp32"),
        ("intra-chunk matrices", 2 * block_bytes(b * p * cs * h * 4),
         "the decay matrix L = exp(segsum(A)) and G, B x heads x padded_N x chunk, fp32"),
        ("chunked B and C", 2 * block_bytes(b * p * h * state * 4), "repeated to every head, padded, fp32"),
        ("chunked inputs", 2 * block_bytes(b * p * d * 4), "x * dt and the D skip, padded, fp32"),
        ("chunked A", 2 * block_bytes(b * p * h * 4), "A * dt and its cumulative sum, fp32"),
        ("conv output", block_bytes(b * n * spec.conv_dim * s) + block_bytes(b * n * h * s),
         "act(conv1d(x, B, C)) and the time steps"),
    ]


def _gated_delta_terms(spec: RecurrentSpec, b: int, n: int, s: int) -> Terms:
    hv, dk, dv, cs = spec.heads, spec.state_size, spec.head_dim, spec.chunk_size
    p = _padded(n, cs)
    repeated = 2 * block_bytes(b * n * hv * dk * s) if hv > spec.groups else 0
    return [
        ("chunked queries, keys, values", 5 * block_bytes(b * hv * p * dk * 4) + 5 * block_bytes(b * hv * p * dv * 4),
         "padded fp32 values, beta-weighted keys and values, decayed keys, the solved systems, queries, keys "
         "and the output"),
        ("intra-chunk matrices", 3 * block_bytes(b * hv * p * cs * 4),
         "pairwise decay, the UT system and intra-chunk attention, B x heads x padded_N x 64, fp32"),
        ("repeated queries/keys", repeated, "key heads repeated to every value head"),
        ("conv output and gates", block_bytes(b * n * spec.conv_dim * s) + block_bytes(b * n * hv * dv * s)
         + block_bytes(b * n * 2 * hv * s) + 3 * block_bytes(b * n * hv * s) + block_bytes(b * n * hv * 4),
         "act(conv1d), the output gate z, in_proj_ba, beta, a, b and the decay g"),
        ("scan state and steps", block_bytes(b * hv * dk * dv * 4) + 2 * block_bytes(b * hv * cs * dv * 4)
         + 3 * block_bytes(b * hv * p * 4), "the running state, one chunk's step tensors, decays"),
    ]


# each mixer kind (RecurrentSpec.kind) and the tensors its torch-fallback scan holds
SCAN_TERMS: dict[str, Callable[[RecurrentSpec, int, int, int], Terms]] = {
    "mamba": _mamba_terms, "mamba2": _mamba2_terms, "gated_delta": _gated_delta_terms,
}


def scan_hidden_copies(arch: Architecture, generate: bool) -> tuple[int, int]:
    """B x N x hidden tensors alive beside the scan: (activation dtype, fp32). Mamba-2 keeps its
    residual in fp32; Mamba's forward() frees the embeddings, generate() keeps them."""
    if arch.model_type == "mamba2":
        return 2, 1
    if arch.model_type == "mamba" and not generate:
        return 2, 0
    return 3, 0


def decode_transient(arch: Architecture, batch: int, s: int) -> int:
    """One mixer layer of a decode step: the state update's fp32 temporaries (dA, dB*x and
    the new state), a fraction of the prefill's."""
    if arch.recurrent is None:
        return 0
    return 3 * block_bytes(arch.recurrent.recurrent_state_elements(batch) * STATE_BYTES)
