"""Run the edge searches of a matrix on the lent GPU: `vramplan validate --find-max` for many
shapes in one device call.

Every trial is a fresh process, forked from this one before CUDA starts (torch and
transformers are imported once here, so a trial costs CUDA start-up, the build and the run,
not Python imports); PYTORCH_CUDA_ALLOC_CONF is set in the child before CUDA initialises.
Rows go to OUT as they come (a killed call keeps what it wrote): one line per trial and one
summary line per search. A matrix's `traces:` (cases with a fixed batch) run first, each with
the allocator's history recorded and appended to TRACES (validate.edge.compact_trace): the
request order the replay is held to. Its `trials:` (fixed cases too) run next, untraced: one
fresh process each, the replay's verdict at a chosen value held to the GPU's.

    scripts/device-run.sh python3 scripts/edge_sweep.py MATRIX.yaml OUT.jsonl SECONDS [TRACES.jsonl.gz]
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

import torch  # noqa: F401  (imported before forking: the children start with it loaded)
import transformers  # noqa: F401
import yaml
from vramplan.source import resolve
from vramplan.validate import edge, findmax, measure

TRIAL_TIMEOUT = 240


def _child(conn, config, case, workdir, trace_path):
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = findmax.ALLOC_CONF[case["allocator"]]
    try:
        row = edge.trial(config, case, workdir, trace_path)
        row["env"] = measure.environment()
    except BaseException as exc:  # report, never hang the parent
        row = {"case": case, "kind": "edge", "status": "crashed",
               "error": "".join(traceback.format_exception_only(type(exc), exc))[:600]}
    conn.send(row)
    conn.close()


def forked_trial(config, case, workdir=None, trace_path=None):
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, config, case, workdir, trace_path))
    proc.start()
    child.close()
    row = None
    if parent.poll(TRIAL_TIMEOUT):
        try:
            row = parent.recv()
        except EOFError:
            row = None
    proc.join(10)
    if proc.is_alive():
        proc.kill()
    return row or {"case": case, "kind": "edge", "status": "crashed", "error": f"exit {proc.exitcode}"}


def _prepare_checkpoint(config, case, workdir):
    """A random bf16 checkpoint for bitsandbytes reloads, written by its own process."""
    ctx = mp.get_context("fork")

    def save():
        model = measure.build_random(config, "bf16", case["attn"], case.get("layers"), relayout=False)
        model.save_pretrained(os.path.join(workdir, "checkpoint"))

    proc = ctx.Process(target=save)
    proc.start()
    proc.join(600)


def _log(out_path, row):
    with open(out_path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    c = row["case"]
    print(f"  {c['model']} {c['allocator']} b{c['batch']} n{c['prompt_len']}: {row['status']} "
          f"alloc {row.get('peak_allocated_bytes', 0) / 2**30:.2f} res "
          f"{row.get('peak_reserved_bytes', 0) / 2**30:.2f} GiB retries {row.get('num_alloc_retries')} "
          f"{row.get('seconds')}s", flush=True)


def _workdir(config, case):
    """A random checkpoint for bitsandbytes reloads, written once per shape."""
    if case["precision"] not in measure.BNB_PRECISIONS:
        return None
    shape = {k: v for k, v in case.items() if k in ("model", "layers", "attn")}
    workdir = f"/dev/shm/edge-{abs(hash(json.dumps(shape, sort_keys=True)))}"
    if not os.path.exists(os.path.join(workdir, "checkpoint", "config.json")):
        os.makedirs(workdir, exist_ok=True)
        _prepare_checkpoint(config, case, workdir)
    return workdir


def main(matrix_path: str, out_path: str, seconds: float, traces_path: str | None = None) -> None:
    deadline = time.time() + seconds
    matrix = yaml.safe_load(Path(matrix_path).read_text())
    for case in matrix.get("traces", []):
        if time.time() > deadline:
            break
        case = {"new_tokens": 16, **case}
        config = resolve(case["model"]).config
        row = forked_trial(config, case, _workdir(config, case), traces_path)
        row["traced"] = True
        _log(out_path, row)
    for case in matrix.get("trials", []):  # fixed cases, untraced: the replay's verdicts at chosen values
        if time.time() > deadline:
            break
        case = {"new_tokens": 16, **case}
        config = resolve(case["model"]).config
        _log(out_path, forked_trial(config, case, _workdir(config, case)))
    for search in matrix.get("searches", []):
        if time.time() > deadline:
            print("deadline reached", flush=True)
            break
        case = {k: v for k, v in search.items() if k not in ("what", "guess", "guesses", "quantum", "allocators")}
        case.setdefault("new_tokens", 16)
        config = resolve(case["model"]).config
        workdir = _workdir(config, case)
        guess = search.get("guess")
        for allocator in search.get("allocators", ["default", "expandable"]):
            full = {**case, "allocator": allocator}
            guess = search.get("guesses", {}).get(allocator, guess)
            result = findmax.find_max(config, full, search["what"], guess,
                                      runner=lambda c, k, w=workdir: forked_trial(c, k, w),
                                      quantum=search.get("quantum", 1), deadline=deadline,
                                      on_trial=lambda row: _log(out_path, row))
            summary = {k: v for k, v in result.items() if k != "trials"}
            summary["trial_count"] = len(result["trials"])
            with open(out_path, "a") as fh:
                fh.write(json.dumps(summary) + "\n")
            print(f"{case['model']} {allocator} {search['what']}: ok {result['largest_ok']} "
                  f"oom {result['smallest_oom']}", flush=True)
            if result["largest_ok"]:  # expandable segments fit at least what the default fits
                guess = int(result["largest_ok"] * 1.04)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
