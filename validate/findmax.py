"""`vramplan validate --find-max batch|prompt-len`: bisect the GPU's real boundary, one fresh
process per trial, and record every trial.

Torch-free: the trials run in `vramplan.validate.edge` workers. `search` brackets the boundary
from a first guess (stepping away from it by a doubling step), then bisects until the gap is at most the
resolution (exact below 50, else 2% of the value, rounded to a multiple of `quantum`). Every
trial is kept, so a committed search shows what ran and what ran out of memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ALLOC_CONF = {"default": "", "expandable": "expandable_segments:True"}
FIELD = {"batch": "batch", "prompt-len": "prompt_len"}


def resolution(value: int, quantum: int = 1) -> int:
    gap = max(1, value // 50)
    return max(quantum, -(-gap // quantum) * quantum)


def search(trial: Callable[[int], dict[str, Any]], guess: int, *, quantum: int = 1, low_limit: int = 1,
           high_limit: int = 1 << 22, deadline: float | None = None) -> dict[str, Any]:
    """Largest value whose trial runs, smallest that runs out of memory, and every trial.

    Brackets from the guess with a step that starts at the resolution and doubles (a good guess
    costs two trials: it runs, one step more does not), then bisects the bracket down to the
    resolution. A trial that neither runs nor runs out of memory ends the search."""
    trials: list[dict[str, Any]] = []

    def run(value: int) -> str:
        row = trial(value)
        trials.append(row)
        return row.get("status", "error")

    def snap(value: float) -> int:
        return max(low_limit, min(high_limit, round(value / quantum) * quantum or quantum))

    def out_of_time() -> bool:
        return deadline is not None and time.time() > deadline

    ok: int | None = None
    oom: int | None = None
    value, step = snap(guess), resolution(snap(guess), quantum)
    while (ok is None or oom is None) and not out_of_time():
        status = run(value)
        if status == "ok":
            ok = value
            if oom is not None or value >= high_limit:
                break
            value = snap(value + step)
        elif status == "oom":
            oom = value
            if ok is not None or value <= low_limit:
                break
            value = snap(value - step)
        else:
            break  # an error, not a boundary: stop and report it
        step *= 2
    while ok is not None and oom is not None and oom - ok > resolution(ok, quantum) and not out_of_time():
        middle = snap((ok + oom) / 2)
        if middle in (ok, oom):
            break
        status = run(middle)
        if status == "ok":
            ok = middle
        elif status == "oom":
            oom = middle
        else:
            break
    return {"largest_ok": ok, "smallest_oom": oom, "trials": trials}


def subprocess_trial(config: dict[str, Any], case: dict[str, Any], workdir: str | None = None) -> dict[str, Any]:
    """One trial in a fresh Python process (what `vramplan validate --find-max` uses)."""
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "row.jsonl"
        job.write_text(json.dumps({"config": config, "case": case, "workdir": workdir}))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTORCH_CUDA_ALLOC_CONF": ALLOC_CONF[case["allocator"]]}
        proc = subprocess.run([sys.executable, "-m", "vramplan.validate.edge", str(job), str(out)],
                              capture_output=True, text=True, env=env, check=False)
        if not out.exists() or not out.read_text().strip():
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            return {"case": case, "kind": "edge", "status": "crashed", "error": tail or f"exit {proc.returncode}"}
        return json.loads(out.read_text().splitlines()[-1])


def find_max(config: dict[str, Any], case: dict[str, Any], what: str, guess: int, *,
             runner: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
             quantum: int = 1, high_limit: int = 1 << 22, deadline: float | None = None,
             on_trial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Bisect `what` (batch or prompt-len) for `case` on this machine's GPU."""
    field = FIELD[what]
    run = runner or subprocess_trial

    def trial(value: int) -> dict[str, Any]:
        row = run(config, {**case, field: value})
        if on_trial:
            on_trial(row)
        return row

    result = search(trial, guess, quantum=quantum, high_limit=high_limit, deadline=deadline)
    return {"kind": "edge-search", "case": case, "what": what, "quantum": quantum, **result}
