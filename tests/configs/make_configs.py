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

# State-space, hybrid and encoder-decoder families (issue 5). ../shared/hub-configs has no
# file for them; each is the family's transformers config class with the published shape of
# the model named in the file name (config-class defaults where the class documents that
# model), so every key is one transformers reads.
from transformers import (  # noqa: E402
    BartConfig,
    FalconH1Config,
    GraniteMoeHybridConfig,
    JambaConfig,
    Mamba2Config,
    MambaConfig,
    T5Config,
)

# state-spaces/mamba-2.8b-hf: d_model 2560, 64 layers, vocab 50280, d_state 16, dt_rank 160
dump("mamba-2.8b.json", MambaConfig(
    hidden_size=2560, num_hidden_layers=64, vocab_size=50280, state_size=16, expand=2,
    intermediate_size=5120, time_step_rank=160, conv_kernel=4, torch_dtype="bfloat16"))
# Mamba2Config's defaults are mistralai/Mamba-Codestral-7B-v0.1 (128 heads of 64, 8 groups)
dump("mamba2-codestral-7b.json", Mamba2Config(torch_dtype="bfloat16"))
# JambaConfig's defaults are ai21labs/Jamba-v0.1 (attention every 8th layer from 4, experts
# every 2nd from 1, 16 experts top 2); use_mamba_kernels stays true as in the Hub file
dump("jamba-v0.1.json", JambaConfig(torch_dtype="bfloat16"))
# tiiuae/Falcon-H1-Tiny-90M-Base: attention and Mamba-2 side by side in every layer
dump("falcon-h1-tiny-90m.json", FalconH1Config(
    hidden_size=512, intermediate_size=768, num_hidden_layers=24, num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, vocab_size=32768, tie_word_embeddings=True,
    max_position_embeddings=262144, mamba_d_ssm=768, mamba_d_state=64, mamba_d_head=32,
    mamba_n_heads=24, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, torch_dtype="bfloat16"))
# ibm-granite/granite-4.0-h-small: 40 layers, 36 Mamba-2 and 4 attention (the attention
# positions are not in the published summary; 5, 15, 25, 35 are this file's choice),
# 72 experts top 10 plus a shared expert, no position embedding
dump("granite-4.0-h-small.json", GraniteMoeHybridConfig(
    hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
    num_local_experts=72, num_experts_per_tok=10, shared_intermediate_size=1536,
    intermediate_size=768, mamba_d_state=128, mamba_d_conv=4, mamba_expand=2,
    mamba_n_heads=128, mamba_d_head=64, mamba_n_groups=1, tie_word_embeddings=True,
    vocab_size=100352, position_embedding_type="nope", max_position_embeddings=131072,
    layer_types=["full_attention" if i % 10 == 5 else "linear_attention" for i in range(40)],
    torch_dtype="bfloat16"))
# google/flan-t5-base: gated-GELU feed-forward, untied lm_head (T5's Hub configs name
# decoder_start_token_id 0, the pad token; the config class has no default for it)
dump("flan-t5-base.json", T5Config(
    d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
    torch_dtype="float32"))
# T5Config's defaults are google-t5/t5-small (ReLU feed-forward, tied embeddings)
dump("t5-small.json", T5Config(decoder_start_token_id=0, torch_dtype="float32"))
# BartConfig's defaults are facebook/bart-large
dump("bart-large.json", BartConfig(torch_dtype="float32"))
