#!/usr/bin/env python3
"""Regenerate README.md's accuracy table from the committed measurements.

Predicts every committed row with the current engine and writes, between the README markers
<!-- accuracy:start --> and <!-- accuracy:end -->, the overall figures (rows, median, p90,
worst) for peak_allocated_bytes and peak_device_bytes and a table per family and precision.

    python scripts/accuracy_table.py          # rewrite README.md's table
    python scripts/accuracy_table.py --check  # exit 1 if README.md is stale
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

import readme_block
from vramplan.validate.compare import compare_rows, measurement_files, read_rows, row_kind

START, END = "<!-- accuracy:start -->", "<!-- accuracy:end -->"


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def _summary(errors: list[float]) -> tuple[str, str, str]:
    a = sorted(abs(e) for e in errors)
    return _pct(statistics.median(a)), _pct(a[min(len(a) - 1, int(0.9 * len(a)))]), _pct(a[-1])


def table() -> str:
    rows = [r for r in read_rows(measurement_files()) if row_kind(r) == "inference"]  # edge and training: own tables
    done, refused = compare_rows(rows)
    measured_ok = sum(1 for r in rows if r.get("status") == "ok")
    gpus = sorted({c.gpu for c in done})
    alloc = [c.allocated_error for c in done]
    device = [c.device_error for c in done if c.device_error is not None]
    by_case = {repr(sorted(r["case"].items())): r for r in rows if r.get("status") == "ok"}

    def clean(c) -> bool:  # nothing reserved-but-free before the run (see tests/test_accuracy.py)
        row = by_case[repr(sorted(c.case.items()))]
        return (row["base_reserved_bytes"] - row["base_allocated_bytes"]) < 0.05 * row["device_bytes"]

    device_clean = [c.device_error for c in done if c.device_error is not None and clean(c)]
    lines = [
        f"Measured on {', '.join(gpus)}: {len(rows)} committed rows, {measured_ok} with a peak, "
        f"{len(done)} predicted"
        + (f" ({len(refused)} rows of families this release refuses are not)." if refused else "."),
        "Error = predicted / measured - 1.",
        "",
        "| total | rows | median abs. error | p90 | worst |",
        "|---|---:|---:|---:|---:|",
        "| peak_allocated_bytes | {} | {} | {} | {} |".format(len(alloc), *_summary(alloc)),
        "| peak_device_bytes, runs measured right after load | {} | {} | {} | {} |".format(
            len(device_clean), *_summary(device_clean)),
        "| peak_device_bytes, all rows | {} | {} | {} | {} |".format(len(device), *_summary(device)),
        "",
        "| family | precision | rows | allocated: median | allocated: worst | device: median |",
        "|---|---|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for c in done:
        precision = c.case["precision"] + ("+dq" if c.case.get("double_quant") else "")
        groups[(c.estimate.model_type, precision)].append(c)
    for (family, precision), group in sorted(groups.items()):
        a = [abs(c.allocated_error) for c in group]
        d = [abs(c.device_error) for c in group if c.device_error is not None]
        lines.append(f"| {family} | {precision} | {len(group)} | {_pct(statistics.median(a))} | "
                     f"{_pct(max(a))} | {_pct(statistics.median(d)) if d else 'n/a'} |")
    return "\n".join(lines)


def main() -> int:
    return readme_block.main(START, END, table, "accuracy table", "scripts/accuracy_table.py", __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
