"""Pre-quantized checkpoints: layouts per Linear, exact bytes from safetensors headers, and
what the checkpoint stores against what the model loads."""

from __future__ import annotations

import json
import struct

import pytest
from vramplan import Workload, estimate
from vramplan.errors import UnsupportedModelError
from vramplan.model import architecture_from_config
from vramplan.request import PrecisionChoice
from vramplan.runtimes.transformers.estimate import estimate_architecture
from vramplan.source import load_bundled

# quantization_config blocks as real checkpoints ship them
GPTQ = {"bits": 4, "group_size": 128, "damp_percent": 0.1, "desc_act": True, "sym": True,
        "true_sequential": True, "quant_method": "gptq"}
AWQ = {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4, "version": "gemm"}
FP8_BLOCK = load_bundled("deepseek-ai/DeepSeek-V3").config["quantization_config"]  # the real one
W4A16 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
             "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}}}}
BNB_NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
           "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}


def llama_with(quantization: dict, dtype: str = "float16") -> dict:
    config = dict(load_bundled("meta-llama/Llama-3.2-1B").config)
    return {**config, "quantization_config": quantization, "torch_dtype": dtype}


def _weights(config: dict) -> int:
    """Weights and their quantization state (scales, zero points, act-order indices)."""
    est = estimate_architecture(architecture_from_config(config), "q", Workload(batch=1, prompt_len=8, new_tokens=2))
    return est.weights_bytes + sum(t.bytes for t in est.breakdown if t.name == "quantization state")


def _unquantized_bytes(config: dict, element: int) -> int:
    arch = architecture_from_config(config)
    return sum(t.elements * element for t in arch.tensors if t.kind != "linear")


def _linears(config: dict):
    arch = architecture_from_config(config)
    return [(t.shape[0], t.shape[1], t.count) for t in arch.tensors if t.kind == "linear"]


def test_gptq_layout():
    config = llama_with(GPTQ)
    expected = _unquantized_bytes(config, 2)
    for out_f, in_f, count in _linears(config):
        groups = in_f // 128
        expected += count * (in_f * out_f // 2 + groups * out_f // 2 + groups * out_f * 2 + in_f * 4)
    assert _weights(config) == expected
    est = estimate("llama-3.2-1b")  # bf16; its 0.5 GiB embedding stays 16-bit in the GPTQ checkpoint
    assert _weights(config) < est.weights_bytes / 2


def test_awq_and_compressed_tensors_layouts():
    awq = llama_with(AWQ)
    expected = _unquantized_bytes(awq, 2) + sum(
        c * (i * o // 2 + (i // 128) * o // 2 + (i // 128) * o * 2) for o, i, c in _linears(awq))
    assert _weights(awq) == expected
    ct = llama_with(W4A16, "bfloat16")
    expected = _unquantized_bytes(ct, 2) + sum(c * (o * i // 2 + o * (i // 128) * 2 + 16) for o, i, c in _linears(ct))
    assert _weights(ct) == expected


def test_fp8_block_scales_like_deepseek_v3():
    config = llama_with(FP8_BLOCK, "bfloat16")
    expected = _unquantized_bytes(config, 2) + sum(
        c * (o * i + -(-o // 128) * -(-i // 128) * 4) for o, i, c in _linears(config))
    assert _weights(config) == expected
    assert FP8_BLOCK["weight_block_size"] == [128, 128]


def test_serialized_bitsandbytes_loads_like_on_the_fly():
    config = llama_with(BNB_NF4, "bfloat16")
    arch = architecture_from_config(config)
    serialized = estimate_architecture(arch, "m", Workload(batch=2, prompt_len=64, new_tokens=4))
    plain = architecture_from_config(load_bundled("meta-llama/Llama-3.2-1B").config)
    on_the_fly = estimate_architecture(plain, "m", Workload(batch=2, prompt_len=64, new_tokens=4),
                                       PrecisionChoice(name="nf4", double_quant=True))
    assert serialized.precision == "nf4" and serialized.double_quant
    assert serialized.peak_allocated_bytes == on_the_fly.peak_allocated_bytes


def test_exact_stored_bytes_win_over_the_formula():
    config = llama_with(GPTQ)
    arch = architecture_from_config(config)
    stored = {}
    for t in arch.tensors:
        for name in t.names():
            module = name.removesuffix(".weight")
            if t.kind == "linear":
                stored[f"{module}.qweight"] = (1000, (1,))
                stored[f"{module}.scales"] = (24, (1,))
            else:
                stored[name] = (t.elements_each * 2, t.shape)
    est = estimate_architecture(arch, "m", Workload(batch=1, prompt_len=8, new_tokens=2), stored=stored)
    linears = sum(t.count for t in arch.tensors if t.kind == "linear")
    assert est.weights_bytes == _unquantized_bytes(config, 2) + linears * 1024
    assert est.checkpoint_bytes == sum(b for b, _ in stored.values())


def test_explicit_precision_on_a_quantized_checkpoint_says_so():
    config = llama_with(GPTQ)
    est = estimate_architecture(architecture_from_config(config), "m", Workload(), PrecisionChoice(name="bf16"))
    assert est.precision == "bf16" and any("pre-quantized" in n for n in est.notes)


def test_unknown_quant_method_is_refused():
    with pytest.raises(UnsupportedModelError, match="quant_method"):
        architecture_from_config(llama_with({"quant_method": "exl9"}))


def test_checkpoint_header_names_what_is_not_loaded(tmp_path):
    """Qwen3-0.6B stores its tied lm_head (751.6M elements); the loaded model holds 596.0M."""
    config = load_bundled("Qwen/Qwen3-0.6B").config
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = architecture_from_config(config)
    header = {n: {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [0, 0]}
              for t in arch.tensors for n in t.names()}
    header["lm_head.weight"] = {"dtype": "BF16", "shape": [151936, 1024], "data_offsets": [0, 0]}
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    est = estimate(str(tmp_path))
    assert est.checkpoint_bytes == 751_632_384 * 2
    note = next(n for n in est.notes if "checkpoint stores" in n)
    assert "751,632,384 elements" in note and "596,049,920" in note and "lm_head.weight" in note
