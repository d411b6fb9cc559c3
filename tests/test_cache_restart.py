"""Phi-3's cache restart (transformers 5.17): generate() drops its cache when the sequence first
passes original_max_position_embeddings, and at every step after. Held against transformers'
own prepare_inputs_for_generation, then through the estimate."""

from __future__ import annotations

import pytest
from vramplan.model import architecture_from_config
from vramplan.source import resolve


def _arch(name: str, **overrides):
    return architecture_from_config({**resolve(name).config, **overrides})


@pytest.mark.parametrize(("prompt", "new_tokens", "first"), [
    (4096, 16, 1),  # the prompt fills the short-rope range: the first decode step restarts
    (4090, 16, 7),
    (4082, 16, 15),  # the last step
    (4081, 16, None),  # the sequence never passes 4096 positions
    (4097, 16, None),  # the prompt is already past them: the cache is kept
    (8192, 256, None),
])
def test_restart_step_of_phi_4_mini(prompt, new_tokens, first):
    from vramplan.runtimes.transformers import kv_cache

    assert kv_cache.restart_step(_arch("phi-4-mini-instruct"), prompt, new_tokens) == first


def test_other_families_never_restart_and_phi3_defaults_as_its_config_class():
    from vramplan.runtimes.transformers import kv_cache

    assert _arch("llama-3.1-8b").cache_restart_positions is None
    assert kv_cache.restart_step(_arch("llama-3.1-8b"), 4096, 16) is None
    config = dict(resolve("phi-4-mini-instruct").config)
    del config["original_max_position_embeddings"]
    transformers = pytest.importorskip("transformers")
    default = transformers.Phi3Config().original_max_position_embeddings
    assert architecture_from_config(config).cache_restart_positions == default == 4096


def test_the_rule_is_transformers_prepare_inputs_for_generation():
    """A tiny Phi-3 on the CPU: for a cache of each length and the step's input, whether
    transformers keeps past_key_values is what restart_step says."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from vramplan.runtimes.transformers import kv_cache

    limit = 32
    config = transformers.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=4 * limit, original_max_position_embeddings=limit,
                                      pad_token_id=0)
    model = transformers.Phi3ForCausalLM(config).eval()
    arch = architecture_from_config(config.to_dict())
    assert arch.cache_restart_positions == limit
    for prompt in (limit - 4, limit, limit + 1):
        new_tokens = 8
        first = kv_cache.restart_step(arch, prompt, new_tokens)
        cached = prompt  # tokens the cache holds before each step, as the model sees it
        for step in range(1, new_tokens):
            cache = transformers.DynamicCache(config=config)
            states = torch.zeros(1, 2, cached, 16)
            cache.update(states, states, 0)
            ids = torch.zeros(1, prompt + step, dtype=torch.long)
            inputs = model.prepare_inputs_for_generation(ids, past_key_values=cache, next_sequence_length=1,
                                                         attention_mask=torch.ones_like(ids))
            dropped = inputs.get("past_key_values") is None
            assert dropped == (first is not None and step >= first), (prompt, step)
            cached = 1 if dropped else cached + 1


def test_the_estimate_holds_the_frozen_cache_and_two_one_token_caches():
    from vramplan import Workload, estimate
    from vramplan.runtimes.transformers import kv_cache

    arch = _arch("phi-4-mini-instruct")

    def kv_term(prompt: int) -> int:
        result = estimate("phi-4-mini-instruct", Workload(batch=2, prompt_len=prompt, new_tokens=16))
        restarted = any("drops its cache" in note for note in result.notes)
        assert restarted == (prompt > 4081)
        return result.kv_cache_bytes

    kv = kv_cache.KvFormat(element_bytes=2)
    one_token = kv_cache.cache_bytes(arch, 2, 1, 0, kv)
    assert kv_term(4096) == kv_cache.cache_bytes(arch, 2, 4096, 0, kv) + 2 * one_token
    assert kv_term(4090) == kv_cache.cache_bytes(arch, 2, 4090, 6, kv) + 2 * one_token
    assert kv_term(4000) == kv_cache.cache_bytes(arch, 2, 4000, 15, kv)

