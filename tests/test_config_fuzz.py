"""Property tests: whatever a config.json holds, reading it ends in an Architecture or in
one of our errors, never in a crash."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vramplan.errors import VramplanError
from vramplan.model import architecture_from_config, supported_model_types
from vramplan.source import load_bundled

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)
KEYS = st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "vocab_size", "intermediate_size", "head_dim", "n_embd", "n_layer", "n_head",
                        "tie_word_embeddings", "sliding_window", "layer_types", "multi_query",
                        "partial_rotary_factor", "rope_parameters", "torch_dtype", "text_config",
                        "ffn_dim", "word_embed_proj_dim", "new_decoder_architecture", "num_kv_heads"])
BASES = ["meta-llama/Llama-3.2-1B", "openai-community/gpt2", "tiiuae/falcon-7b-instruct",
         "google/gemma-2-2b-it", "facebook/opt-125m", "microsoft/phi-2", "bigcode/octocoder",
         "llava-hf/llava-1.5-7b-hf", "bigscience/bloomz-560m", "EleutherAI/gpt-j-6b"]


def _read(config) -> None:
    try:
        arch = architecture_from_config(config, "fuzzed")
    except VramplanError:
        return
    assert arch.parameters > 0
    assert all(d > 0 for t in arch.tensors for d in t.shape)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BASES), st.dictionaries(KEYS, VALUES, max_size=4))
def test_mutated_real_configs_never_crash(base, changes):
    config = copy.deepcopy(load_bundled(base).config)
    config.update(changes)
    _read(config)


@settings(max_examples=200, deadline=None)
@given(st.one_of(VALUES, st.dictionaries(st.text(max_size=10), VALUES, max_size=6)))
def test_garbage_never_crashes(garbage):
    _read(garbage)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(supported_model_types()), st.dictionaries(KEYS, VALUES, max_size=6))
def test_every_family_rejects_incomplete_configs_cleanly(model_type, fields):
    _read({"model_type": model_type, **fields})
