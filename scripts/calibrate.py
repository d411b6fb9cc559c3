#!/usr/bin/env python3
"""Fit the constants vramplan cannot derive from a config, from the committed measurements.

Writes profiles/calibration.yaml (never edit it by hand; run this script again):

* outside_torch, per GPU: NVML's device memory of the process minus torch.cuda.memory_reserved(),
  read in the same instant after each run; the median over rows without bitsandbytes.
* bitsandbytes_outside_torch_bytes: how much more the same figure is once bitsandbytes' CUDA
  library is loaded (median of bitsandbytes rows minus the median above).
* outside_torch_growth_bytes: the median above minus the process's device memory right after
  torch initialized CUDA (before any model): what a first run adds outside torch.
* outside_torch["<GPU>"] for a GPU measured only at the edge (h200-edge.jsonl): the same NVML
  figure, from its edge trials.
* outside_torch["<GPU>-edge"], per GPU with edge trials: what the driver no longer has for torch
  when a run reaches the edge, total_memory less the allocator's capacity: what was in use at
  CUDA initialisation (total - free, which includes memory the driver does not attribute to the
  process), what the run loaded outside torch since (NVML's figure at the end less at init: the
  first matmul's and attention's kernels), and the driver's last DRIVER_SLACK_BYTES; less what
  the run's decode steps added (below), so that it is the figure when a run starts. Also per
  attention kernel ("<GPU>-edge/<kernel>", with MIN_EDGE_KERNEL_ROWS rows or more): an eager run
  does not load SDPA's kernels.
* decode_outside_torch_per_step, per attention kernel: how much NVML's figure less torch's
  reserve grows per decode step of a generation (outside-growth rows: from the sample after the
  prompt's forward to the end, over the decode steps between; small batches of 100+ new
  tokens). The kernel is the one a row restricted SDPA to, else the one torch 2.11 picks on the
  H200 (compute capability 9.0): cuDNN's for bf16/fp16 SDPA, math for fp32, eager's own. With
  cuDNN the driver holds ~100 KiB more after every step (a graph per key length), 2 MiB at a
  time; flash, math and eager grow nothing.

The allocator's reserve is not fitted: the engine replays each run through a simulation of the
caching allocator (vramplan/runtime/allocator.py).

    python scripts/calibrate.py            # rewrite profiles/calibration.yaml
    python scripts/calibrate.py --check    # exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml
from vramplan.catalog import calibration, runtime_profile
from vramplan.runtimes.transformers.decode_replay import MIN_REPLAYED_DECODE_STEPS
from vramplan.validate.compare import gpu_key, measurement_files, read_rows
from vramplan.validate.edgecheck import decode_kernel

OUT = Path(__file__).resolve().parent.parent / "profiles" / "calibration.yaml"
BNB = {"int8", "nf4", "fp4"}
# cudaMalloc (and torch, either allocator mode) could take at most free-after-init - 3.125 MiB
# on the lent H200 (driver 580.159.04, torch 2.11): filled with 1 GiB, 20 MiB, 2 MiB and 512 B
# tensors until each OOMed (session notes of 2026-11; those trials were not kept as rows). Whatever the
# request's size: profiles/measurements/driver/h100-slack.jsonl (scripts/driver_slack.py, driver
# 580.159.04, the lent H100) has cuMemAlloc and cuMemCreate of 2 MiB to 64 GiB refused with 0.19 MiB
# free beyond the request and granted with 2.19 MiB, keeping nothing beyond it (tests/test_outside_growth.py).
DRIVER_SLACK_BYTES = 3 * 2**20 + 2**17


def fit() -> dict:
    files = measurement_files()
    rows = [r for r in read_rows(files) if r.get("status") == "ok" and r.get("device_bytes")
            and r.get("kind", "inference") == "inference"]
    outside: dict[str, list[int]] = defaultdict(list)
    outside_bnb: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        key = gpu_key(row["env"]["gpu"])
        value = row["device_bytes"] - row["reserved_at_device_read_bytes"]
        (outside_bnb if row["case"]["precision"] in BNB else outside)[key].append(value)
    fitted_outside = {
        key: {"bytes": int(statistics.median(values)), "samples": len(values),
              "low": min(values), "high": max(values)}
        for key, values in sorted(outside.items())
    }
    # GPUs never measured get the measured GPU's figure: the best evidence there is
    reference = fitted_outside.get("H100") or next(iter(fitted_outside.values()))
    fitted_outside["default"] = dict(reference)
    per_step = _decode_growth(read_rows(files))
    fitted_outside.update(_edge_outside(read_rows(files), fitted_outside, per_step))
    bnb_extra = [statistics.median(v) - fitted_outside[k]["bytes"] for k, v in outside_bnb.items()
                 if k in fitted_outside]
    # loading through bitsandbytes: the peak above the loaded model, per scheme, as a multiple of
    # the largest Linear's bf16 size (the tensor being quantized when the peak happens); the
    # largest ratio seen, so the estimate is an upper bound
    load_ratio: dict[str, float] = {}
    for row in rows:
        inventory = row.get("inventory", {})
        if inventory.get("weights_from") != "bitsandbytes reload" and not (
                row["case"]["precision"] in BNB and "load_peak_allocated_bytes" in inventory):
            continue
        largest = _largest_linear(row["case"])
        if largest is None:
            continue  # a mixture of experts: its load transient is the expert merge (estimate.py)
        excess = inventory["load_peak_allocated_bytes"] - inventory["allocated_after_load_bytes"]
        key = "int8" if row["case"]["precision"] == "int8" else "4bit"
        load_ratio[key] = max(load_ratio.get(key, 0.0), excess / (2 * largest))
    env = rows[0]["env"]
    return {
        "fitted_from": [f"{p.name}: {sum(1 for _ in read_rows([p]))} rows" for p in files],
        "measured_with": {"gpu": env["gpu"], "driver": env.get("driver") or "unknown",
                          "cuda": env["cuda"], "torch": env["torch"],
                          "transformers": env["transformers"],
                          "bitsandbytes": runtime_profile().measured_with.bitsandbytes},
        "outside_torch": fitted_outside,
        "bnb_load_transient": {k: round(v + 0.005, 2) for k, v in sorted(load_ratio.items())},
        "bitsandbytes_outside_torch_bytes": int(statistics.median(bnb_extra)) if bnb_extra else 0,
        # what appears outside torch after a process's start (cuBLAS, kernels loaded by the first
        # run): what vLLM's start-up profile sees as its non-torch increase
        "outside_torch_growth_bytes": int(reference["bytes"] - statistics.median(
            r["process_baseline_device_bytes"] for r in rows if r.get("process_baseline_device_bytes"))),
        "decode_outside_torch_per_step": per_step,
    }


# a generation long enough that its growth outside torch (2 MiB at a time) gives a rate
MIN_GROWTH_DECODE_STEPS = 100


SDPA_BACKENDS = {"CUDNN_ATTENTION": "cudnn", "FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient",
                 "MATH": "math"}


def _row_kernel(row: dict) -> str | None:
    """The attention kernel a row's decode steps ran: the one it restricted SDPA to, else the
    planner's choice for its GPU (None for a row that allowed several)."""
    backends = row["case"].get("sdpa_backends")
    if backends:
        return SDPA_BACKENDS[backends[0]] if len(backends) == 1 else None
    return decode_kernel(row)


def _decode_growth(rows) -> dict:
    """Per attention kernel: the median growth outside torch per decode step."""
    rates: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        if row.get("kind") != "outside-growth" or row.get("status") != "ok" or _row_kernel(row) is None:
            continue
        after_prompt = row["steps"][0]  # the sample after the prompt's forward
        steps = row["case"]["new_tokens"] - 1 - after_prompt["step"]
        if steps < MIN_GROWTH_DECODE_STEPS:
            continue
        rates[_row_kernel(row)].append((row["at_end"]["nvml"] - after_prompt["nvml"]) // steps)
    return {kernel: {"bytes": int(statistics.median(values)), "samples": len(values), "low": min(values),
                     "high": max(values)} for kernel, values in sorted(rates.items())}


MIN_EDGE_KERNEL_ROWS = 10  # edge rows of one attention kernel before it has its own edge figure


def _edge_outside(rows, already: dict, per_step: dict) -> dict:
    """Per GPU with edge trials: its NVML outside-torch figure (when no inference rows gave one)
    and what is unavailable to the allocator when a run starts (the `-edge` entry): the rows'
    figures at their end, less their decode steps' growth (the out-of-memory trials of 16 new
    tokens ran out in the prompt's forward, mostly; the longer ones near their end)."""
    nvml: dict[str, list[int]] = defaultdict(list)
    unavailable: dict[str, list[int]] = defaultdict(list)
    by_kernel: dict[tuple[str, str | None], list[int]] = defaultdict(list)
    for row in rows:
        if row.get("kind") != "edge" or row.get("status") not in ("ok", "oom") or not row.get("device_bytes"):
            continue
        if row["case"]["precision"] in BNB:
            continue
        key = gpu_key(row["env"]["gpu"])
        outside = row["device_bytes"] - row["reserved_at_end_bytes"]
        if row["status"] == "ok":
            nvml[key].append(outside)
        at_init = row["gpu_total_bytes"] - row["free_at_init_bytes"]
        steps = row["case"].get("new_tokens", 16) - 1
        grown = 0
        if row["status"] == "ok" or steps > MIN_REPLAYED_DECODE_STEPS:
            grown = per_step.get(_row_kernel(row), {}).get("bytes", 0) * steps
        figure = at_init + outside - grown - row["device_at_init_bytes"] + DRIVER_SLACK_BYTES
        unavailable[key].append(figure)
        by_kernel[key, _row_kernel(row)].append(figure)

    def summary(values: list[int]) -> dict:
        return {"bytes": int(statistics.median(values)), "samples": len(values), "low": min(values),
                "high": max(values)}

    out = {key: summary(values) for key, values in sorted(nvml.items()) if key not in already}
    out.update({f"{key}-edge": summary(values) for key, values in sorted(unavailable.items())})
    # the kernels a run loads outside torch depend on its attention: eager runs leave SDPA's fused
    # kernels unloaded (8 MiB less on the H200); a kernel with too few rows keeps the GPU's figure
    out.update({f"{key}-edge/{kernel}": summary(values) for (key, kernel), values in sorted(by_kernel.items())
                if kernel is not None and len(values) >= MIN_EDGE_KERNEL_ROWS})
    return out


def _largest_linear(case: dict) -> int | None:
    """The largest Linear's elements; None for a mixture of experts, whose load peak is set by
    merging the per-expert checkpoint tensors, not by quantizing a Linear."""
    from vramplan.config import shrink_config
    from vramplan.model import architecture_from_config
    from vramplan.source import resolve

    arch = architecture_from_config(shrink_config(resolve(case["model"]).config, case.get("layers")))
    if arch.moe is not None:
        return None
    return max(t.elements_each for t in arch.tensors if t.kind == "linear")


HEADER = """\
# Written by scripts/calibrate.py from the committed measurements; do not edit by hand.
# outside_torch: NVML's process memory minus torch's reserved memory, per GPU ("default" is
# the measured GPU's figure, used for GPUs with no rows); "<GPU>-edge": what the allocator cannot
# have when a run reaches the edge (memory at CUDA init, kernels loaded by the run, the driver's
# last 3.125 MiB), from that GPU's edge trials: the allocator's capacity is the GPU's
# memory_bytes less it (runtimes/transformers/fit.py); bitsandbytes_outside_torch_bytes:
# what loading bitsandbytes' CUDA library adds to it. bnb_load_transient: the largest peak seen
# while bitsandbytes quantizes a model at load, above the loaded model, in units of the
# largest Linear's bf16 size. decode_outside_torch_per_step: what outside torch grows by per
# decode step, by attention kernel (outside-growth rows); the replay's capacity shrinks by it at
# every step.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if calibration.yaml is stale")
    args = parser.parse_args()
    if args.check and not OUT.exists():
        print(f"{OUT} is missing; run scripts/calibrate.py", file=sys.stderr)
        return 1
    if not OUT.exists():  # first run: the engine needs a calibration to compare rows at all
        OUT.write_text(HEADER + yaml.safe_dump(_bootstrap(), sort_keys=False))
        calibration.cache_clear()
    fitted = fit()
    text = HEADER + yaml.safe_dump(fitted, sort_keys=False)
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT} is stale: run scripts/calibrate.py and commit it", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(yaml.safe_dump(fitted, sort_keys=False))
    return 0


def _bootstrap() -> dict:
    zero = {"bytes": 0, "samples": 0, "low": 0, "high": 0}
    return {"fitted_from": [], "measured_with": runtime_profile().measured_with.model_dump(),
            "outside_torch": {"default": zero}, "bitsandbytes_outside_torch_bytes": 0,
            "outside_torch_growth_bytes": 0, "bnb_load_transient": {}}


if __name__ == "__main__":
    sys.exit(main())
