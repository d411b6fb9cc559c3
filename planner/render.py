"""Result models -> text and JSON. Tables for people, one JSON envelope for programs; both read
the same objects.

Every `--json` output is one envelope, `{"schema_version", "command", "request", "result"}`,
whose JSON schema `json_schema()` generates from the result models themselves. Text fits the
terminal's width (the `why` column wraps) and each table picks the unit its values read best in.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model

from .base import GIB
from .planning import MaximumReport, MemorySeries, PlanReport
from .result import Estimate, EstimateMaximum
from .result.training import TrainingEstimate, TrainingMaximum, TrainingPlanResult
from .result.vllm import VllmStartup
from .source import ModelEntry

SCHEMA_VERSION = 1
MIB = 2**20
# what each command's envelope carries as `result`
COMMAND_RESULTS: dict[str, Any] = {
    "estimate": Estimate,
    "estimate-precisions": list[Estimate],
    "estimate-max": EstimateMaximum,
    "estimate-train": TrainingEstimate,
    "estimate-train-max": TrainingMaximum,
    "plan-train": TrainingPlanResult,
    "plan": PlanReport,
    "plan-max": MaximumReport,
    "models": list[ModelEntry],
    "plot": MemorySeries,
    "validate": dict[str, Any],  # validate's report types live above this layer
}

# a fit after this many of the allocator's retries: the long generations of edge-h200-31 to -40 (hundreds of
# retries, each step's cache cat needing a larger block), where the edge is the last to be held exactly
MANY_RETRIES = 100


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def envelope(command: str, request: dict[str, Any], result: Any) -> dict[str, Any]:
    if command not in COMMAND_RESULTS:
        raise ValueError(f"no envelope for command {command!r}")
    return {"schema_version": SCHEMA_VERSION, "command": command, "request": _plain(request),
            "result": _plain(result)}


def to_json(command: str, request: dict[str, Any], result: Any) -> str:
    """The one JSON output path of every command."""
    return json.dumps(envelope(command, request, result), indent=2)


def json_schema() -> dict[str, Any]:
    """The JSON schema of every `--json` output, generated from the result models."""
    variants = []
    for command, result_type in COMMAND_RESULTS.items():
        name = "".join(part.title() for part in command.split("-")) + "Output"
        variants.append(create_model(name, __config__=ConfigDict(extra="forbid"),
                                     schema_version=(Literal[1], ...), command=(Literal[command], ...),
                                     request=(dict[str, Any], ...), result=(result_type, ...)))
    adapter = TypeAdapter(Annotated[Union[tuple(variants)], Field(discriminator="command")])  # noqa: UP007
    schema = adapter.json_schema(mode="serialization")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "vramplan --json output",
            "description": f"schema_version {SCHEMA_VERSION}: one envelope per command", **schema}


# ---- text ---------------------------------------------------------------------------------------

def terminal_width() -> int:
    return max(shutil.get_terminal_size(fallback=(100, 24)).columns, 40)


def byte_unit(values: Sequence[int]) -> tuple[str, Callable[[int], str]]:
    """GiB for tables whose largest value reaches 4 GiB, MiB below: a 135M model's terms are
    readable as "257.3", not "0.25"."""
    largest = max((abs(v) for v in values), default=0)
    unit, size, digits = ("GiB", GIB, 2) if largest >= 4 * GIB else ("MiB", MIB, 1)

    def fmt(nbytes: int) -> str:
        shown = nbytes / size
        if nbytes and abs(shown) < 10**-digits:
            return f"<{10**-digits:.{digits}f}" if nbytes > 0 else f"-<{10**-digits:.{digits}f}"
        return f"{shown:.{digits}f}"

    return unit, fmt


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool], width: int | None = None,
           indent: str = "") -> list[str]:
    """Columns padded to their widest cell; the last column wraps to fit the terminal."""
    width = (width or terminal_width()) - len(indent)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    fixed = sum(widths[:-1]) + 2 * (len(headers) - 1)
    if not right[-1]:
        widths[-1] = max(min(widths[-1], width - fixed), 16)

    def fmt(cells: Sequence[str]) -> list[str]:
        last = textwrap.wrap(cells[-1], widths[-1]) or [""] if not right[-1] else [cells[-1]]
        lines = []
        for i, piece in enumerate(last):
            shown = list(cells[:-1]) if i == 0 else [""] * (len(cells) - 1)
            shown.append(piece)
            lines.append(indent + "  ".join(c.rjust(w) if r else c.ljust(w)
                                            for c, w, r in zip(shown, widths, right, strict=True)).rstrip())
        return lines

    out = [*fmt(headers), indent + "  ".join("-" * w for w in widths)]
    for row in rows:
        out += fmt(row)
    return out


def _notes(notes: Sequence[str], width: int | None = None) -> list[str]:
    width = width or terminal_width()
    return [line for note in notes
            for line in textwrap.wrap(f"note: {note}", width, subsequent_indent="      ")]


def _wrap(lines: Sequence[str], width: int | None = None) -> list[str]:
    width = width or terminal_width()
    return [piece for line in lines for piece in (textwrap.wrap(line, width, subsequent_indent="  ") or [""])]


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
    ]
    lines = [*_wrap(lines), ""]
    unit, fmt = byte_unit([est.peak_device_bytes])
    rows = [[t.name, fmt(t.bytes), t.why] for t in est.breakdown if t.scope == "allocated"]
    rows.append(["= peak allocated", fmt(est.peak_allocated_bytes), "torch.cuda.max_memory_allocated()"])
    rows += [[t.name, fmt(t.bytes), t.why] for t in est.breakdown if t.scope == "outside"]
    rows.append(["= peak on device", fmt(est.peak_device_bytes), "what nvidia-smi shows for the process"])
    lines += _table(["term", unit, "why"], rows, [False, True, False])
    if est.verdict:
        lines += ["", *_wrap(verdict_lines(est.verdict))]
    elif est.kernel_limit:
        lines += ["", *_wrap([f"does NOT run, whatever the memory: {est.kernel_limit}"])]
    lines += _notes(est.notes)
    lines += _wrap([f"({unit} = 2^{30 if unit == 'GiB' else 20} bytes; runtime terms calibrated on "
                    f"{est.calibrated_with['gpu']}, torch {est.calibrated_with['torch']}, "
                    f"transformers {est.calibrated_with['transformers']})"])
    return "\n".join(lines)


def verdict_lines(v) -> list[str]:
    """Will it run: the replay of the run's requests through the caching allocator at the GPU's
    capacity, where it fails, and whether expandable segments change the answer."""
    vunit, vfmt = byte_unit([v.memory_bytes])
    verdict = "fits" if v.fits else "does NOT run" if v.kernel_limit else "does NOT fit"
    capacity = f", capacity for torch {vfmt(v.capacity_bytes)} {vunit}" if v.capacity_bytes else ""
    lines = [f"{v.gpu} ({vfmt(v.memory_bytes)} {vunit}{capacity}, {v.allocator} allocator): {verdict}, "
             f"headroom {vfmt(v.headroom_bytes)} {vunit}"]
    if v.kernel_limit:
        lines.append(f"  it fails whatever the memory: {v.kernel_limit}")
    if not v.fits and v.fails_at:
        unusable = (f", with {vfmt(v.reserved_unusable_bytes)} {vunit} reserved but unusable"
                    if v.reserved_unusable_bytes else "")
        lines.append(f"  the caching allocator runs out of memory at {v.fails_at}{unusable}")
    if v.fits and v.alloc_retries >= MANY_RETRIES:
        lines.append(f"  it fits only after the caching allocator releases its cache and retries ({v.alloc_retries}x), "
                     "as a long generation's growing cache makes it: there blind runs held to the sequence with the "
                     "default allocator (Qwen3-0.6B, 512+512 tokens: said 1054, 1054 ran, 1055 did not) and with "
                     "expandable segments (SmolLM2-1.7B, 256+256: 1413 said and ran, 1414 did not), but the "
                     "driver's placement of the memory decides: leave a sequence or two of margin (README, "
                     "\"Will it run?\")")
    elif v.fits and v.alloc_retries:
        lines.append(f"  it fits only after the caching allocator releases its cache and retries ({v.alloc_retries}x): "
                     "there the driver's placement of the new segments decides, and a run can differ by a "
                     "batch or two (README, \"Will it run?\")")
    if not v.fits and v.fits_with_expandable_segments:
        lines.append("  it fits with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set it before CUDA starts)")
    return lines


def fit_text(fit: EstimateMaximum) -> str:
    """`estimate --max`: the boundary under the chosen allocator mode, and under the other."""
    what = fit.what.replace("_", " ")
    unit, fmt = byte_unit([fit.capacity_bytes])
    if not fit.largest:
        head = f"{fit.model} on {fit.gpu}: not even a {what} of 1 completes at its capacity"
    else:
        head = f"{fit.model} on {fit.gpu}: the largest {what} that runs is {fit.largest}"
        if fit.largest >= fit.limit:
            head += " (a kernel's limit: below)" if fit.limit_why else f" (the search's bound: {fit.limit})"
    lines = [head + f", {fit.allocator} allocator, capacity {fmt(fit.capacity_bytes)} {unit} ({fit.capacity_why})."]
    if fit.limit_why and fit.largest >= fit.limit:
        lines.append(f"Beyond {fit.limit} the run fails whatever the memory: {fit.limit_why}.")
    elif fit.fails_from is not None and fit.fails_at:
        lines.append(f"At {fit.fails_from} the caching allocator runs out of memory at {fit.fails_at}.")
    if fit.also_runs is not None:
        lines.append(f"Some larger values run again (e.g. {fit.also_runs}): near capacity the allocator's 2 MiB "
                     f"rounding makes the edge uneven, so {fit.largest} is the last value below the first that "
                     "fails, not the largest that can run.")
    other = "expandable_segments:True" if fit.allocator == "default" else "the default allocator"
    if fit.largest_other_allocator is not None and fit.largest_other_allocator != fit.largest:
        advice = (" Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before CUDA starts to run the larger one."
                  if fit.allocator == "default" and fit.largest_other_allocator > fit.largest else "")
        lines.append(f"With {other}: {fit.largest_other_allocator}.{advice}")
    return "\n".join(_wrap(lines) + _notes(fit.notes))


def training_text(est: TrainingEstimate) -> str:
    """`estimate --train`: the step's terms at its peak moment, then each moment's total."""
    t = est.training
    method = {"full": "full fine-tuning", "lora": f"LoRA r{t.lora_rank}", "qlora": f"QLoRA r{t.lora_rank}"}[t.method]
    setup = [method, f"optimizer {t.optimizer}", f"{t.attn} attention"]
    if t.gradient_checkpointing:
        setup.append("gradient checkpointing")
    if t.autocast != "none":
        setup.append(f"autocast {t.autocast}")
    lines = [*_wrap([
        f"{est.model}  ({est.model_type}, {est.parameters / 1e9:.2f}B parameters, "
        f"{est.trainable_parameters / 1e6:.1f}M trainable)",
        f"training step: {', '.join(setup)}; weights {est.precision}, batch {t.batch}, sequence {t.seq_len}",
        f"peak at: {est.peak_phase}",
    ]), ""]
    unit, fmt = byte_unit([est.peak_device_bytes])
    rows = [[term.name, fmt(term.bytes), term.why] for term in est.breakdown if term.scope == "allocated"]
    rows.append(["= peak allocated", fmt(est.peak_allocated_bytes),
                 "torch.cuda.max_memory_allocated() over both steps"])
    rows += [[term.name, fmt(term.bytes), term.why] for term in est.breakdown if term.scope == "outside"]
    rows.append(["= peak on device", fmt(est.peak_device_bytes), "what nvidia-smi shows for the process"])
    lines += _table(["term", unit, "why"], rows, [False, True, False])
    lines += ["", "moments of the two steps:"]
    lines += _table(["moment", unit], [[m.name, fmt(m.bytes)] for m in est.moments], [False, True])
    if est.verdict:
        v = est.verdict
        vunit, vfmt = byte_unit([v.memory_bytes])
        lines += ["", f"{v.gpu} ({vfmt(v.memory_bytes)} {vunit} usable): {'fits' if v.fits else 'does NOT fit'}, "
                      f"headroom {vfmt(v.headroom_bytes)} {vunit}"]
    lines += _notes(est.notes)
    return "\n".join(lines)


def training_maximum_text(report: TrainingMaximum) -> str:
    what = report.what.replace("_", " ")
    if not report.largest:
        return f"{report.model} on {report.gpu}: not even a {what} of 1 fits this training step."
    shown = [f"{report.model} on {report.gpu}: the largest {what} whose two training steps fit is {report.largest}"]
    if report.estimate is not None:
        unit, fmt = byte_unit([report.estimate.peak_device_bytes])
        shown.append(f"(peak on device {fmt(report.estimate.peak_device_bytes)} {unit}, "
                     f"peak allocated {fmt(report.estimate.peak_allocated_bytes)} {unit}).")
    return "\n".join(_wrap([" ".join(shown)]))


def training_plans_text(report: TrainingPlanResult) -> str:
    t = report.training
    lines = [*_wrap([f"{report.model}: {t.method} fine-tuning, micro-batch {t.batch} x {t.seq_len} tokens per "
                     f"rank, {t.optimizer}, {report.sharding} sharding"]), ""]
    if report.plans:
        unit, fmt = byte_unit([p.per_gpu_peak_bytes for p in report.plans])
        rows = [[str(i), str(p.gpus), p.gpu, fmt(p.per_gpu_peak_bytes), fmt(p.headroom_bytes),
                 f"{p.cost_per_hour:.2f}" if p.cost_per_hour is not None else "-"]
                for i, p in enumerate(report.plans, 1)]
        lines += _table(["#", "GPUs", "GPU", f"per-GPU peak {unit}", f"headroom {unit}", "$/hour"], rows,
                        [True, True, False, True, True, True])
        best = report.plans[0]
        lines += ["", f"Plan 1, per GPU ({best.gpu}):"]
        lines += _table(["term", unit, "why"], [[x.name, fmt(x.bytes), x.why] for x in best.breakdown if x.bytes],
                        [False, True, False])
    lines += _notes(report.notes)
    return "\n".join(lines)


def models_text(entries: Sequence[ModelEntry]) -> str:
    rows = [[e.hub_id, e.alias, f"refused: {e.refused}" if e.refused else
             f"{e.model_type}, {(e.parameters or 0) / 1e9:.2f}B"] for e in entries]
    return "\n".join(_table(["Hub id", "alias", "status"], rows, [False, False, False]))


def precisions_text(estimates: Sequence[Estimate]) -> str:
    """`--precision all`: one row per precision, as the seed post compares them."""
    first = estimates[0]
    w = first.workload
    lines = [f"{first.model}  ({first.model_type}, {first.parameters / 1e9:.2f}B parameters), "
             f"{w.attn} attention, batch {w.batch}, prompt {w.prompt_len}, {w.new_tokens} new tokens", ""]
    unit, fmt = byte_unit([e.peak_device_bytes for e in estimates])
    headers = ["precision", f"weights {unit}", f"peak allocated {unit}", f"peak on device {unit}"]
    if first.verdict is not None:
        headers.append(f"on {first.verdict.gpu} ({fmt(first.verdict.memory_bytes)} {unit})")
    rows = []
    for est in estimates:
        label = est.precision + (" + double quant" if est.double_quant else "")
        row = [label, fmt(est.weights_bytes), fmt(est.peak_allocated_bytes), fmt(est.peak_device_bytes)]
        if first.verdict is not None and est.verdict:
            row.append(("fits" if est.verdict.fits else "does not fit")
                       + f", {fmt(est.verdict.headroom_bytes)} {unit} headroom")
        rows.append(row)
    lines += _table(headers, rows, [False, True, True, True, False][: len(headers)])
    return "\n".join(lines)


def _rejections(result: PlanReport) -> str:
    reasons = "; ".join(f"{why} ({n} layout{'s' if n != 1 else ''})" for why, n in result.rejected.items())
    return reasons or "no layout to try"


def plans_text(result: PlanReport) -> str:
    """`vramplan plan`: ranked plans, then the per-GPU breakdown of the first."""
    req = result.request
    head = (f"{result.model}: {req.concurrency} concurrent sequence(s) of {req.context} tokens "
            f"({req.new_tokens} generated), {req.runtime} runtime")
    first = next((s.vllm for p in result.plans for s in p.per_gpu if s.vllm is not None), None)
    if first is not None:
        head += (f", vLLM {first.vllm_version} rules ({first.entrypoint}), "
                 f"gpu_memory_utilization {first.gpu_memory_utilization}")
    lines = [*_wrap([head]), ""]
    if not result.plans:
        lines.append(f"No plan fits among {result.considered} layouts: {_rejections(result)}.")
        lines += _notes(result.notes)
        return "\n".join(lines)
    vllm = req.runtime == "vllm"
    priced = any(p.cost_per_hour is not None for p in result.plans)
    unit, fmt = byte_unit([p.gpu_memory_bytes for p in result.plans])
    headers = ["#", "GPUs", "GPU", "precision", "tp", "pp", "replicas", f"peak {unit}", f"headroom {unit}"]
    headers += [f"KV pool {unit}", "seqs"] if vllm else ["batch"]
    headers += ["$/hour"] if priced else []
    unmeasured = set(result.unmeasured_gpus)
    rows = []
    for i, p in enumerate(result.plans, 1):
        row = [str(i), str(p.gpus), p.gpu + ("*" if p.gpu in unmeasured else ""), p.precision, str(p.tp), str(p.pp),
               str(p.replicas), fmt(p.per_gpu_peak_bytes), fmt(p.headroom_bytes)]
        row += [fmt(p.kv_cache_bytes or 0), str(p.max_concurrent_sequences)] if vllm else [str(p.batch_per_replica)]
        row += [f"{p.cost_per_hour:.2f}" if p.cost_per_hour is not None else "-"] if priced else []
        rows.append(row)
    lines += _table(headers, rows, [True, True, False, False, *([True] * (len(headers) - 4))])
    best = result.plans[0]
    bunit, bfmt = byte_unit([s.peak_bytes for s in best.per_gpu])
    lines += ["", f"Plan 1, per GPU ({best.gpu}, {fmt(best.gpu_memory_bytes)} {unit} usable):"]
    for share in best.per_gpu:
        lines.append(f"  stage {share.stage} ({share.layers} layers): {bfmt(share.peak_bytes)} {bunit}")
        terms = [[t.name, bfmt(t.bytes), t.why] for t in share.breakdown if t.bytes >= MIB]
        lines += _table(["term", bunit, "why"], terms, [False, True, False], indent="    ")[2:]
        if share.vllm is not None:
            lines += [f"    {line}" for line in vllm_log_lines(share.vllm)]
    lines += _notes(result.notes)
    lines.append(f"({result.considered} layouts considered, ranked by {result.sort}; "
                 f"{bunit} = 2^{30 if bunit == 'GiB' else 20} bytes)")
    return "\n".join(lines)


def vllm_log_lines(v: VllmStartup) -> list[str]:
    """What vLLM would print at start-up for this rank, in its own words (GiB = 2^30 bytes)."""
    def g(nbytes: int) -> str:
        return f"{nbytes / GIB:.2f} GiB"

    graphs = v.cudagraph_bytes + v.cudagraph_outside_bytes
    return [
        f"Model loading took {g(v.model_loading_bytes)}",
        f"PyTorch activation peak memory takes {g(v.activation_peak_bytes)} (profile run: {v.max_num_batched_tokens} "
        f"tokens, {min(v.max_num_seqs, v.max_num_batched_tokens)} requests, {v.sampler} sampler)",
        f"non_torch_memory takes {g(v.non_torch_bytes)}",
        f"CUDA graph memory: {g(graphs)} ("
        + ("subtracted before the KV cache)" if v.cudagraph_bytes else "captured after the KV cache)"),
        f"Available KV cache memory: {g(v.kv_cache_bytes)}",
        f"GPU KV cache size: {v.kv_cache_tokens:,} tokens",
        f"Maximum concurrency for {v.max_model_len:,} tokens per request: {v.max_concurrency:.2f}x",
    ]


def maximum_text(report: MaximumReport) -> str:
    what = report.what
    lines = [f"{report.model} on {report.gpu}: the largest {what} one replica fits, per layout", ""]
    body = [[str(r.gpus), str(r.tp), str(r.pp),
             (f"{r.value} (capped)" if r.capped else str(r.value)) if r.value else "does not fit"]
            for r in report.layouts]
    lines += _table(["GPUs", "tp", "pp", what], body, [True, True, True, True])
    lines += _notes(report.notes)
    return "\n".join(lines)
