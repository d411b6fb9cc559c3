"""GPU side of `vramplan validate --find-max`: one trial at the edge of the GPU, in its own process.

A trial follows the protocol the estimate models (README, "Will it run?"): a fresh process, the
allocator configured before CUDA starts, the model built from its config with random weights
directly on the GPU (or reloaded through bitsandbytes from a random checkpoint), then
`torch.cuda.empty_cache()` and one `generate(max_new_tokens=T, min_new_tokens=T,
do_sample=False)` over random ids with an all-ones attention mask. Whatever happens, the trial
writes one JSON line: ok or oom, the allocated and reserved peaks, NVML's figure for the
process, the allocator's retry and OOM counters, and for an OOM the request that failed.

    python -m vramplan.validate.edge JOB.json OUT.jsonl
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

_UNITS = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "bytes": 1, "B": 1}


def parse_oom(message: str) -> dict[str, Any]:
    """The figures of PyTorch's out-of-memory message (c10/cuda/CUDACachingAllocator.cpp)."""
    def grab(pattern: str) -> int | None:
        match = re.search(pattern + r" ([\d.]+) (GiB|MiB|KiB|bytes|B)", message)
        return int(float(match.group(1)) * _UNITS[match.group(2)]) if match else None

    return {
        "tried_to_allocate_bytes": grab(r"Tried to allocate"),
        "free_bytes": grab(r"of which"),
        "process_in_use_bytes": grab(r"this process has"),
        "allocated_by_pytorch_bytes": grab(r"Of the allocated memory"),
        "reserved_unallocated_bytes": (lambda m: int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None)(
            re.search(r"and ([\d.]+) (GiB|MiB|KiB|bytes|B) is reserved by PyTorch but unallocated", message)),
    }


def _where(exc: BaseException) -> list[str]:
    """The innermost transformers/torch frames of the failing request: which layer, which op."""
    frames = traceback.extract_tb(exc.__traceback__)
    picked = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}:{f.name}" for f in frames
              if "transformers/" in f.filename or "torch/nn/" in f.filename or "bitsandbytes/" in f.filename]
    return picked[-4:]


def compact_trace(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The allocator's event trace, small enough to commit: one [action, block, bytes, label]
    per event, blocks numbered in order of allocation, labels the innermost
    transformers/torch/bitsandbytes frames, stored once; beside them each event's address
    less the trace's lowest (where the driver put each segment decides best fit among free
    blocks of one size, so the allocator model is checked against it)."""
    from vramplan.validate import measure

    labels: dict[str, int] = {}
    blocks: dict[int, int] = {}
    events: list[list[Any]] = []
    addresses: list[int] = []
    allocated = 0
    for event in snapshot.get("device_traces", [[]])[0]:
        action = event.get("action")
        if action not in ("alloc", "free_completed", "segment_alloc", "segment_free",
                          "segment_map", "segment_unmap", "oom"):
            continue
        addr = int(event.get("addr", 0))
        if action == "alloc":
            block = blocks[addr] = allocated
            allocated += 1
        elif action == "free_completed":
            block = blocks.pop(addr, -1)
        else:
            block = -1
        label = measure._frame_label(event.get("frames", [])) if action in ("alloc", "oom") else ""
        events.append([action, block, int(event.get("size", 0)), labels.setdefault(label, len(labels))])
        addresses.append(-1 if action == "oom" else addr)  # an out-of-memory event has no address
    lowest = min((a for a in addresses if a >= 0), default=0)
    return {"labels": list(labels), "events": events,
            "addresses": [a - lowest if a >= 0 else -1 for a in addresses]}


def trial(config: dict[str, Any], case: dict[str, Any], workdir: str | None = None,
          trace_path: str | None = None) -> dict[str, Any]:
    """Run one case in this (fresh) process. PYTORCH_CUDA_ALLOC_CONF must already be set.
    With `trace_path`, the allocator's history from CUDA's start to the end of the run (or the
    out-of-memory) is appended there as one gzipped JSON line (compact_trace)."""
    import torch
    from vramplan.validate import measure

    started = time.perf_counter()
    torch.cuda.init()
    if trace_path:
        # a 512-token generation of a 28-layer model records ~2.6M entries
        torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
    free_at_init, total = torch.cuda.mem_get_info()
    fraction = case.get("memory_fraction")
    if fraction:
        torch.cuda.set_per_process_memory_fraction(float(fraction))
    row: dict[str, Any] = {"case": case, "kind": "edge", "gpu_total_bytes": int(total),
                           "free_at_init_bytes": int(free_at_init),
                           "device_at_init_bytes": measure.process_device_bytes()}
    model = None
    try:
        if case["precision"] in measure.BNB_PRECISIONS:
            model = measure.build_quantized(config, case["precision"], case["attn"], case.get("layers"),
                                            workdir or measure.scratch_dir(),
                                            double_quant=case.get("double_quant", False))
        else:
            model = measure.build_random(config, case["precision"], case["attn"], case.get("layers"),
                                         relayout=False)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        row["allocated_after_build_bytes"] = int(torch.cuda.memory_allocated())
        row["reserved_after_build_bytes"] = int(torch.cuda.memory_reserved())
        row["device_after_build_bytes"] = measure.process_device_bytes()
        workload = measure.Workload(case["batch"], case["prompt_len"], case["new_tokens"], "generate")
        inputs = measure._inputs(model, workload)
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, min_new_tokens=workload.new_tokens,
                                 max_new_tokens=workload.new_tokens, pad_token_id=0, eos_token_id=None)
        torch.cuda.synchronize()
        row["status"] = "ok"
        row["tokens_generated"] = int(out.shape[1] - workload.prompt_len)
        del out
    except torch.cuda.OutOfMemoryError as exc:
        row["status"] = "oom"
        message = str(exc)
        row["error"] = message.splitlines()[0][:600]
        row["oom"] = parse_oom(message)
        row["failed_at"] = _where(exc)
    except Exception as exc:  # a trial that cannot run is a recorded failure, not a crash
        row["status"] = "error"
        row["error"] = f"{type(exc).__name__}: {exc}"[:600]
    stats = torch.cuda.memory_stats()
    row.update({
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
        "reserved_at_end_bytes": int(torch.cuda.memory_reserved()),
        "device_bytes": measure.process_device_bytes(),
        "num_alloc_retries": int(stats.get("num_alloc_retries", 0)),
        "num_ooms": int(stats.get("num_ooms", 0)),
        "seconds": round(time.perf_counter() - started, 2),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
    })
    if trace_path:
        import gzip

        trace = compact_trace(torch.cuda.memory._snapshot())
        torch.cuda.memory._record_memory_history(enabled=None)
        row["trace_events"] = len(trace["events"])
        with gzip.open(trace_path, "at") as fh:
            fh.write(json.dumps({"case": case, "status": row["status"], **trace}) + "\n")
    return row


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    row = trial(job["config"], job["case"], job.get("workdir"))
    from vramplan.validate import measure

    row["env"] = measure.environment()
    with open(out_path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
