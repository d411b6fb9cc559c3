"""Adapters for state-space and hybrid families: Mamba, Mamba-2, Jamba, Falcon-H1 and
Granite-4.0-H (granitemoehybrid).

Each lists its parameters under transformers 5.17's names (the exactness test compares them
with transformers' own instantiation) and describes its recurrent mixer as a `RecurrentSpec`:
a conv1d state and a scan state per mixer layer instead of a growing KV cache. Layers without
attention are "none" in `layer_types`; Falcon-H1 runs attention and the mixer side by side in
every layer.
"""

from __future__ import annotations

import math

from ...config import MAX_LAYERS, RawConfig
from ...errors import ConfigError
from ..blocks import (
    Inventory,
    MoeLayout,
    attention_and_mixer_layers,
    attention_block,
    gated_mlp,
    layer_norms_and_head,
    moe_mlp,
    read_decoder_shape,
    read_layer_types,
    read_rotary_dim,
    read_tied,
    rope_buffers,
    torch_fallback_note,
    whole_model_arch,
)
from ..registry import adapter
from ..spec import ALL_ATTENTION, Architecture, BufferSpec, LayerKind, MoeSpec, RecurrentSpec


def _dt_rank(raw: RawConfig, key: str, hidden: int) -> int:
    value = raw.raw(key, default="auto")
    return math.ceil(hidden / 16) if value == "auto" else raw.int(key)


def _mamba_mixer(inv: Inventory, prefix: str, hidden: int, inner: int, state: int, rank: int,
                 kernel: int, conv_bias: bool, proj_bias: bool, layers: tuple[int, ...],
                 bc_norms: bool = False) -> None:
    """Mamba-1's mixer (MambaMixer, JambaMambaMixer)."""
    inv.per_layer(f"{prefix}.A_log", (inner, state), "other", layers=layers)
    inv.per_layer(f"{prefix}.D", (inner,), "other", layers=layers)
    inv.per_layer(f"{prefix}.conv1d.weight", (inner, 1, kernel), "other", layers=layers)
    if conv_bias:
        inv.per_layer(f"{prefix}.conv1d.bias", (inner,), "other", layers=layers)  # a conv's, not a Linear's
    inv.linear(f"{prefix}.in_proj", 2 * inner, hidden, proj_bias, layers=layers)
    inv.linear(f"{prefix}.x_proj", rank + 2 * state, inner, False, layers=layers)
    inv.linear(f"{prefix}.dt_proj", inner, rank, True, layers=layers)
    inv.linear(f"{prefix}.out_proj", hidden, inner, proj_bias, layers=layers)
    if bc_norms:  # Jamba normalizes dt, B and C
        inv.per_layer(f"{prefix}.dt_layernorm.weight", (rank,), "norm", layers=layers)
        inv.per_layer(f"{prefix}.b_layernorm.weight", (state,), "norm", layers=layers)
        inv.per_layer(f"{prefix}.c_layernorm.weight", (state,), "norm", layers=layers)


def _mamba2_mixer(inv: Inventory, prefix: str, hidden: int, spec: RecurrentSpec, conv_bias: bool,
                  proj_bias: bool, gated_norm: bool) -> None:
    """Mamba-2's mixer (Mamba2Mixer and its copies in Falcon-H1 and Granite-4.0-H)."""
    layers, heads = spec.layers, spec.heads
    inv.per_layer(f"{prefix}.dt_bias", (heads,), "other", layers=layers)
    inv.per_layer(f"{prefix}.A_log", (heads,), "other", layers=layers)
    inv.per_layer(f"{prefix}.D", (heads,), "other", layers=layers)
    inv.per_layer(f"{prefix}.conv1d.weight", (spec.conv_dim, 1, spec.conv_kernel), "other", layers=layers)
    if conv_bias:
        inv.per_layer(f"{prefix}.conv1d.bias", (spec.conv_dim,), "other", layers=layers)  # a conv's
    inv.linear(f"{prefix}.in_proj", spec.in_proj, hidden, proj_bias, layers=layers)
    if gated_norm:
        inv.per_layer(f"{prefix}.norm.weight", (spec.inner,), "norm", layers=layers)
    inv.linear(f"{prefix}.out_proj", hidden, spec.inner, proj_bias, layers=layers)


def _mamba2_spec(layers: tuple[int, ...], inner: int, heads: int, head_dim: int, groups: int,
                 state: int, kernel: int, chunk: int, residual_in_fp32: bool = False) -> RecurrentSpec:
    if heads * head_dim != inner:
        raise ConfigError(f"Mamba-2 heads x head_dim ({heads} x {head_dim}) must equal its inner width {inner}.")
    if heads % groups:
        raise ConfigError(f"Mamba-2: {heads} heads cannot share {groups} groups (not a divisor).")
    conv_dim = inner + 2 * groups * state
    return RecurrentSpec(kind="mamba2", layers=layers, inner=inner, state_size=state, heads=heads,
                         head_dim=head_dim, groups=groups, conv_kernel=kernel, conv_dim=conv_dim,
                         in_proj=inner + conv_dim + heads, chunk_size=chunk, residual_in_fp32=residual_in_fp32)


@adapter("mamba")
def _mamba(raw: RawConfig) -> Architecture:
    hidden = raw.int("hidden_size", "d_model")
    layers = raw.int("num_hidden_layers", "n_layer", maximum=MAX_LAYERS)
    vocab = raw.int("vocab_size")
    inner = raw.int("intermediate_size", default=None) or int(raw.float("expand", default=2) * hidden)
    state = raw.int("state_size", default=16)
    kernel = raw.int("conv_kernel", default=4)
    rank = _dt_rank(raw, "time_step_rank", hidden)
    everywhere = tuple(range(layers))
    inv = Inventory(layers)
    inv.one("backbone.embeddings.weight", (vocab, hidden), "embedding")
    inv.norm("backbone.layers.{i}.norm", hidden, False)
    _mamba_mixer(inv, "backbone.layers.{i}.mixer", hidden, inner, state, rank, kernel,
                 raw.bool("use_conv_bias", default=True), raw.bool("use_bias", default=False), everywhere)
    inv.norm("backbone.norm_f", hidden, False, per_layer=False)
    tied = read_tied(raw, True)
    inv.head("lm_head", vocab, hidden, tied)
    spec = RecurrentSpec(kind="mamba", layers=everywhere, inner=inner, state_size=state,
                         conv_kernel=kernel, conv_dim=inner, in_proj=2 * inner, dt_rank=rank, gate_copies=4,
                         residual_in_fp32=raw.bool("residual_in_fp32", default=True))
    return _recurrent_only(raw, hidden, layers, vocab, inner, tied, inv, spec)


@adapter("mamba2")
def _mamba2(raw: RawConfig) -> Architecture:
    hidden = raw.int("hidden_size")
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    vocab = raw.int("vocab_size")
    inner = int(raw.float("expand", default=2) * hidden)
    heads = raw.int("num_heads", default=128)
    everywhere = tuple(range(layers))
    spec = _mamba2_spec(everywhere, inner, heads, raw.int("head_dim", default=inner // heads),
                        raw.int("n_groups", default=8), raw.int("state_size", default=128),
                        raw.int("conv_kernel", default=4), raw.int("chunk_size", default=256),
                        residual_in_fp32=raw.bool("residual_in_fp32", default=True))
    inv = Inventory(layers)
    inv.one("backbone.embeddings.weight", (vocab, hidden), "embedding")
    inv.norm("backbone.layers.{i}.norm", hidden, False)
    _mamba2_mixer(inv, "backbone.layers.{i}.mixer", hidden, spec, raw.bool("use_conv_bias", default=True),
                  raw.bool("use_bias", default=False), gated_norm=True)
    inv.norm("backbone.norm_f", hidden, False, per_layer=False)
    tied = read_tied(raw, False)
    inv.head("lm_head", vocab, hidden, tied)
    return _recurrent_only(raw, hidden, layers, vocab, inner, tied, inv, spec)


def _recurrent_only(raw: RawConfig, hidden: int, layers: int, vocab: int, inner: int,
                    tied: bool, inv: Inventory, spec: RecurrentSpec) -> Architecture:
    return whole_model_arch(
        raw, inv, family="mamba", hidden_size=hidden, num_layers=layers,
        vocab_size=vocab, num_heads=1, num_kv_heads=1, head_dim=1, intermediate_size=inner,
        rotary_dim=0, positions="none", max_positions=None, layer_types=("none",) * layers,
        tie_word_embeddings=tied, attention_implementations=("eager",), recurrent=spec, mlp_free=True,
        notes=(torch_fallback_note("Mamba" if spec.kind == "mamba" else "Mamba-2"),),
    )


@adapter("jamba")
def _jamba(raw: RawConfig) -> Architecture:
    shape = read_decoder_shape(raw)
    hidden, layers = shape.hidden, shape.layers
    width = raw.int("intermediate_size")
    attn_period = raw.int("attn_layer_period", default=8)
    attn_offset = raw.int("attn_layer_offset", default=4, minimum=0)
    exp_period = raw.int("expert_layer_period", default=2)
    exp_offset = raw.int("expert_layer_offset", default=1, minimum=0)
    experts = raw.int("num_experts", default=16)
    kinds: tuple[LayerKind, ...] = tuple("full" if i % attn_period == attn_offset else "none" for i in range(layers))
    attention_layers, mamba_layers = attention_and_mixer_layers(kinds)
    sparse = tuple(i for i in range(layers) if experts > 1 and i % exp_period == exp_offset)
    dense = tuple(i for i in range(layers) if i not in sparse)
    inner = int(raw.float("mamba_expand", default=2) * hidden)
    state, kernel = raw.int("mamba_d_state", default=16), raw.int("mamba_d_conv", default=4)
    rank = _dt_rank(raw, "mamba_dt_rank", hidden)
    inv = Inventory(layers)
    inv.one("model.embed_tokens.weight", (shape.vocab, hidden), "embedding")
    _mamba_mixer(inv, "model.layers.{i}.mamba", hidden, inner, state, rank, kernel,
                 raw.bool("mamba_conv_bias", default=True), raw.bool("mamba_proj_bias", default=False),
                 mamba_layers, bc_norms=True)
    attention_block(inv, "model.layers.{i}.self_attn", shape, False, attention_layers)
    gated_mlp(inv, "model.layers.{i}.feed_forward", hidden, width, False, dense)
    moe = None
    if sparse:
        moe = MoeSpec(num_experts=experts, top_k=raw.int("num_experts_per_tok", default=2),
                      expert_intermediate=width, sparse_layers=sparse)
        moe_mlp(inv, "model.layers.{i}.feed_forward", moe, MoeLayout(router="router"), hidden)
    tied = layer_norms_and_head(raw, inv, shape, ("input_layernorm", "pre_ff_layernorm"), "model.final_layernorm")
    spec = RecurrentSpec(kind="mamba", layers=mamba_layers, inner=inner, state_size=state,
                         conv_kernel=kernel, conv_dim=inner, in_proj=2 * inner, dt_rank=rank, gate_copies=3)
    return whole_model_arch(
        raw, inv, **shape.arch_fields(), family="hybrid", intermediate_size=width, rotary_dim=0, positions="none",
        max_positions=None, layer_types=kinds, tie_word_embeddings=tied, attention_implementations=ALL_ATTENTION,
        moe=moe, recurrent=spec, notes=(torch_fallback_note("Jamba's Mamba"),),
    )


@adapter("falcon_h1")
def _falcon_h1(raw: RawConfig) -> Architecture:
    shape = read_decoder_shape(raw)
    hidden, layers = shape.hidden, shape.layers
    width = raw.int("intermediate_size")
    everywhere = tuple(range(layers))
    inner = raw.int("mamba_d_ssm", default=None) or int(raw.float("mamba_expand", default=2) * hidden)
    mamba_heads = raw.int("mamba_n_heads", default=128)
    d_head = raw.raw("mamba_d_head", default="auto")
    mamba_head_dim = inner // mamba_heads if d_head == "auto" else raw.int("mamba_d_head")
    spec = _mamba2_spec(everywhere, inner, mamba_heads, mamba_head_dim, raw.int("mamba_n_groups", default=1),
                        raw.int("mamba_d_state", default=256), raw.int("mamba_d_conv", default=4),
                        raw.int("mamba_chunk_size", default=256))
    inv = Inventory(layers)
    inv.one("model.embed_tokens.weight", (shape.vocab, hidden), "embedding")
    gated_mlp(inv, "model.layers.{i}.feed_forward", hidden, width, raw.bool("mlp_bias", default=False), everywhere)
    _mamba2_mixer(inv, "model.layers.{i}.mamba", hidden, spec, raw.bool("mamba_conv_bias", default=True),
                  raw.bool("projectors_bias", "mamba_proj_bias", default=False),
                  gated_norm=raw.bool("mamba_rms_norm", default=False))
    attention_block(inv, "model.layers.{i}.self_attn", shape, raw.bool("attention_bias", default=False), everywhere)
    tied = layer_norms_and_head(raw, inv, shape, ("input_layernorm", "pre_ff_layernorm"), "model.final_layernorm")
    rotary = read_rotary_dim(raw, shape.head_dim)
    mup = BufferSpec(name="model.layers.{i}.mamba.mup_vector", shape=(1, 1, spec.in_proj), dtype="activation",
                     layers=everywhere, why="Falcon-H1's muP multipliers of the mixer's input projection")
    return whole_model_arch(
        raw, inv, **shape.arch_fields(), family="hybrid", intermediate_size=width, rotary_dim=rotary,
        positions="rope", max_positions=None, tie_word_embeddings=tied, attention_implementations=ALL_ATTENTION,
        buffers=(mup, *rope_buffers("model.", rotary)), recurrent=spec,
        notes=(torch_fallback_note("Falcon-H1's Mamba-2 (beside attention in every layer)"),),
    )


@adapter("granitemoehybrid")
def _granite_hybrid(raw: RawConfig) -> Architecture:
    shape = read_decoder_shape(raw)
    hidden, layers = shape.hidden, shape.layers
    names = raw.list("layer_types", "layers_block_type", default=None) or ["mamba"] * layers
    kinds = read_layer_types(RawConfig({"layer_types": names}, raw.where), layers, lambda i: "none")
    attention_layers, mamba_layers = attention_and_mixer_layers(kinds)
    everywhere = tuple(range(layers))
    inner = int(raw.float("mamba_expand", default=2) * hidden)
    mamba_heads = raw.int("mamba_n_heads", default=128)
    spec = _mamba2_spec(mamba_layers, inner, mamba_heads, raw.int("mamba_d_head", default=inner // mamba_heads),
                        raw.int("mamba_n_groups", default=1), raw.int("mamba_d_state", default=256),
                        raw.int("mamba_d_conv", default=4), raw.int("mamba_chunk_size", default=256))
    experts = raw.int("num_local_experts", default=8, minimum=0)
    shared = raw.int("shared_intermediate_size", default=1024, minimum=0)
    width = raw.int("intermediate_size")
    inv = Inventory(layers)
    inv.one("model.embed_tokens.weight", (shape.vocab, hidden), "embedding")
    inv.norm("model.layers.{i}.input_layernorm", hidden, False)
    inv.norm("model.layers.{i}.post_attention_layernorm", hidden, False)
    moe = None
    if experts:
        moe = MoeSpec(num_experts=experts, top_k=raw.int("num_experts_per_tok", default=2),
                      expert_intermediate=width, shared_intermediate=shared, sparse_layers=everywhere,
                      stored_per_expert=False)  # GraniteMoeParallelExperts: one 3-D tensor in the checkpoint
        moe_mlp(inv, "model.layers.{i}.block_sparse_moe", moe, MoeLayout(router="router"), hidden)
    inv.linear("model.layers.{i}.shared_mlp.input_linear", 2 * shared, hidden, False)
    inv.linear("model.layers.{i}.shared_mlp.output_linear", hidden, shared, False)
    _mamba2_mixer(inv, "model.layers.{i}.mamba", hidden, spec, raw.bool("mamba_conv_bias", default=True),
                  raw.bool("mamba_proj_bias", default=False), gated_norm=True)
    attention_block(inv, "model.layers.{i}.self_attn", shape, raw.bool("attention_bias", default=False),
                    attention_layers)
    tied = layer_norms_and_head(raw, inv, shape, (), "model.norm")
    rope = raw.str("position_embedding_type", default=None) == "rope"
    return whole_model_arch(
        raw, inv, **shape.arch_fields(), family="hybrid", intermediate_size=shared if not experts else width,
        rotary_dim=shape.head_dim if rope else 0, positions="rope" if rope else "none", max_positions=None,
        layer_types=kinds, tie_word_embeddings=tied, attention_implementations=ALL_ATTENTION,
        buffers=rope_buffers("model.", shape.head_dim) if rope else (), moe=moe, recurrent=spec,
        notes=(torch_fallback_note("Granite-4.0-H's Mamba-2"),),
    )
