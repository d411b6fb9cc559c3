"""`plan` and `plot` under invalid requests: exit 2 with one sentence naming the bad option; a
valid request that no layout fits exits 1 with its reason; nothing is silently ignored."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from vramplan.cli import main

from .test_hostile_cli import refused


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("args,needle", [
    (["--precision", "all"], "estimate-only"),
    (["--precision", "int3"], "Unknown precision"),
    (["--precision", ""], "Unknown precision"),
    (["--tp", "3"], "power of two"),
    (["--tp", "1024"], "does not divide"),
    (["--tp", "0"], "--tp"),
    (["--tp", "-2"], "--tp"),
    (["--pp", "100"], "exceeds the 16 layers"),
    (["--pp", "0"], "--pp"),
    (["--tp", "8", "--pp", "16", "--max-gpus", "64"], "more than --max-gpus"),
    (["--top", "-1"], "--top"),
    (["--top", "0"], "--top"),
    (["--context", "0"], "--context"),
    (["--context", "-5"], "--context"),
    (["--context", "99999999999"], "--context"),
    (["--new-tokens", "0"], "--new-tokens"),
    (["--context", "512", "--new-tokens", "512"], "less than --context"),
    (["--concurrency", "0"], "--concurrency"),
    (["--concurrency", "-1"], "--concurrency"),
    (["--max-gpus", "0"], "--max-gpus"),
    (["--gpu-memory-utilization", "0.5"], "vLLM's"),
    (["--max-num-batched-tokens", "4096"], "vLLM's"),
    (["--max-num-seqs", "8"], "vLLM's"),
    (["--kv-cache-dtype", "fp16"], "--kv-cache-dtype"),
    (["--runtime", "vllm", "--kv-cache-dtype", "int4"], "QuantizedCache"),
    (["--runtime", "vllm", "--kv-cache-dtype", "fp32"], "needs --precision fp32"),
    (["--runtime", "vllm", "--gpu-memory-utilization", "1.5"], "gpu-memory-utilization"),
    (["--runtime", "vllm", "--gpu-memory-utilization", "0"], "gpu-memory-utilization"),
    (["--runtime", "vllm", "--max-num-seqs", "0"], "--max-num-seqs"),
    (["--runtime", "vllm", "--max-num-batched-tokens", "-1"], "--max-num-batched-tokens"),
    (["--runtime", "tgi"], "tgi"),
    (["--sort", "price"], "price"),
    (["--gpu", "tpu-v9"], "Unknown GPU"),
    (["--max", "context"], "exactly one --gpu"),
    (["--max", "context", "--gpu", "h100", "--gpu", "l4"], "exactly one --gpu"),
    (["--tp", "abc"], "not a valid integer"),
])
def test_invalid_plan_requests_exit_2(args, needle):
    refused(run("plan", "llama-3.2-1b", *args), needle)


@pytest.mark.parametrize("model", ["gpt2", "opt-125m", "gpt_bigcode-santacoder"])
def test_context_beyond_a_hard_position_limit_is_refused(model):
    refused(run("plan", model, "--context", "4096"), "positions")
    assert run("plan", model, "--gpu", "h100").exit_code == 0  # the default context follows the model


def test_the_default_context_follows_the_model():
    data = json.loads(run("plan", "gpt2", "--gpu", "h100", "--json").output)["result"]
    assert data["request"]["context"] == 1024
    data = json.loads(run("plan", "llama-3.2-1b", "--gpu", "h100", "--json").output)["result"]
    assert data["request"]["context"] == 4096


def test_a_valid_request_that_nothing_fits_exits_1_with_its_reason():
    result = run("plan", "llama-3.1-70b", "--gpu", "rtx4090", "--max-gpus", "2")
    assert result.exit_code == 1
    assert "No plan fits" in result.output and "does not fit" in result.output
    data = json.loads(run("plan", "llama-3.1-70b", "--gpu", "rtx4090", "--max-gpus", "2", "--json").output)
    assert data["result"]["plans"] == [] and all(reason for reason in data["result"]["rejected"])
    result = run("plan", "llama-3.1-70b", "--gpu", "rtx4090", "--tp", "16", "--runtime", "vllm")
    assert result.exit_code == 1 and "--multi-node" in result.output
    result = run("plan", "llama-3.1-70b", "--gpu", "rtx4090", "--max", "context", "--tp", "1", "--pp", "1",
                 "--max-gpus", "1")
    assert result.exit_code == 1 and "does not fit" in result.output


def test_max_context_is_capped_at_the_models_positions():
    result = run("plan", "gpt2", "--gpu", "h100", "--max", "context", "--tp", "1", "--pp", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)["result"]
    assert data["limit"] == 1024 and data["layouts"][0] == {"gpu": "H100", "gpus": 1, "tp": 1, "pp": 1,
                                                             "value": 1024, "capped": True}
    assert any("capped at the model's 1024 positions" in n for n in data["notes"])
    text = run("plan", "gpt2", "--gpu", "h100", "--max", "context", "--tp", "1", "--pp", "1").output
    assert "1024 (capped)" in text and "capped at the model's 1024 positions" in text


# ---- plot -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["-p", "int3"], "Unknown precision"),
    (["-p", "bf16", "-p", "nope"], "Unknown precision"),
    (["--upto", "-5"], "--upto"),
    (["--upto", "0"], "--upto"),
    (["--x", "batch", "--upto", "-1"], "--upto"),
    (["--batch", "0"], "batch"),
    (["--prompt-len", "-3"], "prompt-len"),
    (["--gpu", "tpu-v9"], "Unknown GPU"),
])
def test_plot_refuses_as_estimate_does_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "chart.png"
    refused(run("plot", "gpt2", "-o", str(out), *args), needle)
    assert not out.exists()


def test_plot_output_paths(tmp_path):
    refused(run("plot", "gpt2", "-o", str(tmp_path / "missing" / "chart.png")), "does not exist")
    (tmp_path / "dir.png").mkdir()
    refused(run("plot", "gpt2", "-o", str(tmp_path / "dir.png")), "not a regular file")
    refused(run("plot", "gpt2", "-o", str(tmp_path / "chart.bmp")), ".png")


def test_plot_of_nothing_is_refused(tmp_path):
    out = tmp_path / "chart.png"
    refused(run("plot", "gpt2", "-o", str(out), "--prompt-len", "100", "--new-tokens", "1000"), "Nothing to plot")
    assert not out.exists()
