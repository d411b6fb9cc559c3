"""What vLLM prints at start-up, per rank, as vramplan predicts it (runtimes/vllm.py fills it)."""

from __future__ import annotations

from ..base import Frozen


class VllmStartup(Frozen):
    """The figures of vLLM's start-up log lines for one GPU of a layout, in vLLM's own terms."""

    vllm_version: str  # the release whose rules were applied
    gpu_memory_utilization: float
    max_num_seqs: int
    max_num_batched_tokens: int
    model_loading_bytes: int  # "Model loading took X GiB"
    activation_peak_bytes: int  # the profile run's torch peak increase
    non_torch_bytes: int  # non-torch memory growth since the start-up snapshot
    cudagraph_bytes: int  # subtracted before the KV cache (0 where a version captures graphs after it)
    kv_cache_bytes: int  # "Available KV cache memory: G GiB"
    kv_cache_tokens: int  # "GPU KV cache size: N tokens"
    max_concurrency: float  # "Maximum concurrency for L tokens per request: K x"
