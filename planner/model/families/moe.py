"""Mixture-of-experts and latent-attention families: Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V2/V3, gpt-oss and Llama-4 (text).

transformers 5.17 holds every layer's experts fused into two 3-D Parameters (gate_up_proj,
down_proj) beside a router and, where the family has them, shared experts.
"""

from __future__ import annotations

from ...config import MAX_LAYERS, RawConfig
from ...errors import ConfigError
from ..blocks import MoeLayout, llama_like, moe_sparse_layers, qwen_sparse_layers, read_window, sliding_everywhere
from ..registry import adapter
from ..spec import Architecture, BufferSpec, MlaSpec, MoeSpec, TensorSpec


def _experts_in_every_layer(raw: RawConfig, layers: int, **options: bool) -> MoeSpec:
    """Mixtral's and gpt-oss's mixture: every layer's MLP, experts of intermediate_size."""
    return MoeSpec(num_experts=raw.int("num_local_experts", "num_experts"), top_k=raw.int("num_experts_per_tok"),
                   expert_intermediate=raw.int("intermediate_size"), sparse_layers=tuple(range(layers)), **options)


@adapter("mixtral")
def _mixtral(raw: RawConfig) -> Architecture:
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    window = read_window(raw)
    # MixtralTopKRouter returns its fp32 softmax values
    moe = _experts_in_every_layer(raw, layers, routing_fp32=True, normalized_top_k=True)
    return llama_like(raw, family="moe", tied_default=False, window=window, moe=moe,
                       layer_rule=sliding_everywhere(window))


@adapter("qwen2_moe")
def _qwen2_moe(raw: RawConfig) -> Architecture:
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    moe = MoeSpec(num_experts=raw.int("num_experts", "num_local_experts"), top_k=raw.int("num_experts_per_tok"),
                  expert_intermediate=raw.int("moe_intermediate_size"),
                  shared_intermediate=raw.int("shared_expert_intermediate_size", default=0, minimum=0),
                  sparse_layers=qwen_sparse_layers(raw, layers), shared_first=True,
                  normalized_top_k=raw.bool("norm_topk_prob", default=False))
    # Qwen2MoeConfig: with use_sliding_window, the even layers below max_window_layers slide
    window = read_window(raw) if raw.bool("use_sliding_window", default=False) else None
    first_full = raw.int("max_window_layers", default=28, minimum=0)
    arch = llama_like(raw, family="moe", tied_default=False, qkv_bias=True, moe=moe, window=window,
                      layer_rule=lambda i: "sliding" if window and i % 2 == 0 and i < first_full else "full",
                      moe_layout=MoeLayout(shared="shared_expert", shared_gate=True))
    # create_sliding_window_causal_mask runs whatever the layers are (H200 trace of Qwen1.5-MoE)
    return arch.model_copy(update={"unused_sliding_mask": "sliding" not in arch.layer_types})


@adapter("qwen3_moe")
def _qwen3_moe(raw: RawConfig) -> Architecture:
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    bias = raw.bool("attention_bias", default=False)
    moe = MoeSpec(num_experts=raw.int("num_experts", "num_local_experts"), top_k=raw.int("num_experts_per_tok"),
                  expert_intermediate=raw.int("moe_intermediate_size"),
                  sparse_layers=qwen_sparse_layers(raw, layers),
                  normalized_top_k=raw.bool("norm_topk_prob", default=False))
    # Qwen3MoeConfig keeps sliding_window only with use_sliding_window; then every layer slides
    window = read_window(raw) if raw.bool("use_sliding_window", default=False) else None
    return llama_like(raw, family="moe", tied_default=False, qkv_bias=bias, o_bias=bias,
                       qk_norm="per_head", moe=moe, window=window, layer_rule=sliding_everywhere(window))


@adapter("olmoe")
def _olmoe(raw: RawConfig) -> Architecture:
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    moe = MoeSpec(num_experts=raw.int("num_experts", "num_local_experts"), top_k=raw.int("num_experts_per_tok"),
                  expert_intermediate=raw.int("intermediate_size"), sparse_layers=tuple(range(layers)),
                  normalized_top_k=raw.bool("norm_topk_prob", default=False))
    return llama_like(raw, family="moe", tied_default=False, qk_norm="full", moe=moe)


def _deepseek(raw: RawConfig, v3: bool) -> Architecture:
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    experts = raw.int("n_routed_experts", "num_local_experts")
    width = raw.int("moe_intermediate_size")
    # transformers 5.17 makes layer i sparse when i >= first_k_dense_replace (moe_layer_freq
    # is read by the remote code only)
    moe = MoeSpec(num_experts=experts, top_k=raw.int("num_experts_per_tok"), expert_intermediate=width,
                  shared_intermediate=raw.int("n_shared_experts", default=0, minimum=0) * width,
                  sparse_layers=moe_sparse_layers(layers, first_dense=raw.int("first_k_dense_replace", default=0,
                                                                           minimum=0)),
                  routing_fp32=True, router_fp32=True,  # the router runs in fp32, returns fp32 weights
                  sigmoid_groups=(raw.int("n_group", default=8), raw.int("topk_group", default=4)) if v3 else None,
                  normalized_top_k=v3 and raw.bool("norm_topk_prob", default=True))
    mla = MlaSpec(q_lora_rank=raw.int("q_lora_rank", default=None), kv_lora_rank=raw.int("kv_lora_rank"),
                  qk_nope_head_dim=raw.int("qk_nope_head_dim"), qk_rope_head_dim=raw.int("qk_rope_head_dim"),
                  v_head_dim=raw.int("v_head_dim"),
                  rope_interleave=v3 and raw.bool("rope_interleave", default=True))
    raw = raw.with_defaults({"head_dim": mla.qk_nope_head_dim + mla.qk_rope_head_dim})
    extra = ()
    if v3:
        extra = (BufferSpec(name="model.layers.{i}.mlp.gate.e_score_correction_bias", shape=(experts,),
                            dtype="activation", layers=moe.sparse_layers,
                            why="DeepSeek-V3's per-expert routing score correction"),)
    return llama_like(raw, family="deepseek_v3" if v3 else "deepseek", tied_default=False, moe=moe, mla=mla,
                       qkv_bias=raw.bool("attention_bias", default=False),
                       moe_layout=MoeLayout(shared="shared_experts"), rotary_dim=mla.qk_rope_head_dim,
                       extra_buffers=extra)


@adapter("deepseek_v2")
def _deepseek_v2(raw: RawConfig) -> Architecture:
    return _deepseek(raw, v3=False)


@adapter("deepseek_v3")
def _deepseek_v3(raw: RawConfig) -> Architecture:
    return _deepseek(raw, v3=True)


@adapter("gpt_oss")
def _gpt_oss(raw: RawConfig) -> Architecture:
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    window = read_window(raw)
    moe = _experts_in_every_layer(raw, layers, expert_bias=True, stored_per_expert=False, softmax_after_top_k=True)
    arch = llama_like(raw, family="gpt_oss", tied_default=False, qkv_bias=True, o_bias=True, moe=moe,
                       moe_layout=MoeLayout(router="router", router_bias=True, transposed=True), window=window,
                       layer_rule=lambda i: "sliding" if i % 2 == 0 else "full",
                       # transformers 5.17 raises for gpt-oss with sdpa (measured): eager or flash
                       attention=("eager", "flash_attention_2"))
    sinks = TensorSpec(name="model.layers.{i}.self_attn.sinks", shape=(arch.num_heads,), kind="other",
                       layers=tuple(range(layers)))
    return arch.model_copy(update={"tensors": (sinks, *arch.tensors), "attention_sinks": True})


@adapter("llama4_text")
def _llama4_text(raw: RawConfig) -> Architecture:
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    step = raw.int("interleave_moe_layer_step", default=1)
    listed = raw.list("moe_layers", default=None)
    sparse = tuple(listed) if listed is not None else tuple(range(step - 1, layers, step))
    if any(not isinstance(i, int) or not 0 <= i < layers for i in sparse):
        raise ConfigError(f"{raw.where}: moe_layers must list layer indices below {layers}.")
    width = raw.int("intermediate_size")
    moe = MoeSpec(num_experts=raw.int("num_local_experts", "num_experts"), top_k=raw.int("num_experts_per_tok"),
                  expert_intermediate=width, shared_intermediate=width, sparse_layers=sparse,
                  all_experts=True, stored_per_expert=False)
    # Llama4TextConfig: a layer without rope (every no_rope_layer_interval-th) attends to all
    # tokens; the others attend within chunks of attention_chunk_size
    interval = raw.int("no_rope_layer_interval", default=4)
    no_rope = raw.list("no_rope_layers", default=None) or [int((i + 1) % interval != 0) for i in range(layers)]
    if len(no_rope) < layers:
        raise ConfigError(f"{raw.where}: no_rope_layers must have one entry per layer ({layers}).")
    chunk = raw.int("attention_chunk_size", default=8192)
    return llama_like(raw, family="llama4", tied_default=False, moe=moe, mlp_module="feed_forward",
                       intermediate_keys=("intermediate_size_mlp",), window=chunk,
                       moe_layout=MoeLayout(router="router", transposed=True, shared="shared_expert"),
                       layer_rule=lambda i: "chunked" if no_rope[i] else "full")

