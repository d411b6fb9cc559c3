#!/usr/bin/env python3
"""Regenerate README.md's edge table (issue 10) from the committed edge rows.

For every committed search (profiles/measurements/h200-edge.jsonl) the measured boundary beside
the largest fit vramplan predicts, and the device bytes of the trials that filled the GPU, written
between <!-- edge:start --> and <!-- edge:end -->.

    python scripts/edge_table.py          # rewrite README.md's table
    python scripts/edge_table.py --check  # exit 1 if README.md is stale
"""

from __future__ import annotations

import statistics
import sys

import readme_block
from vramplan.validate.compare import measurement_files, read_rows
from vramplan.validate.edgecheck import (
    boundary_holds,
    estimate,
    fills_the_gpu,
    measured_peak_device,
    merged_searches,
    predicted_boundary,
)

START, END = "<!-- edge:start -->", "<!-- edge:end -->"


def _shape(case: dict) -> str:
    layers = f" ({case['layers']} layers)" if case.get("layers") else ""
    precision = "" if case["precision"] == "bf16" else f" {case['precision']}"
    return f"{case['model']}{layers}{precision} {case['attn']}"


def table() -> str:
    rows = list(read_rows(measurement_files()))
    searches = merged_searches(rows)
    trials = [r for r in rows if r.get("kind") == "edge" and r.get("status") in ("ok", "oom")]
    lines = ["| shape (H200; 16 new tokens unless fixed) | varied | fixed | allocator | measured runs / OOM "
             "| vramplan --max |",
             "|---|---|---|---|---:|---:|"]
    equal = 0
    for search in sorted(searches, key=lambda s: (_shape(s["case"]), s["what"], s["case"]["allocator"])):
        case = search["case"]
        predicted = predicted_boundary(search).value
        holds = boundary_holds(search, predicted)
        equal += holds
        fixed = f"prompt {case['prompt_len']}" if search["what"] == "batch" else f"batch {case.get('batch', 1)}"
        if case.get("new_tokens", 16) != 16:
            fixed += f", {case['new_tokens']} new tokens"
        above = f" (runs again: {', '.join(map(str, search['runs_above']))})" if search["runs_above"] else ""
        lines.append(f"| {_shape(case)} | {search['what']} | {fixed} | {case['allocator']} | "
                     f"{search['largest_ok']} / {search['smallest_oom']}{above} | "
                     f"{predicted}{'' if holds else ' (miss)'} |")
    verdicts = sum(estimate(r).verdict.fits == (r["status"] == "ok") for r in trials)
    full = [r for r in trials if fills_the_gpu(r)]
    errors = [abs(estimate(r).peak_device_bytes / measured_peak_device(r) - 1) for r in full]
    summary = (f"{equal} of {len(searches)} searches: the predicted largest fit runs and one step more does "
               f"not, as measured (the GPU's edge: the last value that ran below the first that ran out of "
               f"memory; values that ran above it are listed). {verdicts} of {len(trials)} trials (H200 and H100): "
               f"the verdict is the GPU's (ok or out of memory). {len(full)} trials that filled at least half the "
               f"GPU: peak device bytes median |error| {statistics.median(errors):.2%}, worst {max(errors):.2%} "
               f"(NVML's per-process figure).")
    return summary + "\n\n" + "\n".join(lines)


def main() -> int:
    return readme_block.main(START, END, table, "edge table", "scripts/edge_table.py", __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
