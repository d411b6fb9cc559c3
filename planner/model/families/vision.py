"""Vision towers of vision-language models, added to the language model's `Architecture`.

LLaVA (a CLIP tower) and Mistral-3 (Pixtral, as in Magistral-Small) are listed tensor by tensor
under transformers 5.17's names (the language model's own tensors keep the causal LM's names;
the exactness test maps model.language_model.* onto them). Their weights are exact; the
towers' activations are not modelled (said in the output). Other wrappers are estimated by
their language model alone, said likewise.
"""

from __future__ import annotations

from ...config import MAX_LAYERS, RawConfig
from ..blocks import Inventory
from ..spec import Architecture, BufferSpec


def with_vision_tower(arch: Architecture, wrapper: str, raw: RawConfig, vision: dict | None,
                      where: str) -> Architecture | None:
    """`arch` with its wrapper's vision tower and projector, or None when vramplan does not
    list that tower (the caller then notes that only the language model is estimated)."""
    if vision is None and wrapper == "llava":
        vision = {}  # LlavaConfig's default tower
    if vision is None:
        return None
    kind = vision.get("model_type")
    config = RawConfig(vision, f"{where}.vision_config")
    arch = _composite_tie(arch, wrapper, raw)
    if wrapper == "llava" and kind in (None, "clip_vision_model"):
        return _clip(arch, raw, config)
    if wrapper == "mistral3" and kind == "pixtral":
        return _pixtral(arch, raw, config)
    return None


# the wrapper config's own tie_word_embeddings default (transformers 5.17): the composite model
# ties lm_head by the top-level flag, not the text config's
_WRAPPER_TIES = {"llava": False, "mistral3": True}


def _composite_tie(arch: Architecture, wrapper: str, raw: RawConfig) -> Architecture:
    tied = raw.bool("tie_word_embeddings", default=_WRAPPER_TIES[wrapper])
    if tied == arch.tie_word_embeddings:
        return arch
    if not tied:  # untie: the head gets its own tensor
        embedding = next(t for t in arch.tensors if t.kind == "embedding")
        head = embedding.model_copy(update={"name": "lm_head.weight", "kind": "lm_head"})
        return arch.model_copy(update={"tie_word_embeddings": False, "tensors": (*arch.tensors, head)})
    note = (f"{wrapper}'s config leaves tie_word_embeddings at its default (true), so transformers 5.17 ties "
            "lm_head to the token embedding in the full model: one tensor in memory, whatever the checkpoint stores.")
    return arch.model_copy(update={"tie_word_embeddings": True, "notes": (*arch.notes, note),
                                   "tensors": tuple(t for t in arch.tensors if t.kind != "lm_head")})


def _projector_pair(inv: Inventory, text_hidden: int, width: int, bias: bool) -> None:
    projector = "model.multi_modal_projector"
    inv.one(f"{projector}.linear_1.weight", (text_hidden, width), "linear")
    inv.one(f"{projector}.linear_2.weight", (text_hidden, text_hidden), "linear")
    if bias:
        inv.one(f"{projector}.linear_1.bias", (text_hidden,), "bias")
        inv.one(f"{projector}.linear_2.bias", (text_hidden,), "bias")


def _added(arch: Architecture, inv: Inventory, buffers: tuple[BufferSpec, ...], note: str) -> Architecture:
    params = sum(t.elements for t in inv.items)
    return arch.model_copy(update={
        "tensors": (*arch.tensors, *inv.items), "buffers": (*arch.buffers, *buffers),
        "notes": (*arch.notes, note.format(params=f"{params:,}"))})


def _pixtral(arch: Architecture, raw: RawConfig, vision: RawConfig) -> Architecture:
    """Mistral-3: a Pixtral tower (RMSNorm, gated MLP, 2-D rotary positions) and a projector
    that merges spatial_merge_size^2 patches before two Linears."""
    hidden = vision.int("hidden_size", default=1024)
    inter = vision.int("intermediate_size", default=4096)
    layers = vision.int("num_hidden_layers", default=24, maximum=MAX_LAYERS)
    patch = vision.int("patch_size", default=16)
    channels = vision.int("num_channels", default=3)
    head_dim = vision.int("head_dim", default=None) or hidden // vision.int("num_attention_heads", default=16)
    merge = raw.int("spatial_merge_size", default=2)
    inv = Inventory(0)
    tower = "model.vision_tower"
    inv.one(f"{tower}.patch_conv.weight", (hidden, channels, patch, patch), "other")
    inv.one(f"{tower}.ln_pre.weight", (hidden,), "norm")
    for i in range(layers):
        layer = f"{tower}.transformer.layers.{i}"
        inv.one(f"{layer}.attention_norm.weight", (hidden,), "norm")
        for proj in ("gate_proj", "up_proj"):
            inv.one(f"{layer}.feed_forward.{proj}.weight", (inter, hidden), "linear")
        inv.one(f"{layer}.feed_forward.down_proj.weight", (hidden, inter), "linear")
        for proj in ("k_proj", "v_proj", "q_proj", "o_proj"):
            inv.one(f"{layer}.attention.{proj}.weight", (hidden, hidden), "linear")
        inv.one(f"{layer}.ffn_norm.weight", (hidden,), "norm")
    inv.one("model.multi_modal_projector.norm.weight", (hidden,), "norm")
    inv.one("model.multi_modal_projector.patch_merger.merging_layer.weight", (hidden, hidden * merge * merge), "linear")
    _projector_pair(inv, arch.hidden_size, hidden, raw.bool("multimodal_projector_bias", default=True))
    why = "Pixtral's rotary frequencies (fp32), kept twice: current and original"
    buffers = tuple(BufferSpec(name=f"{tower}.patch_positional_embedding.{name}", shape=(head_dim // 2,),
                               dtype="fp32", why=why) for name in ("inv_freq", "original_inv_freq"))
    return _added(arch, inv, buffers, f"mistral3: the Pixtral vision tower ({layers} layers) and projector add "
                  "{params} parameters; runtime terms cover the language model (prompt_len counts the image "
                  "tokens), the tower's own activations are not modelled (large images give thousands of patches).")


def _clip(arch: Architecture, raw: RawConfig, vision: RawConfig) -> Architecture:
    """LLaVA: a CLIP vision tower and a two-layer projector beside the language model, named
    as LlavaForConditionalGeneration holds them (its text model under model.language_model is
    listed under the causal LM's names). Defaults are LlavaConfig's (CLIP ViT-L/14 at 336 px)."""
    hidden = vision.int("hidden_size", default=1024)
    inter = vision.int("intermediate_size", default=4096)
    layers = vision.int("num_hidden_layers", default=24, maximum=MAX_LAYERS)
    patch, image = vision.int("patch_size", default=14), vision.int("image_size", default=336)
    positions = (image // patch) ** 2 + 1  # the patches and the class token
    inv = Inventory(0)
    tower = "model.vision_tower"
    inv.one(f"{tower}.embeddings.class_embedding", (hidden,), "other")
    inv.one(f"{tower}.embeddings.patch_embedding.weight", (hidden, 3, patch, patch), "other")
    inv.one(f"{tower}.embeddings.position_embedding.weight", (positions, hidden), "position_embedding")
    for name in ("pre_layrnorm", "post_layernorm"):
        inv.norm(f"{tower}.{name}", hidden, True, per_layer=False)
    for i in range(layers):
        layer = f"{tower}.encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            inv.one(f"{layer}.self_attn.{proj}.weight", (hidden, hidden), "linear")
            inv.one(f"{layer}.self_attn.{proj}.bias", (hidden,), "bias")
        for norm in ("layer_norm1", "layer_norm2"):
            inv.norm(f"{layer}.{norm}", hidden, True, per_layer=False)
        inv.one(f"{layer}.mlp.fc1.weight", (inter, hidden), "linear")
        inv.one(f"{layer}.mlp.fc1.bias", (inter,), "bias")
        inv.one(f"{layer}.mlp.fc2.weight", (hidden, inter), "linear")
        inv.one(f"{layer}.mlp.fc2.bias", (hidden,), "bias")
    feature_layers = raw.raw("vision_feature_layer", default=-2)
    width = hidden * (len(feature_layers) if isinstance(feature_layers, list) else 1)
    _projector_pair(inv, arch.hidden_size, width, raw.bool("multimodal_projector_bias", default=True))
    ids = BufferSpec(name=f"{tower}.embeddings.position_ids", shape=(1, positions), dtype="int64",
                     why="the vision tower's position ids (int64)")
    return _added(arch, inv, (ids,), f"llava: the CLIP vision tower ({layers} layers) and projector add "
                  "{params} parameters; runtime terms cover the language model (prompt_len counts each image's "
                  f"{positions - 1} placeholder tokens), the vision tower's own activations are not modelled.")
