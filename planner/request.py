"""The typed inputs every layer shares: a run's workload, a precision choice, a plan request.

At the bottom of the package (they import only `base`): the model, the runtimes, planning and
the CLI all speak these types.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Frozen

MAX_BATCH = 1 << 16
MAX_TOKENS = 1 << 24

Attention = Literal["auto", "sdpa", "eager", "flash_attention_2"]
# PyTorch's caching allocator: its default segments, or PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
AllocatorMode = Literal["default", "expandable"]


class Workload(Frozen):
    """One run: `generate` (prefill, then new_tokens - 1 decode steps) or one `forward`."""

    batch: int = Field(1, ge=1, le=MAX_BATCH)
    prompt_len: int = Field(512, ge=1, le=MAX_TOKENS)
    new_tokens: int = Field(128, ge=0, le=MAX_TOKENS)
    mode: Literal["generate", "forward"] = "generate"
    # "auto": what transformers picks itself, SDPA where the family has it, else eager
    attn: Attention = "auto"
    # auto: DynamicCache in the activation dtype; int8/int4/int2: transformers' QuantizedCache
    # (HQQ for 8 bits, quanto for 4 and 2); fp8: the layout serving engines use (1 byte each)
    kv_cache_dtype: Literal["auto", "fp16", "bf16", "fp32", "fp8", "int8", "int4", "int2"] = "auto"
    allocator: AllocatorMode = "default"

    @property
    def decode_forwards(self) -> int:
        """generate()'s forwards after the prompt's: one per new token but the first."""
        return max(0, self.new_tokens - 1) if self.mode == "generate" else 0


class Training(Frozen):
    """One fine-tuning step as it runs by default: model.train(), use_cache=False, loss from
    labels, backward, optimizer.step(), zero_grad(set_to_none=True); two steps (the first one
    creates the optimizer states)."""

    method: Literal["full", "lora", "qlora"] = "full"
    batch: int = Field(1, ge=1, le=MAX_BATCH)
    seq_len: int = Field(512, ge=2, le=MAX_TOKENS)
    lora_rank: int = Field(16, ge=1, le=1 << 16)
    lora_targets: tuple[str, ...] = ("all-linear",)  # peft's "all-linear", or module names
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit", "sgd", "adafactor"] = "adamw"
    autocast: Literal["none", "bf16", "fp16"] = "none"  # mixed precision over fp32 weights
    double_quant: bool = False  # qlora: bitsandbytes double quantization
    attn: Attention = "auto"
    allocator: AllocatorMode = "default"


class PrecisionChoice(Frozen):
    name: str = "auto"  # "auto": the config's torch_dtype, bf16 when it has none
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # bitsandbytes' compute dtype
    double_quant: bool = False


RuntimeName = Literal["transformers", "vllm"]


class PlanRequest(Frozen):
    context: int = Field(4096, ge=2, le=1 << 24)  # tokens per sequence: prompt + generated
    new_tokens: int = Field(256, ge=1, le=1 << 24)
    concurrency: int = Field(1, ge=1, le=1 << 20)
    precisions: tuple[str, ...] = ("bf16",)
    runtime: RuntimeName = "transformers"
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)  # vllm; None: the version's default
    max_num_batched_tokens: int | None = None  # vllm; None: its default
    max_num_seqs: int | None = None  # vllm; None: its default
    # as for a Workload: vLLM takes auto or fp8, transformers also its QuantizedCache (int8/int4/int2)
    kv_cache_dtype: Literal["auto", "fp16", "bf16", "fp32", "fp8", "int8", "int4", "int2"] = "auto"
    vllm_version: str | None = None  # vllm; None: the release the rules default to
    entrypoint: Literal["serve", "offline"] = "serve"  # vllm: `vllm serve` or the offline LLM class
    sampler: Literal["auto", "torch", "flashinfer", "triton"] = "auto"  # vllm's top-k/top-p path
    tensor_parallel_size: int | None = None  # fixed tp, or None to search
    pipeline_parallel_size: int | None = None
    max_gpus: int = Field(64, ge=1)
    allow_multi_node: bool = False  # tp across nodes
    attn: Attention = "auto"
    allocator: AllocatorMode = "default"
