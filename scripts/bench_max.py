#!/usr/bin/env python3
"""Time the largest-fit search (runtimes/transformers/fit.py) on several shapes.

    python scripts/bench_max.py            # the table below, on the H200
    python scripts/bench_max.py --gpu h100
    python scripts/bench_max.py --workers 1   # every replay in this process

Each row: the shape, the allocator mode, what is searched, the largest value whose replay
completes at the GPU's capacity, how many replays the search took and the wall time. Slow
replays (long generations) run in forked workers, as many as --workers (default: the CPUs
this process may use, or VRAMPLAN_WORKERS); the answers do not depend on it.
"""

from __future__ import annotations

import argparse
import time

from vramplan.catalog import gpu_catalog
from vramplan.config import shrink_config
from vramplan.model import architecture_from_config
from vramplan.request import PrecisionChoice, Workload
from vramplan.runtimes.transformers.fit import largest_fit_detail
from vramplan.runtimes.transformers.replay_pool import worker_count
from vramplan.source import resolve

SHAPES = [  # model, layers, attn, prompt_len, new_tokens, what
    ("llama-3.1-8b", None, "sdpa", 8192, 16, "batch"),
    ("llama-3.1-8b", None, "sdpa", 1024, 16, "batch"),
    ("llama-3.2-1b", None, "eager", 4096, 16, "batch"),
    ("qwen3-0.6b", None, "sdpa", 4096, 16, "batch"),
    ("qwen3-30b-a3b", None, "sdpa", 1024, 16, "batch"),
    ("mistral-7b-v0.1", None, "sdpa", 8192, 16, "batch"),
    ("llama-3.1-8b", None, "sdpa", 1, 128, "prompt_len"),
    ("qwen3-0.6b", None, "sdpa", 1, 128, "prompt_len"),
    # long generations: every decode step replayed (up to decode_replay's budget of layer-steps)
    ("qwen3-0.6b", None, "sdpa", 512, 512, "batch"),
    ("llama-3.1-8b", None, "sdpa", 1024, 1024, "batch"),
    ("llama-3.1-70b", None, "sdpa", 1024, 512, "batch"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="h200")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    gpu = gpu_catalog().find(args.gpu)
    workers = args.workers or worker_count()
    print(f"{workers} worker(s)")
    print(f"{'shape':44} {'allocator':10} {'what':10} {'largest':>8} {'replays':>7} {'seconds':>7}")
    for model, layers, attn, prompt, new, what in SHAPES:
        arch = architecture_from_config(shrink_config(resolve(model).config, layers), model)
        for allocator in ("default", "expandable"):
            workload = Workload(batch=1, prompt_len=prompt, new_tokens=new, attn=attn, allocator=allocator)
            started = time.perf_counter()
            found = largest_fit_detail(arch, model, workload, PrecisionChoice(), gpu, what, workers=workers)
            seconds = time.perf_counter() - started
            shape = f"{model} {attn} n{prompt if what == 'batch' else '?'} t{new}"
            print(f"{shape:44} {allocator:10} {what:10} {found.value:8} {found.replays:7} {seconds:7.2f}")


if __name__ == "__main__":
    main()
