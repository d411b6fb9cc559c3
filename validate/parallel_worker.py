"""GPU side of multi-GPU validation: one case on several GPUs, one JSON row per GPU.

    python -m vramplan.validate.parallel_worker JOB.json OUT.jsonl            # pipeline (device_map)
    torchrun --nproc-per-node N -m vramplan.validate.parallel_worker JOB OUT  # tensor parallel

A random checkpoint is written first (from the job's config) unless the case names one, then
loaded through from_pretrained, with the job's device_map or with tp_plan="auto".
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from vramplan.validate import measure


def _checkpoint(job: dict[str, Any], workdir: str, rank: int) -> str:
    case = job["case"]
    if case.get("checkpoint"):
        return case["checkpoint"]
    path = os.path.join(workdir, "checkpoint")
    if rank == 0:
        model = measure.build_random(job["config"], case["precision"], case["attn"], case.get("layers"),
                                     relayout=False)
        model.save_pretrained(path)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return path


def _per_device(devices: list[int], base: dict[int, int]) -> list[dict[str, Any]]:
    rows = []
    for device in devices:
        rows.append({
            "device": device,
            "base_allocated_bytes": base[device],
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
            "reserved_at_device_read_bytes": int(torch.cuda.memory_reserved(device)),
        })
    return rows


def _run(model, case: dict[str, Any], devices: list[int]) -> list[dict[str, Any]]:
    workload = measure.Workload(case["batch"], case["prompt_len"], case["new_tokens"], case["mode"])
    inputs = measure._inputs(model, workload)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    gc.collect()
    base = {}
    for device in devices:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base[device] = int(torch.cuda.memory_allocated(device))
    with torch.no_grad():
        if workload.mode == "forward":
            del model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        else:
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None,
                           min_new_tokens=workload.new_tokens, max_new_tokens=workload.new_tokens)
    for device in devices:
        torch.cuda.synchronize(device)
    return _per_device(devices, base)


def main(job_path: str, out_path: str) -> None:
    from transformers import AutoModelForCausalLM

    job = json.loads(Path(job_path).read_text())
    case = job["case"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dtype = measure.TORCH_DTYPES[case["precision"]]
    with tempfile.TemporaryDirectory(dir=measure.scratch_dir()) as workdir:
        if world > 1:  # tensor parallel under torchrun
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
            torch.distributed.init_process_group("nccl")
            shared = [workdir]
            torch.distributed.broadcast_object_list(shared, src=0)
            path = _checkpoint(job, shared[0], rank)
            torch.distributed.barrier()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, tp_plan="auto",
                                                         attn_implementation=case["attn"]).eval()
            measure.warm_up(model)
            devices = [torch.cuda.current_device()]
        else:  # pipeline: one process, a device_map of whole layers
            path = _checkpoint(job, workdir, 0)
            device_map = {k: int(v) for k, v in job["device_map"].items()}
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map,
                                                         attn_implementation=case["attn"]).eval()
            measure.warm_up(model)
            devices = sorted(set(device_map.values()))
        rows = _run(model, case, devices)
        env = measure.environment()
        device_bytes = measure.process_device_bytes()
        for row in rows:
            row.update(case=case, status="ok", env=env, rank=rank, world_size=world,
                       device_bytes=device_bytes if world > 1 else None)
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
            torch.distributed.destroy_process_group()
        if rank == 0:
            with open(out_path, "a") as fh:
                for row in rows:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
