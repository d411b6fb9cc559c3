"""Shared test helpers: the transformers oracle and the committed measurement rows."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TEST_CONFIGS = sorted((TESTS / "configs").glob("*.json"))


def transformers_model_on_meta(config: dict):
    """transformers' own instantiation of a config on the meta device (no memory, no download).

    `AutoModelForCausalLM.from_config` under `torch.device("meta")` ties embeddings the way the
    model on a GPU does; accelerate's init_empty_weights() does not (it leaves lm_head untied
    under transformers 5.17 and overcounts a llama-3.2-1B-shaped model by 0.49 GiB)."""
    torch = pytest.importorskip("torch")
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    config = {k: v for k, v in config.items() if k not in ("auto_map", "quantization_config")}
    model_type = config.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **config)
    if model_type in ("llava", "mistral3", "gemma3", "llama4"):
        hf_config = hf_config.text_config
    auto = transformers.AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(hf_config)


@lru_cache(maxsize=1)
def committed_rows() -> tuple[dict, ...]:
    from vramplan.validate.compare import measurement_files, read_rows

    return tuple(read_rows(measurement_files()))


@pytest.fixture(scope="session")
def rows():
    return committed_rows()


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())
