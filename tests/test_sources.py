"""Where a config comes from: bundle, file, directory (with safetensors headers), Hub offline."""

from __future__ import annotations

import json
import struct

import pytest
from vramplan.errors import SourceError
from vramplan.source import bundled_index, read_safetensors_header, resolve


def test_bundled_by_hub_id_and_alias():
    by_id = resolve("meta-llama/Llama-3.1-8B")
    by_alias = resolve("llama-3.1-8b")
    assert by_id.origin == by_alias.origin == "bundled"
    assert by_id.config == by_alias.config
    assert resolve("LLAMA-3.1-8B").name == "meta-llama/Llama-3.1-8B"


def test_every_shared_hub_config_is_bundled():
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared" / "hub-configs"
    if not shared.is_dir():
        pytest.skip("../shared/hub-configs is not beside this checkout")
    names = {p.name for p in shared.glob("*.json")}
    assert names == set(bundled_index().values()) | (names - set(bundled_index().values()))
    for name in names:
        assert name in bundled_index().values(), f"{name} is not bundled"


def _write_safetensors(path, tensors):
    header = {name: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, 0]}
              for name, (dtype, shape) in tensors.items()}
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_directory_reads_config_and_safetensors_headers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(resolve("llama-3.2-1b").config))
    _write_safetensors(tmp_path / "model.safetensors", {
        "model.embed_tokens.weight": ("BF16", (128256, 2048)),
        "lm_head.weight": ("BF16", (128256, 2048)),
    })
    source = resolve(str(tmp_path))
    assert source.origin == "directory"
    assert source.stored_tensors["lm_head.weight"].elements == 128256 * 2048


def test_safetensors_header_is_bounded(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**12))
    with pytest.raises(SourceError):
        read_safetensors_header(bad)


def test_config_json_path(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2"}))
    assert resolve(str(path)).config == {"model_type": "gpt2"}


@pytest.mark.parametrize("reference", ["", "   ", "a/b/c", "./missing", "x.json"])
def test_bad_references(reference):
    with pytest.raises(SourceError):
        resolve(reference)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="Hub cannot be reached"):
        resolve("someone/not-bundled-model")


def test_auto_map_is_never_followed(tmp_path):
    config = dict(resolve("llama-3.2-1b").config)
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "evil.py").write_text("raise SystemExit('repository code ran')\n")
    from vramplan import estimate

    assert estimate(str(tmp_path)).parameters > 0


def test_the_dtype_a_config_without_one_loads_in():
    from vramplan.source import StoredTensor, load_dtype, stored_float_dtype

    stored = {"a": StoredTensor("BF16", (1000, 1000)), "b": StoredTensor("F32", (10,)),
              "c": StoredTensor("F8_E4M3", (4000, 4000)), "d": StoredTensor("I64", (10**7,))}
    assert stored_float_dtype(stored) == "bf16"  # the float dtype holding most bytes; fp8 and ints never
    assert load_dtype("fp16", False, stored) == ("fp16", None)  # the config's own dtype wins
    assert load_dtype(None, True, stored) == (None, None)  # a pre-quantized scheme decides its own
    dtype, note = load_dtype(None, False, stored)
    assert dtype == "bf16" and "safetensors" in note
    dtype, note = load_dtype(None, False, None)
    assert dtype == "fp32" and "fp32 assumed" in note


def test_sub_byte_dtypes_count_bits():
    from vramplan.source import StoredTensor

    assert StoredTensor("F4", (3, 5)).nbytes == 8  # 15 four-bit values in whole bytes
    assert StoredTensor("BF16", (3, 5)).nbytes == 30
