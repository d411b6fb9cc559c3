"""Build a model from its config on a CUDA device and measure what one workload allocates.

This module owns the GPU side of validation: it imports torch and transformers (never the
estimate path does), builds a model with random weights straight from a config dict (no
download) or loads a checkpoint, runs `generate()` or a single forward, and reads the
caching allocator's counters and the process's device memory through NVML.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from vramplan.config import shrink_config

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BNB_PRECISIONS = ("int8", "nf4", "fp4")


@dataclass(frozen=True)
class Workload:
    batch: int
    prompt_len: int
    new_tokens: int
    mode: str = "generate"  # "generate" or "forward"
    images: int = 0  # images per sequence, for a vision-language model


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _nvml_handle():
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None, None
    try:
        pynvml.nvmlInit()
        index = torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            index = int(visible.split(",")[index])
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # NVML missing or not permitted: measure without it
        return None, None


def process_device_bytes() -> int | None:
    """Device memory this process holds as the driver sees it (what nvidia-smi shows)."""
    nvml, handle = _nvml_handle()
    if handle is None:
        return None
    pid = os.getpid()
    try:
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        procs = []
    for proc in procs:
        if proc.pid == pid and proc.usedGpuMemory is not None:
            return int(proc.usedGpuMemory)
    # Inside some sandboxes the PID namespace hides our own PID from the driver: with the
    # GPU to ourselves, the device-wide figure is ours.
    if len(procs) <= 1:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.used)
    return None


def environment() -> dict[str, Any]:
    """Versions and the GPU that a measurement depends on."""
    import transformers

    env: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_total_bytes": int(torch.cuda.get_device_properties(0).total_memory),
        "cuda": torch.version.cuda,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        import bitsandbytes  # type: ignore[import-not-found]

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        env["bitsandbytes"] = None
    nvml, _ = _nvml_handle()
    env["driver"] = nvml.nvmlSystemGetDriverVersion() if nvml else None
    if isinstance(env["driver"], bytes):
        env["driver"] = env["driver"].decode()
    return env


def _hf_config(config: dict[str, Any]):
    """A transformers config object from a config dict, without running any repository code.

    `quantization_config` is dropped: a random model built from the config is not a
    pre-quantized checkpoint (those are measured through `load_checkpoint`).
    """
    from transformers import AutoConfig

    dropped = ("auto_map", "architectures", "quantization_config")
    config = {k: v for k, v in config.items() if k not in dropped}
    model_type = config.pop("model_type")
    return AutoConfig.for_model(model_type, **config)


def auto_model_class(config: dict[str, Any]):
    """The transformers auto class that generates text for this config: encoder-decoder
    models through the seq2seq head, vision-language models through image-text-to-text."""
    import transformers

    if config.get("is_encoder_decoder") or config.get("model_type") in ("t5", "bart", "mt5", "mbart"):
        return transformers.AutoModelForSeq2SeqLM
    if isinstance(config.get("vision_config"), dict) and config.get("model_type") != "llama4":
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def build_random(config: dict[str, Any], precision: str, attn: str, num_layers: int | None = None,
                 relayout: bool = True):
    """Random weights straight from the config, allocated on the GPU (no download).

    Initializing on the GPU leaves freed temporaries between the parameters (a tied embedding's
    discarded copy: ~0.3-0.5 GiB reserved but free), which a checkpoint load does not. With
    `relayout`, the model goes to the CPU and back once the cache is emptied, so that its
    parameters are allocated one after another, as from_pretrained allocates them.
    """
    hf_config = _hf_config(shrink_config(config, num_layers))
    with torch.device("cuda"):
        model = auto_model_class(config).from_config(
            hf_config, dtype=TORCH_DTYPES[precision], attn_implementation=attn
        )
    if relayout:
        model.to("cpu")
        gc.collect()
        torch.cuda.empty_cache()
        model.to("cuda")
    return model.eval()


def scratch_dir() -> str:
    """Where a random checkpoint is written for reloading: RAM disk when it has room."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and shutil.disk_usage(shm).free > 40 * 2**30:
        return shm
    return tempfile.gettempdir()


def build_quantized(config: dict[str, Any], precision: str, attn: str, num_layers: int | None,
                    workdir: str, compute_dtype: str = "bf16", double_quant: bool = False):
    """Save a random bf16 checkpoint, then reload it through bitsandbytes: the real loading
    path, quantization included. The checkpoint is written once per worker and reused."""
    path = os.path.join(workdir, "checkpoint")
    if not os.path.exists(os.path.join(path, "config.json")):
        model = build_random(config, "bf16", attn, num_layers, relayout=False)  # fast on the GPU
        model.save_pretrained(path)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    quant = bnb_config(precision, compute_dtype, double_quant)
    torch.cuda.reset_peak_memory_stats()
    model = auto_model_class(config).from_pretrained(
        path, quantization_config=quant, device_map="cuda:0", attn_implementation=attn,
        dtype=TORCH_DTYPES[compute_dtype],
    )
    return model.eval()


def bnb_config(precision: str, compute_dtype: str = "bf16", double_quant: bool = False):
    from transformers import BitsAndBytesConfig

    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=precision,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=TORCH_DTYPES[compute_dtype],
    )


def load_checkpoint(path_or_id: str, precision: str, attn: str, revision: str | None = None,
                    compute_dtype: str = "bf16", double_quant: bool = False):
    """A real checkpoint through from_pretrained (local directory, or the Hub when reachable)."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"attn_implementation": attn, "device_map": "cuda:0", "revision": revision}
    if precision in BNB_PRECISIONS:
        kwargs["quantization_config"] = bnb_config(precision, compute_dtype, double_quant)
        kwargs["dtype"] = TORCH_DTYPES[compute_dtype]
    else:
        kwargs["dtype"] = TORCH_DTYPES[precision]
    torch.cuda.reset_peak_memory_stats()
    config = AutoConfig.from_pretrained(path_or_id, revision=revision).to_dict()
    return auto_model_class(config).from_pretrained(path_or_id, **kwargs).eval()


def tensor_inventory(model) -> dict[str, int]:
    """Parameters (shared ones once) and buffers actually resident on the GPU."""
    seen: set[int] = set()
    params = param_bytes = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        params += p.numel()
        param_bytes += p.numel() * p.element_size()
    persistent = set(model.state_dict().keys())
    buffer_bytes = non_persistent_bytes = 0
    for name, b in model.named_buffers():
        if b.data_ptr() in seen:
            continue
        seen.add(b.data_ptr())
        size = b.numel() * b.element_size()
        if name in persistent:
            buffer_bytes += size
        else:
            non_persistent_bytes += size
    return {
        "parameters": params,
        "param_bytes": param_bytes,
        "buffer_bytes": buffer_bytes,
        "nonpersistent_buffer_bytes": non_persistent_bytes,
    }


def _reset() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def warm_up(model) -> None:
    """One tiny forward so that one-off allocations (cuBLAS workspace, kernels' lazy state)
    exist before a case is measured; their size is part of the runtime overhead term."""
    ids = torch.zeros((1, 4), dtype=torch.long, device="cuda")
    with torch.no_grad():
        extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **extra)
    del ids
    torch.cuda.synchronize()


def image_token_id(model) -> int | None:
    config = model.config
    for key in ("image_token_id", "image_token_index"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    return None


def image_tokens_per_image(model) -> int:
    """How many placeholder tokens one image expands to (LLaVA-style: one per patch, the
    class token dropped under the "default" feature selection)."""
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    strategy = getattr(model.config, "vision_feature_select_strategy", "default")
    return patches + (1 if strategy == "full" else 0)


def _inputs(model, workload: Workload) -> dict[str, torch.Tensor]:
    """Random token ids (image placeholders at the front when the workload has images);
    ids never hit the image token by chance, so a text-only run stays text-only."""
    vocab = int(model.get_input_embeddings().num_embeddings)
    special = image_token_id(model)
    high = min(vocab, special) if special is not None else vocab
    generator = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(3, high, (workload.batch, workload.prompt_len), device="cuda",
                        generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if workload.images:
        per_image = image_tokens_per_image(model)
        ids[:, : workload.images * per_image] = special
        size = model.config.vision_config.image_size
        inputs["pixel_values"] = torch.randn(
            (workload.batch * workload.images, 3, size, size), device="cuda", generator=generator,
            dtype=model.dtype)
    return inputs


# Frames from these packages say which code allocated a block; the rest is call plumbing.
_INTERESTING_FRAMES = ("transformers/", "torch/nn/", "bitsandbytes/", "accelerate/")


def _frame_label(frames: list[dict[str, Any]]) -> str:
    picked = []
    for frame in frames:
        name = frame.get("filename", "")
        if any(tag in name for tag in _INTERESTING_FRAMES):
            short = name.split("site-packages/")[-1]
            picked.append(f"{short}:{frame.get('line')}:{frame.get('name')}")
        if len(picked) == 3:
            break
    return " < ".join(picked) or "?"


def peak_live_set(snapshot: dict[str, Any], keep: int = 40) -> dict[str, Any]:
    """Replay the allocator's trace and list the blocks alive at the highest point.

    Only blocks allocated while recording count, so the figure is the peak *above* the
    allocations that already existed (weights, inputs): what the runtime terms must explain.
    """
    trace = snapshot.get("device_traces", [[]])[0]
    live: dict[int, int] = {}
    current = peak = 0
    peak_index = -1
    for index, event in enumerate(trace):
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = event["size"]
            current += event["size"]
            if current > peak:
                peak, peak_index = current, index
        elif action == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])
    alive: dict[int, dict[str, Any]] = {}
    for event in trace[: peak_index + 1]:
        action = event.get("action")
        if action == "alloc":
            alive[event["addr"]] = event
        elif action == "free_completed":
            alive.pop(event["addr"], None)
    groups: dict[tuple[int, str], int] = {}
    for event in alive.values():
        key = (int(event["size"]), _frame_label(event.get("frames", [])))
        groups[key] = groups.get(key, 0) + 1
    ordered = sorted(groups.items(), key=lambda kv: -kv[0][0] * kv[1])
    trigger = trace[peak_index] if peak_index >= 0 else {}
    return {
        "peak_above_start_bytes": peak,
        "events": len(trace),
        "peak_event_index": peak_index,
        "trigger": _frame_label(trigger.get("frames", [])),
        "live": [{"bytes": size, "count": count, "where": where}
                 for (size, where), count in ordered[:keep]],
        "live_groups_left_out": max(0, len(ordered) - keep),
    }


def run_workload(model, workload: Workload, diagnose: bool = False) -> dict[str, Any]:
    """Run one workload and read the allocator's counters around it.

    With `diagnose`, the allocator records every allocation with its Python stack, and the
    row carries the set of blocks alive at the peak (slower; the figures are unchanged).
    """
    inputs = _inputs(model, workload)
    base = _reset()
    reserved_base = torch.cuda.memory_reserved()
    if diagnose:
        torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
    try:
        started = time.perf_counter()
        with torch.no_grad():
            if workload.mode == "forward":
                if model.config.is_encoder_decoder:
                    out = model(**inputs, decoder_input_ids=inputs["input_ids"], use_cache=False)
                else:
                    out = model(**inputs, use_cache=False)
                del out
            else:
                out = model.generate(
                    **inputs, do_sample=False,
                    min_new_tokens=workload.new_tokens, max_new_tokens=workload.new_tokens,
                    pad_token_id=0, eos_token_id=None,
                )
                # a decoder-only model returns the prompt too; a seq2seq one the decoder start
                produced = int(out.shape[1] - (1 if model.config.is_encoder_decoder
                                               else workload.prompt_len))
                del out
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        result = {
            "base_allocated_bytes": base,
            "base_reserved_bytes": reserved_base,
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
            # NVML and the allocator read together: their difference is memory outside torch
            "device_bytes": process_device_bytes(),
            "reserved_at_device_read_bytes": int(torch.cuda.memory_reserved()),
            "seconds": round(elapsed, 3),
        }
        if diagnose:
            result["peak_live_set"] = peak_live_set(torch.cuda.memory._snapshot())
    finally:
        # an OOM must not leave recording on: the next case's live set would replay this one's
        if diagnose:
            torch.cuda.memory._record_memory_history(enabled=None)
    if workload.mode != "forward":
        result["tokens_generated"] = produced
    del inputs
    return result


def prefill_profile(model, workload: Workload) -> dict[str, Any]:
    """One prefill forward (cache on, last-token logits, as generate() does) with hooks on the
    decoder layers: where the peak sits, for diagnosing a drifting term."""
    layers = _decoder_layers(model)
    if not layers or model.config.is_encoder_decoder or workload.images:
        return {}
    inputs = _inputs(model, workload)
    marks: dict[str, int] = {}

    def pre(_module, _args, _kwargs=None):
        torch.cuda.synchronize()
        marks.setdefault("layer0_in", torch.cuda.memory_allocated())
        torch.cuda.reset_peak_memory_stats()

    def post(_module, _args, _output):
        torch.cuda.synchronize()
        marks.setdefault("layer0_peak", torch.cuda.max_memory_allocated())
        marks.setdefault("layer0_out", torch.cuda.memory_allocated())

    handles = [layers[0].register_forward_pre_hook(pre), layers[0].register_forward_hook(post)]
    base = _reset()
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            del out
    finally:
        for h in handles:
            h.remove()
    torch.cuda.synchronize()
    del inputs
    return {"base": base, **{k: int(v) for k, v in marks.items()}}


def _decoder_layers(model) -> list:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return list(module)
    return []


def measure_case(model, workload: Workload, diagnose: bool = False) -> dict[str, Any]:
    """One measured row; an out-of-memory is a data point, not a crash."""
    try:
        row = run_workload(model, workload, diagnose=diagnose)
        row["status"] = "ok"
        if diagnose and workload.mode == "generate":
            row["prefill_profile"] = prefill_profile(model, workload)
    except torch.cuda.OutOfMemoryError as exc:
        row = {"status": "oom", "error": str(exc).splitlines()[0][:300]}
    finally:
        gc.collect()
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    return row
