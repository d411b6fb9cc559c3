"""Runs that fail whatever the memory (runtimes/transformers/kernel_limits.py): bitsandbytes
int8's kernels index a Linear's input and output with 32-bit integers."""

from __future__ import annotations

import pytest
from vramplan import estimate, estimate_maximum, plan_maximum
from vramplan.catalog import precision
from vramplan.render import estimate_text, fit_text
from vramplan.request import Workload
from vramplan.runtimes.transformers.kernel_limits import INPUT_ELEMENTS, OUTPUT_ELEMENTS, token_limit
from vramplan.source import resolve
from vramplan.validate.edgecheck import architecture as _architecture
from vramplan.validate.edgecheck import estimate as _estimate

from .conftest import committed_rows


def _llama_limit() -> int:
    """Llama-3.1-8B's widest Linear: the MLP's intermediate side (gate/up outputs, down's input)."""
    config = resolve("llama-3.1-8b").config
    widest = max(config["intermediate_size"], config["hidden_size"])
    return min(INPUT_ELEMENTS // widest, OUTPUT_ELEMENTS // widest)


def test_the_int8_limit_is_set_by_the_widest_linear():
    limit = token_limit(_architecture({"model": "llama-3.1-8b"}), precision("int8"))
    assert limit is not None and limit.tokens == _llama_limit() == 149_796
    assert limit.features == 14_336 and limit.module.startswith("model.layers.*.mlp.")


def test_an_output_of_exactly_2_31_elements_overflows_and_an_input_of_them_does_not():
    # the dequantizer's rows * cols is an int (2^31 wraps); the quantizer's last offset is rows * cols - 1
    assert OUTPUT_ELEMENTS == 2**31 - 1 and INPUT_ELEMENTS == 2**31
    limit = token_limit(_architecture({"model": "qwen2.5-0.5b"}), precision("int8"))
    config = resolve("qwen2.5-0.5b").config
    assert limit is not None and limit.tokens == OUTPUT_ELEMENTS // config["intermediate_size"]


@pytest.mark.parametrize("name", ["bf16", "fp16", "fp32", "nf4", "fp4"])
def test_only_int8_has_the_limit(name):
    assert token_limit(_architecture({"model": "llama-3.1-8b"}), precision(name)) is None


def test_past_the_limit_the_verdict_is_that_it_does_not_run():
    tokens = _llama_limit()
    batch = tokens // 2048
    within = estimate("llama-3.1-8b", Workload(batch=batch, prompt_len=2048), "int8", "h200")
    past = estimate("llama-3.1-8b", Workload(batch=batch + 1, prompt_len=2048), "int8", "h200")
    assert within.kernel_limit is None and within.verdict.fits and within.verdict.kernel_limit is None
    assert past.kernel_limit is not None and f"{(batch + 1) * 2048:,} tokens" in past.kernel_limit
    assert not past.verdict.fits and past.verdict.fits_with_expandable_segments is False
    assert past.verdict.fails_at is None  # not an out-of-memory: no request to name
    assert "does NOT run" in estimate_text(past) and "whatever the memory" in estimate_text(past)
    # without a GPU the estimate says it too
    assert "does NOT run, whatever the memory" in estimate_text(
        estimate("llama-3.1-8b", Workload(batch=batch + 1, prompt_len=2048), "int8"))


def test_the_largest_fit_stops_at_the_limit():
    batch = _llama_limit() // 2048
    found = estimate_maximum("llama-3.1-8b", Workload(prompt_len=2048), "batch", "h200", "int8")
    assert found.largest == found.limit == batch and found.limit_why is not None
    assert found.largest_other_allocator == batch
    assert f"Beyond {batch} the run fails whatever the memory" in fit_text(found)
    prompt = estimate_maximum("llama-3.1-8b", Workload(batch=64), "prompt_len", "h200", "int8")
    assert prompt.largest == _llama_limit() // 64 and prompt.limit_why is not None


def test_a_plan_stops_at_the_limit_too():
    best = plan_maximum("llama-3.1-8b", "h200", "concurrency", precision="int8", context=2048 + 16, new_tokens=16)
    one_gpu = next(row for row in best.layouts if row.tp == 1 and row.pp == 1)
    assert one_gpu.value == _llama_limit() // 2048
    assert any("32-bit" in note for note in best.notes)


INT8_FAILURES = [r for r in committed_rows() if r.get("kind") == "edge" and r["case"]["precision"] == "int8"
                 and r.get("status") in ("error", "crashed")]


def test_every_committed_int8_failure_is_the_limit():
    """Edge trials in int8 that stopped without an out-of-memory (the first: Qwen2.5-0.5B, batch 655 x
    4096 tokens on the H200, an illegal memory access) are past the limit."""
    assert any("illegal memory access" in r.get("error", "") for r in INT8_FAILURES)
    for row in INT8_FAILURES:
        est = _estimate(row)
        assert est.kernel_limit is not None and not est.verdict.fits


INT8_RUNS = [r for r in committed_rows()
             if r.get("status") == "ok" and (r.get("case") or {}).get("precision") == "int8"]


@pytest.mark.parametrize("row", INT8_RUNS, ids=lambda r: f"{r['case']['model']}-b{r['case']['batch']}")
def test_every_committed_int8_run_is_within_the_limit(row):
    case = row["case"]
    tokens = case["batch"] * case["prompt_len"]
    limit = token_limit(_architecture(case), precision("int8"))
    assert limit is not None and tokens <= limit.tokens
