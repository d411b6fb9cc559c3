"""Sweeps: models x precisions x attention x workloads, one JSON line per case.

Each model runs in its own worker process, so that a crash or a leaked allocation of one
model cannot change another's figures, and an out-of-memory case is recorded as a data point
while the sweep goes on. The output file is the resume point: cases already in it are
skipped.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

CASE_KEYS = ("model", "layers", "precision", "attn", "batch", "prompt_len", "new_tokens", "mode",
             "double_quant", "images")


def case_id(case: dict[str, Any]) -> str:
    return "|".join(str(case.get(k)) for k in CASE_KEYS)


def expand_matrix(matrix: dict[str, Any]) -> list[dict[str, Any]]:
    """Cartesian product of each block of a matrix file, in file order."""
    cases: list[dict[str, Any]] = []
    for block in matrix.get("blocks", []):
        layers_by_model = block.get("layers", {}) or {}
        workloads = block["workloads"]
        for model, precision, attn, dq, workload in itertools.product(
            block["models"], block.get("precisions", ["bf16"]), block.get("attn", ["sdpa"]),
            block.get("double_quant", [False]), workloads,
        ):
            if precision not in ("nf4", "fp4") and dq:
                continue
            case = {
                "model": model,
                "layers": layers_by_model.get(model),
                "precision": precision,
                "attn": attn,
                "batch": int(workload["batch"]),
                "prompt_len": int(workload["prompt_len"]),
                "new_tokens": int(workload.get("new_tokens", 0)),
                "mode": workload.get("mode", "generate"),
                "double_quant": bool(dq),
            }
            if workload.get("images"):
                case["images"] = int(workload["images"])
            # `diagnose` records the live set at the peak; it is not part of a case's identity
            diagnose = bool(block.get("diagnose", False))
            known = {case_id(c): c for c in cases}
            if case_id(case) in known:
                known[case_id(case)]["diagnose"] |= diagnose
            else:
                cases.append({**case, "diagnose": diagnose})
    return cases


def expand_training_matrix(matrix: dict[str, Any]) -> list[dict[str, Any]]:
    """Training-step cases (validate/train.py) of a matrix: each block's models x methods x
    checkpointing x optimizers x autocast x workloads (batch, seq_len)."""
    cases = []
    for block in matrix.get("blocks", []):
        for model, method, checkpointing, optimizer, autocast, workload in itertools.product(
                block["models"], block.get("methods", ["full"]), block.get("gradient_checkpointing", [False]),
                block.get("optimizers", ["adamw"]), block.get("autocast", ["none"]), block["workloads"]):
            cases.append({"model": model, "layers": (block.get("layers") or {}).get(model), "method": method,
                          "precision": block.get("precision", "bf16"), "attn": block.get("attn", "sdpa"),
                          "gradient_checkpointing": checkpointing, "optimizer": optimizer, "autocast": autocast,
                          "lora_rank": block.get("lora_rank", 16), "double_quant": block.get("double_quant", False),
                          "batch": int(workload["batch"]), "seq_len": int(workload["seq_len"])})
    return cases


def matrix_kind(name: str) -> str:
    """edge-*.yaml: edge searches; train-*.yaml: training steps; outside-growth-*.yaml: generations
    probed for memory outside torch (scripts/outside_growth.py); the rest: inference sweeps."""
    for prefix, kind in (("edge-", "edge"), ("train-", "train"), ("outside-growth-", "outside-growth")):
        if name.startswith(prefix):
            return kind
    return "inference"


def done_ids(out_path: Path) -> set[str]:
    if not out_path.exists():
        return set()
    ids = set()
    for line in out_path.read_text().splitlines():
        try:
            ids.add(case_id(json.loads(line)["case"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a killed run: that case runs again
    return ids


def _groups(cases: list[dict[str, Any]]) -> Iterator[tuple[tuple[str, Any], list[dict[str, Any]]]]:
    order: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for case in cases:
        order.setdefault((case["model"], case["layers"]), []).append(case)
    yield from order.items()


def run_matrix(matrix_path: Path, out_path: Path, resolve_config, progress=None,
               deadline: float | None = None) -> int:
    """Run every case of the matrix not yet in `out_path`; return how many rows were added.

    `resolve_config(model) -> dict` turns a model reference into its config dict (the CLI
    passes vramplan's own resolver, so bundled profiles, local paths and Hub ids all work).
    `deadline` (a `time.time()` value) stops the sweep cleanly before a case would start
    after it; the output file then resumes the sweep on the next run.
    """
    matrix = yaml.safe_load(matrix_path.read_text())
    cases = expand_matrix(matrix)
    finished = done_ids(out_path)
    todo = [c for c in cases if case_id(c) not in finished]
    total, added = len(cases), 0
    position = len(cases) - len(todo)
    for (model, _layers), group in _groups(todo):
        if deadline is not None and time.time() > deadline:
            break
        job = {"config": resolve_config(model), "cases": group, "deadline": deadline}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump(job, fh)
            job_path = fh.name
        before = len(done_ids(out_path))
        proc = subprocess.Popen(
            [sys.executable, "-m", "vramplan.validate.worker", job_path, str(out_path)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            position += 1
            if progress:
                progress(position, total, line.rstrip())
        proc.wait()
        os.unlink(job_path)
        written = len(done_ids(out_path)) - before
        added += written
        if proc.returncode != 0 and written < len(group):
            # the worker died (a hard CUDA fault, say): record the rest as failed cases
            with out_path.open("a") as fh:
                have = done_ids(out_path)
                for case in group:
                    if case_id(case) not in have:
                        fh.write(json.dumps({"case": case, "status": "crashed",
                                             "error": f"worker exit {proc.returncode}"}) + "\n")
    return added


def print_progress(done: int, total: int, line: str) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    print(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":  # python -m vramplan.validate.sweep MATRIX.yaml OUT.jsonl [SECONDS]
    from vramplan.source import resolve

    budget = float(sys.argv[3]) if len(sys.argv) > 3 else None
    run_matrix(Path(sys.argv[1]), Path(sys.argv[2]), lambda m: resolve(m).config, print_progress,
               deadline=time.time() + budget if budget else None)
