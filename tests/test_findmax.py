"""`vramplan validate --find-max`'s search, driven by a fake GPU whose boundary is known."""

from __future__ import annotations

import pytest
from vramplan.validate.findmax import resolution, search


def _gpu(boundary: int, errors_at: int | None = None):
    def trial(value: int) -> dict:
        if errors_at is not None and value >= errors_at:
            return {"status": "error"}
        return {"status": "ok" if value <= boundary else "oom", "value": value}
    return trial


@pytest.mark.parametrize("boundary, guess", [(53, 53), (53, 55), (53, 40), (53, 80), (724, 698), (724, 724),
                                              (372, 434), (16, 19), (1, 5), (3000, 100)])
def test_search_brackets_the_boundary_within_the_resolution(boundary, guess):
    result = search(_gpu(boundary), guess)
    ok, oom = result["largest_ok"], result["smallest_oom"]
    assert ok <= boundary < oom
    assert oom - ok <= resolution(ok)
    assert [t["value"] for t in result["trials"]].count(ok) == 1  # no trial repeated


def test_a_right_guess_costs_two_trials():
    assert len(search(_gpu(53), 53)["trials"]) == 2
    assert len(search(_gpu(724), 724)["trials"]) == 2  # 724 runs, 738 (one 2% step) does not


def test_below_fifty_the_boundary_is_exact():
    result = search(_gpu(37), 30)
    assert (result["largest_ok"], result["smallest_oom"]) == (37, 38)


def test_quantum_keeps_every_trial_a_multiple():
    result = search(_gpu(16_000), 15_000, quantum=64)
    assert all(t["value"] % 64 == 0 for t in result["trials"])
    assert result["largest_ok"] <= 16_000 < result["smallest_oom"]


def test_an_error_ends_the_search_without_inventing_a_boundary():
    result = search(_gpu(100, errors_at=60), 50)
    assert result["largest_ok"] == 57 and result["smallest_oom"] is None  # 50, 51, 53, 57 ran; 65 failed
    assert result["trials"][-1]["status"] == "error"


def test_nothing_runs():
    result = search(_gpu(0), 4)
    assert result["largest_ok"] is None and result["smallest_oom"] == 1
