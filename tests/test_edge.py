"""The edge of the GPU: the caching allocator under a capacity limit, and the committed
largest-fit searches (profiles/measurements/h200-edge.jsonl) predicted by the replay."""

from __future__ import annotations

import pytest
from vramplan.runtimes.allocator import CachingAllocator, OutOfMemory
from vramplan.validate.edgecheck import architecture as _architecture
from vramplan.validate.edgecheck import (
    boundary_holds,
    fills_the_gpu,
    measured_peak_device,
    merged_searches,
    predicted_boundary,
)
from vramplan.validate.edgecheck import case_id as _case_id
from vramplan.validate.edgecheck import estimate as _estimate
from vramplan.validate.edgecheck import gpu as _gpu
from vramplan.validate.edgecheck import trial_id as _trial_id
from vramplan.validate.edgecheck import workload as _workload

from .conftest import committed_rows

MIB = 2**20
GIB = 2**30


def _steps(expandable: bool) -> list[tuple[int, float]]:
    """allocator.md section 8's first table, replayed: (reserved MiB, allocated MiB) after each step."""
    a = CachingAllocator(expandable=expandable)
    seen = []

    def mark():
        seen.append((a.reserved // MIB, round(a.allocated / MIB, 4)))

    a.malloc(1)
    mark()
    a.malloc(3 * MIB // 2)
    mark()
    a.malloc(3 * MIB // 2)
    mark()
    a.malloc(12 * MIB + 1)
    mark()
    a.malloc(39 * MIB // 2)
    mark()
    sixteen = [a.malloc(16 * MIB) for _ in range(8)]
    mark()
    for h in sixteen:
        a.free(h)
    for _ in range(4):
        a.malloc(32 * MIB)
    mark()
    for h in list(a._live):
        a.free(h)
    a.release_cached()
    mark()
    return seen


def test_allocator_reference_steps_default():
    # measured on an H200, torch 2.11 (allocator.md section 8)
    assert _steps(False) == [(2, 0.0005), (22, 1.5005), (22, 3.0005), (22, 15.001), (42, 35.001),
                             (170, 163.001), (298, 163.001), (0, 0.0)]


def test_allocator_reference_steps_expandable():
    assert _steps(True) == [(2, 0.0005), (22, 1.5005), (22, 3.0005), (22, 15.001), (42, 34.501),
                            (182, 162.501), (182, 162.501), (0, 0.0)]


def _fill(expandable: bool) -> tuple[CachingAllocator, list[int], list[int]]:
    """Fill a 142,626 MiB device: 1 GiB tensors, then 20 MiB, 2 MiB and 512 B ones, each until OOM."""
    a = CachingAllocator(capacity=142626 * MIB, expandable=expandable)
    marks, gib = [], []
    for size in (GIB, 20 * MIB, 2 * MIB, 512):
        try:
            while True:
                handle = a.malloc(size)
                if size == GIB:
                    gib.append(handle)
        except OutOfMemory:
            pass
        marks.append(a.reserved // MIB)
    return a, marks, gib


@pytest.mark.parametrize("expandable, marks, after", [
    (False, [142336, 142616, 142616, 142626], 142114),
    (True, [142340, 142620, 142620, 142626], 142146),
])
def test_allocator_fills_the_device_as_measured(expandable, marks, after):
    a, seen, gib = _fill(expandable)
    assert seen == marks
    assert (a.num_alloc_retries, a.num_ooms) == (4, 4)
    # free two 1 GiB tensors that are not adjacent, then ask for 1.5 GiB: only the OOM retry's
    # release (whole segments; expandable: the pages inside free blocks) makes room
    # (expandable: tensor 10 starts on a 20 MiB page boundary and frees 51 whole pages, tensor 21
    # starts 4 MiB into one and frees 50: the 101 pages the GPU unmapped)
    a.free(gib[10])
    a.free(gib[21])
    a.malloc(3 * GIB // 2)
    assert a.reserved // MIB == after
    assert (a.num_alloc_retries, a.num_ooms) == (5, 4)


def test_out_of_memory_names_the_request_and_the_unusable_reserve():
    a = CachingAllocator(capacity=100 * MIB)
    keep = a.malloc(30 * MIB)
    hole = a.malloc(40 * MIB)
    a.malloc(28 * MIB)
    a.free(hole)  # 40 MiB free but pinned in a segment? no: its own segment, released on retry
    a.free(keep)
    with pytest.raises(OutOfMemory) as caught:
        a.malloc(80 * MIB, "layer 3 mlp.up_proj")
    err = caught.value
    assert err.label == "layer 3 mlp.up_proj"
    assert err.tried == 80 * MIB
    assert a.reserved == 28 * MIB  # the two free segments were released before giving up
    assert err.reserved_unusable == 0
    assert (a.num_alloc_retries, a.num_ooms) == (1, 1)


def test_a_partly_used_segment_stays_reserved():
    a = CachingAllocator(capacity=100 * MIB)
    big = a.malloc(60 * MIB)
    a.free(big)
    small = a.malloc(30 * MIB)  # carved out of the 60 MiB segment: 30 MiB free stay pinned
    with pytest.raises(OutOfMemory) as caught:
        a.malloc(50 * MIB)
    assert caught.value.reserved_unusable == 30 * MIB
    a.free(small)
    a.malloc(50 * MIB)  # now the whole segment is free: best fit, no retry
    assert (a.reserved, a.num_alloc_retries) == (60 * MIB, 1)


# -- the committed edge searches (profiles/measurements/h200-edge.jsonl) ----------------------


DEVICE_TOLERANCE = 0.03  # peak_device_bytes on trials that use at least half of the GPU

SEARCHES = merged_searches(committed_rows())
TRIALS = [r for r in committed_rows() if r.get("kind") == "edge" and r.get("status") in ("ok", "oom")]

# Where the replay does not yet reproduce the GPU's edge, and why. strict: a search or trial
# that starts matching fails here until it is taken off the list.
UNREPLAYED = ("the family's layers are not replayed request by request: its verdict turns where the point model's "
              "allocated peak reaches the capacity (which held in edge-h200-24), and names no request")
QWEN3_NEXT_L8 = ("the allocator's placement after its retries: Qwen3-Next with 8 layers at batch 380 (blind "
                 "edge-h200-26; said 380 fits, 373 runs, 380 does not) reaches the allocated peak the GPU reached, "
                 "but after its second retry the GPU needs two more where the replay serves a 14.8 GiB request from "
                 "its cache; its trace (edge-h200-27) shows the first difference at a tie between two free 3 GiB "
                 "blocks, decided by where the driver placed the segments it reused: around allocations outside "
                 "torch (gaps of 384-416 MiB in the address ranges) the model does not know of")
QWEN3_NEXT_L8_RUN = "qwen3-next-80b-a3b-instruct-l8-bf16-sdpa-n1024-default"
KNOWN_SEARCH_GAPS: dict[str, str] = {
    QWEN3_NEXT_L8_RUN: QWEN3_NEXT_L8,
}
KNOWN_TRIAL_GAPS: dict[str, str] = {
    f"{QWEN3_NEXT_L8_RUN}-b380": QWEN3_NEXT_L8,
}
# blind edge-h200-39: said 77951 tokens fit with 2.6 MiB to spare; the GPU's cudaMalloc refused the sliding
# layer's 45.27 GiB additive mask with 8.7 MiB free (beyond the driver's 3.125 MiB the capacity keeps)
KNOWN_TRIAL_GAPS["gemma-2-2b-it-bf16-sdpa-n77951-default-b4"] = (
    "a capacity finer than the driver: Gemma-2-2B at batch 4 replays to 2.6 MiB under the capacity where the "
    "GPU refused a 45.27 GiB segment with 8.7 MiB free (one case; the edge figure's rows range over 11 MiB)")
# out-of-memory trials whose verdict holds but whose replay fails at another request than the GPU
KNOWN_FAILURE_GAPS: dict[str, str] = {
    trial: UNREPLAYED for trial in ("tests/configs/jamba-v0.1.json-l8-bf16-sdpa-n2048-default-b34",
                                    "tests/configs/granite-4.0-h-small.json-l6-bf16-sdpa-n1024-default-b8",
                                    "tests/configs/falcon-h1-tiny-90m.json-bf16-sdpa-n4096-default-b22")}
KNOWN_DEVICE_GAPS: dict[str, str] = {}
KNOWN_SMALL_DEVICE_GAPS: dict[str, str] = {
    # blind edge-h100-2: its allocated peak is within 1%, its reserve is not
    "qwen2.5-0.5b-int8-sdpa-n4096-default-b107-h100": (
        "bitsandbytes int8's Linear temporaries (the input's fp16 copy, its int8 rows and outlier mask, the int32 "
        "product and its fp16 dequantization) are not replayed: the reserve is 2.7 GiB said, 6.6 GiB measured"),
}


def _h200():
    from vramplan.catalog import gpu_catalog

    return gpu_catalog().find("H200")


def _param(row: dict, ident: str, gaps: dict[str, str]):
    gap = gaps.get(ident)
    return pytest.param(row, id=ident, marks=[pytest.mark.xfail(reason=gap, strict=True)] if gap else [])


def test_every_search_has_both_ends_or_says_why():
    assert all(s["largest_ok"] is not None and s["smallest_oom"] is not None for s in SEARCHES)
    assert set(KNOWN_SEARCH_GAPS) <= {_case_id(s["case"]) for s in SEARCHES}


def test_enough_shapes_and_kinds_with_both_allocators():
    """Issue 10 asks for 12 shapes over 6 kinds, each with both allocator settings."""
    shapes: dict[str, set[str]] = {}
    for s in SEARCHES:
        shapes.setdefault(_case_id(s["case"]).rsplit("-", 1)[0], set()).add(s["case"]["allocator"])
    both = [k for k, v in shapes.items() if v == {"default", "expandable"}]
    assert len(shapes) >= 13 and len(both) >= 9


@pytest.mark.parametrize("search", [_param(s, _case_id(s["case"]), KNOWN_SEARCH_GAPS) for s in SEARCHES])
def test_largest_fit_is_the_measured_boundary(search):
    found = predicted_boundary(search)
    assert boundary_holds(search, found.value), (
        f"{_case_id(search['case'])}: predicted {found.value}, measured {search['largest_ok']} runs and "
        f"{search['smallest_oom']} runs out of memory; the replay fails at {found.fails_from}: {found.fails_at}")


@pytest.mark.parametrize("row", [_param(r, _trial_id(r), KNOWN_TRIAL_GAPS) for r in TRIALS])
def test_verdict_matches_each_trial(row):
    verdict = _estimate(row).verdict
    assert verdict is not None
    assert verdict.fits == (row["status"] == "ok"), (
        f"{_trial_id(row)} measured {row['status']}; verdict {'fits' if verdict.fits else 'does not fit'}"
        f" (fails at {verdict.fails_at})")


FULL_GPU_TRIALS = [r for r in TRIALS if fills_the_gpu(r)]


@pytest.mark.parametrize("row", [_param(r, _trial_id(r), KNOWN_DEVICE_GAPS) for r in FULL_GPU_TRIALS])
def test_full_gpu_device_bytes(row):
    predicted = _estimate(row).peak_device_bytes
    measured = measured_peak_device(row)
    assert abs(predicted / measured - 1) <= DEVICE_TOLERANCE, (
        f"{_trial_id(row)}: device predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB "
        f"({predicted / measured - 1:+.2%})")


OK_TRIALS = [r for r in TRIALS if r["status"] == "ok"]
ALLOCATED_TOLERANCE = 0.035  # the point model's allocated peak on the edge runs (the accuracy table's worst)


@pytest.mark.parametrize("row", [pytest.param(r, id=_trial_id(r)) for r in OK_TRIALS])
def test_allocated_peak_of_each_run(row):
    """The estimate's peak allocated bytes (the point model) on every edge run that completed; the
    additive mask of a sliding layer past its window (Mistral-7B at 63248 tokens: 59.6 GiB) was missing."""
    predicted = _estimate(row).peak_allocated_bytes
    assert abs(predicted / row["peak_allocated_bytes"] - 1) <= ALLOCATED_TOLERANCE, (
        f"{_trial_id(row)}: allocated predicted {predicted / 2**30:.2f} GiB, measured "
        f"{row['peak_allocated_bytes'] / 2**30:.2f} GiB")


SMALL_TRIALS = [r for r in TRIALS if r["status"] == "ok" and not fills_the_gpu(r)]
SMALL_DEVICE_TOLERANCE = 0.05  # issue 10: the runs far from the edge stay within 5%


@pytest.mark.parametrize("row", [_param(r, _trial_id(r), KNOWN_SMALL_DEVICE_GAPS) for r in SMALL_TRIALS])
def test_small_trial_device_bytes(row):
    """The H200 runs under half the GPU (the traced small eager runs among them), measured by the
    edge protocol: a fresh process, nothing run before."""
    predicted = _estimate(row).peak_device_bytes
    measured = measured_peak_device(row)
    assert abs(predicted / measured - 1) <= SMALL_DEVICE_TOLERANCE, (
        f"{_trial_id(row)}: device predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB")


def test_known_gaps_are_real_trials():
    ids = {_trial_id(r) for r in TRIALS}
    assert set(KNOWN_TRIAL_GAPS) <= ids and set(KNOWN_DEVICE_GAPS) <= ids and set(KNOWN_SMALL_DEVICE_GAPS) <= ids
    assert set(KNOWN_FAILURE_GAPS) <= ids


def test_capacity_of_the_h200_comes_from_its_edge_rows():
    from vramplan.runtimes.allocator import capacity

    cap = capacity(_h200())
    assert _h200().memory_bytes == 150_109_880_320  # torch's total_memory on the lent H200
    # free after CUDA init 142,629 MiB, less the ~170 MiB of kernels a run loads, less 3.125 MiB
    assert 142_450 * MIB <= cap.bytes <= 142_470 * MIB
    assert "edge rows" in cap.why


def test_gpus_without_edge_rows_state_their_assumption():
    from vramplan.catalog import gpu_catalog
    from vramplan.runtimes.allocator import capacity

    cap = capacity(gpu_catalog().find("A100-80GB"))
    assert "assumption" in cap.why


def test_verdict_names_the_failing_request_and_suggests_expandable_segments():
    # llama-3.2-1b eager at batch 28, 4096 tokens: neither allocator fits (measured: both OOM)
    row = next(r for r in TRIALS if _trial_id(r) == "llama-3.2-1b-bf16-eager-n4096-expandable-b28")
    verdict = _estimate(row).verdict
    assert not verdict.fits and verdict.fits_with_expandable_segments is False
    # the GPU: "Tried to allocate 56.00 GiB" in torch.nn.functional.softmax, eager_attention_forward
    assert verdict.fails_at == "prefill layer 0, softmax (56.00 GiB)"
    assert row["oom"]["tried_to_allocate_bytes"] == 56 * GIB and row["failed_at"][-1].endswith(":softmax")
    assert verdict.reserved_unusable_bytes is not None and verdict.headroom_bytes < 0


OOM_TRIALS = [r for r in TRIALS if r["status"] == "oom"]


@pytest.mark.parametrize("row", [_param(r, _trial_id(r), {**KNOWN_TRIAL_GAPS, **KNOWN_FAILURE_GAPS})
                                 for r in OOM_TRIALS])
def test_the_replay_fails_at_the_request_the_gpu_failed_at(row):
    """torch's message prints what it tried to allocate to two decimals of its unit; the replay's
    failing request (the segment it needed) must print the same."""
    from vramplan.request import PrecisionChoice
    from vramplan.runtimes.transformers.fit import replay_at_capacity

    case = row["case"]
    run = replay_at_capacity(_architecture(case), _workload(case), PrecisionChoice(name=case["precision"]),
                             _gpu(row), case["allocator"])
    assert not run.completed
    tried = row["oom"]["tried_to_allocate_bytes"]
    unit = GIB if tried >= GIB else MIB
    assert round(run.failed_request_bytes / unit, 2) == round(tried / unit, 2), (
        f"{_trial_id(row)}: replay fails at {run.failed_at}, the GPU tried to allocate {tried / unit:.2f} "
        f"{'GiB' if unit == GIB else 'MiB'} at {row['failed_at'][-1]}")


@pytest.mark.parametrize("model, order", [
    ("llama-3.1-8b", "traced"), ("gemma-2-2b-it", "traced"), ("stablelm-2-zephyr-1_6b", "code"),
    ("phi-3.5-mini-instruct", "code"), ("falcon-7b-instruct", "code"), ("phi-2", "code"), ("bloomz-560m", "code"),
    ("mpt-7b-instruct", "code"), ("gpt-oss-20b", "code"), ("tests/configs/olmoe-1b-7b.json", "coarse"),
    ("deepseek-v3", "code"),
    ("tests/configs/mamba-2.8b.json", "code"), ("tests/configs/mamba2-codestral-7b.json", "code"),
    ("tests/configs/jamba-v0.1.json", "none"),
    ("tests/configs/flan-t5-base.json", "code"),
    ("tests/configs/bart-large.json", "none"),
])
def test_the_verdict_says_what_its_request_order_rests_on(model, order):
    """A verdict on a family whose layers are not replayed in a traced or code-read order says so."""
    from pathlib import Path

    from vramplan import estimate
    from vramplan.request import Workload

    source = str(Path(__file__).parent / "configs" / Path(model).name) if model.startswith("tests/") else model
    work = Workload(batch=2, prompt_len=512)
    est = estimate(source, work, gpu="h100")
    coarse = [n for n in est.notes if "coarse request order" in n]
    unreplayed = [n for n in est.notes if "not replayed request by request" in n]
    assert bool(coarse) == (order == "coarse") and bool(unreplayed) == (order == "none")
    assert not [n for n in estimate(source, work).notes if "request order" in n]  # no GPU, no verdict


def test_mpt_refuses_positions_past_its_alibi_table():
    """MptModel slices an ALiBi bias built for max_seq_len positions: 2048 + 16 tokens was a shape error on
    the H200 (edge-h200-18), so the planner refuses it instead of sizing a run that cannot start."""
    from vramplan import estimate
    from vramplan.errors import WorkloadError
    from vramplan.request import Workload

    with pytest.raises(WorkloadError, match="2048 positions"):
        estimate("mpt-7b-instruct", Workload(batch=1, prompt_len=2048, new_tokens=16))
    assert estimate("mpt-7b-instruct", Workload(batch=1, prompt_len=2032, new_tokens=16)).peak_allocated_bytes > 0


def test_fp16_eager_softmax_has_no_upcast_copy():
    """torch's softmax(x, dtype=float32) of CUDA fp16 is one fused kernel; bf16 is upcast into a copy first.
    At bf16's peak the masked scores, the upcast and the fp32 softmax are alive; at fp16's the masked scores,
    the fp32 softmax and its cast back: 2 bytes a score less, which is what moved Llama-3.2-1B's measured
    boundary at 2048-token prompts from 66 (bf16's prediction) to 87 (the replay now at capacity, too)."""
    from vramplan.catalog import runtime_profile
    from vramplan.request import PrecisionChoice
    from vramplan.runtimes.transformers.fit import _Run

    runs = {}
    for precision in ("bf16", "fp16"):
        case = {"model": "llama-3.2-1b", "precision": precision, "attn": "eager", "prompt_len": 2048,
                "new_tokens": 16, "allocator": "default", "batch": 66}
        run = _Run(_architecture(case), _workload(case), PrecisionChoice(name=precision), runtime_profile())
        runs[precision] = run.replay(_workload(case), None, "default")
    scores = 66 * 32 * 2048 * 2048
    assert runs["bf16"].peak_allocated - runs["fp16"].peak_allocated == scores * (4 - 2)
    measured = next(r for r in TRIALS if r["case"]["precision"] == "fp16" and r["case"]["attn"] == "eager"
                    and r["case"]["model"] == "llama-3.2-1b" and r["case"]["batch"] == 66)
    assert abs(runs["fp16"].peak_allocated - measured["peak_allocated_bytes"]) < 2**20


@pytest.mark.parametrize("model, layers, what, fixed", [
    ("tests/configs/jamba-v0.1.json", 8, "batch", 2048), ("tests/configs/mamba-2.8b.json", 16, "batch", 1024),
    ("tests/configs/bart-large.json", None, "batch", 1000), ("qwen3-next-80b-a3b-instruct", 4, "prompt_len", 8),
    ("llama-3.2-1b", None, "batch", 4096),
])
def test_largest_fit_is_where_the_verdict_turns(model, layers, what, fixed):
    """--max and the verdict apply one rule: at the largest fit the verdict says it fits, one more
    and it does not, also for families whose layers are not replayed request by request (their
    replay alone would complete at any size: the point model's allocated peak decides)."""
    from vramplan.request import PrecisionChoice, Workload
    from vramplan.runtimes.transformers.estimate import estimate_architecture
    from vramplan.runtimes.transformers.fit import largest_fit_detail
    from vramplan.validate.edgecheck import architecture

    arch = architecture({"model": model, "layers": layers})
    other = "prompt_len" if what == "batch" else "batch"
    work = Workload(new_tokens=16, **{other: fixed})
    fit = largest_fit_detail(arch, model, work, PrecisionChoice(), _h200(), what)
    assert 0 < fit.value < fit.limit and fit.fails_from == fit.value + 1

    def verdict(value: int):
        return estimate_architecture(arch, model, work.model_copy(update={what: value}), PrecisionChoice(),
                                     _h200()).verdict

    at, past = verdict(fit.value), verdict(fit.value + 1)
    assert at.fits and not past.fits
    assert past.fails_at == fit.fails_at


def test_runs_past_the_trained_context_say_so():
    """Rotary positions do not stop at max_position_embeddings (131072 for Llama-3.1), so an
    estimate, --max prompt-len and plan's context past it run: each says the model was not trained
    that far. A learned table (GPT-2's 1024) is a hard limit and is refused instead."""
    from vramplan import estimate, estimate_maximum
    from vramplan.errors import WorkloadError
    from vramplan.request import Workload

    past = estimate("llama-3.1-8b", Workload(prompt_len=131_000, new_tokens=100))
    assert any("131100 is beyond the model's 131072 positions" in n for n in past.notes)
    assert not any("beyond the model's" in n for n in estimate("llama-3.1-8b", Workload(prompt_len=4096)).notes)
    fit = estimate_maximum("llama-3.1-8b", Workload(new_tokens=128), "prompt_len", "h200")
    assert fit.largest + 128 > 131072 and any("beyond the model's 131072 positions" in n for n in fit.notes)
    with pytest.raises(WorkloadError):
        estimate("gpt2", Workload(prompt_len=1000, new_tokens=100))


def test_a_fit_that_needs_the_allocators_retries_says_so():
    """A verdict whose replay completes only after releasing the cache names the retries (the blind
    edge-h200-26 search of Qwen3-Next with 8 layers: said 380 fits after 2 retries, the GPU needed
    4 and ran out of memory); one that never came near the capacity says nothing of it."""
    from vramplan.render import verdict_lines
    from vramplan.result import Verdict

    tight = Verdict(gpu="H200", memory_bytes=150109880320, fits=True, headroom_bytes=1 << 30, alloc_retries=2)
    assert any("retries (2x)" in line for line in verdict_lines(tight))
    roomy = tight.model_copy(update={"alloc_retries": 0})
    assert not any("retries" in line for line in verdict_lines(roomy))
    row = next(r for r in TRIALS if _trial_id(r) == "qwen3-next-80b-a3b-instruct-l8-bf16-sdpa-n1024-default-b373")
    assert _estimate(row).verdict.alloc_retries == row["num_alloc_retries"] == 2


def test_a_long_generation_meets_the_allocator_at_every_decode_step():
    """Each decode step's cache cat asks every layer for a block a little larger than the one it
    frees, so the reserve builds up over the whole generation: Qwen3-0.6B generating 512 tokens
    after 512 at batch 1230 keeps its allocated peak under the H200's capacity at the last step (the
    rule of the 16-step replay said it fits), yet its replay runs out of memory in a later step; the
    GPU (edge-h200-31) ran out of memory from 1057. Past the replay's budget a note says so."""
    import re

    case = {"model": "qwen3-0.6b", "precision": "bf16", "attn": "sdpa", "prompt_len": 512, "new_tokens": 512,
            "allocator": "default", "batch": 1230}
    est = _estimate({"case": case})
    assert est.peak_allocated_bytes < est.verdict.capacity_bytes
    assert not est.verdict.fits
    assert int(re.search(r"decode step (\d+)", est.verdict.fails_at).group(1)) > 16  # past the old bound
    fitting = _estimate({"case": {**case, "batch": 1000}})
    assert fitting.verdict.fits and fitting.verdict.alloc_retries >= 100
    # a fit after hundreds of retries: its peak on device is the capacity's, not an unbounded reserve
    assert abs(fitting.peak_device_bytes / _h200().memory_bytes - 1) < 0.01
    longer = _estimate({"case": {**case, "batch": 100, "new_tokens": 4000}})
    assert any("replays the first 1170 of 3999 decode steps" in note for note in longer.notes)


def test_largest_fit_is_the_last_value_below_the_first_failure():
    """Near capacity the edge is not monotone (edge-h200-36/-37: Llama-3.2-3B runs 40085 tokens,
    not 40086, and 43257 again): a bisection that starts above lands on an island. The answer is
    the last value below the first failure, with the CLEAR_BELOW_AN_EDGE values under it run."""
    from vramplan.runtimes.transformers.fit import CLEAR_BELOW_AN_EDGE, _bracket, _lowest_edge, _walk_down

    islands = {102, 103, 104, 105, *range(111, 116)}  # runs again above the first failure, 101
    tried: list[int] = []

    def fits(value: int) -> bool:
        tried.append(value)
        return value <= 100 or value in islands

    low, high = _bracket(fits, 113, 10_000)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    assert (low, high) == (115, 116)  # the bisection alone: an island
    tried.clear()
    assert _walk_down(fits, _no_prefetch, 1, low, high) == (100, 101)
    assert tried == list(range(114, 68, -1))  # down value by value, to 32 that run below the first failure
    assert _lowest_edge(fits, _no_prefetch, 1, low, high) == (100, 101)  # the walk's fallback agrees
    assert CLEAR_BELOW_AN_EDGE > 16  # longer than the measured islands' runs (16 at most: the test below)


def test_the_lowest_edge_is_found_from_any_edge_above_it():
    """Llama-3.2-1B eager at batch 1: the replay (and the GPU, edge-h200-37) fails from 16869 tokens,
    runs 16880-16895 and 17592, fails at 16896 and 17599. From every edge of the replay in that band
    the search comes down to the first failure."""
    from vramplan.catalog import calibration, runtime_profile
    from vramplan.request import PrecisionChoice
    from vramplan.runtimes.transformers.fit import WALK_LIMIT, _lowest_edge, _Run, _walk_down

    search = next(s for s in SEARCHES if _case_id(s["case"]) == "llama-3.2-1b-bf16-eager-n16000-default")
    case = search["case"]
    run = _Run(_architecture(case), _workload(case), PrecisionChoice(name=case["precision"]), runtime_profile())
    fitted = calibration()
    cap = run.capacity(_h200(), fitted)
    seen: dict[int, bool] = {}

    def fits(value: int) -> bool:
        if value not in seen:
            seen[value] = run.runs(run.workload.model_copy(update={"prompt_len": value}), cap, "default",
                                   fitted).completed
        return seen[value]

    edges = [v for v in range(16_860, 17_600) if fits(v) and not fits(v + 1)]
    assert len(edges) > 20
    assert {_walk_down(fits, _no_prefetch, 1, v, v + 1) for v in edges} == {(16_868, 16_869)}
    assert max(edges) - 16_869 > WALK_LIMIT  # the walk's fallback was taken from the highest edges
    assert {_lowest_edge(fits, _no_prefetch, 1, v, v + 1) for v in edges} == {(16_868, 16_869)}


def _no_prefetch(values) -> None:
    """A search without workers: every value is left to fits()."""


def test_the_llama_prompt_length_edge_and_its_islands():
    found = predicted_boundary(next(s for s in SEARCHES
                                    if _case_id(s["case"]) == "llama-3.2-3b-instruct-bf16-sdpa-n40255-default"))
    assert (found.value, found.fails_from) == (40085, 40086)  # the GPU: 40085 runs, 40086 does not
    assert found.also_runs is not None and found.also_runs > found.fails_from
    assert "prefill layer 26, mlp act * up" in found.fails_at


_PARALLEL_SEARCH = """
import json
from vramplan.runtimes.transformers import replay_pool
from vramplan.validate.edgecheck import merged_searches, predicted_boundary, case_id
from vramplan.validate.compare import measurement_files, read_rows
search = next(s for s in merged_searches(read_rows(measurement_files()))
              if case_id(s["case"]) == "llama-3.2-3b-instruct-bf16-sdpa-n40255-default")
forked = []
close = replay_pool.ReplayPool.close
def noting_close(pool):
    forked.append(pool._executor is not None)
    close(pool)
replay_pool.ReplayPool.close = noting_close
replay_pool.SLOW_REPLAY_SECONDS = 0.0  # every replay counts as slow: the workers take the search
answers = [predicted_boundary(search, workers=n).model_dump(exclude={"replays"}) for n in (1, 3)]
print(json.dumps({"answers": answers, "forked": forked}))
"""


def test_a_search_with_workers_answers_as_one_without():
    """Replays in forked workers (replay_pool) change how long a search takes, not its answer: the
    Llama-3.2-3B prompt-length search, whose bisection lands on an island 3,000 tokens above the
    first failure (so the walk down gives way to its bisection), with 1 and 3 workers, in a fresh
    single-threaded process (the only kind that forks)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PARALLEL_SEARCH], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["forked"] == [False, True]
    one, three = result["answers"]
    assert one == three and (one["value"], one["fails_from"]) == (40085, 40086)


def test_workers_setting(monkeypatch):
    from vramplan.errors import WorkloadError
    from vramplan.runtimes.transformers.replay_pool import WORKERS_VARIABLE, ReplayPool, worker_count

    monkeypatch.setenv(WORKERS_VARIABLE, "3")
    assert worker_count() == 3
    for wrong in ("0", "two", "-1"):
        monkeypatch.setenv(WORKERS_VARIABLE, wrong)
        with pytest.raises(WorkloadError, match=WORKERS_VARIABLE):
            worker_count()
    # a pool that is not slow replays here, in order, whatever its workers
    pool = ReplayPool(lambda v: v * v, workers=4)
    assert pool.map([3, 1, 2]) == [9, 1, 4] and pool._executor is None


def test_merged_searches_take_the_first_failure_of_every_trial():
    case = {"model": "m", "precision": "bf16", "attn": "sdpa", "prompt_len": 1000, "new_tokens": 16,
            "allocator": "default"}
    rows = [{"kind": "edge-search", "case": case, "what": "batch", "largest_ok": 288, "smallest_oom": 293},
            *({"kind": "edge", "case": {**case, "batch": b}, "status": status}
              for b, status in ((244, "ok"), (245, "oom"), (246, "ok"), (252, "oom"), (250, "crashed")))]
    (merged,) = merged_searches(rows)
    assert (merged["largest_ok"], merged["smallest_oom"], merged["runs_above"]) == (244, 245, [246, 288])
    assert boundary_holds(merged, 244) and not boundary_holds(merged, 288) and not boundary_holds(merged, 243)
