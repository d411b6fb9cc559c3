"""What grows outside torch during a generation: one fresh process per case, each recording,
after the build and after every generated token, the memory the driver no longer has for the
caching allocator (total - free - reserved: CUDA's context, loaded kernels, libraries' own
allocations) and NVML's per-process figure less torch's reserve.

The edge trials of long generations (edge-h200-31/-33) ended with ~48 MiB more outside torch
than 16-token runs; this says when that memory appears (per decode step, per kernel first used,
per batch) so the capacity the replay uses can follow it.

    scripts/device-run.sh python3 scripts/outside_growth.py CASES.yaml OUT.jsonl
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys

import torch
import transformers  # imported before forking, and the probe is a LogitsProcessor
import yaml
from vramplan.source import resolve
from vramplan.validate import measure


def _outside() -> dict[str, int | None]:
    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    device = measure.process_device_bytes()
    return {"driver": int(total - free - reserved), "nvml": None if device is None else int(device - reserved),
            "reserved": int(reserved), "allocated": int(torch.cuda.memory_allocated())}


class _Probe(transformers.LogitsProcessor):
    """Called once per generated token, after that step's forward."""

    def __init__(self):
        self.samples: list[dict] = []
        self.step = 0

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        now = _outside()
        last = self.samples[-1] if self.samples else None
        if last is None or (last["driver"], last["nvml"]) != (now["driver"], now["nvml"]):
            self.samples.append({"step": self.step, **now})
        self.step += 1
        return scores


def _child(conn, config, case):
    for key, value in case.get("env", {}).items():
        os.environ[key] = str(value)
    row = {"kind": "outside-growth", "case": case}
    try:
        torch.cuda.init()
        row["at_init"] = _outside()
        model = measure.build_random(config, case["precision"], case["attn"], case.get("layers"), relayout=False)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        row["after_build"] = _outside()
        workload = measure.Workload(case["batch"], case["prompt_len"], case["new_tokens"], "generate")
        inputs = measure._inputs(model, workload)
        probe = _Probe()
        backends = case.get("sdpa_backends")
        if backends:  # only these SDPA kernels (torch.nn.attention.SDPBackend names)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            chosen = sdpa_kernel([getattr(SDPBackend, name) for name in backends])
        else:
            import contextlib

            chosen = contextlib.nullcontext()
        with torch.no_grad(), chosen:
            model.generate(**inputs, do_sample=False, min_new_tokens=workload.new_tokens,
                           max_new_tokens=workload.new_tokens, pad_token_id=0, eos_token_id=None,
                           logits_processor=transformers.LogitsProcessorList([probe]))
        torch.cuda.synchronize()
        row["steps"] = probe.samples
        row["at_end"] = _outside()
        row["num_alloc_retries"] = int(torch.cuda.memory_stats().get("num_alloc_retries", 0))
        row["status"] = "ok"
    except BaseException as exc:  # report, never hang the parent
        row["status"] = "error"
        row["error"] = f"{type(exc).__name__}: {exc}"[:600]
    row["env"] = measure.environment()
    conn.send(row)
    conn.close()


def main(cases_path: str, out_path: str) -> None:
    with open(cases_path) as fh:
        cases = yaml.safe_load(fh)["cases"]
    ctx = mp.get_context("fork")
    for case in cases:
        config = resolve(case["model"]).config
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(child, config, case))
        proc.start()
        child.close()
        row = parent.recv() if parent.poll(300) else {"kind": "outside-growth", "case": case, "status": "timeout"}
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        with open(out_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(case, row.get("status"), row.get("at_end"), len(row.get("steps", [])), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
