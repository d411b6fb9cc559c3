"""What vLLM prints at start-up, per rank, as vramplan predicts it (runtimes/vllm.py fills it)."""

from __future__ import annotations

from typing import Literal

from ..base import Frozen


class VllmStartup(Frozen):
    """The figures of vLLM's start-up log lines for one GPU of a layout, in vLLM's own terms.

    Log lines, by the version's wording: "Model loading took X GiB" (model_loading_bytes);
    "Available KV cache memory: G GiB" (kv_cache_bytes; V0: "the rest of the memory reserved for
    KV Cache is G GiB"); "GPU KV cache size: N tokens" (kv_cache_tokens); "Maximum concurrency for
    L tokens per request: K x" (max_model_len, max_concurrency)."""

    vllm_version: str  # the release whose rules were applied
    engine: Literal["v0", "v1"]
    entrypoint: Literal["serve", "offline"]
    sampler: Literal["torch", "flashinfer", "triton"]  # the top-k/top-p path its profile run took
    gpu_memory_utilization: float
    total_memory_bytes: int  # what torch.cuda.mem_get_info() reports as total
    requested_bytes: int  # total x gpu_memory_utilization
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    model_loading_bytes: int  # "Model loading took X GiB"
    activation_peak_bytes: int  # the profile run's torch peak increase
    non_torch_bytes: int  # non-torch memory charged to the budget (the version's definition)
    cudagraph_bytes: int  # subtracted before the KV cache (0 where a version captures graphs after it)
    cudagraph_outside_bytes: int = 0  # graphs captured after the KV cache, out of the (1 - util) headroom
    kv_cache_bytes: int  # "Available KV cache memory: G GiB"
    kv_block_bytes: int  # one block id across the tensors that share it (page x layers per group)
    kv_groups: int  # KV-cache groups (full attention, sliding window), sharing one block pool
    gpu_blocks: int  # "# GPU blocks: B" (V0), num_blocks (V1)
    blocks_per_request: int  # blocks one max_model_len request takes, across the groups
    kv_cache_tokens: int  # "GPU KV cache size: N tokens"
    max_concurrency: float  # "Maximum concurrency for L tokens per request: K x"
