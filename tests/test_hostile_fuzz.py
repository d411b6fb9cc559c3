"""Fuzzing the file readers and the CLI: whatever a config, a safetensors header or a GPU catalog
holds, the outcome is a result or one of our errors (exit 0, 1 or 2 with one line), never a
traceback, an internal error or an unbounded read."""

from __future__ import annotations

import copy
import itertools
import json
import struct

import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vramplan.catalog import gpu_catalog
from vramplan.cli import main
from vramplan.errors import CatalogError, SourceError
from vramplan.source import load_bundled, read_safetensors_header

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)
CONFIG_KEYS = st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                               "vocab_size", "intermediate_size", "max_position_embeddings", "torch_dtype",
                               "quantization_config", "text_config", "tie_word_embeddings", "model_type",
                               "rope_scaling", "sliding_window", "layer_types", "n_positions", "use_cache"])
QUANT = st.fixed_dictionaries({"quant_method": st.sampled_from(["gptq", "awq", "fp8", "compressed-tensors",
                                                                "bitsandbytes", "mxfp4", "other"])},
                              optional={"bits": VALUES, "group_size": VALUES, "modules_to_not_convert": VALUES,
                                        "ignore": VALUES, "config_groups": VALUES, "weight_block_size": VALUES,
                                        "load_in_4bit": VALUES, "load_in_8bit": VALUES, "zero_point": VALUES,
                                        "activation_scheme": VALUES, "bnb_4bit_quant_type": VALUES})
BASES = ["meta-llama/Llama-3.2-1B", "openai-community/gpt2", "Qwen/Qwen3-30B-A3B", "google/gemma-2-2b-it"]
DTYPES = st.one_of(st.sampled_from(["BF16", "F16", "F32", "I32", "U8", "F8_E4M3", "F4", "bf16"]), VALUES)
SHAPES = st.one_of(st.lists(st.integers(0, 4096), max_size=3), st.lists(VALUES, max_size=3), VALUES)
COUNTER = itertools.count()


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _outcome(result) -> None:
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    if result.exit_code == 2:
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("vramplan: "), result.output


@fuzz(80)
@given(st.sampled_from(BASES), st.dictionaries(CONFIG_KEYS, VALUES, max_size=3), st.one_of(st.none(), QUANT),
       st.sampled_from(["estimate", "plan"]))
def test_fuzzed_configs_through_the_cli(tmp_path_factory, base, changes, quant, command):
    config = copy.deepcopy(load_bundled(base).config)
    config.update(changes)
    if quant is not None:
        config["quantization_config"] = quant
    folder = tmp_path_factory.mktemp("config")
    (folder / "config.json").write_text(json.dumps(config))
    args = [command, str(folder)] + (["--gpu", "h100", "--context", "512"] if command == "plan" else [])
    _outcome(CliRunner().invoke(main, args))


@fuzz(200)
@given(st.dictionaries(st.text(max_size=20), st.one_of(
    st.fixed_dictionaries({"dtype": DTYPES, "shape": SHAPES}, optional={"data_offsets": VALUES}), VALUES),
    max_size=4), st.one_of(st.none(), st.integers(0, 2**64 - 1)), st.binary(max_size=16))
def test_fuzzed_safetensors_headers(tmp_path_factory, header, length, tail):
    body = json.dumps(header).encode() + tail
    path = tmp_path_factory.getbasetemp() / f"fuzz-{next(COUNTER)}.safetensors"
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body)
    try:
        tensors = read_safetensors_header(path)
    except SourceError as exc:
        assert str(exc).endswith(".") and "\n" not in str(exc)
        return
    for tensor in tensors.values():
        assert all(isinstance(d, int) and d >= 0 for d in tensor.shape) and tensor.nbytes >= 0


GPU_FIELDS = st.fixed_dictionaries(
    {"name": st.one_of(st.text(max_size=12), VALUES), "vendor": st.sampled_from(["nvidia", "amd", "intel"]),
     "memory_bytes": st.one_of(st.integers(-2**50, 2**50), VALUES), "memory_source": st.just("test"),
     "bandwidth_gbps": st.one_of(st.floats(allow_nan=True), VALUES), "bf16": st.booleans(), "fp8": VALUES,
     "int8": st.booleans(), "gpus_per_node": st.one_of(st.integers(-2, 2000), VALUES), "interconnect": st.just("x")},
    optional={"price_per_hour_usd": st.one_of(st.floats(allow_nan=True), VALUES), "aliases": VALUES,
              "outside_torch_key": st.sampled_from(["default", "H100", "nowhere"])})


@fuzz(120)
@given(st.one_of(st.lists(GPU_FIELDS, max_size=3), VALUES))
def test_fuzzed_gpu_catalogs(tmp_path_factory, gpus):
    path = tmp_path_factory.getbasetemp() / f"gpus-{next(COUNTER)}.yaml"
    path.write_text(yaml.safe_dump({"gpus": gpus}))
    try:
        catalog = gpu_catalog(path)
    except CatalogError as exc:
        assert "\n" not in str(exc)
        return
    names = [g.name.lower() for g in catalog.gpus]
    assert len(names) == len(set(names))
    assert all(g.memory_bytes > 0 and g.gpus_per_node >= 1 for g in catalog.gpus)


@fuzz(60)
@given(st.lists(st.sampled_from(["--tp", "--pp", "--top", "--context", "--concurrency", "--new-tokens",
                                 "--max-gpus", "--max-num-seqs", "--gpu-memory-utilization"]), max_size=3),
       st.lists(st.one_of(st.integers(-5, 5000), st.sampled_from(["0.5", "x", "", "1e9"])), min_size=3, max_size=3),
       st.sampled_from(["transformers", "vllm"]), st.sampled_from(["auto", "any", "all", "int8", "fp9"]))
def test_fuzzed_plan_options(flags, values, runtime, precision):
    args = ["plan", "llama-3.2-1b", "--gpu", "l4", "--runtime", runtime, "--precision", precision]
    for flag, value in zip(flags, values, strict=False):
        args += [flag, str(value)]
    _outcome(CliRunner().invoke(main, args))
