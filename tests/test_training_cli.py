"""`vramplan estimate --train`: the flags the issue names, their JSON, --max, and refusals."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from vramplan.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_train_flags_reach_the_estimate_and_json_carries_the_totals():
    result = run("estimate", "llama-3.2-1b", "--train", "lora", "--batch", "4", "--seq-len", "1024",
                 "--lora-rank", "8", "--gradient-checkpointing", "--precision", "fp32", "--autocast", "bf16",
                 "--gpu", "h200", "--json")
    assert result.exit_code == 0, result.output
    envelope = json.loads(result.output)
    assert envelope["command"] == "estimate-train"
    est = envelope["result"]
    assert est["training"] == {**est["training"], "method": "lora", "batch": 4, "seq_len": 1024, "lora_rank": 8,
                               "gradient_checkpointing": True, "autocast": "bf16"}
    assert est["precision"] == "fp32"
    assert est["peak_allocated_bytes"] == max(m["bytes"] for m in est["moments"])
    assert est["peak_device_bytes"] > est["peak_allocated_bytes"]
    assert est["verdict"]["fits"] is True
    names = {t["name"] for t in est["breakdown"]}
    assert {"weights", "adapter weights"} <= names


def test_rank_changes_the_adapters_by_the_exact_bytes():
    """LoRA A [r, in] and B [out, r] in fp32 on every all-linear module: doubling r doubles them."""
    def adapters(rank: str) -> int:
        out = json.loads(run("estimate", "qwen2.5-0.5b", "--train", "lora", "--lora-rank", rank, "--json").output)
        return next(t["bytes"] for t in out["result"]["breakdown"] if t["name"] == "adapter weights")
    assert adapters("32") == pytest.approx(2 * adapters("16"), rel=0.001)


def test_text_output_names_the_step_and_its_peak():
    result = run("estimate", "gpt2-medium", "--train", "full", "--batch", "8", "--seq-len", "1024")
    assert result.exit_code == 0, result.output
    assert "training step: full fine-tuning" in result.output
    assert "peak at: step" in result.output
    assert "= peak allocated" in result.output


def test_max_batch_is_the_boundary_of_the_verdict():
    result = run("estimate", "llama-3.2-1b", "--train", "full", "--seq-len", "2048", "--gpu", "h100",
                 "--max", "batch", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["result"]
    best = report["largest"]
    assert best > 0 and report["estimate"]["verdict"]["fits"]

    def fits(batch: int) -> bool:
        out = run("estimate", "llama-3.2-1b", "--train", "full", "--seq-len", "2048", "--gpu", "h100",
                  "--batch", str(batch), "--json")
        return json.loads(out.output)["result"]["verdict"]["fits"]
    assert fits(best) and not fits(best + 1)


@pytest.mark.parametrize("args", [
    ["--train", "full", "--precision", "all"],
    ["--train", "full", "--mode", "forward"],
    ["--train", "full", "--max", "batch"],  # no --gpu
    ["--max", "seq-len", "--gpu", "h100"],  # seq-len is a training axis
    ["--train", "lora", "--lora-rank", "0"],
    ["--train", "full", "--seq-len", "1"],
    ["--train", "lora", "--precision", "nf4"],  # 4-bit weights are qlora
])
def test_invalid_training_requests_exit_2_with_one_sentence(args):
    result = CliRunner().invoke(main, ["estimate", "llama-3.2-1b", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def _plan(*args: str) -> dict:
    result = run("plan", "llama-3.1-8b", "--train", "full", "--batch", "2", "--seq-len", "2048",
                 "--gradient-checkpointing", "--gpu", "h100", "--json", *args)
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.output)["result"]


def test_plan_train_shards_states_then_grads_then_weights():
    """Per rank at a fixed width: zero1 divides the optimizer states, zero2 the grads too, zero3
    the weights too; each scheme needs no more GPUs than the one before."""
    plans = {s: _plan("--sharding", s)["plans"] for s in ("zero1", "zero2", "zero3")}
    counts = [plans[s][0]["gpus"] for s in ("zero1", "zero2", "zero3")]
    assert counts == sorted(counts, reverse=True)
    terms = {t["name"]: t["bytes"] for t in plans["zero3"][0]["breakdown"]}
    assert "gathered layer parameters" in terms and "communication buffers" in terms
    assert all(p["per_gpu_peak_bytes"] <= p["gpu_memory_bytes"] for s in plans for p in plans[s])


def test_plan_train_without_a_fit_exits_1_with_the_reason():
    result = run("plan", "llama-3.1-70b", "--train", "full", "--sharding", "none", "--gpu", "l4")
    assert result.exit_code == 1
    assert "no GPU kind fits" in result.output
