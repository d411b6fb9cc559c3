"""The llama-shaped families: model.embed_tokens, model.layers.{i}.self_attn / mlp, model.norm.

Llama, Mistral, Qwen2/3, Gemma 1-3, Cohere, OLMo-2, StableLM, StarCoder2, Phi-3 and Phi differ
in biases, norms, MLP layout and which layers slide; `blocks.llama_like` builds them all.
"""

from __future__ import annotations

from ...config import RawConfig
from ...errors import UnsupportedModelError
from ..blocks import llama_like, read_heads, read_rotary_dim, read_window, sliding_everywhere
from ..registry import adapter
from ..spec import Architecture, BufferSpec

_LLAMA_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "vocab_size": 32000}
_MISTRAL_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                     "sliding_window": 4096}



@adapter("llama")
def _llama(raw: RawConfig) -> Architecture:
    raw = raw.with_defaults(_LLAMA_DEFAULTS)
    bias = raw.bool("attention_bias", default=False)
    return llama_like(raw, family="llama", tied_default=False, qkv_bias=bias, o_bias=bias,
                       mlp_bias=raw.bool("mlp_bias", default=False))


@adapter("mistral")
def _mistral(raw: RawConfig) -> Architecture:
    raw = raw.with_defaults(_MISTRAL_DEFAULTS)
    window = read_window(raw)
    return llama_like(raw, family="llama", tied_default=False, window=window,
                       layer_rule=sliding_everywhere(window))


@adapter("qwen2")
def _qwen2(raw: RawConfig) -> Architecture:
    # transformers' Qwen2Config: sliding window only with use_sliding_window, and only from
    # layer max_window_layers on
    use = raw.bool("use_sliding_window", default=False)
    window = read_window(raw) if use else None
    first = raw.int("max_window_layers", default=28, minimum=0)
    return llama_like(raw, family="llama", tied_default=False, qkv_bias=True, window=window,
                       layer_rule=lambda i: "sliding" if window and i >= first else "full")


@adapter("qwen3")
def _qwen3(raw: RawConfig) -> Architecture:
    bias = raw.bool("attention_bias", default=False)
    use = raw.bool("use_sliding_window", default=False)
    window = read_window(raw) if use else None
    first = raw.int("max_window_layers", default=28, minimum=0)
    return llama_like(raw, family="llama", tied_default=False, qkv_bias=bias, o_bias=bias,
                       qk_norm="per_head", window=window,
                       layer_rule=lambda i: "sliding" if window and i >= first else "full")


def _embed_scale(prefix: str = "model.") -> BufferSpec:
    return BufferSpec(name=f"{prefix}embed_tokens.embed_scale", shape=(), dtype="activation",
                      why="Gemma's embedding scale, a scalar in the model dtype")


@adapter("gemma")
def _gemma(raw: RawConfig) -> Architecture:
    return llama_like(raw, family="gemma", tied_default=True, extra_buffers=(_embed_scale(),))


@adapter("gemma2")
def _gemma2(raw: RawConfig) -> Architecture:
    window = read_window(raw)
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm")
    # transformers' Gemma2Config: even layers slide, odd layers see everything
    return llama_like(raw, family="gemma2", tied_default=True, norms=norms, window=window,
                       layer_rule=lambda i: "sliding" if (i + 1) % 2 else "full",
                       extra_buffers=(_embed_scale(),))


@adapter("gemma3_text")
def _gemma3(raw: RawConfig) -> Architecture:
    window = read_window(raw)
    pattern = raw.int("sliding_window_pattern", "_sliding_window_pattern", default=6)
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm")
    arch = llama_like(raw, family="gemma3", tied_default=True, norms=norms, qk_norm="per_head",
                       window=window,
                       layer_rule=lambda i: "full" if (i + 1) % pattern == 0 else "sliding")
    # two rotary embeddings (local and global), each with inv_freq and original_inv_freq
    half = arch.head_dim // 2
    buffers = [BufferSpec(name=f"model.rotary_emb.{kind}_{which}", shape=(half,), dtype="fp32",
                          why="rotary frequencies of local and global layers (fp32)")
               for kind in ("full_attention", "sliding_attention")
               for which in ("inv_freq", "original_inv_freq")]
    return arch.model_copy(update={"buffers": (*buffers, _embed_scale())})


@adapter("cohere")
def _cohere(raw: RawConfig) -> Architecture:
    if raw.bool("use_qk_norm", default=False):
        raise UnsupportedModelError(f"{raw.where}: cohere with use_qk_norm is not modelled yet.")
    bias = raw.bool("attention_bias", default=False)
    # one bias-free LayerNorm feeds attention and MLP in parallel
    return llama_like(raw, family="cohere", tied_default=True, qkv_bias=bias, o_bias=bias,
                       norms=("input_layernorm",))


@adapter("olmo2")
def _olmo2(raw: RawConfig) -> Architecture:
    bias = raw.bool("attention_bias", default=False)
    # norms after attention and MLP, none before; q/k norms span all heads
    return llama_like(raw, family="olmo2", tied_default=False, qkv_bias=bias, o_bias=bias,
                       qk_norm="full", norms=("post_attention_layernorm", "post_feedforward_layernorm"))


@adapter("stablelm")
def _stablelm(raw: RawConfig) -> Architecture:
    if raw.bool("qk_layernorm", default=False):
        raise UnsupportedModelError(f"{raw.where}: stablelm with qk_layernorm is not modelled yet.")
    if raw.bool("use_parallel_residual", default=False):
        raise UnsupportedModelError(f"{raw.where}: stablelm with use_parallel_residual is not "
                                    "modelled yet.")
    _, _, head_dim = read_heads(raw, raw.int("hidden_size"))
    return llama_like(raw, family="stablelm", tied_default=False,
                       qkv_bias=raw.bool("use_qkv_bias", default=False), norm_bias=True,
                       rotary_dim=read_rotary_dim(raw, head_dim))


@adapter("starcoder2")
def _starcoder2(raw: RawConfig) -> Architecture:
    bias = raw.bool("use_bias", default=True)
    window = read_window(raw)
    arch = llama_like(raw, family="starcoder2", tied_default=True, qkv_bias=bias, o_bias=bias,
                      mlp_bias=bias, mlp="c_fc", norm_bias=True, window=window,
                      layer_rule=sliding_everywhere(window))
    return arch.model_copy(update={"activation": raw.str("hidden_act", default="gelu_pytorch_tanh")})


@adapter("phi3")
def _phi3(raw: RawConfig) -> Architecture:
    _, _, head_dim = read_heads(raw, raw.int("hidden_size"))
    window = read_window(raw)
    arch = llama_like(raw, family="phi3", tied_default=False, fused_qkv=True,
                      mlp="gate_up_fused", rotary_dim=read_rotary_dim(raw, head_dim), window=window,
                      layer_rule=sliding_everywhere(window))
    # Phi3Config's default when the config names none
    restart = raw.int("original_max_position_embeddings", default=4096)
    return arch.model_copy(update={"cache_restart_positions": restart})


@adapter("phi")
def _phi(raw: RawConfig) -> Architecture:
    if raw.bool("qk_layernorm", default=False):
        raise UnsupportedModelError(f"{raw.where}: phi with qk_layernorm is not modelled yet.")
    _, _, head_dim = read_heads(raw, raw.int("hidden_size"))
    # attention and MLP read the same LayerNorm output in parallel
    arch = llama_like(raw, family="phi", tied_default=False, qkv_bias=True, o_bias=True,
                      mlp_bias=True, mlp="fc", o_name="dense", norms=("input_layernorm",),
                      norm_bias=True, final_norm="final_layernorm", head_bias=True,
                      rotary_dim=read_rotary_dim(raw, head_dim))
    return arch.model_copy(update={"activation": raw.str("hidden_act", default="gelu_new")})  # PhiConfig's default

