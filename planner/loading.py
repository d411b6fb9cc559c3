"""A model reference -> its source and Architecture, in the dtype from_pretrained would load it.

The one place a config from the wild meets our types: every API function loads through here.
"""

from __future__ import annotations

from pydantic import ValidationError

from .errors import ConfigError
from .model import Architecture, architecture_from_config
from .source import ModelSource, load_dtype, resolve


def _load(model: str, revision: str | None = None) -> tuple[ModelSource, Architecture, str | None]:
    """The source, its architecture with the dtype from_pretrained would load it in, and a note
    when that dtype was not named by the config."""
    source = resolve(model, revision)
    arch = _architecture(source)
    dtype, note = load_dtype(arch.config_dtype, arch.quantization is not None, source.stored_tensors)
    if dtype != arch.config_dtype:
        arch = arch.model_copy(update={"config_dtype": dtype})
    return source, arch, note


def _architecture(source: ModelSource) -> Architecture:
    """The config -> Architecture step, where a config from the wild meets our types: a field of
    the wrong type that slipped past the lenient reader is still the config's fault, said in
    one sentence that names the field where it is known."""
    try:
        return architecture_from_config(source.config, source.name)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "a field"
        raise ConfigError(f"{source.name}: the config does not describe a model vramplan can size "
                          f"({exc.title}.{field}: {first['msg']}).") from None
    except (TypeError, AttributeError, ValueError, ZeroDivisionError, RecursionError) as exc:
        raise ConfigError(f"{source.name}: a config field has the wrong type or value "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}).") from None
