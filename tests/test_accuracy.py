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
DEVICE_TOLERANCE = 0.05
# A row whose allocator already held this share of the device figure, free, before the run
# started (left by building random weights, or by the previous case in the same worker) does
# not measure what peak_device_bytes predicts: one load, then one run. Those rows are reported
# in README's table, not gated.
PRE_RUN_RESERVE_LIMIT = 0.05

# Rows the allocator replay does not yet reproduce within DEVICE_TOLERANCE, and why. strict:
# a row that starts passing fails here until it is taken off the list.
KNOWN_DEVICE_GAPS = {
    "H100 llama-3.2-1b-bf16-eager-b32-n480-t16-generate":
        "this H100 row reserved 7,358 MiB and allocated 128 KiB more at its peak than the H200, where the same "
        "case reserves 6,512 MiB whether run fresh (edge protocol, edge-h200-7 trace) or after the H100 worker's "
        "own earlier cases (h200-history.jsonl: not the worker's history, then); the replay holds the H200 to "
        "0.1%. Run fresh on an H100 (edge-h100-1, traced) the case reserves 6,512 MiB too, request for request "
        "the model's (tests/test_edge_traces.py): the 846 MiB are this row's worker, not the H100",
}


def _modelled_rows():
    from vramplan.config import shrink_config
    from vramplan.errors import UnsupportedModelError
    from vramplan.model import architecture_from_config
    from vramplan.source import resolve

    for row in committed_rows():
        if not comparable(row):
            continue
        case = row["case"]
        try:
            config = resolve(case.get("config_source") or case["model"]).config
            architecture_from_config(shrink_config(config, case.get("layers")))
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


def _clean_history(row) -> bool:
    before = row["base_reserved_bytes"] - row["base_allocated_bytes"]
    return bool(row.get("device_bytes")) and before < PRE_RUN_RESERVE_LIMIT * row["device_bytes"]


DEVICE_ROWS = [row for row in ROWS if _clean_history(row)]


def _gap_key(row) -> str:
    """A known gap is one GPU's row: "H100 <case id>"."""
    return f"{row['env']['gpu'].replace('NVIDIA ', '').split()[0]} {_id(row)}"


def _device_param(row):
    gap = KNOWN_DEVICE_GAPS.get(_gap_key(row))
    marks = [pytest.mark.xfail(reason=gap, strict=True)] if gap else []
    return pytest.param(row, id=_id(row), marks=marks)


@pytest.mark.parametrize("row", [_device_param(r) for r in DEVICE_ROWS])
def test_peak_device_within_tolerance(row):
    comparison = compare_row(row)
    reserve = next((t.bytes for t in comparison.estimate.breakdown if t.name == "allocator reserve"), 0)
    measured_reserve = row["peak_reserved_bytes"] - row["peak_allocated_bytes"]
    assert abs(comparison.device_error) <= DEVICE_TOLERANCE, (
        f"{comparison.label()}: device predicted {comparison.predicted_device / 2**20:.0f} MiB, measured "
        f"{comparison.measured_device / 2**20:.0f} MiB ({comparison.device_error:+.2%}); allocator reserve "
        f"predicted {reserve / 2**20:.0f} MiB, measured {measured_reserve / 2**20:.0f} MiB; allocated "
        f"{comparison.allocated_error:+.2%}")


def test_known_device_gaps_are_real_rows():
    ids = {_gap_key(r) for r in DEVICE_ROWS}
    assert set(KNOWN_DEVICE_GAPS) <= ids
    assert len(KNOWN_DEVICE_GAPS) <= 0.15 * len(DEVICE_ROWS)


def test_rows_record_their_environment():
    for row in committed_rows():
        if row.get("kind") == "edge-search":
            continue  # a search's summary; its trials carry the environment
        env = row["env"]
        for key in ("gpu", "gpu_total_bytes", "cuda", "torch", "transformers", "driver"):
            assert env.get(key), f"{_id(row)} lacks env.{key}"
