"""GPT-2-shaped families and others with their own module names: GPT-2, GPT-BigCode, OPT,
Falcon, BLOOM, GPT-NeoX, GPT-J and MPT."""

from __future__ import annotations

from ...config import RawConfig
from ...errors import ConfigError, UnsupportedModelError
from ..blocks import Inventory, read_head_shape, read_rotary_dim, read_tied, rope_buffers, whole_model_arch
from ..registry import adapter
from ..spec import ALL_ATTENTION, Architecture, BufferSpec

GPT2_KEYS = (("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers"), ("n_head", "num_attention_heads"))


def _learned_positions(positions: int) -> dict:
    """A learned position table of `positions` rows and no rotary embedding: past it is an
    index out of range."""
    return {"rotary_dim": 0, "positions": "learned", "max_positions": positions}


@adapter("gpt2", "gpt_bigcode")
def _gpt2(raw: RawConfig) -> Architecture:
    """GPT-2's module names; GPT-BigCode has nn.Linear where GPT-2 has Conv1D, one key/value
    head when multi_query, and a causal-mask buffer."""
    bigcode = raw.str("model_type") == "gpt_bigcode"
    shape = read_head_shape(raw, *GPT2_KEYS)
    if bigcode and raw.bool("multi_query", default=True):
        shape = shape._replace(kv_heads=1)
    hidden, vocab = shape.hidden, shape.vocab
    positions = raw.int("n_positions", "max_position_embeddings")
    inner = raw.int("n_inner", default=None) or 4 * hidden
    tied = read_tied(raw, True)
    inv = Inventory(shape.layers)
    inv.one("transformer.wte.weight", (vocab, hidden), "embedding")
    inv.one("transformer.wpe.weight", (positions, hidden), "position_embedding")
    h, conv1d = "transformer.h.{i}", not bigcode
    inv.norm(f"{h}.ln_1", hidden, True)
    inv.linear(f"{h}.attn.c_attn", hidden + 2 * shape.kv_heads * shape.head_dim, hidden, True, conv1d=conv1d)
    inv.linear(f"{h}.attn.c_proj", hidden, hidden, True, conv1d=conv1d)
    inv.norm(f"{h}.ln_2", hidden, True)
    inv.linear(f"{h}.mlp.c_fc", inner, hidden, True, conv1d=conv1d)
    inv.linear(f"{h}.mlp.c_proj", hidden, inner, True, conv1d=conv1d)
    inv.norm("transformer.ln_f", hidden, True, per_layer=False)
    inv.head("lm_head", vocab, hidden, tied)
    mask = BufferSpec(name="transformer.bias", shape=(positions, positions), dtype="bool",
                      why="GPT-BigCode's causal-mask table, n_positions^2 booleans")
    return whole_model_arch(
        raw, inv, **shape.arch_fields(), family="gpt_bigcode" if bigcode else "gpt2", intermediate_size=inner,
        **_learned_positions(positions), tie_word_embeddings=tied, attention_implementations=ALL_ATTENTION,
        buffers=(mask,) if bigcode else (),
        # GPT2Config's default, GPTBigCodeConfig's (octocoder's config names none)
        activation=raw.str("activation_function", default="gelu_pytorch_tanh" if bigcode else "gelu_new"))


@adapter("opt")
def _opt(raw: RawConfig) -> Architecture:
    shape = read_head_shape(raw)
    hidden, vocab = shape.hidden, shape.vocab
    ffn = raw.int("ffn_dim")
    positions = raw.int("max_position_embeddings")
    proj = raw.int("word_embed_proj_dim", default=hidden)
    bias = raw.bool("enable_bias", default=True)
    affine = raw.bool("layer_norm_elementwise_affine", default=True)
    before = raw.bool("do_layer_norm_before", default=True)
    final_norm = before and not raw.bool("_remove_final_layer_norm", default=False)
    tied = read_tied(raw, True)
    inv = Inventory(shape.layers)
    d = "model.decoder"
    inv.one(f"{d}.embed_tokens.weight", (vocab, proj), "embedding")
    # OPT's learned positions are offset by 2 rows
    inv.one(f"{d}.embed_positions.weight", (positions + 2, hidden), "position_embedding")
    if final_norm and affine:
        inv.norm(f"{d}.final_layer_norm", hidden, True, per_layer=False)
    if proj != hidden:
        inv.one(f"{d}.project_out.weight", (proj, hidden), "linear")
        inv.one(f"{d}.project_in.weight", (hidden, proj), "linear")
    lay = f"{d}.layers.{{i}}"
    for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
        inv.linear(f"{lay}.self_attn.{name}", hidden, hidden, bias)
    if affine:
        inv.norm(f"{lay}.self_attn_layer_norm", hidden, True)
    inv.linear(f"{lay}.fc1", ffn, hidden, bias)
    inv.linear(f"{lay}.fc2", hidden, ffn, bias)
    if affine:
        inv.norm(f"{lay}.final_layer_norm", hidden, True)
    inv.head("lm_head", vocab, proj, tied)
    return whole_model_arch(
        raw, inv, **shape.arch_fields(), family="opt", intermediate_size=ffn, **_learned_positions(positions),
        tie_word_embeddings=tied, attention_implementations=ALL_ATTENTION,
        activation=raw.str("activation_function", default="relu"))  # OPTConfig's default


@adapter("falcon")
def _falcon(raw: RawConfig) -> Architecture:
    shape = read_head_shape(raw)
    hidden, heads, head_dim = shape.hidden, shape.heads, shape.head_dim
    new_arch = raw.bool("new_decoder_architecture", default=False)
    multi_query = raw.bool("multi_query", default=True)
    # transformers' Falcon: the new decoder layout uses num_kv_heads; the old one uses ONE kv
    # head when multi_query, whatever num_kv_heads says (re-saved configs carry both)
    if new_arch:
        kv_heads = raw.int("num_kv_heads", default=heads)
    else:
        kv_heads = 1 if multi_query else heads
    if raw.bool("alibi", default=False):
        raise UnsupportedModelError(f"{raw.where}: falcon with alibi is not modelled yet.")
    bias = raw.bool("bias", default=False)
    ffn = raw.int("ffn_hidden_size", default=None) or 4 * hidden
    parallel = raw.bool("parallel_attn", default=True)
    tied = read_tied(raw, True)
    inv = Inventory(shape.layers)
    inv.one("transformer.word_embeddings.weight", (shape.vocab, hidden), "embedding")
    h = "transformer.h.{i}"
    qkv_out = (heads + 2 * kv_heads) * head_dim
    inv.linear(f"{h}.self_attention.query_key_value", qkv_out, hidden, bias)
    inv.linear(f"{h}.self_attention.dense", hidden, hidden, bias)
    inv.linear(f"{h}.mlp.dense_h_to_4h", ffn, hidden, bias)
    inv.linear(f"{h}.mlp.dense_4h_to_h", hidden, ffn, bias)
    if new_arch and raw.int("num_ln_in_parallel_attn", default=2) == 2:
        inv.norm(f"{h}.ln_attn", hidden, True)
        inv.norm(f"{h}.ln_mlp", hidden, True)
    else:
        inv.norm(f"{h}.input_layernorm", hidden, True)
        if not new_arch and not parallel:
            inv.norm(f"{h}.post_attention_layernorm", hidden, True)
    inv.norm("transformer.ln_f", hidden, True, per_layer=False)
    inv.head("lm_head", shape.vocab, hidden, tied)
    family = "falcon_mqa" if kv_heads != heads and not new_arch else "falcon"
    return whole_model_arch(
        raw, inv, **shape._replace(kv_heads=kv_heads).arch_fields(), family=family,
        # the new decoder layout broadcasts K and V to every query head before caching them
        # (FalconAttention: num_kv_heads = num_heads if new_decoder_architecture)
        cache_heads=heads if new_arch else None,
        intermediate_size=ffn, rotary_dim=head_dim, positions="rope", max_positions=None,
        tie_word_embeddings=tied, attention_implementations=ALL_ATTENTION,
        buffers=tuple(rope_buffers("transformer.", head_dim)),
    )


@adapter("bloom")
def _bloom(raw: RawConfig) -> Architecture:
    shape = read_head_shape(raw, ("hidden_size", "n_embed"), *GPT2_KEYS[1:])
    hidden = shape.hidden
    tied = read_tied(raw, True)
    inv = Inventory(shape.layers)
    inv.one("transformer.word_embeddings.weight", (shape.vocab, hidden), "embedding")
    inv.norm("transformer.word_embeddings_layernorm", hidden, True, per_layer=False)
    h = "transformer.h.{i}"
    inv.norm(f"{h}.input_layernorm", hidden, True)
    inv.linear(f"{h}.self_attention.query_key_value", 3 * hidden, hidden, True)
    inv.linear(f"{h}.self_attention.dense", hidden, hidden, True)
    inv.norm(f"{h}.post_attention_layernorm", hidden, True)
    inv.linear(f"{h}.mlp.dense_h_to_4h", 4 * hidden, hidden, True)
    inv.linear(f"{h}.mlp.dense_4h_to_h", hidden, 4 * hidden, True)
    inv.norm("transformer.ln_f", hidden, True, per_layer=False)
    inv.head("lm_head", shape.vocab, hidden, tied)
    return whole_model_arch(
        raw, inv, **shape.arch_fields(), family="bloom", intermediate_size=4 * hidden, rotary_dim=0,
        positions="alibi", max_positions=None, tie_word_embeddings=tied,
        # transformers 5.17 raises for bloom with sdpa: only its own (eager) attention exists
        attention_implementations=("eager",),
    )


@adapter("gpt_neox")
def _gpt_neox(raw: RawConfig) -> Architecture:
    shape = read_head_shape(raw)
    hidden = shape.hidden
    inner = raw.int("intermediate_size")
    bias = raw.bool("attention_bias", default=True)
    # parallel residual (attention and MLP read the same input) or GPT-2-like sequential
    family = "gpt_neox" if raw.bool("use_parallel_residual", default=True) else "gpt_neox_sequential"
    rotary = read_rotary_dim(raw, shape.head_dim, ("rotary_pct", "partial_rotary_factor"))
    tied = read_tied(raw, False)
    inv = Inventory(shape.layers)
    inv.one("gpt_neox.embed_in.weight", (shape.vocab, hidden), "embedding")
    lay = "gpt_neox.layers.{i}"
    inv.norm(f"{lay}.input_layernorm", hidden, True)
    inv.norm(f"{lay}.post_attention_layernorm", hidden, True)
    inv.linear(f"{lay}.attention.query_key_value", 3 * hidden, hidden, bias)
    inv.linear(f"{lay}.attention.dense", hidden, hidden, bias)
    inv.linear(f"{lay}.mlp.dense_h_to_4h", inner, hidden, True)
    inv.linear(f"{lay}.mlp.dense_4h_to_h", hidden, inner, True)
    inv.norm("gpt_neox.final_layer_norm", hidden, True, per_layer=False)
    inv.head("lm_head", shape.vocab, hidden, tied)
    return whole_model_arch(
        raw, inv, **shape.arch_fields(), family=family, intermediate_size=inner, rotary_dim=rotary,
        positions="rope", max_positions=None, tie_word_embeddings=tied, attention_implementations=ALL_ATTENTION,
        buffers=tuple(rope_buffers("gpt_neox.", rotary)),
    )


@adapter("gptj")
def _gptj(raw: RawConfig) -> Architecture:
    shape = read_head_shape(raw, *GPT2_KEYS)
    hidden = shape.hidden
    positions = raw.int("n_positions", "max_position_embeddings")
    inner = raw.int("n_inner", default=None) or 4 * hidden
    rotary = raw.int("rotary_dim", default=None) or shape.head_dim
    tied = read_tied(raw, False)
    inv = Inventory(shape.layers)
    inv.one("transformer.wte.weight", (shape.vocab, hidden), "embedding")
    h = "transformer.h.{i}"
    inv.norm(f"{h}.ln_1", hidden, True)
    for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
        inv.linear(f"{h}.attn.{name}", hidden, hidden, False)
    inv.linear(f"{h}.mlp.fc_in", inner, hidden, True)
    inv.linear(f"{h}.mlp.fc_out", hidden, inner, True)
    inv.norm("transformer.ln_f", hidden, True, per_layer=False)
    inv.head("lm_head", shape.vocab, hidden, tied, bias=True)
    table = BufferSpec(name="transformer.h.{i}.attn.embed_positions", shape=(positions, rotary),
                       dtype="fp32", layers=tuple(range(shape.layers)),
                       why="GPT-J's sin/cos table, n_positions x rotary_dim fp32, one per layer")
    return whole_model_arch(
        raw, inv, **shape.arch_fields(), family="gptj", intermediate_size=inner, rotary_dim=rotary,
        positions="rope",
        # positions index the sin/cos table: past it is an out-of-range index on the GPU
        max_positions=positions, tie_word_embeddings=tied,
        # transformers 5.17 raises for GPT-J with sdpa
        attention_implementations=("eager", "flash_attention_2"), buffers=(table,),
        activation=raw.str("activation_function", default="gelu_new"),  # GPTJConfig's default
    )


@adapter("mpt")
def _mpt(raw: RawConfig) -> Architecture:
    shape = read_head_shape(raw, ("d_model", "hidden_size"), ("n_layers", "num_hidden_layers"),
                            ("n_heads", "num_attention_heads"))
    hidden = shape.hidden
    ratio = raw.int("expansion_ratio", default=4)
    no_bias = raw.bool("no_bias", default=True)
    attn_config = raw.raw("attn_config", default={}) or {}
    if not isinstance(attn_config, dict):
        raise ConfigError(f"{raw.where}: attn_config must be an object.")
    if attn_config.get("alibi", True) is not True:
        raise UnsupportedModelError(f"{raw.where}: mpt without alibi is not modelled.")
    tied = read_tied(raw, True)
    inv = Inventory(shape.layers)
    inv.one("transformer.wte.weight", (shape.vocab, hidden), "embedding")
    b = "transformer.blocks.{i}"
    inv.norm(f"{b}.norm_1", hidden, not no_bias)
    inv.linear(f"{b}.attn.Wqkv", 3 * hidden, hidden, not no_bias)
    inv.linear(f"{b}.attn.out_proj", hidden, hidden, not no_bias)
    inv.norm(f"{b}.norm_2", hidden, not no_bias)
    inv.linear(f"{b}.ffn.up_proj", ratio * hidden, hidden, not no_bias)
    inv.linear(f"{b}.ffn.down_proj", hidden, ratio * hidden, not no_bias)
    inv.norm("transformer.norm_f", hidden, not no_bias, per_layer=False)
    inv.head("lm_head", shape.vocab, hidden, tied)
    return whole_model_arch(
        raw, inv, **shape.arch_fields(), family="mpt", intermediate_size=ratio * hidden, rotary_dim=0,
        # MptModel builds its ALiBi bias for config.max_seq_len positions and slices it per step: a longer
        # sequence is a shape error (the H200 edge search of MPT-7B at 2048 + 16 tokens, edge-h200-18)
        positions="alibi", max_positions=raw.int("max_seq_len", default=2048), tie_word_embeddings=tied,
        attention_implementations=("eager",),
    )
