"""Mixture-of-experts and latent attention: the engine's terms against the committed H100 live
sets (what was alive at the peak, by source line) and against transformers' own quantization
integrations, instantiated on the meta device."""

from __future__ import annotations

import pytest
from vramplan import Workload
from vramplan.base import block_bytes
from vramplan.catalog import runtime_profile
from vramplan.config import shrink_config
from vramplan.errors import UnsupportedModelError, WorkloadError
from vramplan.model import architecture_from_config
from vramplan.parallel import shard
from vramplan.request import PrecisionChoice
from vramplan.runtimes.transformers import experts, kv_cache
from vramplan.runtimes.transformers.estimate import estimate_architecture
from vramplan.runtimes.transformers.kv_cache import KvFormat
from vramplan.source import bundled_names, load_bundled, resolve

from .conftest import committed_rows, transformers_model_on_meta

BF16 = 2


def _row(model: str, batch: int):
    for row in committed_rows():
        case = row["case"]
        if case["model"] == model and case["batch"] == batch and row.get("status") == "ok":
            return row
    raise LookupError(f"no committed row for {model} at batch {batch}")


def _arch(row):
    case = row["case"]
    return architecture_from_config(shrink_config(resolve(case.get("config_source") or case["model"]).config,
                                                  case.get("layers")))


def _live(row, where: str) -> list[int]:
    """Bytes of each live-set entry (one per tensor) whose allocation site contains `where`."""
    out = []
    for entry in row["peak_live_set"]["live"]:
        if where in entry["where"].split(" < ")[0]:
            out += [entry["bytes"]] * entry["count"]
    return out


def test_latent_attention_caches_the_latent_and_the_rotary_key():
    row = _row("deepseek-v2-lite", 1)
    arch = _arch(row)
    tokens = row["case"]["prompt_len"] + row["case"]["new_tokens"] - 1  # cache at the last step
    kv = KvFormat(element_bytes=BF16)
    keys = _live(row, "cache_utils.py:146")
    values = _live(row, "cache_utils.py:147")
    assert len(keys) == len(values) == arch.num_layers
    # the live set lists tensor sizes; the allocator holds them in 512-byte blocks
    assert keys[0] == tokens * 512 * BF16
    assert block_bytes(keys[0]) == kv_cache.layer_bytes(arch, 1, tokens, kv, part="key")
    assert block_bytes(values[0]) == kv_cache.layer_bytes(arch, 1, tokens, kv, part="value")


@pytest.mark.parametrize("model,batch", [("mixtral-8x7b-v0.1", 1), ("mixtral-8x7b-v0.1", 8),
                                         ("qwen3-30b-a3b", 1), ("gpt-oss-20b", 1)])
def test_decode_gathers_a_copy_of_each_selected_experts_weights(model, batch):
    row = _row(model, batch)
    arch = _arch(row)
    gathered = _live(row, "moe.py:136") + _live(row, "moe.py:156")  # gate_up and down gathers
    assert len(gathered) == 2
    moe = arch.moe
    rows = batch * moe.top_k
    h, i = arch.hidden_size, moe.expert_intermediate
    assert sorted(gathered) == sorted([rows * 2 * i * h * BF16, rows * h * i * BF16])
    # the decode term holds those two copies and the small per-row tensors around them
    transient = experts.decode_transient(arch, batch, BF16)
    assert 0 <= transient - sum(gathered) < 0.01 * transient


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite"])
def test_grouped_prefill_tail_matches_the_live_set(model):
    """At the peak of a b8 n960 prefill, grouped_mm keeps the routed copies, the masked down
    output, the weighted rows and their reordered copy (fp32 where routing weights are)."""
    row = _row(model, 8)
    arch = _arch(row)
    tokens = row["case"]["batch"] * row["case"]["prompt_len"]
    measured = sum(_live(row, "moe.py:394") + _live(row, "moe.py:465") + _live(row, "moe.py:468")
                   + _live(row, "moe.py:473"))
    terms = dict((n, b) for n, b, _ in experts.prefill_terms(arch, runtime_profile().families[arch.family].experts,
                                                             tokens, BF16))
    predicted_tail = terms["routed token copies"] + terms["expert intermediates"] - tokens * arch.moe.top_k * 8
    assert predicted_tail == measured


def test_llama4_runs_every_expert_on_every_token():
    row = _row("llama-4-scout-17b-16e-instruct", 8)
    arch = _arch(row)
    tokens = row["case"]["batch"] * row["case"]["prompt_len"]
    measured = sum(_live(row, "modeling_llama4.py:80") + _live(row, "modeling_llama4.py:82")
                   + _live(row, "modeling_llama4.py:170") + _live(row, "functional.py:2397:silu"))
    ((_, predicted, _),) = experts.prefill_terms(arch, runtime_profile().families["llama4"].experts, tokens, BF16)
    assert predicted == measured


MOE_CONFIGS = [hub_id for hub_id, _ in bundled_names()
               if load_bundled(hub_id).config.get("model_type") in
               ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "llama4")]


@pytest.mark.parametrize("hub_id", MOE_CONFIGS)
def test_bitsandbytes_converts_exactly_the_plain_linears(hub_id):
    """transformers 5.17's replace_with_bnb_linear swaps modules whose type *is* nn.Linear (or
    Conv1D): fused experts (3-D Parameters), Parameter routers and Llama-4's Linear-subclass
    router stay in the compute dtype. Our `linear` kind must be that set, lm_head aside."""
    import torch

    config = shrink_config(load_bundled(hub_id).config, 4)
    arch = architecture_from_config(config)
    model = transformers_model_on_meta(config)
    plain = {f"{name}.weight" for name, module in model.named_modules()
             if type(module) is torch.nn.Linear and name != "lm_head"}
    ours = {n for t in arch.tensors if t.kind == "linear" for n in t.names()}
    assert ours == plain
    assert any(t.kind == "expert" for t in arch.tensors)


def test_fp8_experts_match_transformers_fp8_integration():
    """DeepSeek-V3's fp8 checkpoint: our bytes against transformers' FP8Linear / FP8Experts
    swapped into the meta model (4 layers: 3 dense, 1 sparse)."""
    import torch
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    config = shrink_config(load_bundled("deepseek-ai/DeepSeek-V3").config, 4)
    model = transformers_model_on_meta(config)
    block = config["quantization_config"]["weight_block_size"]
    model = replace_with_fp8_linear(model, modules_to_not_convert=["lm_head"],
                                    quantization_config=FineGrainedFP8Config(weight_block_size=block))
    theirs = sum(p.numel() * p.element_size() for p in model.parameters())
    est = estimate_architecture(architecture_from_config(config), "v3", Workload(batch=1, prompt_len=8, new_tokens=2))
    assert est.precision.startswith("fp8")
    ours = est.weights_bytes + next(t.bytes for t in est.breakdown if t.name == "quantization state")
    assert ours == theirs
    assert torch.float8_e4m3fn in {p.dtype for n, p in model.named_parameters() if ".experts." in n}


def test_gptq_mixture_of_experts_is_refused():
    config = dict(load_bundled("mistralai/Mixtral-8x7B-v0.1").config)
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        estimate_architecture(architecture_from_config(config), "m", Workload())


def test_tensor_parallel_splits_experts_and_keeps_the_latent_cache_whole():
    arch = architecture_from_config(load_bundled("mistralai/Mixtral-8x7B-v0.1").config)
    rank = shard(arch, tp=2)
    experts_of = lambda a: sum(t.elements for t in a.tensors if t.kind == "expert")  # noqa: E731
    routers_of = lambda a: sum(t.elements for t in a.tensors if t.kind == "router")  # noqa: E731
    assert 2 * experts_of(rank) == experts_of(arch)
    assert routers_of(rank) == routers_of(arch)
    assert rank.moe.expert_intermediate == arch.moe.expert_intermediate // 2

    deepseek = architecture_from_config(load_bundled("deepseek-ai/DeepSeek-V2-Lite").config)
    rank = shard(deepseek, tp=4)
    assert rank.cache_width("key") == deepseek.cache_width("key") == 512
    assert rank.cache_width("value") == 64
    narrower = {**load_bundled("deepseek-ai/DeepSeek-V2-Lite").config, "moe_intermediate_size": 1400}
    with pytest.raises(WorkloadError, match="expert width 1400"):
        shard(architecture_from_config(narrower), tp=16)


def test_pipeline_stage_keeps_its_own_sparse_layers():
    """DeepSeek-V2-Lite's layer 0 is dense: a 2-stage pipeline's first stage has one dense MLP,
    the second none, and each stage's MoE positions index its own layers."""
    arch = architecture_from_config(load_bundled("deepseek-ai/DeepSeek-V2-Lite").config)
    first, second = shard(arch, pp=2, stage=0), shard(arch, pp=2, stage=1)
    assert first.dense_mlp_layers == 1 and second.dense_mlp_layers == 0
    assert second.moe.sparse_layers == tuple(range(second.num_layers))
    assert first.parameters + second.parameters == arch.parameters  # untied: nothing is copied


def test_bnb_on_moe_says_the_experts_stay_unquantized():
    arch = architecture_from_config(load_bundled("Qwen/Qwen3-30B-A3B").config)
    est = estimate_architecture(arch, "q", Workload(batch=1, prompt_len=64, new_tokens=4), PrecisionChoice(name="nf4"))
    bf16 = estimate_architecture(arch, "q", Workload(batch=1, prompt_len=64, new_tokens=4))
    expert_bytes = sum(t.elements * BF16 for t in arch.tensors if t.kind == "expert")
    assert est.weights_bytes > expert_bytes > 0.9 * bf16.weights_bytes
    assert any("nn.Linear layers only" in n for n in est.notes)


def test_plan_sizes_a_pre_quantized_checkpoint_as_stored():
    from vramplan import plan

    result = plan("deepseek-ai/DeepSeek-V3", gpus=["H200"], runtime="vllm", top=1)
    best = result.plans[0]
    assert best.precision == "fp8-8bit-block128x128"
    bf16 = plan("deepseek-ai/DeepSeek-V3", gpus=["H200"], runtime="vllm", top=1, precision="bf16").plans[0]
    assert best.gpus < bf16.gpus
