"""config.json -> `Architecture`: the typed, normalized description of a model.

One small adapter per config family (registered by `model_type` in `families/`) reads the
config the way transformers' own config class and modeling code would, and lists every
parameter tensor under transformers' own name. Naming tensors exactly is what lets the
exactness test compare our inventory with transformers' instantiation name by name, and what
lets quantization decide per tensor what it converts.

Mixture-of-experts families are listed the way transformers 5.17 holds them: every layer's
experts fused into two 3-D Parameters (gate_up_proj, down_proj), a router, and shared experts
where the family has them. Families we do not model (remote-code families) are refused with a
message that says so.
"""

from __future__ import annotations

from ..config import RawConfig
from ..errors import ConfigError, UnsupportedModelError
from ..quantized import scheme_from_config
from . import families
from .families import vision
from .registry import (
    _ADAPTERS,
    MULTIMODAL_TEXT_CONFIG,
    NOT_YET_MODELLED,
    REMOTE_CODE_FAMILIES,
    supported_model_types,
)
from .spec import Architecture, TensorSpec

__all__ = ["Architecture", "TensorSpec", "architecture_from_config", "families", "supported_model_types"]


def architecture_from_config(config: dict, where: str = "config") -> Architecture:
    """The one entry point: a raw config dict in, a strict `Architecture` out."""
    raw = RawConfig(config, where)
    model_type = raw.str("model_type", default=None)
    if not model_type:
        raise ConfigError(f"{where} has no model_type; vramplan cannot tell which architecture it is.")
    if model_type in MULTIMODAL_TEXT_CONFIG and isinstance(config.get("text_config"), dict):
        text = dict(config["text_config"])
        text.setdefault("model_type", _default_text_model_type(model_type))
        if "quantization_config" in config and "quantization_config" not in text:
            text["quantization_config"] = config["quantization_config"]
        arch = architecture_from_config(text, f"{where}.text_config")
        towered = vision.with_vision_tower(arch, model_type, raw, config.get("vision_config"), where)
        if towered is not None:
            return towered
        note = (f"{model_type} is multimodal: only its language model ({arch.model_type}) is "
                "estimated; the vision tower and projector are not included.")
        return arch.model_copy(update={"notes": (*arch.notes, note)})
    if model_type in REMOTE_CODE_FAMILIES:
        raise UnsupportedModelError(
            f"{model_type!r} needs the model repository's own code (trust_remote_code), which "
            "vramplan never runs; use a checkpoint converted to a transformers-native family.")
    if model_type in NOT_YET_MODELLED:
        raise UnsupportedModelError(
            f"{model_type!r} uses {NOT_YET_MODELLED[model_type]}, which this vramplan release "
            f"does not estimate yet; supported: {', '.join(supported_model_types())}.")
    fn = _ADAPTERS.get(model_type)
    if fn is None:
        raise UnsupportedModelError(
            f"Unknown model_type {model_type!r}; supported: {', '.join(supported_model_types())}.")
    arch = fn(raw)
    update: dict = {"use_cache": raw.bool("use_cache", default=True)}
    scheme = scheme_from_config(raw)
    if scheme is not None:
        update["quantization"] = scheme
    return arch.model_copy(update=update)


def _default_text_model_type(wrapper: str) -> str:
    return {"llava": "llama", "mistral3": "mistral", "gemma3": "gemma3_text", "llama4": "llama4_text",
            "llava_next": "llama", "paligemma": "gemma", "qwen2_vl": "qwen2"}[wrapper]

