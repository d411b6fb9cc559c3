"""The `vramplan` command: parse options, call the API, render. Nothing else lives here.

Every error a user can cause (a bad model reference, a malformed config, an unknown GPU, an
impossible workload, a bad option value) is one sentence on stderr and exit status 2, without a
traceback; `plan` exits 1 when the request is valid but no layout fits. `--json` prints one
envelope per command through `render.to_json`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from . import render
from .errors import VramplanError, WorkloadError

KV_CACHE_DTYPES = ["auto", "fp16", "bf16", "fp32", "fp8", "int8", "int4", "int2"]
ATTENTION = ["auto", "sdpa", "eager", "flash_attention_2"]


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"vramplan: {' '.join(message.split())}", err=True)
    sys.exit(code)


def friendly_errors(fn):
    """Turn our errors (and pydantic's, for option values) into one sentence and exit 2. Anything
    else is a bug: one sentence too (VRAMPLAN_DEBUG=1 shows the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VramplanError as exc:
            _fail(str(exc))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "value"
            _fail(f"invalid {field.replace('_', '-')}: {first['msg']}.")
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if os.environ.get("VRAMPLAN_DEBUG"):
                raise
            detail = str(exc).splitlines()[0][:200] if str(exc) else ""
            _fail(f"internal error ({type(exc).__name__}{': ' + detail if detail else ''}); please report it "
                  "with the command line (VRAMPLAN_DEBUG=1 shows the traceback).")

    return wrapper


class VramplanGroup(click.Group):
    """click's usage errors as one line, like every other refusal."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            _fail(exc.format_message().rstrip(".") + ".", exc.exit_code)
        except click.Abort:
            _fail("aborted.", 1)


def _request() -> dict:
    """The parsed options, echoed in the JSON envelope."""
    return {k: v for k, v in click.get_current_context().params.items() if k != "as_json"}


def workload_options(fn):
    """The workload options `estimate` and `validate` share."""
    options = [
        click.option("--batch", "-b", type=int, default=1, show_default=True, help="Sequences per batch."),
        click.option("--prompt-len", "-n", type=int, default=512, show_default=True,
                     help="Prompt tokens per sequence."),
        click.option("--new-tokens", "-t", type=int, default=128, show_default=True,
                     help="Tokens generate() produces (generate mode)."),
        click.option("--mode", type=click.Choice(["generate", "forward"]), default="generate",
                     show_default=True, help="generate(): last-token logits and a KV cache; "
                     "forward: one pass with logits for every position."),
        click.option("--attn", type=click.Choice(ATTENTION), default="auto", show_default=True,
                     help="transformers' attention implementation; auto = what transformers picks "
                          "(sdpa where the family has it, else eager)."),
        click.option("--precision", "-p", default="auto", show_default=True,
                     help="fp32, fp16, bf16, int8, nf4 or fp4; auto = the config's torch_dtype (else the "
                          "checkpoint's); all = one row per precision (estimate only)."),
        click.option("--kv-cache-dtype", type=click.Choice(KV_CACHE_DTYPES), default="auto", show_default=True,
                     help="auto: the activation dtype (DynamicCache); int8/int4/int2: transformers' QuantizedCache "
                          "(recent 127 tokens kept in full precision); fp8: as serving engines store it."),
        click.option("--double-quant", is_flag=True, help="bitsandbytes 4-bit double quantization."),
        click.option("--compute-dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16",
                     show_default=True, help="bitsandbytes compute dtype."),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit)."),
        click.option("--allocator", type=click.Choice(["default", "expandable"]), default="default",
                     show_default=True, help="PyTorch's caching allocator as it starts by default, or with "
                     "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (the verdict replays the run under it)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _workload(batch, prompt_len, new_tokens, mode, attn, kv_cache_dtype, allocator="default"):
    from .request import Workload

    return Workload(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, mode=mode, attn=attn,
                    kv_cache_dtype=kv_cache_dtype, allocator=allocator)


def _catalog_option():
    return click.option("--gpu-catalog", type=click.Path(path_type=Path), default=None,
                        help="A YAML file of extra GPUs, same format as profiles/gpus.yaml (new names only).")


@click.group(cls=VramplanGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vramplan")
def main() -> None:
    """How much GPU memory will a Hugging Face model need? Answered from its config.json."""


def training_options(fn):
    """`estimate --train`: one default fine-tuning step instead of a generate() run."""
    options = [
        click.option("--train", "train", type=click.Choice(["full", "lora", "qlora"]), default=None,
                     help="A fine-tuning step (two steps: forward with labels, backward, optimizer.step, "
                          "zero_grad) instead of generate(); qlora = bitsandbytes nf4 base + LoRA."),
        click.option("--seq-len", type=int, default=512, show_default=True, help="Training sequence length."),
        click.option("--lora-rank", type=int, default=16, show_default=True, help="LoRA rank (peft's r)."),
        click.option("--lora-targets", default="all-linear", show_default=True,
                     help="Comma-separated module names, or all-linear (peft's: every Linear but lm_head)."),
        click.option("--gradient-checkpointing", is_flag=True,
                     help="gradient_checkpointing_enable(use_reentrant=False), plus enable_input_require_grads "
                          "under peft."),
        click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit", "paged_adamw8bit", "sgd", "adafactor"]),
                     default="adamw", show_default=True, help="torch AdamW, bitsandbytes 8-bit AdamW, SGD, Adafactor."),
        click.option("--autocast", type=click.Choice(["none", "bf16", "fp16"]), default="none", show_default=True,
                     help="Mixed precision: autocast the forward over --precision fp32 weights."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _training(train, batch, seq_len, lora_rank, lora_targets, gradient_checkpointing, optimizer, autocast, attn,
              double_quant):
    from .request import Training

    targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip()) or ("all-linear",)
    return Training(method=train, batch=batch, seq_len=seq_len, lora_rank=lora_rank, lora_targets=targets,
                    gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, autocast=autocast,
                    attn="sdpa" if attn == "auto" else attn, double_quant=double_quant)


@main.command()
@click.argument("model")
@workload_options
@training_options
@click.option("--gpu", default=None, help="Add a fits/does-not-fit verdict for this GPU (see profiles/gpus.yaml).")
@_catalog_option()
@click.option("--max", "maximize", type=click.Choice(["batch", "prompt-len", "seq-len"]), default=None,
              help="With --gpu: the largest batch or prompt length whose run completes at the GPU's capacity "
                   "(with --train: batch or seq-len).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (see `vramplan schema`).")
@friendly_errors
def estimate(model, batch, prompt_len, new_tokens, mode, attn, precision, kv_cache_dtype, double_quant,
             compute_dtype, revision, allocator, train, seq_len, lora_rank, lora_targets, gradient_checkpointing,
             optimizer, autocast, gpu, gpu_catalog, maximize, as_json):
    """Estimate the GPU memory of one run of MODEL (bundled name, local path or Hub id)."""
    from . import estimate as run_estimate
    from . import estimate_precisions

    if train:
        _estimate_training(model, locals())
        return
    workload = _workload(batch, prompt_len, new_tokens, mode, attn, kv_cache_dtype, allocator)
    if maximize:
        from . import estimate_maximum

        if maximize == "seq-len":
            raise WorkloadError("--max seq-len sizes a training step: give --train, or --max prompt-len.")
        if not gpu:
            raise WorkloadError("--max answers for one GPU: give --gpu.")
        fit = estimate_maximum(model, workload, maximize.replace("-", "_"), gpu, precision, double_quant=double_quant,
                               compute_dtype=compute_dtype, revision=revision, gpu_catalog_file=gpu_catalog)
        click.echo(render.to_json("estimate-max", _request(), fit) if as_json else render.fit_text(fit))
        if not fit.largest:
            sys.exit(1)
        return
    if precision == "all":
        results = estimate_precisions(model, workload, gpu, compute_dtype=compute_dtype, revision=revision,
                                      gpu_catalog_file=gpu_catalog)
        click.echo(render.to_json("estimate-precisions", _request(), results) if as_json
                   else render.precisions_text(results))
        return
    result = run_estimate(model, workload, precision, gpu, double_quant=double_quant,
                          compute_dtype=compute_dtype, revision=revision, gpu_catalog_file=gpu_catalog)
    click.echo(render.to_json("estimate", _request(), result) if as_json else render.estimate_text(result))


def _estimate_training(model: str, o: dict) -> None:
    from . import estimate_training, training_maximum

    if o["precision"] == "all":
        raise WorkloadError("--precision all compares inference runs; give one precision for --train.")
    if o["mode"] != "generate" or o["kv_cache_dtype"] != "auto":
        raise WorkloadError("--mode and --kv-cache-dtype describe inference; a training step has no KV cache.")
    training = _training(o["train"], o["batch"], o["seq_len"], o["lora_rank"], o["lora_targets"],
                         o["gradient_checkpointing"], o["optimizer"], o["autocast"], o["attn"], o["double_quant"])
    common = dict(double_quant=o["double_quant"], compute_dtype=o["compute_dtype"], revision=o["revision"],
                  gpu_catalog_file=o["gpu_catalog"])
    if o["maximize"] == "prompt-len":
        raise WorkloadError("--max prompt-len sizes generate(); a training step takes --max batch or seq-len.")
    if o["maximize"]:
        if not o["gpu"]:
            raise WorkloadError("--max answers for one GPU: give --gpu.")
        report = training_maximum(model, training, o["maximize"].replace("-", "_"), o["gpu"], o["precision"], **common)
        click.echo(render.to_json("estimate-train-max", _request(), report) if o["as_json"]
                   else render.training_maximum_text(report))
        return
    result = estimate_training(model, training, o["precision"], o["gpu"], **common)
    click.echo(render.to_json("estimate-train", _request(), result) if o["as_json"] else render.training_text(result))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@friendly_errors
def models(as_json):
    """List the bundled model configs (usable offline by Hub id or alias)."""
    from . import bundled_models

    entries = bundled_models()
    click.echo(render.to_json("models", _request(), entries) if as_json else render.models_text(entries))


@main.command()
@click.argument("model")
@click.option("--context", "--max-model-len", "context", type=int, default=None,
              help="Tokens per sequence, prompt plus generated (vLLM: --max-model-len); default "
                   "min(4096, the model's positions).")
@click.option("--new-tokens", "-t", type=int, default=256, show_default=True, help="Generated tokens per sequence.")
@click.option("--concurrency", type=int, default=1, show_default=True, help="Sequences that must be served at once.")
@click.option("--gpu", "gpus", multiple=True, help="GPU kind(s) to consider (repeatable); default: the whole catalog.")
@_catalog_option()
@click.option("--precision", "-p", default="auto", show_default=True,
              help="A precision, 'auto' (the config's torch_dtype, else the checkpoint's) or 'any' (all of them).")
@click.option("--runtime", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True)
@click.option("--tensor-parallel-size", "--tp", "tp", type=int, default=None, help="Fix tp instead of searching.")
@click.option("--pipeline-parallel-size", "--pp", "pp", type=int, default=None, help="Fix pp instead of searching.")
@click.option("--gpu-memory-utilization", type=float, default=None,
              help="vLLM's memory fraction (default: the version's, 0.9 up to 0.19, 0.92 from "
                   "0.20).")
@click.option("--max-num-batched-tokens", type=int, default=None, help="vLLM's token budget per step (profile run).")
@click.option("--max-num-seqs", type=int, default=None,
              help="vLLM's max_num_seqs: sequences per step and in the sampler's profile run (default: the "
                   "version's, 256 or 1024 by GPU and entry point).")
@click.option("--kv-cache-dtype", type=click.Choice(KV_CACHE_DTYPES), default="auto", show_default=True,
              help="As for estimate; vLLM takes auto or fp8.")
@click.option("--vllm-version", default=None,
              help="vLLM release whose start-up rules apply (default 0.24.0; 0.6.0-0.33.x).")
@click.option("--entrypoint", type=click.Choice(["serve", "offline"]), default=None,
              help="vLLM's defaults of `vllm serve` (default) or of the offline LLM class.")
@click.option("--sampler", type=click.Choice(["auto", "torch", "flashinfer", "triton"]), default=None,
              help="vLLM's top-k/top-p path in the profile run (default: the version's).")
@click.option("--max-gpus", type=int, default=64, show_default=True, help="Largest plan to consider.")
@click.option("--multi-node", is_flag=True, help="Allow tensor parallelism across nodes.")
@click.option("--max", "maximize", type=click.Choice(["context", "batch", "concurrency"]), default=None,
              help="Instead of plans: the largest context, or batch (= concurrency), each layout of --gpu fits.")
@click.option("--allocator", type=click.Choice(["default", "expandable"]), default="default", show_default=True,
              help="transformers: PyTorch's caching allocator by default, or with expandable_segments:True.")
@click.option("--sort", type=click.Choice(["gpus", "memory", "cost", "headroom"]), default="gpus", show_default=True,
              help="gpus: fewest GPUs, then the smallest GPU that fits, then cost; memory: least total GPU "
                   "memory; cost: cheapest per hour where priced; headroom: most memory left.")
@click.option("--top", type=int, default=10, show_default=True, help="Plans to show.")
@training_options
@click.option("--batch", type=int, default=1, show_default=True, help="With --train: each rank's micro-batch.")
@click.option("--sharding", type=click.Choice(["none", "zero1", "zero2", "zero3", "fsdp"]), default="zero3",
              show_default=True, help="With --train: how data-parallel ranks partition states, grads and weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (see `vramplan schema`).")
@friendly_errors
def plan(model, context, new_tokens, concurrency, gpus, gpu_catalog, precision, runtime, tp, pp,
         gpu_memory_utilization, max_num_batched_tokens, max_num_seqs, kv_cache_dtype, vllm_version, entrypoint,
         sampler, max_gpus, multi_node, maximize, allocator, sort, top, train, seq_len, lora_rank, lora_targets,
         gradient_checkpointing, optimizer, autocast,
         batch, sharding, as_json):
    """How many of which GPU, in which tensor x pipeline layout, serve MODEL's workload (or, with
    --train, run its fine-tuning job).

    Exits 1 when the request is valid but no layout fits, 2 when it is invalid."""
    from . import plan as run_plan
    from . import plan_maximum, plan_training

    if train:
        training = _training(train, batch, seq_len, lora_rank, lora_targets, gradient_checkpointing, optimizer,
                             autocast, "auto", False)
        report = plan_training(model, training, list(gpus), sharding=sharding, precision=precision,
                               max_gpus=max_gpus, gpu_catalog_file=gpu_catalog)
        click.echo(render.to_json("plan-train", _request(), report) if as_json else render.training_plans_text(report))
        if not report.plans:
            sys.exit(1)
        return

    options = dict(context=context, new_tokens=new_tokens, concurrency=concurrency, precision=precision,
                   runtime=runtime, tp=tp, pp=pp, gpu_memory_utilization=gpu_memory_utilization,
                   max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                   kv_cache_dtype=kv_cache_dtype, max_gpus=max_gpus, multi_node=multi_node,
                   vllm_version=vllm_version, entrypoint=entrypoint, sampler=sampler, allocator=allocator,
                   gpu_catalog_file=gpu_catalog)
    if maximize:
        if len(gpus) != 1:
            raise WorkloadError("--max answers for one GPU kind: give exactly one --gpu.")
        maximize = "concurrency" if maximize == "batch" else maximize  # one replica's batch is its concurrency
        report = plan_maximum(model, gpus[0], maximize, **options)
        click.echo(render.to_json("plan-max", _request(), report) if as_json else render.maximum_text(report))
        if not any(row.value for row in report.layouts):
            sys.exit(1)
        return
    result = run_plan(model, list(gpus), top=top, sort=sort, **options)
    click.echo(render.to_json("plan", _request(), result) if as_json else render.plans_text(result))
    if not result.plans:
        sys.exit(1)


@main.command()
@click.argument("model")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Where to write the chart (.png, .svg or .pdf).")
@click.option("--x", "axis", type=click.Choice(["context", "batch"]), default="context", show_default=True,
              help="What the horizontal axis varies.")
@click.option("--upto", type=int, default=None, help="Largest x value (default: the model's context, or 64).")
@click.option("--precision", "-p", "precisions", multiple=True,
              help="Precision(s) to draw; default the config's dtype, int8 and nf4; all: every precision.")
@click.option("--gpu", "gpus", multiple=True, help="GPU kind(s) whose capacity to draw as a line.")
@_catalog_option()
@click.option("--batch", "-b", type=int, default=1, show_default=True)
@click.option("--prompt-len", "-n", type=int, default=2048, show_default=True)
@click.option("--new-tokens", "-t", type=int, default=128, show_default=True)
@click.option("--attn", type=click.Choice(ATTENTION), default="auto")
@click.option("--json", "as_json", is_flag=True, help="Also print the plotted series as JSON.")
@friendly_errors
def plot(model, output, axis, upto, precisions, gpus, gpu_catalog, batch, prompt_len, new_tokens, attn, as_json):
    """Chart MODEL's memory against context (or batch) per precision, with GPU capacity lines."""
    from . import memory_series
    from .plot import check_output, write_plot

    check_output(output)
    series = memory_series(model, axis, list(precisions), list(gpus), batch=batch, prompt_len=prompt_len,
                           new_tokens=new_tokens, attn=attn, upto=upto, gpu_catalog_file=gpu_catalog)
    write_plot(output, series)
    click.echo(render.to_json("plot", _request(), series) if as_json else f"wrote {output}")


@main.command()
def schema():
    """Print the JSON schema of every command's --json output."""
    click.echo(json.dumps(render.json_schema(), indent=2))


@main.command()
@click.argument("model", required=False)
@workload_options
@click.option("--weights", type=click.Choice(["random", "checkpoint"]), default="random", show_default=True,
              help="random: build from the config (no download); checkpoint: from_pretrained(MODEL).")
@click.option("--layers", type=int, default=None, help="Build only this many decoder layers (memory is per layer).")
@click.option("--tolerance", type=float, default=None,
              help="Exit 1 when a total is off by more than this many percent.")
@click.option("--matrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Run a sweep described by a matrix YAML instead of one case.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append the measured rows to this JSONL file (a sweep resumes from it).")
@click.option("--tp", type=int, default=1, show_default=True,
              help="Measure tensor parallelism over this many GPUs (torchrun, transformers' tp_plan).")
@click.option("--pp", type=int, default=1, show_default=True,
              help="Measure pipeline stages over this many GPUs (one process, a device_map of whole layers).")
@training_options
@click.option("--find-max", "find_max", type=click.Choice(["batch", "prompt-len"]), default=None,
              help="Bisect the largest batch or prompt length that runs here, one fresh process per trial.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@friendly_errors
def validate(model, batch, prompt_len, new_tokens, mode, attn, precision, kv_cache_dtype, double_quant,
             compute_dtype, revision, allocator, weights, layers, tolerance, matrix, out, tp, pp, train, seq_len,
             lora_rank, lora_targets, gradient_checkpointing, optimizer, autocast, find_max, as_json):
    """Measure MODEL on this machine's GPU and compare with the estimate (needs CUDA)."""
    from .validate import runner, steps

    if matrix is not None:
        if out is None:
            raise WorkloadError("--matrix needs --out FILE: the sweep appends to it and resumes from it.")
        runner.run_sweep(matrix, out)
        return
    if model is None:
        raise WorkloadError("Give a MODEL to validate, or --matrix FILE for a sweep.")
    if train:
        training = _training(train, batch, seq_len, lora_rank, lora_targets, gradient_checkpointing, optimizer,
                             autocast, attn, double_quant)
        report = steps.validate_training(model, training, precision=precision, revision=revision, layers=layers,
                                         out=out)
        click.echo(render.to_json("validate", _request(), report) if as_json else steps.training_report_text(report))
        if tolerance is not None and not report.within(tolerance):
            sys.exit(1)
        return
    workload = _workload(batch, prompt_len, new_tokens, mode, attn, kv_cache_dtype)
    if find_max:
        edge = steps.find_max(model, workload, find_max, precision=precision, allocator=allocator, layers=layers,
                              revision=revision, out=out)
        click.echo(render.to_json("validate", _request(), edge) if as_json else steps.edge_report_text(edge))
        if not edge.agrees():
            sys.exit(1)
        return
    if tp > 1 or pp > 1:
        parallel = runner.validate_parallel(model, workload, precision=precision, revision=revision,
                                            weights=weights, layers=layers, tp=tp, pp=pp, out=out)
        click.echo(render.to_json("validate", _request(), parallel) if as_json
                   else runner.parallel_report_text(parallel))
        if tolerance is not None and not parallel.within(tolerance):
            sys.exit(1)
        return
    workload = workload.model_copy(update={"allocator": allocator})
    report = runner.validate_one(model, workload, precision=precision, double_quant=double_quant,
                                 compute_dtype=compute_dtype, revision=revision, weights=weights,
                                 layers=layers, out=out)
    click.echo(render.to_json("validate", _request(), report) if as_json else runner.report_text(report))
    if tolerance is not None and not report.within(tolerance):
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
