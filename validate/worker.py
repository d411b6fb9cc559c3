"""Worker process of a sweep: one model, all its cases, one JSON line each.

Invoked as `python -m vramplan.validate.worker JOB.json OUT.jsonl` by `sweep.run_matrix`.
Prints one short line per case for the parent's progress display.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from vramplan.validate import measure


def _build(config: dict[str, Any], case: dict[str, Any], workdir: str):
    compute = case.get("compute_dtype", "bf16")
    if case.get("checkpoint"):
        return measure.load_checkpoint(case["checkpoint"], case["precision"], case["attn"],
                                       case.get("revision"), compute_dtype=compute,
                                       double_quant=case.get("double_quant", False))
    if case["precision"] in measure.BNB_PRECISIONS:
        return measure.build_quantized(config, case["precision"], case["attn"], case["layers"],
                                       workdir, compute_dtype=compute,
                                       double_quant=case.get("double_quant", False))
    return measure.build_random(config, case["precision"], case["attn"], case["layers"])


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    config, cases = job["config"], job["cases"]
    env = measure.environment()
    baseline_device = measure.process_device_bytes()
    by_build: dict[tuple, list[dict[str, Any]]] = {}
    for case in cases:
        key = (case["precision"], case["attn"], case.get("double_quant", False))
        by_build.setdefault(key, []).append(case)
    deadline = job.get("deadline")

    def out_of_time() -> bool:
        return deadline is not None and time.time() > deadline

    with tempfile.TemporaryDirectory(dir=measure.scratch_dir()) as workdir:
        for _key, group in by_build.items():
            if out_of_time():
                break
            model = None
            try:
                torch.cuda.reset_peak_memory_stats()
                model = _build(config, group[0], workdir)
                load_peak = int(torch.cuda.max_memory_allocated())
                inventory = measure.tensor_inventory(model)
                inventory["allocated_after_load_bytes"] = int(torch.cuda.memory_allocated())
                inventory["load_peak_allocated_bytes"] = load_peak
                inventory["reserved_after_load_bytes"] = int(torch.cuda.memory_reserved())
                inventory["weights_from"] = ("checkpoint" if group[0].get("checkpoint") else
                                             "bitsandbytes reload" if group[0]["precision"] in measure.BNB_PRECISIONS
                                             else "random, relaid out")
                measure.warm_up(model)
                inventory["allocated_after_warmup_bytes"] = int(torch.cuda.memory_allocated())
                build_error = None
            except torch.cuda.OutOfMemoryError as exc:
                build_error = ("oom", str(exc).splitlines()[0][:300])
            except Exception as exc:  # a model that cannot be built is a recorded failure
                build_error = ("error", f"{type(exc).__name__}: {exc}"[:300])
            for case in group:
                if out_of_time():
                    break
                if build_error:
                    row = {"case": case, "status": build_error[0], "error": build_error[1]}
                else:
                    workload = measure.Workload(case["batch"], case["prompt_len"],
                                                case["new_tokens"], case["mode"],
                                                case.get("images") or 0)
                    result = measure.measure_case(model, workload, diagnose=case.get("diagnose", False))
                    row = {"case": case, **result, "inventory": inventory,
                           "process_baseline_device_bytes": baseline_device}
                row["env"] = env
                with open(out_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                peak = row.get("peak_allocated_bytes")
                shown = f"{peak / 2**30:.2f} GiB" if peak else row.get("error", "")
                print(f"{case['model']} {case['precision']} {case['attn']} "
                      f"b{case['batch']} n{case['prompt_len']} t{case['new_tokens']} "
                      f"{case['mode']}: {row['status']} {shown}", flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
