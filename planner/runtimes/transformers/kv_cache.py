"""The KV cache as transformers 5.17's DynamicCache layers allocate it.

Every layer holds one key and one value tensor of B x kv_heads x length x head_dim, grown by
torch.cat (a new allocation each step). Multi-head latent attention (DeepSeek-V2/V3) caches its
compressed latent as the "keys" (B x 1 x length x kv_lora_rank) and the shared rotary key as
the "values" (B x 1 x length x qk_rope_head_dim): measured on DeepSeek-V2-Lite. A
sliding-window (or chunked) layer keeps a *view* of the full concatenation, so after prefill it
still holds the whole prompt; from the first decode step on it keeps the last `window` tokens
(DynamicSlidingWindowLayer.update).
"""

from __future__ import annotations

from typing import Literal

from ...base import Frozen, block_bytes
from ...model.spec import Architecture, LayerKind
from . import recurrent

Part = Literal["key", "value"]

# transformers' QuantizedCache defaults (cache_utils.QuantizedLayer)
RESIDUAL_LENGTH = 128
Q_GROUP_SIZE = 64


class KvFormat(Frozen):
    """How the cache stores keys and values.

    dense: DynamicCache in `element_bytes` (the activation dtype; fp8 as serving engines store
    it). quantized: transformers' QuantizedCache, `nbits` per element plus a scale and a zero
    point per group of 64 in the activation dtype, with up to residual_length - 1 recent tokens
    kept in full precision."""

    kind: Literal["dense", "quantized"] = "dense"
    element_bytes: int  # dense storage, or the full-precision residual and dequantized copies
    nbits: int = 16

    def stored_bytes(self, elements: int) -> int:
        if self.kind == "dense":
            return elements * self.element_bytes
        groups = -(-elements // Q_GROUP_SIZE)
        return -(-elements * self.nbits // 8) + 2 * groups * self.element_bytes


def _layer_elements(arch: Architecture, batch: int, length: int, part: Part) -> int:
    return batch * length * arch.cache_width(part)


def layer_tensor_bytes(arch: Architecture, batch: int, length: int, element_bytes: int,
                       part: Part = "key") -> int:
    """One key (or value) tensor of one layer in a dense cache, as the allocator holds it."""
    return block_bytes(_layer_elements(arch, batch, length, part) * element_bytes)


def layer_bytes(arch: Architecture, batch: int, length: int, kv: KvFormat, decoded: int = 0,
                part: Part = "key") -> int:
    """One layer's keys (or values) after prefill and `decoded` steps, in `kv`'s format."""
    if kv.kind == "dense":
        return block_bytes(kv.stored_bytes(_layer_elements(arch, batch, length, part)))
    # the residual holds the tokens since the last requantization (at most residual_length - 1)
    residual = min(decoded, RESIDUAL_LENGTH - 1)
    quantized = length - residual
    return (block_bytes(kv.stored_bytes(_layer_elements(arch, batch, quantized, part)))
            + block_bytes(_layer_elements(arch, batch, residual, part) * kv.element_bytes))


def stored_length(kind: str, window: int | None, prompt_len: int, decoded: int) -> int:
    """Tokens a layer's tensors hold after prefill plus `decoded` decode steps."""
    total = prompt_len + decoded
    if kind == "full" or window is None or decoded == 0:
        return total
    # after the first decode step: the last window-1 tokens (a view) + the new one, copied
    return min(total, window)


def cache_bytes(arch: Architecture, batch: int, prompt_len: int, decoded: int, kv: KvFormat,
                layers: int | None = None, activation_bytes: int | None = None) -> int:
    """All layers' keys and values (the first `layers` only, when given: the cache a layer
    sees while it runs) after prefill and `decoded` decode steps, and the fixed-size states of
    recurrent mixer layers (conv window in the activation dtype, scan state in fp32)."""
    total = recurrent.state_bytes(arch, batch, activation_bytes or kv.element_bytes, layers)
    if arch.encoder is not None:
        # decoder self-attention: the start token and one per step; cross-attention: the prompt
        count = len(arch.layer_types[:layers])
        self_length = decoded + 1
        return total + count * sum(layer_bytes(arch, batch, length, kv, decoded, part)
                                   for length in (self_length, prompt_len) for part in ("key", "value"))
    for kind in arch.layer_types[:layers]:
        if kind == "none":
            continue
        length = stored_length(kind, arch.sliding_window, prompt_len, decoded)
        total += sum(layer_bytes(arch, batch, length, kv, decoded, part) for part in ("key", "value"))
    return total


def restart_step(arch: Architecture, prompt_len: int, new_tokens: int) -> int | None:
    """The first decode step generate() runs over a fresh cache, or None.

    Phi-3 (Phi3ForCausalLM.prepare_inputs_for_generation, transformers 5.17) sets
    past_key_values to None when the step's input reaches original_max_position_embeddings + 1
    positions while the cache holds no more than that: once, when the sequence crosses it, and
    then at every step (the fresh cache holds one token). The H200 trace of Phi-4-mini at
    4096-token prompts shows the rest: the dropped cache stays allocated, frozen, until
    generate() returns; each step's one-token cache goes after the next step's logits."""
    limit = arch.cache_restart_positions
    if limit is None or prompt_len > limit:
        return None
    first = limit + 1 - prompt_len
    return first if first <= new_tokens - 1 else None


def held_cache_bytes(arch: Architecture, batch: int, prompt_len: int, growth_steps: int, restarted_steps: int,
                     kv: KvFormat, activation_bytes: int | None = None) -> int:
    """The caches generate() holds at once, at their largest: the prompt's after its growth
    steps and, once it restarts (restart_step), the one-token caches of the last two restarted
    steps (the previous step's goes only after the next step's logits)."""
    fresh = cache_bytes(arch, batch, 1, 0, kv, activation_bytes=activation_bytes) if restarted_steps else 0
    return (cache_bytes(arch, batch, prompt_len, growth_steps, kv, activation_bytes=activation_bytes)
            + min(restarted_steps, 2) * fresh)


def releases_after_both_cats(kind: LayerKind) -> bool:
    """DynamicSlidingWindowLayer (sliding and chunked layers) concatenates the keys and the
    values before either old tensor goes; DynamicLayer replaces the keys, then the values."""
    return kind in ("sliding", "chunked")


def decode_update_transient(arch: Architecture, batch: int, length: int, kv: KvFormat,
                            kind: LayerKind = "full") -> int:
    """What one layer's cache update allocates on top of the cache during a decode step
    (`length`: what the layer held before it): DynamicCache copies the layer's key (then
    value) to grow it, a sliding layer both before the old ones go; QuantizedLayer dequantizes
    the layer's keys and values and concatenates them with the residual (four full-precision
    copies of the layer at once)."""
    key = layer_tensor_bytes(arch, batch, length, kv.element_bytes, "key")
    value = layer_tensor_bytes(arch, batch, length, kv.element_bytes, "value")
    if kv.kind == "quantized":
        return 2 * (key + value)
    return key + value if releases_after_both_cats(kind) else max(key, value)
