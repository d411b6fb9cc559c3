"""Reading a config.json from the wild, leniently, into values we can trust.

A Hub config is not our type: keys have aliases across families (`n_embd` / `hidden_size`),
some are missing and take the default transformers' config class would give them, and some
are nonsense. `RawConfig` answers typed questions about such a dict and turns every bad
answer into a `ConfigError` that names the field, never a KeyError or a TypeError.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

_MISSING = object()
# Bounds no real config comes near; they keep arithmetic on nonsense configs cheap and sane.
MAX_DIMENSION = 1 << 24  # widths, vocabularies, positions, windows
MAX_LAYERS = 1 << 12


class RawConfig:
    """Typed, named access to a config dict. `where` names the config in error messages."""

    def __init__(self, data: dict[str, Any], where: str = "config") -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a JSON object, not {type(data).__name__}.")
        self.data = data
        self.where = where

    def with_defaults(self, defaults: dict[str, Any]) -> RawConfig:
        """The same config where absent keys take `defaults` (transformers' config-class defaults).
        A key present as null keeps its null: Mistral-7B-v0.3's `"sliding_window": null` means no
        window, not MistralConfig's default of 4096."""
        merged = {**defaults, **self.data}
        return RawConfig(merged, self.where)

    def has(self, *names: str) -> bool:
        return any(self.data.get(n) is not None for n in names)

    def raw(self, *names: str, default: Any = _MISSING) -> Any:
        for name in names:
            value = self.data.get(name)
            if value is not None:
                return value
        if default is _MISSING:
            raise ConfigError(f"{self.where} has no {' / '.join(names)}; it is needed to size the model.")
        return default

    def int(self, *names: str, default: Any = _MISSING, minimum: int = 1,
            maximum: int = MAX_DIMENSION) -> int:
        value = self.raw(*names, default=default)
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()
        ):
            raise ConfigError(f"{self.where}: {names[0]} must be a whole number, not {value!r}.")
        value = int(value)
        if value < minimum:
            raise ConfigError(f"{self.where}: {names[0]} must be at least {minimum}, not {value}.")
        if value > maximum:
            raise ConfigError(f"{self.where}: {names[0]} = {value} is beyond any real model "
                              f"(at most {maximum}).")
        return value

    def float(self, *names: str, default: Any = _MISSING) -> float:
        value = self.raw(*names, default=default)
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{self.where}: {names[0]} must be a finite number, not {value!r}.")
        return float(value)

    def bool(self, *names: str, default: Any = _MISSING) -> bool:
        value = self.raw(*names, default=default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}: {names[0]} must be true or false, not {value!r}.")
        return value

    def str(self, *names: str, default: Any = _MISSING) -> str:
        value = self.raw(*names, default=default)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self.where}: {names[0]} must be a string, not {value!r}.")
        return value

    def list(self, *names: str, default: Any = _MISSING) -> list[Any]:
        value = self.raw(*names, default=default)
        if value is not None and not isinstance(value, list):
            raise ConfigError(f"{self.where}: {names[0]} must be a list, not {value!r}.")
        return value

    def sub(self, name: str) -> RawConfig:
        """A nested config (a multimodal model's `text_config`)."""
        value = self.data.get(name)
        if not isinstance(value, dict):
            raise ConfigError(f"{self.where}: {name} must be an object.")
        return RawConfig(value, f"{self.where}.{name}")

    def divides(self, total: int, parts: int, what: str) -> int:
        if total % parts:
            raise ConfigError(f"{self.where}: {what} ({total}) is not divisible by {parts}.")
        return total // parts


def shrink_config(config: dict[str, Any], num_layers: int | None) -> dict[str, Any]:
    """A copy of `config` with fewer decoder layers: memory is per layer, so a reduced model
    measures the same per-layer cost when the full one does not fit. A multimodal config's
    text model (`text_config`) is the one reduced."""
    config = dict(config)
    if num_layers is None:
        return config
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = shrink_config(config["text_config"], num_layers)
        return config
    keys = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    for key in keys:
        if key in config:
            config[key] = num_layers
    if not any(key in config for key in keys):
        config["num_hidden_layers"] = num_layers
    # per-layer lists (layer kinds, which layers use rope or experts) follow the new count
    for key in ("layer_types", "no_rope_layers", "moe_layers"):
        if isinstance(config.get(key), list):
            config[key] = config[key][:num_layers]
    return config
