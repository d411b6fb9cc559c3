"""Sweep bookkeeping and the allocator-trace replay, tested without a GPU."""

from __future__ import annotations

import json
from importlib import resources

import yaml
from vramplan.validate.sweep import case_id, done_ids, expand_matrix, expand_training_matrix, matrix_kind


def test_committed_matrices_expand_and_resolve():
    from vramplan.source import resolve

    folder = resources.files("vramplan.profiles") / "matrices"
    for entry in folder.iterdir():
        if entry.name.endswith(".yaml"):
            matrix = yaml.safe_load(entry.read_text())
            kind = matrix_kind(entry.name)
            if kind == "edge":  # searches, traces or fixed trials
                cases = matrix.get("searches", []) + matrix.get("traces", []) + matrix.get("trials", [])
            elif kind == "outside-growth":  # fixed cases, each one generation
                cases = matrix["cases"]
            else:
                cases = expand_training_matrix(matrix) if kind == "train" else expand_matrix(matrix)
            assert cases, entry.name
            for model in {c["model"] for c in cases}:
                resolve(model)


def test_matrices_not_yet_run_hold_only_estimable_cases():
    """A matrix waiting for GPU time (next-*.yaml) holds no case the planner would refuse (a
    family, an attention implementation, a precision): device time is scarce. Run matrices may
    record refusals on purpose (gpt-oss with SDPA)."""
    from vramplan.config import shrink_config
    from vramplan.model import architecture_from_config
    from vramplan.request import PrecisionChoice, Workload
    from vramplan.runtimes.transformers.estimate import estimate_architecture
    from vramplan.source import resolve

    folder = resources.files("vramplan.profiles") / "matrices"
    pending = [entry for entry in folder.iterdir() if entry.name.startswith("next-")]
    assert pending
    for entry in pending:
        for case in expand_matrix(yaml.safe_load(entry.read_text())):
            arch = architecture_from_config(shrink_config(resolve(case["model"]).config, case["layers"]))
            workload = Workload(batch=case["batch"], prompt_len=case["prompt_len"],
                                new_tokens=case["new_tokens"], mode=case["mode"], attn=case["attn"])
            estimate_architecture(arch, case["model"], workload,
                                  PrecisionChoice(name=case["precision"], double_quant=case["double_quant"]))


def test_expand_dedupes_and_keeps_double_quant_for_4bit_only():
    matrix = {"blocks": [{"models": ["m"], "precisions": ["int8", "nf4"], "double_quant": [False, True],
                          "workloads": [{"batch": 1, "prompt_len": 8, "new_tokens": 2}]},
                         {"models": ["m"], "precisions": ["nf4"], "diagnose": True,
                          "workloads": [{"batch": 1, "prompt_len": 8, "new_tokens": 2}]}]}
    cases = expand_matrix(matrix)
    assert [(c["precision"], c["double_quant"]) for c in cases] == [("int8", False), ("nf4", False), ("nf4", True)]
    assert cases[1]["diagnose"] is True


def test_resume_skips_done_and_survives_a_cut_line(tmp_path):
    case = {"model": "m", "layers": None, "precision": "bf16", "attn": "sdpa", "batch": 1,
            "prompt_len": 8, "new_tokens": 2, "mode": "generate", "double_quant": False}
    out = tmp_path / "rows.jsonl"
    out.write_text(json.dumps({"case": case, "status": "ok"}) + "\n" + '{"case": {"mod')
    assert done_ids(out) == {case_id(case)}


def test_peak_live_set_replays_the_trace():
    import pytest

    pytest.importorskip("torch")
    from vramplan.validate.measure import peak_live_set

    frame = [{"filename": "/x/site-packages/transformers/models/llama/modeling_llama.py", "line": 1, "name": "f"}]
    trace = [{"action": "alloc", "addr": 1, "size": 100, "frames": frame},
             {"action": "alloc", "addr": 2, "size": 300, "frames": frame},
             {"action": "free_completed", "addr": 1, "size": 100},
             {"action": "alloc", "addr": 3, "size": 50, "frames": frame}]
    result = peak_live_set({"device_traces": [trace]})
    assert result["peak_above_start_bytes"] == 400
    assert sorted(g["bytes"] for g in result["live"]) == [100, 300]
