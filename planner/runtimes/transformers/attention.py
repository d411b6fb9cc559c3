"""Attention: which kernel runs, and what it allocates while it runs.

transformers' SDPA integration (integrations/sdpa_attention.py) passes `enable_gqa=True` when
a model has fewer key/value heads than query heads and no mask is needed; otherwise it repeats
K and V to every head itself. PyTorch 2.11 then picks a kernel: flash for fp16/bf16 without a
mask (it accepts enable_gqa); memory-efficient for a mask or fp32 (it refuses enable_gqa); the
math kernel for what neither accepts, e.g. fp32 with enable_gqa. The math kernel upcasts
fp16/bf16 to fp32 and materializes the full B x heads x N x N scores (measured: fp32 llama-3.2-1b
and falcon-7b-instruct, whose 71 query heads against one key/value head only math accepts).
"""

from __future__ import annotations

from typing import Literal

from ...base import block_bytes
from ...catalog import FamilyLayout, Gpu
from ...model.spec import Architecture

Kernel = Literal["flash", "efficient", "math", "eager"]


def needs_mask(arch: Architecture, kind: str, kv_length: int) -> bool:
    """Whether transformers materializes a mask for SDPA (no padding assumed): a sliding (or
    chunked) layer whose keys reach past its window (masking_utils._ignore_causal_mask_sdpa)."""
    return kind in ("sliding", "chunked") and arch.sliding_window is not None and kv_length >= arch.sliding_window


def sdpa_kernel(arch: Architecture, layout: FamilyLayout, activation_bytes: int, masked: bool) -> Kernel:
    if layout.sdpa_kernel == "math":
        return "math"
    if arch.mla is not None and arch.mla.v_head_dim != arch.head_dim:
        # flash needs one head size for q, k and v; latent attention's values are narrower
        return "efficient"
    grouped = arch.num_kv_heads < arch.num_heads
    half = activation_bytes == 2
    if grouped and not masked and arch.head_dim <= 256:
        return "flash" if half else "math"  # enable_gqa: only flash and math accept it
    if half and not masked and arch.head_dim <= 256:
        return "flash"
    return "efficient"


def decode_kernel(arch: Architecture, layout: FamilyLayout, attn: str, activation_bytes: int,
                  gpu: Gpu | None) -> str:
    """The kernel a decode step's attention runs on `gpu`, as calibration.yaml's
    decode_outside_torch_per_step names it: on compute capability 9.0 and 10.0 torch 2.11 tries
    cuDNN's attention first for fp16/bf16 (measured on the H200: an SDPA run restricted to cuDNN
    grows the memory outside torch per decode step exactly as the default does, one restricted to
    flash does not), which builds and keeps an execution graph for every new key length."""
    if attn != "sdpa":
        return "eager" if attn == "eager" else "flash"
    kernel = sdpa_kernel(arch, layout, activation_bytes, masked=False)
    if kernel != "math" and activation_bytes == 2 and gpu is not None and gpu.prefers_cudnn_attention:
        return "cudnn"
    return kernel


def repeats_kv(arch: Architecture, layout: FamilyLayout, kernel: Kernel, masked: bool) -> bool:
    """transformers copies K and V to every query head (repeat_kv) for eager, and for SDPA
    whenever it cannot pass enable_gqa."""
    if arch.num_kv_heads == arch.num_heads or not layout.repeats_kv:
        return False
    if kernel == "eager":
        return True
    # one key/value head repeats as a view (its expanded head dimension has stride 0, which the
    # reshape keeps): SDPA reads it without a copy (H200 trace of Gemma-3-1B's sliding layers)
    return arch.num_kv_heads > 1 and kernel != "math" and (masked or arch.head_dim > 256)


def kernel_workspace(arch: Architecture, layout: FamilyLayout, kernel: Kernel, batch: int,
                     q_len: int, kv_len: int, activation_bytes: int, masked: bool,
                     softmax_upcast: bool) -> int:
    """Bytes the attention call itself allocates for one layer, output included."""
    heads, d = arch.num_heads, arch.head_dim
    scores = batch * heads * q_len * kv_len
    value_dim = arch.mla.v_head_dim if arch.mla is not None else d
    out = block_bytes(batch * q_len * heads * value_dim * activation_bytes)
    # sdpa_attention_forward makes a boolean mask additive in the input dtype before the kernel runs
    # (layer_replay's "SDPA additive mask"; H200: Mistral-7B's 8 x 63248-token prefill, edge-h200-39)
    additive = block_bytes(batch * q_len * kv_len * activation_bytes) if masked else 0
    if kernel == "flash":
        return additive + out + block_bytes(batch * heads * q_len * 4)  # log-sum-exp, fp32
    if kernel == "efficient":
        padded = -(-q_len // 32) * 32
        return additive + out + block_bytes(batch * heads * padded * 4)
    if kernel == "math":
        # aten _scaled_dot_product_attention_math: scaled q (fp32), scores and softmax (fp32),
        # _safe_softmax's boolean mask of the scores and of fully-masked rows
        total = 2 * block_bytes(scores * 4) + block_bytes(scores) + block_bytes(batch * heads * q_len)
        total += block_bytes(batch * heads * q_len * d * 4)  # q * sqrt(scale)
        if activation_bytes < 4:  # fp16/bf16 inputs are upcast first
            total += block_bytes(batch * heads * q_len * d * 4)
            total += 2 * block_bytes(batch * arch.num_kv_heads * kv_len * d * 4)
        if arch.num_kv_heads < heads and layout.sdpa_kernel != "math":  # enable_gqa expands K, V
            total += 2 * block_bytes(batch * heads * kv_len * d * 4)
        if masked:  # the boolean mask becomes an additive one in the input dtype
            total += block_bytes(batch * q_len * kv_len * activation_bytes)
        else:  # is_causal: a lower-triangular N x N mask, made additive in fp32
            total += block_bytes(q_len * kv_len * 4)
        return total
    # eager: q @ k^T (+ mask) in the model dtype, softmax in fp32 (input upcast, except fp16's
    # fused kernel, and output)
    eager = layout.eager_scores
    upcasts = eager.upcast_copies if activation_bytes < 4 and softmax_upcast else 0
    low, wide = block_bytes(scores * activation_bytes), block_bytes(scores * 4)
    at_softmax = eager.dtype_copies * low + (eager.fp32_copies + upcasts) * wide
    if activation_bytes >= 4 or not eager.upcast_copies or softmax_upcast:
        return at_softmax
    # fp16's fused softmax makes no upcast: the cast back to the model dtype, its output beside
    # the fp32 softmax and the scores, is then the larger moment (H200, Llama-3.2-1B fp16 eager)
    return max(at_softmax, (eager.dtype_copies + 1) * low + eager.fp32_copies * wide)


def held_weights(layout: FamilyLayout, kernel: Kernel, batch: int, heads: int, q_len: int,
                 kv_len: int, activation_bytes: int) -> tuple[int, int]:
    """Eager attention returns its softmax weights (B x heads x N x N, model dtype): bytes
    still alive (in attention, in the MLP) because a layer or the model's loop holds them."""
    if kernel != "eager":
        return 0, 0
    one = block_bytes(batch * heads * q_len * kv_len * activation_bytes)
    previous = one if layout.eager_scores.weights_held == "next_layer" else 0
    return previous, one + previous
