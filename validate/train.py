"""GPU side of `vramplan validate --train`: measure fine-tuning steps as they run by default.

The step (README, "Fine-tuning"): the model built from its config with random weights on the
GPU (QLoRA: a random bf16 checkpoint reloaded through bitsandbytes nf4), gradient checkpointing
through `gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})`
(plus `enable_input_require_grads()` under peft), LoRA through peft's
`get_peft_model(LoraConfig(r=R, target_modules="all-linear"))`, then `model.train()`,
use_cache off, and two steps of `loss = model(input_ids=ids, labels=ids).loss`,
`loss.backward()`, `optimizer.step()`, `optimizer.zero_grad(set_to_none=True)`. Each phase of
each step records its allocated peak, so a drifting term can be found.

    python -m vramplan.validate.train JOB.json OUT.jsonl     # JOB: {"config": ..., "cases": [...]}
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from vramplan.validate import measure

BUILD_KEYS = ("model", "layers", "method", "precision", "gradient_checkpointing", "lora_rank", "double_quant", "attn")


def build_key(case: dict[str, Any]) -> tuple:
    return tuple(case.get(k) for k in BUILD_KEYS)


def build(config: dict[str, Any], case: dict[str, Any], workdir: str):
    method = case["method"]
    if method == "qlora":
        model = measure.build_quantized(config, "nf4", case["attn"], case.get("layers"), workdir,
                                        compute_dtype="bf16", double_quant=case.get("double_quant", False))
    else:
        model = measure.build_random(config, case["precision"], case["attn"], case.get("layers"), relayout=False)
    model.config.use_cache = False
    if case.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=int(case.get("lora_rank", 16)), target_modules="all-linear"))
    model.train()
    return model


def optimizer_for(name: str, params):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-4, relative_step=False, scale_parameter=False, warmup_init=False)
    import bitsandbytes as bnb

    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(params, lr=1e-4)
    if name == "paged_adamw8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    raise ValueError(f"unknown optimizer {name}")


def _phase_peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def run_steps(model, case: dict[str, Any]) -> dict[str, Any]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_for(case.get("optimizer", "adamw"), trainable)
    vocab = int(model.get_input_embeddings().num_embeddings)
    generator = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(3, vocab, (case["batch"], case["seq_len"]), device="cuda", generator=generator)
    autocast = case.get("autocast", "none")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = int(torch.cuda.memory_allocated())
    phases: list[dict[str, Any]] = []
    holder: dict[str, Any] = {}

    def forward():
        if autocast != "none":
            with torch.autocast("cuda", dtype=measure.TORCH_DTYPES[autocast]):
                holder["loss"] = model(input_ids=ids, labels=ids).loss
        else:
            holder["loss"] = model(input_ids=ids, labels=ids).loss

    def backward():
        holder.pop("loss").backward()

    started = time.perf_counter()
    for step in (1, 2):
        for name, fn in (("forward", forward), ("backward", backward), ("step", optimizer.step),
                         ("zero_grad", lambda: optimizer.zero_grad(set_to_none=True))):
            peak = _phase_peak(fn)
            phases.append({"step": step, "phase": name, "peak_allocated_bytes": peak,
                           "allocated_after_bytes": int(torch.cuda.memory_allocated())})
    torch.cuda.synchronize()
    row = {
        "base_allocated_bytes": base,
        "peak_allocated_bytes": max(p["peak_allocated_bytes"] for p in phases),
        "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
        "device_bytes": measure.process_device_bytes(),
        "reserved_at_device_read_bytes": int(torch.cuda.memory_reserved()),
        "phases": phases,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "seconds": round(time.perf_counter() - started, 3),
    }
    for p in trainable:
        p.grad = None
    return row


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    config, cases = job["config"], job["cases"]
    env = measure.environment()
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for case in cases:
        groups.setdefault(build_key(case), []).append(case)
    for group in groups.values():
        first = group[0]
        root = Path(job.get("workdir") or measure.scratch_dir())
        workdir = str(root / f"train-{first['model']}-{first.get('layers')}")
        Path(workdir).mkdir(parents=True, exist_ok=True)
        model, build_error = None, None
        try:
            torch.cuda.reset_peak_memory_stats()
            model = build(config, group[0], workdir)
            gc.collect()
            torch.cuda.empty_cache()
            inventory = {"allocated_after_build_bytes": int(torch.cuda.memory_allocated()),
                         "load_peak_allocated_bytes": int(torch.cuda.max_memory_allocated())}
        except Exception as exc:  # recorded, not fatal: the other groups still run
            build_error = f"{type(exc).__name__}: {exc}"[:400]
        for case in group:
            row: dict[str, Any] = {"case": case, "kind": "train", "env": env}
            if build_error:
                row.update(status="error", error=build_error)
            else:
                try:
                    row.update(run_steps(model, case), status="ok", inventory=inventory)
                except torch.cuda.OutOfMemoryError as exc:
                    row.update(status="oom", error=str(exc).splitlines()[0][:300])
                except Exception as exc:
                    row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:400])
            with open(out_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            peak = row.get("peak_allocated_bytes")
            shown = f"{peak / 2**30:.2f} GiB" if peak else row["error"]
            print(f"{case['model']} {case['method']} {case['precision']} gc={case.get('gradient_checkpointing')} "
                  f"{case.get('optimizer')} {case.get('autocast', 'none')} b{case['batch']} n{case['seq_len']}: "
                  f"{row['status']} {shown} {row.get('seconds')}s", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        del model
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
