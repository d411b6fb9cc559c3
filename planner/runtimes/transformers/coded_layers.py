"""Which decoder layers are replayed from their family's modeling code (family_layers.py,
layernorm_layers.py, own_attention_layers.py, mla_layers.py) rather than in the traced llama
order or the coarse one (sequence.py), and the decode steps of those that differ."""

from __future__ import annotations

from ...model.spec import Architecture
from .activations import RunSpec
from .family_layers import (
    Tracer,
    cohere_layer,
    cohere_norm,
    gpt_neox_layer,
    layer_norm_fused,
    olmo2_layer,
    phi3_layer,
    stablelm_layer,
)
from .gpt_oss_layers import gpt_oss_layer
from .layernorm_layers import (
    SINGLE_KERNEL_ACTIVATIONS,
    falcon_new_layer,
    falcon_parallel,
    falcon_parallel_layer,
    gpt2_layer,
    opt_layer,
    opt_pre_norm,
    phi_layer,
    starcoder2_layer,
)
from .mla_layers import deepseek_layer, mla_decode_attention
from .own_attention_layers import (
    bloom_decode_attention,
    bloom_layer,
    gptj_decode_attention,
    gptj_layer,
    gptj_position_table,
    mpt_layer,
)


def _deepseek_mla(arch: Architecture) -> bool:
    """DeepSeek-V2, and V3 with its interleaved rotary (its config's default)."""
    mla = arch.mla
    return mla is not None and (arch.model_type == "deepseek_v2"
                                or (arch.model_type == "deepseek_v3" and mla.rope_interleave))


def layer_for(arch: Architecture, rms: bool, kernel: str, spec: RunSpec):
    """The replay of this family's decoder layer written here, or None (the caller's order)."""
    if _deepseek_mla(arch) and kernel in ("flash", "efficient") and spec.quantization == "none":
        return deepseek_layer
    if arch.model_type == "gpt_oss" and kernel == "eager" and spec.quantization == "none":
        return gpt_oss_layer
    if arch.moe is not None or spec.quantization not in ("none", "4bit"):
        return None
    if arch.model_type == "phi" and kernel in ("flash", "efficient", "eager") and \
            arch.activation in (*SINGLE_KERNEL_ACTIVATIONS, "gelu_new"):
        return phi_layer  # its projections dequantize under bitsandbytes 4-bit
    if spec.quantization != "none":
        return None
    if arch.model_type == "gptj" and kernel == "eager" and arch.activation in (*SINGLE_KERNEL_ACTIVATIONS, "gelu_new"):
        return gptj_layer
    if arch.model_type == "bloom" and kernel == "eager":
        return bloom_layer
    if arch.model_type == "mpt" and kernel == "eager":
        return mpt_layer
    if arch.family == "falcon_mqa" and kernel == "math" and falcon_parallel(arch):
        return falcon_parallel_layer
    if arch.family == "falcon" and spec.attn == "sdpa" and arch.cache_heads == arch.num_heads:
        return falcon_new_layer  # the new decoder layout
    if arch.model_type == "gpt_bigcode" and arch.activation in SINGLE_KERNEL_ACTIVATIONS and \
            kernel in ("flash", "efficient", "eager"):
        return gpt2_layer  # eager too: its layer keeps to eager_attention's order
    if kernel not in ("flash", "efficient"):
        return None
    if arch.model_type == "stablelm" and not rms:
        return stablelm_layer
    if arch.family == "gpt_neox_sequential":
        return gpt_neox_layer
    if arch.model_type == "olmo2":
        return olmo2_layer
    if arch.model_type == "phi3" and rms:
        return phi3_layer
    if arch.model_type == "cohere" and not arch.qk_norm:
        return cohere_layer
    if arch.model_type == "gpt2" and arch.activation == "gelu_new":
        return gpt2_layer
    if arch.model_type == "starcoder2" and arch.activation in SINGLE_KERNEL_ACTIVATIONS:
        return starcoder2_layer
    if arch.model_type == "opt" and arch.activation in SINGLE_KERNEL_ACTIVATIONS and opt_pre_norm(arch):
        return opt_layer
    return None


def final_norm(tr: Tracer, arch: Architecture, hidden_bytes: int, rows: int, s: int) -> int:
    """The model's last norm, for the families above whose norm is not RMSNorm."""
    if arch.model_type == "cohere":
        return cohere_norm(tr, hidden_bytes, rows, s)
    return layer_norm_fused(tr, hidden_bytes, rows)


def decode_layer_steps(arch: Architecture, spec: RunSpec):
    """A coded family whose decode steps differ from the shared ones (decode_replay.decode): a
    function run before the layer's cache update, returning what it holds until the layer's
    attention is done, and the attention itself; or None."""
    if arch.model_type == "gptj" and spec.attn == "eager" and spec.quantization == "none":
        return (lambda tr: [gptj_position_table(tr, arch, spec.batch)],
                lambda tr, kv_length: gptj_decode_attention(tr, arch, spec, kv_length))
    if arch.model_type == "bloom" and spec.attn == "eager" and spec.quantization == "none":
        return (lambda tr: [], lambda tr, kv_length: bloom_decode_attention(tr, arch, spec, kv_length))
    if _deepseek_mla(arch) and spec.attn == "sdpa" and spec.quantization == "none":
        return (lambda tr: [], lambda tr, kv_length: mla_decode_attention(tr, arch, spec, kv_length))
    return None
