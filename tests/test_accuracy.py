"""The accuracy gate: every committed GPU measurement predicted within tolerance.

A failure prints which part drifted (memory before the run, or the runtime terms at the peak)
with the predicted terms and, where the row recorded one, the measured live set.
"""

from __future__ import annotations

import statistics

import pytest

from vramplan.validate.compare import comparable, compare_row, drift

from .conftest import committed_rows

ALLOCATED_TOLERANCE = 0.05  # every row
ALLOCATED_MEDIAN_TOLERANCE = 0.02


def _modelled_rows():
    from vramplan.architecture import architecture_from_config
    from vramplan.config import shrink_config
    from vramplan.errors import UnsupportedModelError
    from vramplan.source import resolve

    for row in committed_rows():
        if not comparable(row):
            continue
        case = row["case"]
        try:
            architecture_from_config(shrink_config(resolve(case["model"]).config, case.get("layers")))
        except UnsupportedModelError:
            continue  # families this release refuses (test_refusals covers them)
        yield row


ROWS = list(_modelled_rows())


def _id(row):
    c = row["case"]
    return (f"{c['model']}-{c['precision']}{'dq' if c.get('double_quant') else ''}-{c['attn']}-"
            f"b{c['batch']}-n{c['prompt_len']}-t{c['new_tokens']}-{c['mode']}")


def test_enough_rows_are_committed():
    assert len(ROWS) >= 150
    gpus = {row["env"]["gpu"] for row in ROWS}
    assert any("H100" in g for g in gpus)


@pytest.mark.parametrize("row", ROWS, ids=[_id(r) for r in ROWS])
def test_peak_allocated_within_tolerance(row):
    comparison = compare_row(row)
    assert abs(comparison.allocated_error) <= ALLOCATED_TOLERANCE, drift(comparison, row)


def test_median_allocated_error():
    errors = [abs(compare_row(row).allocated_error) for row in ROWS]
    assert statistics.median(errors) <= ALLOCATED_MEDIAN_TOLERANCE


def test_rows_record_their_environment():
    for row in committed_rows():
        env = row["env"]
        for key in ("gpu", "gpu_total_bytes", "cuda", "torch", "transformers", "driver"):
            assert env.get(key), f"{_id(row)} lacks env.{key}"
