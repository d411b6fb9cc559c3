"""vLLM's start-up figures against published start-up logs (profiles/vllm_startup_logs.yaml).

Every row with a `predict:` block is replayed with its release's rules, GPU (the logged total
memory where the log prints one) and flags: the KV pool, token count and blocks within 3%,
every other logged component within 0.25 GiB. A failure names the row and the component.
"""

from __future__ import annotations

import pytest
from vramplan import load_model, plan
from vramplan.catalog import gpu_catalog
from vramplan.errors import WorkloadError
from vramplan.parallel import shard
from vramplan.request import PlanRequest
from vramplan.result import VllmStartup
from vramplan.runtimes.vllm import release_rules, version_key, vllm_startup
from vramplan.validate.vllmcheck import GIB, ROWS, TESTABLE, drift, predict


def test_enough_rows_are_replayed():
    assert len(TESTABLE) >= 26
    gpus = {r["predict"].get("gpu") or "logged" for r in TESTABLE}
    versions = {r["predict"]["rules"] for r in TESTABLE}
    tps = {r["predict"].get("tp", 1) for r in TESTABLE}
    assert len(gpus) >= 5 and len(versions) >= 8 and {1, 2, 4, 8} <= tps


def test_every_row_has_a_source_and_untested_rows_say_why():
    for row in ROWS:
        assert row["url"].startswith(("https://", "github-index-file:")), row["id"]
        assert row.get("quote"), row["id"]
        assert ("predict" in row) != bool(row.get("not_replayed")), f"{row['id']}: predict it or say why not"


@pytest.mark.parametrize("row", TESTABLE, ids=[r["id"] for r in TESTABLE])
def test_logged_row_is_predicted(row):
    startup = predict(row)
    problems = drift(row, startup)
    assert not problems, f"{row['id']} (rules {startup.vllm_version}): " + "; ".join(problems)


def test_versions_parse_and_select_rules():
    assert version_key("0.9.1.dev705+g01220ce89") == (0, 9, 1)
    assert version_key("0.29.1rc1.dev339") == (0, 29, 1)
    assert release_rules("0.19.1")[1].gpu_memory_utilization == 0.9
    assert release_rules("0.20.0")[1].gpu_memory_utilization == 0.92
    assert release_rules("0.20.0")[1].cudagraph_subtracted and not release_rules("0.19.1")[1].cudagraph_subtracted
    assert release_rules(None)[0] == "0.24.0"
    with pytest.raises(WorkloadError, match="older than the first release"):
        release_rules("0.5.3")
    with pytest.raises(WorkloadError, match="must look like"):
        release_rules("latest")


def _startup(model: str, gpu: str, tp: int = 1, **request) -> VllmStartup:
    _, arch = load_model(model)
    req = PlanRequest(runtime="vllm", **{"context": 16384, **request})
    return vllm_startup(shard(arch, tp, 1, 0, replicate_kv=True), gpu_catalog().find(gpu), req, "auto", tp)


def test_defaults_follow_entrypoint_gpu_and_version():
    h100 = _startup("meta-llama/Llama-3.1-8B-Instruct", "h100")
    assert (h100.max_num_batched_tokens, h100.max_num_seqs) == (8192, 1024)
    offline = _startup("meta-llama/Llama-3.1-8B-Instruct", "h100", entrypoint="offline")
    assert (offline.max_num_batched_tokens, offline.max_num_seqs) == (16384, 1024)
    a100 = _startup("meta-llama/Llama-3.1-8B-Instruct", "a100-80gb")
    assert (a100.max_num_batched_tokens, a100.max_num_seqs) == (2048, 256)
    old = _startup("meta-llama/Llama-3.1-8B-Instruct", "a100-80gb", vllm_version="0.8.5")
    assert old.max_num_seqs == 1024  # 0.8.5 gave every >= 70 GiB GPU the large defaults
    v0 = _startup("meta-llama/Llama-3.1-8B-Instruct", "h100", vllm_version="0.6.6", context=20000)
    assert v0.max_num_batched_tokens == 20000 and v0.engine == "v0"  # no chunked prefill below 32k


def test_sampler_path_changes_the_activation_peak():
    torch = _startup("Qwen/Qwen3-8B", "h100", sampler="torch")
    flashinfer = _startup("Qwen/Qwen3-8B", "h100", sampler="flashinfer")
    assert flashinfer.sampler == "flashinfer" and torch.sampler == "torch"
    per_element = release_rules(torch.vllm_version)[1].sampler_bytes
    assert torch.activation_peak_bytes - flashinfer.activation_peak_bytes == pytest.approx(
        1024 * 151936 * (per_element["torch"] - per_element["flashinfer"]), rel=0.01)


def test_tp_replicates_kv_heads_and_charges_nccl_per_rank():
    one = _startup("meta-llama/Llama-3.1-70B-Instruct", "h100", tp=4)
    many = _startup("meta-llama/Llama-3.1-70B-Instruct", "h100", tp=16, vllm_version="0.10.2")
    # 8 KV heads: 2 per rank at tp 4; at tp 16 each rank keeps one replicated head, not half of one
    assert one.kv_block_bytes == 16 * 80 * 2 * 2 * 128 * 2
    assert many.kv_block_bytes == 16 * 80 * 1 * 2 * 128 * 2
    solo = _startup("meta-llama/Llama-3.1-8B-Instruct", "h100")
    pair = _startup("meta-llama/Llama-3.1-8B-Instruct", "h100", tp=2)
    assert pair.non_torch_bytes > solo.non_torch_bytes  # NCCL buffers on every rank
    l40s = _startup("meta-llama/Llama-3.1-8B-Instruct", "l40s", tp=2)
    assert l40s.non_torch_bytes < pair.non_torch_bytes  # PCIe: no NVLS buffers


def test_pipeline_stages_page_their_own_layers_and_share_one_block_count():
    """pp 2: each stage's pool pages only its 40 layers (4 of 8 KV heads per rank at tp 2); the
    first stage also holds the embeddings, the last the lm_head, so their pools differ, and the
    engine allocates the smaller block count on every stage (vLLM takes the minimum over workers)."""
    result = plan("meta-llama/Llama-3.1-70B-Instruct", ["h100"], context=16384, runtime="vllm", tp=2, pp=2)
    best = next(p for p in result.plans if p.tp == 2 and p.pp == 2)
    first, last = (share.vllm for share in best.per_gpu)
    assert [share.layers for share in best.per_gpu] == [40, 40]
    assert first.kv_block_bytes == last.kv_block_bytes == 16 * 40 * 4 * 2 * 128 * 2
    assert first.model_loading_bytes != last.model_loading_bytes
    assert first.gpu_blocks == last.gpu_blocks
    assert best.kv_cache_bytes == min(first.kv_cache_bytes, last.kv_cache_bytes)
    one_stage = _startup("meta-llama/Llama-3.1-70B-Instruct", "h100", tp=4)
    assert one_stage.kv_block_bytes == 16 * 80 * 2 * 2 * 128 * 2  # tp 4, one stage: all 80 layers


def test_latent_attention_pages_are_one_copy_and_not_split():
    one = _startup("deepseek-ai/DeepSeek-V2-Lite", "h100")
    two = _startup("deepseek-ai/DeepSeek-V2-Lite", "h100", tp=2)
    assert one.kv_block_bytes == two.kv_block_bytes == 16 * 27 * (512 + 64) * 2


def test_sliding_window_layers_share_the_pool_from_091():
    new = _startup("openai/gpt-oss-20b", "h100", vllm_version="0.11.0")
    old = _startup("openai/gpt-oss-20b", "h100", vllm_version="0.8.5")
    assert new.kv_groups == 2 and old.kv_groups == 1
    # 12 full + 12 sliding layers: a block id spans 12 layers; a request needs its full-length
    # blocks plus the window's (128 - 1 + 8192 tokens)
    assert new.kv_block_bytes == 16 * 12 * 8 * 64 * 2 * 2
    assert new.blocks_per_request == 16384 // 16 + (-(-(127 + 8192) // 16) + 1)
    assert new.max_concurrency > old.max_concurrency


def test_gpt_oss_120b_at_16k_plans_on_one_h100():
    result = plan("openai/gpt-oss-120b", ["h100"], context=16384, runtime="vllm", top=3)
    best = result.plans[0]
    assert best.gpus == 1 and best.precision == "mxfp4"
    share = best.per_gpu[0]
    assert share.vllm is not None and share.vllm.max_concurrency >= 1
    assert share.vllm.model_loading_bytes < 66 * GIB


def test_plan_keeps_kv_bytes_and_concurrency_consistent_with_the_startup():
    best = plan("meta-llama/Llama-3.1-8B-Instruct", ["l40s"], context=8192, runtime="vllm", tp=2, pp=1).plans[0]
    figures = [s.vllm for s in best.per_gpu]
    assert all(f is not None for f in figures)
    assert best.kv_cache_bytes == min(f.kv_cache_bytes for f in figures if f)
    assert best.max_concurrent_sequences == int(min(f.max_concurrency for f in figures if f))
    for share in best.per_gpu:
        assert sum(t.bytes for t in share.breakdown) == share.peak_bytes


def test_refusals_are_one_sentence():
    with pytest.raises(WorkloadError, match="not model"):
        _startup("Qwen/Qwen3-Next-80B-A3B-Instruct", "h200")
