"""Qwen3-Next (qwen3_next): three gated-DeltaNet linear-attention layers to every full
attention layer, and a mixture of 512 experts with a gated shared expert.

The gated DeltaNet is a recurrent mixer of its own kind (RecurrentSpec kind "gated_delta"):
a conv1d window over queries, keys and values and an fp32 state of value_heads x key_dim x
value_dim per layer instead of a KV cache. Its attention layers gate their output per head
(q_proj twice as wide) and normalize queries and keys per head.
"""

from __future__ import annotations

from ...config import RawConfig
from ...errors import ConfigError
from .. import blocks  # the shared builders, named as blocks.* so a reader sees which they are
from ..registry import adapter
from ..spec import ALL_ATTENTION, Architecture, MoeSpec, RecurrentSpec


@adapter("qwen3_next")
def _qwen3_next(raw: RawConfig) -> Architecture:
    shape = blocks.read_decoder_shape(raw)
    hidden, layers = shape.hidden, shape.layers
    interval = raw.int("full_attention_interval", default=4)
    kinds = blocks.read_layer_types(raw, layers, lambda i: "full" if (i + 1) % interval == 0 else "none")
    attention_layers, linear_layers = blocks.attention_and_mixer_layers(kinds)
    key_heads, key_dim = raw.int("linear_num_key_heads", default=16), raw.int("linear_key_head_dim", default=128)
    value_heads = raw.int("linear_num_value_heads", default=32)
    value_dim = raw.int("linear_value_head_dim", default=128)
    if value_heads % key_heads:
        raise ConfigError(f"{raw.where}: {value_heads} value heads cannot share {key_heads} key heads.")
    kernel = raw.int("linear_conv_kernel_dim", default=4)
    conv_dim = 2 * key_heads * key_dim + value_heads * value_dim
    spec = RecurrentSpec(kind="gated_delta", layers=linear_layers, inner=value_heads * value_dim,
                         state_size=key_dim, heads=value_heads, head_dim=value_dim, groups=key_heads,
                         conv_kernel=kernel, conv_dim=conv_dim,
                         in_proj=2 * key_heads * key_dim + 2 * value_heads * value_dim, chunk_size=64)
    sparse = blocks.qwen_sparse_layers(raw, layers) if raw.int("num_experts", default=512, minimum=0) else ()
    dense = tuple(i for i in range(layers) if i not in sparse)
    inv = blocks.Inventory(layers)
    inv.one("model.embed_tokens.weight", (shape.vocab, hidden), "embedding")
    la = "model.layers.{i}.linear_attn"
    inv.per_layer(f"{la}.dt_bias", (value_heads,), "other", layers=linear_layers)
    inv.per_layer(f"{la}.A_log", (value_heads,), "other", layers=linear_layers)
    inv.per_layer(f"{la}.conv1d.weight", (conv_dim, 1, kernel), "other", layers=linear_layers)
    inv.linear(f"{la}.in_proj_qkvz", spec.in_proj, hidden, False, layers=linear_layers)
    inv.linear(f"{la}.in_proj_ba", 2 * value_heads, hidden, False, layers=linear_layers)
    inv.per_layer(f"{la}.norm.weight", (value_dim,), "norm", layers=linear_layers)
    inv.linear(f"{la}.out_proj", hidden, value_heads * value_dim, False, layers=linear_layers)
    moe = None
    if sparse:
        moe = MoeSpec(num_experts=raw.int("num_experts"), top_k=raw.int("num_experts_per_tok", default=10),
                      expert_intermediate=raw.int("moe_intermediate_size", default=512),
                      shared_intermediate=raw.int("shared_expert_intermediate_size", default=512, minimum=0),
                      sparse_layers=sparse, shared_first=True,
                      normalized_top_k=raw.bool("norm_topk_prob", default=True))
        layout = blocks.MoeLayout(shared="shared_expert", shared_gate=True)
        blocks.moe_mlp(inv, "model.layers.{i}.mlp", moe, layout, hidden)
    blocks.gated_mlp(inv, "model.layers.{i}.mlp", hidden, raw.int("intermediate_size"), False, dense)
    inv.norm("model.layers.{i}.input_layernorm", hidden, False)
    inv.norm("model.layers.{i}.post_attention_layernorm", hidden, False)
    blocks.attention_block(inv, "model.layers.{i}.self_attn", shape, raw.bool("attention_bias", default=False),
                           attention_layers, gated_query=True)
    inv.per_layer("model.layers.{i}.self_attn.q_norm.weight", (shape.head_dim,), "norm", layers=attention_layers)
    inv.per_layer("model.layers.{i}.self_attn.k_norm.weight", (shape.head_dim,), "norm", layers=attention_layers)
    tied = blocks.layer_norms_and_head(raw, inv, shape, (), "model.norm")
    rotary = blocks.read_rotary_dim(raw, shape.head_dim)
    notes = [blocks.torch_fallback_note("Qwen3-Next's gated DeltaNet")]
    if raw.int("num_nextn_predict_layers", "mtp_num_hidden_layers", default=0, minimum=0):
        notes.append("the checkpoint's multi-token-prediction layers are not loaded by transformers "
                     "and are not counted.")
    return blocks.whole_model_arch(
        raw, inv, **shape.arch_fields(), family="hybrid", intermediate_size=raw.int("intermediate_size"),
        rotary_dim=rotary, positions="rope", max_positions=None, layer_types=kinds, tie_word_embeddings=tied,
        attention_implementations=ALL_ATTENTION, buffers=blocks.rope_buffers("model.", rotary), moe=moe,
        recurrent=spec, notes=tuple(notes),
    )
