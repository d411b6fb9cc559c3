"""The adapter registry: which function reads which `model_type`, and which are refused.

Family modules register themselves with `@adapter("model_type")`; `vramplan.model` imports
them all and dispatches on a config's model_type.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import RawConfig
from .spec import Architecture

Adapter = Callable[[RawConfig], Architecture]
_ADAPTERS: dict[str, Adapter] = {}

# Families transformers 5.17 has no code for, or whose configs need trust_remote_code.
REMOTE_CODE_FAMILIES = {"chatglm", "internlm2", "phi-msft", "minicpm", "phi3_v", "kimi_k2"}
# Modelled in a later release of vramplan; refused clearly until then.
NOT_YET_MODELLED = {
    "mbart": "encoder-decoder layers in mBART's pre-norm layout",
}
# Multimodal wrappers whose language model is a family we model: the text config is used.
MULTIMODAL_TEXT_CONFIG = {"llava", "mistral3", "gemma3", "llava_next", "paligemma", "qwen2_vl", "llama4"}


def adapter(*model_types: str) -> Callable[[Adapter], Adapter]:
    def register(fn: Adapter) -> Adapter:
        for model_type in model_types:
            _ADAPTERS[model_type] = fn
        return fn

    return register


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)

