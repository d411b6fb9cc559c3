#!/usr/bin/env python3
"""Write test configs for families that ../shared/hub-configs has no file for, from
transformers' own config classes (so every key is one transformers understands).

    python tests/configs/make_configs.py    # rewrites tests/configs/*.json

* falcon-new-decoder.json: FalconConfig with the falcon-40b layout (new_decoder_architecture,
  8 key/value heads, two LayerNorms per layer), scaled to 4 layers.
* gpt-neox-parallel.json: GPTNeoXConfig defaults (the GPT-NeoX-20B shape, parallel residual),
  4 layers.
* gpt-neox-partial-rotary.json: a Pythia-like GPTNeoXConfig with rotary_pct 0.25.
* olmoe-1b-7b.json: OlmoeConfig defaults (OLMoE-1B-7B: 64 experts, top 8), 4 layers.
"""

import json
from pathlib import Path

from transformers import FalconConfig, GPTNeoXConfig, OlmoeConfig

HERE = Path(__file__).resolve().parent


def dump(name: str, config) -> None:
    data = config.to_dict()
    data.pop("transformers_version", None)
    (HERE / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


dump("falcon-new-decoder.json", FalconConfig(
    hidden_size=8192, num_attention_heads=128, num_kv_heads=8, num_hidden_layers=4,
    new_decoder_architecture=True, parallel_attn=True, bias=False, vocab_size=65024,
    torch_dtype="bfloat16"))
dump("gpt-neox-parallel.json", GPTNeoXConfig(num_hidden_layers=4, torch_dtype="float16"))
dump("gpt-neox-partial-rotary.json", GPTNeoXConfig(
    hidden_size=2048, num_attention_heads=8, intermediate_size=8192, num_hidden_layers=4,
    rotary_pct=0.25, vocab_size=50304, tie_word_embeddings=False))
dump("olmoe-1b-7b.json", OlmoeConfig(num_hidden_layers=4, torch_dtype="bfloat16"))
