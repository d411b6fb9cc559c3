"""The KV cache as transformers 5.17's DynamicCache layers allocate it.

Every layer holds one key and one value tensor of B x kv_heads x length x head_dim, grown by
torch.cat (a new allocation each step). A sliding-window layer keeps a *view* of the full
concatenation, so after prefill it still holds the whole prompt; from the first decode step
on it keeps the last `window` tokens (DynamicSlidingWindowLayer.update).
"""

from __future__ import annotations

from ..architecture import Architecture
from ..base import block_bytes


def layer_tensor_bytes(arch: Architecture, batch: int, length: int, element_bytes: int) -> int:
    """One key (or value) tensor of one layer, as the allocator holds it."""
    heads = arch.cache_heads or arch.num_kv_heads
    return block_bytes(batch * heads * length * arch.head_dim * element_bytes)


def stored_length(kind: str, window: int | None, prompt_len: int, decoded: int) -> int:
    """Tokens a layer's tensors hold after prefill plus `decoded` decode steps."""
    total = prompt_len + decoded
    if kind == "full" or window is None or decoded == 0:
        return total
    # after the first decode step: the last window-1 tokens (a view) + the new one, copied
    return min(total, window)


def cache_bytes(arch: Architecture, batch: int, prompt_len: int, decoded: int,
                element_bytes: int) -> int:
    """All layers' keys and values after prefill and `decoded` decode steps."""
    total = 0
    for kind in arch.layer_types:
        length = stored_length(kind, arch.sliding_window, prompt_len, decoded)
        total += 2 * layer_tensor_bytes(arch, batch, length, element_bytes)
    return total
