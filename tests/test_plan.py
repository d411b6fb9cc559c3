"""`vramplan plan` and the per-GPU arithmetic of tensor and pipeline parallelism."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from vramplan import load_model, plan, plan_maximum
from vramplan.catalog import gpu_catalog
from vramplan.cli import main
from vramplan.errors import WorkloadError
from vramplan.parallel import shard
from vramplan.request import PlanRequest
from vramplan.runtimes.transformers.serve import transformers_layout

MODEL = "meta-llama/Llama-3.1-70B-Instruct"


@pytest.fixture(scope="module")
def llama70():
    return load_model(MODEL)[1]


@pytest.mark.parametrize("name", ["llama-3.1-70b", "qwen2.5-7b", "gpt2", "falcon-7b-instruct", "phi-2",
                                  "bloomz-560m", "gemma-2-2b-it"])
def test_sharded_weights_add_up(name):
    arch = load_model(name)[1]
    for tp in (2, 4):
        try:
            rank = shard(arch, tp)
        except WorkloadError:
            continue
        replicated = sum(t.elements for t in arch.tensors
                         if t.kind in ("norm", "position_embedding")
                         or (t.kind == "bias" and t.name.split(".")[-2] in ("o_proj", "dense", "c_proj", "out_proj",
                                                                               "down_proj", "fc2", "fc_out",
                                                                               "dense_4h_to_h")))
        vocab_padding = sum(t.shape[1] * (-(-t.shape[0] // tp) * tp - t.shape[0]) for t in arch.tensors
                            if t.kind in ("embedding", "lm_head"))
        assert rank.parameters * tp == arch.parameters + replicated * (tp - 1) + vocab_padding
    stages = [shard(arch, 1, 2, s) for s in range(2)]
    head_copy = arch.tensors[0].elements if arch.tie_word_embeddings else 0
    assert sum(r.parameters for r in stages) == arch.parameters + head_copy
    assert sum(r.num_layers for r in stages) == arch.num_layers


def test_tp_must_divide_heads(llama70):
    with pytest.raises(WorkloadError, match="key/value heads"):
        shard(llama70, 16, replicate_kv=False)
    assert shard(llama70, 16, replicate_kv=True).num_kv_heads == 1  # vLLM replicates
    with pytest.raises(WorkloadError, match="attention heads"):
        shard(llama70, 3)


def test_acceptance_plan_for_llama_70b_on_h100():
    runner = CliRunner()
    result = runner.invoke(main, ["plan", MODEL, "--context", "8192", "--concurrency", "32", "--gpu", "h100",
                                  "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)["result"]
    plans = data["plans"]
    assert plans and [p["gpus"] for p in plans] == sorted(p["gpus"] for p in plans)
    arch = load_model(MODEL)[1]
    h100 = gpu_catalog().find("h100")
    for p in plans:
        for key in ("gpu", "gpus", "tp", "pp", "replicas", "per_gpu_peak_bytes", "headroom_bytes"):
            assert key in p
        assert p["gpus"] == p["tp"] * p["pp"] * p["replicas"]
        assert arch.num_heads % p["tp"] == 0 and arch.num_kv_heads % p["tp"] == 0
        assert p["headroom_bytes"] == h100.memory_bytes - p["per_gpu_peak_bytes"] >= 0
        for share in p["per_gpu"]:
            assert sum(t["bytes"] for t in share["breakdown"]) == share["peak_bytes"]
        assert p["per_gpu_peak_bytes"] == max(s["peak_bytes"] for s in p["per_gpu"])
        assert sum(s["layers"] for s in p["per_gpu"]) == arch.num_layers
    # the smallest plan is the smallest that fits by the engine's own numbers
    best = plans[0]["gpus"]
    request = PlanRequest(context=8192, concurrency=32, precisions=("bf16",))
    for n in range(1, best):
        for tp in (1, 2, 4, 8):
            for pp in range(1, n + 1):
                if n % (tp * pp):
                    continue
                replicas = n // (tp * pp)
                try:
                    stages = transformers_layout(arch, MODEL, request, "bf16", h100, tp, pp, -(-32 // replicas))
                except WorkloadError:
                    continue
                assert max(e.peak_device_bytes for e in stages) > h100.memory_bytes, (n, tp, pp)


def test_vllm_plan_kv_pool_and_concurrency():
    result = plan(MODEL, ["h100"], context=8192, concurrency=32, runtime="vllm", top=3)
    best = result.plans[0]
    assert best.runtime == "vllm" and best.kv_cache_bytes > 0
    block_tokens = 16
    per_block = 2 * (80 // best.pp) * (8 // best.tp) * 128 * 2 * block_tokens
    assert best.max_concurrent_sequences == (best.kv_cache_bytes // per_block) // (8192 // block_tokens)
    assert best.max_concurrent_sequences * best.replicas >= 32
    for share in best.per_gpu:
        assert sum(t.bytes for t in share.breakdown) == share.peak_bytes <= best.gpu_memory_bytes
    fp8 = plan(MODEL, ["h100"], context=8192, concurrency=32, runtime="vllm", kv_cache_dtype="fp8", tp=4, pp=1)
    assert fp8.plans[0].max_concurrent_sequences > 1.9 * best.max_concurrent_sequences * (best.tp / 4) ** 0


def test_vllm_flag_names_are_accepted():
    runner = CliRunner()
    result = runner.invoke(main, ["plan", "llama-3.1-8b", "--max-model-len", "4096", "--max-num-seqs", "8",
                                  "--tensor-parallel-size", "2", "--pipeline-parallel-size", "1",
                                  "--gpu-memory-utilization", "0.8", "--kv-cache-dtype", "fp8", "--runtime", "vllm",
                                  "--gpu", "l4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)["result"]
    assert data["plans"] and all(p["tp"] == 2 and p["pp"] == 1 for p in data["plans"])
    # --max-num-seqs is vLLM's max_num_seqs, not the concurrency to serve
    assert data["request"]["max_num_seqs"] == 8 and data["request"]["concurrency"] == 1
    assert data["request"]["kv_cache_dtype"] == "fp8" and data["request"]["gpu_memory_utilization"] == 0.8


def test_max_context_is_the_boundary():
    rows = plan_maximum(MODEL, "rtx4090", "context", context=4096, new_tokens=128, concurrency=1,
                        precision="bf16", runtime="transformers", tp=1, pp=1, max_gpus=1).layouts
    assert rows[0].value == 0  # 131 GiB of bf16 weights on a 24 GB card
    rows = plan_maximum("llama-3.1-8b", "h100", "context", context=4096, new_tokens=128, concurrency=4,
                        precision="bf16", runtime="transformers", tp=1, pp=1, max_gpus=1).layouts
    best = rows[0].value
    assert 4096 < best < 131072 and not rows[0].capped
    fits = plan("llama-3.1-8b", ["h100"], context=best, new_tokens=128, concurrency=4, tp=1, pp=1, max_gpus=1)
    assert fits.plans
    over = plan("llama-3.1-8b", ["h100"], context=best + 1, new_tokens=128, concurrency=4, tp=1, pp=1, max_gpus=1)
    assert not over.plans


def test_plot_writes_a_readable_png(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = tmp_path / "memory.png"
    result = CliRunner().invoke(main, ["plot", "llama-3.1-8b", "-o", str(out), "--gpu", "h100", "--gpu", "rtx4090",
                                       "--upto", "32768"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 400
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours and len(colours) > 20  # lines and text, not a blank canvas


def test_plot_rejects_unknown_suffix(tmp_path):
    result = CliRunner().invoke(main, ["plot", "gpt2", "-o", str(tmp_path / "x.bmp")])
    assert result.exit_code == 2 and ".png" in result.output


def test_vllm_plan_bounds_positions_per_request_not_per_profile_run():
    """vLLM's profile run spreads max_num_batched_tokens (8192) over up to max_num_seqs requests,
    so gpt2's 1024 learned positions allow a 1024-token max_model_len, not a 2048-token one."""
    assert plan("gpt2", ["h100"], context=1024, runtime="vllm").plans
    with pytest.raises(WorkloadError, match="1024 positions"):  # an invalid request, not a plan that does not fit
        plan("gpt2", ["h100"], context=2048, runtime="vllm")
    refused = plan("gpt2", ["h100"], context=1024, runtime="vllm", max_num_seqs=2)  # 4096 tokens per request
    assert not refused.plans and any("1024 positions" in reason for reason in refused.rejected)


def test_kv_cache_dtype_means_for_plan_what_it_means_for_estimate():
    """--kv-cache-dtype int4 under the transformers runtime plans each rank with transformers'
    QuantizedCache, as `estimate --kv-cache-dtype int4` sizes one GPU: a smaller cache per GPU."""
    from vramplan import plan

    def peak(kv: str) -> int:
        report = plan("llama-3.1-8b", ["h100"], context=32768, concurrency=4, kv_cache_dtype=kv, tp=1, pp=1)
        return report.plans[0].per_gpu_peak_bytes
    assert peak("int4") < peak("auto")
