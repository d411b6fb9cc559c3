"""Result models -> text. Tables for people, JSON for programs; both read the same objects."""

from __future__ import annotations

import json
from collections.abc import Sequence

from .base import gib
from .estimate import Estimate


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
