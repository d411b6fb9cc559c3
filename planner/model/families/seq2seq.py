"""Adapters for encoder-decoder families: T5 (and mT5) and BART.

Parameters are listed under transformers 5.17's names. Two facts of that version matter for
memory: T5Config forces tie_word_embeddings to True (configuration_t5.py: "we tie weights
always"), so Flan-T5's separately stored lm_head is not a separate tensor once loaded; BART
keeps a final_logits_bias buffer of vocab size. The decoder is what `num_layers`,
`layer_types` and the KV cache describe; the encoder is an `EncoderSpec`.
"""

from __future__ import annotations

from ...config import MAX_LAYERS, RawConfig
from ...errors import ConfigError
from ..blocks import Inventory, read_tied, whole_model_arch
from ..registry import adapter
from ..spec import ALL_ATTENTION, Architecture, BufferSpec, EncoderSpec


def _t5_stack(inv: Inventory, stack: str, layers: int, d_model: int, inner: int, ffn: int,
              heads: int, buckets: int, gated: bool, decoder: bool) -> None:
    for i in range(layers):
        block = f"{stack}.block.{i}.layer"
        attentions = ["0.SelfAttention", "1.EncDecAttention"] if decoder else ["0.SelfAttention"]
        for attention in attentions:
            for proj in ("q", "k", "v"):
                inv.one(f"{block}.{attention}.{proj}.weight", (inner, d_model), "linear")
            inv.one(f"{block}.{attention}.o.weight", (d_model, inner), "linear")
        if i == 0:  # only the first block owns the relative position bias table
            inv.one(f"{block}.0.SelfAttention.relative_attention_bias.weight", (buckets, heads), "position_embedding")
        ff = 2 if decoder else 1
        for j in range(ff + 1):
            inv.one(f"{block}.{j}.layer_norm.weight", (d_model,), "norm")
        dense = f"{block}.{ff}.DenseReluDense"
        if gated:
            inv.one(f"{dense}.wi_0.weight", (ffn, d_model), "linear")
            inv.one(f"{dense}.wi_1.weight", (ffn, d_model), "linear")
        else:
            inv.one(f"{dense}.wi.weight", (ffn, d_model), "linear")
        inv.one(f"{dense}.wo.weight", (d_model, ffn), "linear")
    inv.one(f"{stack}.final_layer_norm.weight", (d_model,), "norm")


@adapter("t5", "mt5")
def _t5(raw: RawConfig) -> Architecture:
    d_model = raw.int("d_model")
    d_kv = raw.int("d_kv")
    heads = raw.int("num_heads")
    ffn = raw.int("d_ff")
    vocab = raw.int("vocab_size")
    encoder_layers = raw.int("num_layers", maximum=MAX_LAYERS)
    decoder_layers = raw.int("num_decoder_layers", default=encoder_layers, maximum=MAX_LAYERS)
    buckets = raw.int("relative_attention_num_buckets", default=32)
    projection = raw.str("feed_forward_proj", default="relu")
    gated = projection.startswith("gated-")
    if projection.removeprefix("gated-") not in ("relu", "gelu", "gelu_new", "silu"):
        raise ConfigError(f"{raw.where}: unknown feed_forward_proj {projection!r}.")
    inner = heads * d_kv
    inv = Inventory(0)
    inv.one("shared.weight", (vocab, d_model), "embedding")
    _t5_stack(inv, "encoder", encoder_layers, d_model, inner, ffn, heads, buckets, gated, decoder=False)
    _t5_stack(inv, "decoder", decoder_layers, d_model, inner, ffn, heads, buckets, gated, decoder=True)
    # transformers 5.17's T5Config sets tie_word_embeddings = True whatever the file says
    encoder = EncoderSpec(layers=encoder_layers, ffn=ffn, gated_ffn=gated, relative_bias=True,
                          forced_eos=raw.raw("forced_eos_token_id", default=None) is not None,
                          scaled_decoder_output=raw.bool("tie_word_embeddings", default=True) is not False)
    notes = ()
    if raw.bool("tie_word_embeddings", default=True) is False:
        notes = ("the config unties lm_head, but transformers 5.17's T5Config always ties it to the shared "
                 "embedding: the checkpoint's separate lm_head is not a separate tensor in memory.",)
    return whole_model_arch(
        raw, inv, family="t5", hidden_size=d_model, num_layers=decoder_layers,
        vocab_size=vocab, num_heads=heads, num_kv_heads=heads, head_dim=d_kv, intermediate_size=ffn,
        rotary_dim=0, positions="none", max_positions=None, tie_word_embeddings=True,
        attention_implementations=("sdpa", "eager"), encoder=encoder, notes=notes,
        # T5Config's dense_act_fn: "gated-gelu" means gelu_new (configuration_t5.py, 5.17)
        activation="gelu_new" if projection == "gated-gelu" else projection.removeprefix("gated-"),
    )


def _bart_stack(inv: Inventory, stack: str, layers: int, d_model: int, ffn: int, positions: int,
                decoder: bool) -> None:
    inv.one(f"model.{stack}.embed_positions.weight", (positions + 2, d_model), "position_embedding")
    for i in range(layers):
        layer = f"model.{stack}.layers.{i}"
        attentions = ["self_attn", "encoder_attn"] if decoder else ["self_attn"]
        for attention in attentions:
            for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
                inv.one(f"{layer}.{attention}.{proj}.weight", (d_model, d_model), "linear")
                inv.one(f"{layer}.{attention}.{proj}.bias", (d_model,), "bias")
            inv.norm(f"{layer}.{attention}_layer_norm", d_model, True, per_layer=False)
        inv.one(f"{layer}.fc1.weight", (ffn, d_model), "linear")
        inv.one(f"{layer}.fc1.bias", (ffn,), "bias")
        inv.one(f"{layer}.fc2.weight", (d_model, ffn), "linear")
        inv.one(f"{layer}.fc2.bias", (d_model,), "bias")
        inv.norm(f"{layer}.final_layer_norm", d_model, True, per_layer=False)
    inv.norm(f"model.{stack}.layernorm_embedding", d_model, True, per_layer=False)


@adapter("bart")
def _bart(raw: RawConfig) -> Architecture:
    d_model = raw.int("d_model")
    vocab = raw.int("vocab_size")
    positions = raw.int("max_position_embeddings", default=1024)
    encoder_layers = raw.int("encoder_layers", maximum=MAX_LAYERS)
    decoder_layers = raw.int("decoder_layers", maximum=MAX_LAYERS)
    heads = raw.int("decoder_attention_heads")
    if raw.int("encoder_attention_heads") != heads or raw.int("encoder_ffn_dim") != raw.int("decoder_ffn_dim"):
        raise ConfigError(f"{raw.where}: encoder and decoder of different widths are not modelled.")
    if d_model % heads:
        raise ConfigError(f"{raw.where}: d_model {d_model} is not a multiple of {heads} heads.")
    ffn = raw.int("decoder_ffn_dim")
    inv = Inventory(0)
    inv.one("model.shared.weight", (vocab, d_model), "embedding")
    _bart_stack(inv, "encoder", encoder_layers, d_model, ffn, positions, decoder=False)
    _bart_stack(inv, "decoder", decoder_layers, d_model, ffn, positions, decoder=True)
    tied = read_tied(raw, True)
    inv.head("lm_head", vocab, d_model, tied)
    bias = BufferSpec(name="final_logits_bias", shape=(1, vocab), dtype="activation",
                      why="BART's final_logits_bias (a persistent buffer, cast with the model)")
    encoder = EncoderSpec(layers=encoder_layers, ffn=ffn,
                          forced_eos=raw.raw("forced_eos_token_id", default=None) is not None)
    return whole_model_arch(
        raw, inv, family="bart", hidden_size=d_model, num_layers=decoder_layers, vocab_size=vocab,
        num_heads=heads, num_kv_heads=heads, head_dim=d_model // heads, intermediate_size=ffn,
        rotary_dim=0, positions="learned", max_positions=positions, tie_word_embeddings=tied,
        attention_implementations=ALL_ATTENTION, buffers=(bias,), encoder=encoder,
    )
