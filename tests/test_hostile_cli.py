"""Careless and hostile input, command by command: every refusal is one sentence on stderr that
names the bad field, exit status 2, no traceback, no hang and no unbounded read; a valid plan
request that no layout fits exits 1 with its reason."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from vramplan.cli import main
from vramplan.source import load_bundled

LLAMA = load_bundled("llama-3.2-1b").config
GPU_ENTRY = ("{name: %s, vendor: nvidia, memory_bytes: %s, memory_source: test, bandwidth_gbps: 1, bf16: true, "
             "fp8: false, int8: true, gpus_per_node: %s, interconnect: none%s}")


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def refused(result, *needles: str) -> str:
    """One line, `vramplan: ...`, exit 2, naming what was wrong."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    line = lines[0]
    assert line.startswith("vramplan: ") and "Traceback" not in result.output
    assert "internal error" not in line, line
    for needle in needles:
        assert needle.lower() in line.lower(), line
    return line


def model_dir(tmp_path: Path, config: dict | None = None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config if config is not None else LLAMA))
    return tmp_path


def safetensors(path: Path, header, raw: bytes | None = None, length: int | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body)
    return path


def run_subprocess(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """The hang cases run in a child process: a read that blocks fails the timeout, not the suite."""
    code = "import sys; from vramplan.cli import main; sys.argv = ['vramplan', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def refused_subprocess(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vramplan: "), proc.stderr
    assert "internal error" not in lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]


# ---- model references and config files -------------------------------------------------------

@pytest.mark.parametrize("reference,needle", [
    ("a/" + "b" * 5000, "model reference"),
    ("a/" + "b" * 3000, "hub id"),
    ("b" * 5000, "model reference"),
    ("meta-llama/Llama\x01-3", "hub id"),
    ("owner/na me", "hub id"),
    ("owner/name\nnext", "hub id"),
    ("bad\x00id", "nul"),
    ("own..er/x", "hub id"),
])
def test_model_ids_that_are_no_hub_id(reference, needle):
    refused(run("estimate", reference), needle)


def test_deeply_nested_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    refused(run("estimate", str(path)), "nests")
    config = {"model_type": "llama"}
    inner = config
    for _ in range(200):
        inner["x"] = {}
        inner = inner["x"]
    path.write_text(json.dumps(config))
    refused(run("estimate", str(path)), "nests")


@pytest.mark.parametrize("raw,needle", [
    (b'{"model_type": "llama", "name": "\xff\xfe"}', "UTF-8"),
    (b"\x00\x01\x02", "JSON"),
    (b"", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"hidden_size": 1' + b"0" * 5000 + b"}", "JSON"),
    (b'{"model_type": "llama", "hidden_size": NaN}', "hidden_size"),
    (b'{"model_type": "llama", "hidden_size": Infinity}', "hidden_size"),
])
def test_config_bytes_that_are_no_config(tmp_path, raw, needle):
    path = tmp_path / "config.json"
    path.write_bytes(raw)
    refused(run("estimate", str(path)), needle)
    refused(run("estimate", str(tmp_path)), needle)  # the same file found in its directory


def test_config_too_large_is_not_read(tmp_path):
    path = tmp_path / "config.json"
    with path.open("wb") as fh:  # sparse: 4 GiB on paper, nothing on disk
        fh.truncate(4 * 2**30)
    refused(run("estimate", str(path)), "MiB")
    refused(run("estimate", str(tmp_path)), "MiB")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_device_files_as_config():
    refused(run("estimate", "/dev/zero"), "character device")
    refused(run("plan", "/dev/zero"), "character device")


def test_config_that_is_a_directory_without_config(tmp_path):
    (tmp_path / "config.json").mkdir()
    refused(run("estimate", str(tmp_path)), "directory")


def test_dangling_config_link(tmp_path):
    (tmp_path / "config.json").symlink_to(tmp_path / "nowhere.json")
    refused(run("estimate", str(tmp_path)), "dangling")
    refused(run("estimate", str(tmp_path / "config.json")), "dangling")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_config_and_weights_do_not_hang(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    refused_subprocess(run_subprocess("estimate", str(fifo)), "FIFO")
    refused_subprocess(run_subprocess("estimate", str(tmp_path)), "FIFO")
    other = tmp_path / "model"
    model_dir(other.mkdir() or other)
    os.mkfifo(other / "model.safetensors")
    refused_subprocess(run_subprocess("estimate", str(other)), "FIFO")


# ---- safetensors headers ----------------------------------------------------------------------

def _header(shape, dtype="BF16"):
    return {"model.embed_tokens.weight": {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}}


@pytest.mark.parametrize("header,needle", [
    (_header(["a", 2]), "shape"),
    (_header([1.5, 2]), "shape"),
    (_header([-1, 2]), "shape"),
    (_header([True, 2]), "shape"),
    (_header([2**40, 2**40]), "elements"),
    (_header("2048"), "shape"),
    (_header([2] * 20), "dimensions"),
    (_header(None), "shape"),
    (_header([2, 2], dtype="F128"), "dtype"),
    (_header([2, 2], dtype=None), "dtype"),
    (_header([2, 2], dtype=7), "dtype"),
    ({"model.embed_tokens.weight": [1, 2]}, "dtype and shape"),
    ([1, 2, 3], "JSON object"),
])
def test_safetensors_headers_that_lie(tmp_path, header, needle):
    safetensors(model_dir(tmp_path) / "model.safetensors", header)
    refused(run("estimate", str(tmp_path)), needle)


def test_safetensors_nan_shape(tmp_path):
    raw = b'{"w": {"dtype": "BF16", "shape": [NaN, 2], "data_offsets": [0, 0]}}'
    safetensors(model_dir(tmp_path) / "model.safetensors", None, raw=raw)
    refused(run("estimate", str(tmp_path)), "shape")


@pytest.mark.parametrize("raw,length,needle", [
    (b"{}", 2**40, "header size"),
    (b"{}", 1000, "header size"),  # longer than the file
    (b"\xff\xfe{}", None, "UTF-8"),
    (b"{not json", None, "not valid JSON"),
    (b"[" * 50_000 + b"]" * 50_000, None, "nests"),
])
def test_safetensors_framing(tmp_path, raw, length, needle):
    safetensors(model_dir(tmp_path) / "model.safetensors", None, raw=raw, length=length)
    refused(run("estimate", str(tmp_path)), needle)


def test_short_safetensors_file(tmp_path):
    (model_dir(tmp_path) / "model.safetensors").write_bytes(b"\x01\x02")
    refused(run("estimate", str(tmp_path)), "too short")


def test_directory_and_dangling_link_named_safetensors(tmp_path):
    first = tmp_path / "a"
    model_dir(first.mkdir() or first)
    (first / "model.safetensors").mkdir()
    refused(run("estimate", str(first)), "directory")
    second = tmp_path / "b"
    model_dir(second.mkdir() or second)
    (second / "model.safetensors").symlink_to(second / "gone.safetensors")
    refused(run("estimate", str(second)), "dangling")


def test_a_valid_header_still_counts(tmp_path):
    safetensors(model_dir(tmp_path) / "model.safetensors", _header([128256, 2048]))
    result = run("estimate", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["result"]["checkpoint_bytes"] == 128256 * 2048 * 2


# ---- quantization_config of the wrong shape -----------------------------------------------------

@pytest.mark.parametrize("qc", [
    "gptq", 5, [], {"quant_method": 5}, {"quant_method": "gptq", "bits": "4"},
    {"quant_method": "gptq", "bits": 4, "modules_to_not_convert": [1, 2]},
    {"quant_method": "gptq", "bits": 4, "modules_to_not_convert": "lm_head"},
    {"quant_method": "compressed-tensors", "config_groups": [1]},
    {"quant_method": "compressed-tensors", "config_groups": "x"},
    {"quant_method": "fp8", "weight_block_size": [True, "x"]},
    {"quant_method": "fp8", "weight_block_size": "128"},
    {"quant_method": "fp8", "activation_scheme": 3},
    {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": 7},
    {"quant_method": "awq", "bits": 1e30}, {"quant_method": "gptq", "bits": 0},
    {"quant_method": "mxfp4", "modules_to_not_convert": [None]},
    {"quant_method": "no-such-method"},
])
def test_quantization_config_fields_of_the_wrong_type(tmp_path, qc):
    refused(run("estimate", str(model_dir(tmp_path, {**LLAMA, "quantization_config": qc}))), "quantization")


# ---- the GPU catalog ----------------------------------------------------------------------------

def catalog(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gpus.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("entry,needle", [
    (GPU_ENTRY % ("Mine", -1, 8, ""), "memory_bytes"),
    (GPU_ENTRY % ("Mine", 0, 8, ""), "memory_bytes"),
    (GPU_ENTRY % ("Mine", 10**9, 0, ""), "gpus_per_node"),
    (GPU_ENTRY % ("Mine", 10**9, -3, ""), "gpus_per_node"),
    (GPU_ENTRY % ("Mine", 10**9, 8, ", price_per_hour_usd: -2"), "price_per_hour_usd"),
    (GPU_ENTRY % ("Mine", 10**9, 8, ", price_per_hour_usd: .nan"), "price_per_hour_usd"),
    (GPU_ENTRY % ("Mine", "lots", 8, ""), "memory_bytes"),
    (GPU_ENTRY % ("H100", 10**9, 8, ""), "built-in"),
    (GPU_ENTRY % ("Mine", 10**9, 8, ", aliases: [h100-sxm]"), "built-in"),
    (GPU_ENTRY % ("Mine", 10**9, 8, ", outside_torch_key: nowhere"), "outside_torch_key"),
    (GPU_ENTRY % ("'!!!'", 10**9, 8, ""), "letter"),
    ("just a string", "mapping"),
])
def test_catalog_entries_that_are_wrong(tmp_path, entry, needle):
    path = catalog(tmp_path, f"gpus:\n  - {entry}\n")
    refused(run("estimate", "llama-3.2-1b", "--gpu", "h100", "--gpu-catalog", path), needle)
    refused(run("plan", "llama-3.2-1b", "--gpu-catalog", path), needle)


@pytest.mark.parametrize("text,needle", [
    ("gpus: [", "Cannot read"),
    ("- a\n- b\n", "mapping"),
    ("gpus: 5\n", "list"),
    ("gpus: []\n", "list"),
    ("", "mapping"),
    ("gpus: " + "[" * 5000 + "]" * 5000, "GPU catalog"),
])
def test_catalog_files_that_are_wrong(tmp_path, text, needle):
    refused(run("plan", "llama-3.2-1b", "--gpu-catalog", catalog(tmp_path, text)), needle)


def test_catalog_bytes_and_sizes(tmp_path):
    path = tmp_path / "gpus.yaml"
    path.write_bytes(b"gpus: \xff\xfe")
    refused(run("plan", "llama-3.2-1b", "--gpu-catalog", str(path)), "UTF-8")
    with path.open("wb") as fh:
        fh.truncate(4 * 2**30)
    refused(run("plan", "llama-3.2-1b", "--gpu-catalog", str(path)), "MiB")
    refused(run("plan", "llama-3.2-1b", "--gpu-catalog", str(tmp_path)), "directory")
    refused(run("plan", "llama-3.2-1b", "--gpu-catalog", str(tmp_path / "missing.yaml")), "does not exist")
    if os.path.exists("/dev/zero"):
        refused(run("plan", "llama-3.2-1b", "--gpu-catalog", "/dev/zero"), "character device")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_catalog_does_not_hang(tmp_path):
    fifo = tmp_path / "gpus.yaml"
    os.mkfifo(fifo)
    refused_subprocess(run_subprocess("plan", "llama-3.2-1b", "--gpu-catalog", str(fifo)), "FIFO")
    refused_subprocess(run_subprocess("estimate", "llama-3.2-1b", "--gpu", "x", "--gpu-catalog", str(fifo)), "FIFO")


def test_a_new_catalog_gpu_is_planned(tmp_path):
    path = catalog(tmp_path, f"gpus:\n  - {GPU_ENTRY % ('MyCard', 48 * 2**30, 4, ', price_per_hour_usd: 1.5')}\n")
    result = run("plan", "llama-3.2-1b", "--gpu", "mycard", "--gpu-catalog", path, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)["result"]
    assert data["plans"][0]["gpu"] == "MyCard" and data["plans"][0]["cost_per_hour"] == 1.5
    assert data["unmeasured_gpus"] == ["MyCard"]


@pytest.mark.parametrize("gpu", ["x" * 5000, "h100\x01", "", "  "])
def test_unknown_gpu_names(gpu):
    refused(run("estimate", "llama-3.2-1b", "--gpu", gpu), "GPU")
