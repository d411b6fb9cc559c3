"""Result models -> text. Tables for people, JSON for programs; both read the same objects."""

from __future__ import annotations

import json
from collections.abc import Sequence

from .base import gib
from .result import Estimate


def to_json(model) -> str:
    return json.dumps(model.model_dump(mode="json"), indent=2)


def _gib(nbytes: int) -> str:
    return f"{gib(nbytes):.2f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)).rstrip()

    return [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def estimate_text(est: Estimate) -> str:
    w = est.workload
    run = (f"generate: batch {w.batch}, prompt {w.prompt_len}, {w.new_tokens} new tokens"
           if w.mode == "generate" else f"forward: batch {w.batch}, {w.prompt_len} tokens")
    lines = [
        f"{est.model}  ({est.model_type}, {est.parameters / 1e9:.2f}B parameters)",
        f"precision {est.precision}"
        + (f" (compute {est.compute_dtype})" if est.precision != est.compute_dtype else "")
        + f", {w.attn} attention, {run}",
        f"peak at: {est.peak_phase}",
        "",
    ]
    rows = [[t.name, _gib(t.bytes), t.why] for t in est.breakdown if t.scope == "allocated"]
    rows.append(["= peak allocated", _gib(est.peak_allocated_bytes), "torch.cuda.max_memory_allocated()"])
    rows += [[t.name, _gib(t.bytes), t.why] for t in est.breakdown if t.scope == "outside"]
    rows.append(["= peak on device", _gib(est.peak_device_bytes), "what nvidia-smi shows for the process"])
    lines += _table(["term", "GiB", "why"], rows, [False, True, False])
    if est.verdict:
        v = est.verdict
        verdict = "fits" if v.fits else "does NOT fit"
        lines += ["", f"{v.gpu} ({_gib(v.memory_bytes)} GiB usable): {verdict}, "
                      f"headroom {_gib(v.headroom_bytes)} GiB"]
    for note in est.notes:
        lines.append(f"note: {note}")
    lines.append(f"(GiB = 2^30 bytes; runtime terms calibrated on {est.calibrated_with['gpu']}, "
                 f"torch {est.calibrated_with['torch']}, transformers {est.calibrated_with['transformers']})")
    return "\n".join(lines)


def models_text(entries: Sequence[tuple[str, str, str]]) -> str:
    rows = [[hub, alias, status] for hub, alias, status in entries]
    return "\n".join(_table(["Hub id", "alias", "status"], rows, [False, False, False]))


def precisions_text(estimates: Sequence[Estimate]) -> str:
    """`--precision all`: one row per precision, as the seed post compares them."""
    first = estimates[0]
    w = first.workload
    lines = [f"{first.model}  ({first.model_type}, {first.parameters / 1e9:.2f}B parameters), "
             f"{w.attn} attention, batch {w.batch}, prompt {w.prompt_len}, {w.new_tokens} new tokens", ""]
    verdict = first.verdict is not None
    headers = ["precision", "weights GiB", "peak allocated GiB", "peak on device GiB"]
    if verdict:
        headers.append(f"on {first.verdict.gpu} ({_gib(first.verdict.memory_bytes)} GiB)")
    rows = []
    for est in estimates:
        label = est.precision + (" + double quant" if est.double_quant else "")
        row = [label, _gib(est.weights_bytes), _gib(est.peak_allocated_bytes), _gib(est.peak_device_bytes)]
        if verdict and est.verdict:
            row.append(("fits" if est.verdict.fits else "does not fit")
                       + f", {_gib(est.verdict.headroom_bytes)} GiB headroom")
        rows.append(row)
    lines += _table(headers, rows, [False, True, True, True, False][: len(headers)])
    return "\n".join(lines)


def plans_text(result) -> str:
    """`vramplan plan`: ranked plans, then the per-GPU breakdown of the first."""
    req = result.request
    head = (f"{result.model}: {req.concurrency} concurrent sequence(s) of {req.context} tokens "
            f"({req.new_tokens} generated), {req.runtime} runtime")
    if req.runtime == "vllm":
        head += f", gpu_memory_utilization {req.gpu_memory_utilization}"
    lines = [head, ""]
    if not result.plans:
        reasons = "; ".join(f"{why} ({n} layouts)" for why, n in result.rejected.items())
        lines.append(f"No plan fits among {result.considered} layouts: {reasons}.")
        return "\n".join(lines)
    vllm = req.runtime == "vllm"
    headers = ["#", "GPUs", "GPU", "precision", "tp", "pp", "replicas", "per-GPU peak GiB", "headroom GiB"]
    headers += ["KV pool GiB", "max seqs"] if vllm else ["batch/replica"]
    headers.append("$/hour")
    rows = []
    for i, p in enumerate(result.plans, 1):
        row = [str(i), str(p.gpus), p.gpu, p.precision, str(p.tp), str(p.pp), str(p.replicas),
               _gib(p.per_gpu_peak_bytes), _gib(p.headroom_bytes)]
        row += [_gib(p.kv_cache_bytes or 0), str(p.max_concurrent_sequences)] if vllm else [str(p.batch_per_replica)]
        row.append(f"{p.cost_per_hour:.2f}" if p.cost_per_hour is not None else "-")
        rows.append(row)
    lines += _table(headers, rows, [True, True, False, False, True, True, True, True, True, True, True, True][
        : len(headers)])
    best = result.plans[0]
    lines += ["", f"Plan 1, per GPU ({best.gpu}, {_gib(best.gpu_memory_bytes)} GiB usable):"]
    for share in best.per_gpu:
        lines.append(f"  stage {share.stage} ({share.layers} layers): {_gib(share.peak_bytes)} GiB")
        for term in share.breakdown:
            if term.bytes >= 2**20:
                lines.append(f"    {term.name:28s} {_gib(term.bytes):>8s}  {term.why}")
    lines.append(f"({result.considered} layouts considered; GiB = 2^30 bytes)")
    return "\n".join(lines)


def maximum_text(model: str, gpu: str, what: str, rows: list[dict]) -> str:
    lines = [f"{model} on {gpu}: the largest {what} one replica fits, per layout", ""]
    body = [[str(r["gpus"]), str(r["tp"]), str(r["pp"]), str(r[what]) if r[what] else "does not fit"] for r in rows]
    lines += _table(["GPUs", "tp", "pp", what], body, [True, True, True, True])
    return "\n".join(lines)
