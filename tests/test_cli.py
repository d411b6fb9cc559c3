"""The CLI through click's CliRunner: output, --json round-trips, and one-sentence errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from vramplan import Workload, estimate
from vramplan.cli import main
from vramplan.result import Estimate


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, list(args))

    return invoke


def test_estimate_prints_a_table_with_totals(run):
    result = run("estimate", "llama-3.2-1b", "--batch", "2", "--prompt-len", "256")
    assert result.exit_code == 0, result.output
    assert "= peak allocated" in result.output and "= peak on device" in result.output
    assert "KV cache" in result.output and "weights" in result.output


def test_estimate_json_is_the_result_model(run):
    result = run("estimate", "llama-3.2-1b", "--batch", "2", "--prompt-len", "256", "--json")
    assert result.exit_code == 0, result.output
    envelope = json.loads(result.output)
    assert envelope["schema_version"] == 1 and envelope["command"] == "estimate"
    assert envelope["request"]["model"] == "llama-3.2-1b" and envelope["request"]["batch"] == 2
    data = envelope["result"]
    for key in ("model", "parameters", "weights_bytes", "kv_cache_bytes", "peak_allocated_bytes",
                "peak_device_bytes", "breakdown"):
        assert key in data
    assert all({"name", "bytes", "why"} <= set(t) for t in data["breakdown"])
    parsed = Estimate.model_validate(data)
    direct = estimate("llama-3.2-1b", Workload(batch=2, prompt_len=256))
    assert parsed == direct
    allocated = sum(t["bytes"] for t in data["breakdown"] if t["scope"] == "allocated")
    assert allocated == data["peak_allocated_bytes"]
    assert sum(t["bytes"] for t in data["breakdown"]) == data["peak_device_bytes"]


def test_gpu_verdict_says_whether_it_fits(run):
    fits = json.loads(run("estimate", "llama-3.2-1b", "--gpu", "H100-80GB-SXM", "--json").output)["result"]
    assert fits["verdict"]["fits"] is True and fits["verdict"]["gpu"] == "H100"
    big = json.loads(run("estimate", "meta-llama/Llama-3.1-70B", "--gpu", "rtx4090", "--json").output)["result"]
    assert big["verdict"]["fits"] is False and big["verdict"]["headroom_bytes"] < 0


@pytest.mark.parametrize("args,needle", [
    (["estimate", "no-such-model"], "not an existing path"),
    (["estimate", "llama-3.2-1b", "--gpu", "tpu-v9"], "Unknown GPU"),
    (["estimate", "llama-3.2-1b", "--batch", "0"], "batch"),
    (["estimate", "llama-3.2-1b", "--batch", "999999999"], "batch"),
    (["estimate", "llama-3.2-1b", "--precision", "int3"], "Unknown precision"),
    (["estimate", "gpt2", "--prompt-len", "4000"], "positions"),
    (["estimate", "bloomz-560m", "--attn", "sdpa"], "eager"),
    (["estimate", "THUDM/chatglm3-6b"], "trust_remote_code"),
    (["estimate", "/no/such/dir/config.json"], "not an existing path"),
])
def test_user_errors_are_one_sentence_and_exit_2(run, args, needle):
    result = run(*args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vramplan: ") and needle in lines[0]
    assert "Traceback" not in result.output


def test_malformed_config_file(run, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    result = run("estimate", str(bad))
    assert result.exit_code == 2 and "not valid JSON" in result.output
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 0}))
    result = run("estimate", str(bad))
    assert result.exit_code == 2 and "num_attention_heads" in result.output


def test_models_lists_the_bundle(run):
    result = run("models", "--json")
    assert result.exit_code == 0
    entries = json.loads(result.output)["result"]
    aliases = {e["alias"] for e in entries}
    assert {"llama-3.1-8b", "qwen3-0.6b", "octocoder"} <= aliases
    assert any(e["refused"] for e in entries) and all(e["parameters"] or e["refused"] for e in entries)


def test_validate_without_cuda_is_a_clear_error(run):
    result = run("validate", "llama-3.2-1b")
    assert result.exit_code == 2
    assert "CUDA" in result.output or "validate needs" in result.output


def test_validate_matrix_needs_out(run, tmp_path):
    matrix = tmp_path / "m.yaml"
    matrix.write_text("blocks: []\n")
    result = run("validate", "--matrix", str(matrix))
    assert result.exit_code == 2 and "--out" in result.output


def test_small_models_print_mib_and_text_fits_the_terminal(run):
    result = CliRunner().invoke(main, ["estimate", "smollm2-135m-instruct"], env={"COLUMNS": "72"})
    assert result.exit_code == 0, result.output
    assert "MiB" in result.output and " 0.00 " not in result.output
    assert all(len(line) <= 72 for line in result.output.splitlines())
    big = run("estimate", "llama-3.1-8b").output
    assert "GiB" in big.splitlines()[4]


def test_dtype_when_the_config_names_none(run, tmp_path):
    """transformers 5.17 loads the checkpoint's stored dtype (dtype='auto'): the headers when
    present, else fp32; the output says which was assumed."""
    gpt2 = json.loads(run("estimate", "gpt2", "--json").output)["result"]
    assert gpt2["precision"] == "fp32" and any("fp32 assumed" in n for n in gpt2["notes"])
    import struct

    from vramplan.source import load_bundled

    (tmp_path / "config.json").write_text(json.dumps(load_bundled("gpt2").config))
    header = json.dumps({"wte.weight": {"dtype": "F16", "shape": [50257, 768], "data_offsets": [0, 0]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    local = json.loads(run("estimate", str(tmp_path), "--json").output)["result"]
    assert local["precision"] == "fp16" and any("safetensors store" in n for n in local["notes"])
    explicit = json.loads(run("estimate", "gpt2", "--precision", "bf16", "--json").output)["result"]
    assert not any("torch_dtype" in n for n in explicit["notes"])


def test_plan_ranks_fewest_gpus_then_the_smallest_gpu(run):
    data = json.loads(run("plan", "smollm2-135m-instruct", "--json", "--top", "28").output)["result"]
    plans = data["plans"]
    assert plans[0]["gpus"] == 1 and plans[0]["gpu"] != "MI325X"
    keys = [(p["gpus"], p["gpu_memory_bytes"]) for p in plans]
    assert keys == sorted(keys)
    assert "H100" not in data["unmeasured_gpus"] and "T4" in data["unmeasured_gpus"]
    by_headroom = json.loads(run("plan", "smollm2-135m-instruct", "--json", "--sort", "headroom").output)["result"]
    assert by_headroom["plans"][0]["headroom_bytes"] == max(p["headroom_bytes"] for p in plans)
    text = run("plan", "smollm2-135m-instruct", "--gpu", "t4", "--gpu", "h100").output
    assert "T4*" in text and "H100*" not in text and "no committed rows measured T4" in text


def test_plan_prints_the_caveats(run):
    tp = run("plan", "llama-3.1-8b", "--gpu", "h100", "--tp", "2").output
    assert "NCCL buffers and CUDA-graph constants are not measured" in tp
    moe = run("plan", "qwen3-30b-a3b", "--gpu", "h100", "--precision", "int8").output
    assert "nn.Linear layers only" in moe  # estimate's notes for the per-GPU run
    assert "fp32 assumed" in run("plan", "gpt2", "--gpu", "h100").output
    assert "not measured" in run("plan", "llama-3.1-8b", "--gpu", "h100", "--runtime", "vllm").output
