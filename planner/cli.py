"""The `vramplan` command: parse options, call the API, render. Nothing else lives here.

Every error a user can cause (a bad model reference, a malformed config, an unknown GPU, an
impossible workload) is one sentence on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from . import render
from .errors import VramplanError, WorkloadError


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"vramplan: {message}", err=True)
    sys.exit(code)


def friendly_errors(fn):
    """Turn our errors (and pydantic's, for option values) into one sentence and exit 2."""

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

    return wrapper


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
        click.option("--attn", type=click.Choice(["auto", "sdpa", "eager", "flash_attention_2"]),
                     default="auto", show_default=True,
                     help="transformers' attention implementation; auto = what transformers picks "
                          "(sdpa where the family has it, else eager)."),
        click.option("--precision", "-p", default="auto", show_default=True,
                     help="fp32, fp16, bf16, int8, nf4 or fp4; auto = the config's torch_dtype; "
                          "all = one row per precision (estimate only)."),
        click.option("--kv-cache-dtype", type=click.Choice(["auto"]), default="auto", show_default=True,
                     help="KV cache dtype; auto = the activation dtype (transformers' DynamicCache)."),
        click.option("--double-quant", is_flag=True, help="bitsandbytes 4-bit double quantization."),
        click.option("--compute-dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16",
                     show_default=True, help="bitsandbytes compute dtype."),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _workload(batch, prompt_len, new_tokens, mode, attn, kv_cache_dtype):
    from .estimate import Workload

    return Workload(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, mode=mode, attn=attn,
                    kv_cache_dtype=kv_cache_dtype)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vramplan")
def main() -> None:
    """How much GPU memory will a Hugging Face model need? Answered from its config.json."""


@main.command()
@click.argument("model")
@workload_options
@click.option("--gpu", default=None, help="Add a fits/does-not-fit verdict for this GPU (see profiles/gpus.yaml).")
@click.option("--gpu-catalog", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A YAML file of extra GPUs, same format as profiles/gpus.yaml.")
@click.option("--json", "as_json", is_flag=True, help="Print the result model as JSON.")
@friendly_errors
def estimate(model, batch, prompt_len, new_tokens, mode, attn, precision, kv_cache_dtype, double_quant,
             compute_dtype, revision, gpu, gpu_catalog, as_json):
    """Estimate the GPU memory of one run of MODEL (bundled name, local path or Hub id)."""
    from . import estimate as run_estimate
    from . import estimate_precisions

    workload = _workload(batch, prompt_len, new_tokens, mode, attn, kv_cache_dtype)
    if precision == "all":
        results = estimate_precisions(model, workload, gpu, compute_dtype=compute_dtype, revision=revision,
                                      gpu_catalog_file=gpu_catalog)
        if as_json:
            click.echo(json.dumps([r.model_dump(mode="json") for r in results], indent=2))
        else:
            click.echo(render.precisions_text(results))
        return
    result = run_estimate(model, workload, precision, gpu, double_quant=double_quant,
                          compute_dtype=compute_dtype, revision=revision, gpu_catalog_file=gpu_catalog)
    click.echo(render.to_json(result) if as_json else render.estimate_text(result))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@friendly_errors
def models(as_json):
    """List the bundled model configs (usable offline by Hub id or alias)."""
    from .architecture import architecture_from_config
    from .source import bundled_names, load_bundled

    entries = []
    for hub_id, alias in bundled_names():
        source = load_bundled(hub_id)
        try:
            arch = architecture_from_config(source.config, hub_id)
            status = f"{arch.model_type}, {arch.parameters / 1e9:.2f}B"
        except VramplanError as exc:
            status = f"refused: {str(exc).split(';')[0]}"
        entries.append((hub_id, alias, status))
    if as_json:
        click.echo(json.dumps([{"hub_id": h, "alias": a, "status": s} for h, a, s in entries], indent=2))
    else:
        click.echo(render.models_text(entries))


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
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@friendly_errors
def validate(model, batch, prompt_len, new_tokens, mode, attn, precision, kv_cache_dtype, double_quant,
             compute_dtype, revision, weights, layers, tolerance, matrix, out, as_json):
    """Measure MODEL on this machine's GPU and compare with the estimate (needs CUDA)."""
    from .validate import runner

    if matrix is not None:
        if out is None:
            raise WorkloadError("--matrix needs --out FILE: the sweep appends to it and resumes from it.")
        runner.run_sweep(matrix, out)
        return
    if model is None:
        raise WorkloadError("Give a MODEL to validate, or --matrix FILE for a sweep.")
    workload = _workload(batch, prompt_len, new_tokens, mode, attn, kv_cache_dtype)
    report = runner.validate_one(model, workload, precision=precision, double_quant=double_quant,
                                 compute_dtype=compute_dtype, revision=revision, weights=weights,
                                 layers=layers, out=out)
    click.echo(render.to_json(report) if as_json else runner.report_text(report))
    if tolerance is not None and not report.within(tolerance):
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
