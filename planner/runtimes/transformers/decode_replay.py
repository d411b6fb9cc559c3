"""generate()'s decode steps, replayed through the caching allocator after the prefill
(sequence.py): each layer's cache update, its attention temporaries where the family's order
is exact, the step's logits, and generate()'s own bookkeeping tensors."""

from __future__ import annotations

from typing import Any

from ...catalog import FamilyLayout
from ...model.spec import Architecture
from . import attention, coded_layers, kv_cache, layer_replay, mlp_layers
from .activations import RunSpec

Tracer = Any  # tracer.Tracer: new(), drop(), temp(), at(), matmul(), decode_step(), at_capacity

# Decode steps replayed one by one. Each step's cache update asks every layer for blocks a little
# larger than the ones it frees, so under a capacity the allocator's reserve and its retries build
# up over the whole generation: the verdict's replay runs every step, up to a budget of layer-steps
# (a few seconds for `--max`), past which the point model's peak decides for the later steps.
# Without a capacity (the reserve a run builds with room to spare) the first steps only: there the
# reserve of a growing cache only grows, as no real GPU lets it.
MIN_REPLAYED_DECODE_STEPS = 16
MAX_REPLAYED_DECODE_LAYER_STEPS = 32768


def replayed_steps(at_capacity: bool, steps: int, layers: int) -> int:
    """How many of `steps` cached forwards over `layers` layers the replay runs one by one."""
    bound = MIN_REPLAYED_DECODE_STEPS
    if at_capacity:
        bound = max(bound, MAX_REPLAYED_DECODE_LAYER_STEPS // max(1, layers))
    return min(steps, bound)


def last_token_logits(tr: Tracer, layout: FamilyLayout, nbytes: int) -> int | None:
    """The lm_head's output for the last token; with final logit softcapping (Gemma-2) the
    logits / cap, tanh and * cap follow, each one's input going once it exists."""
    logits = tr.new(nbytes)
    if layout.logit_softcapping:
        for op in ("/ cap", "tanh", "* cap"):
            capped = tr.new(nbytes, f"logit softcapping {op}")
            tr.drop(logits)
            logits = capped
    return logits


def decode(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec,
           cache: list[int | None], logits_copy: int | None, attention_temporaries: bool = False,
           traced_layers: bool = False, prompt_logits: int | None = None) -> None:
    """Decode steps in generate()'s order (H200 trace of Qwen3-0.6B's 512-token generation): before
    each forward _update_model_kwargs_for_generation's position_ids and attention_mask cats (the old
    ones go), the fp32 copy of the previous logits (the prompt's was made with its logits), the
    input_ids cat and the previous logits going; then the layers' cache cats and the step's logits;
    after the last forward the same bookkeeping once more (`prompt_logits`: the prompt's logits,
    copied there too, as the trace shows; else the caller copied them). With `traced_layers`, each
    step is the traced model's forward over one token (_traced_step); otherwise its layers' cache
    updates with the attention temporaries their family's order knows."""
    b, n = spec.batch, spec.prompt_len
    vocab = arch.vocab_size if arch.computes_logits else 0
    kept = {"positions": None, "mask": None, "ids": None, "copy": logits_copy}  # the prompt's own: the caller's

    def bookkeeping(step: int, logits: int | None) -> None:
        tr.at(f"decode step {step}", "generate() bookkeeping")
        grown = b * (n + step) * 8
        fresh = tr.new(grown, "position_ids (torch.cat)")
        fresh_mask = tr.new(grown, "attention_mask (torch.cat)")
        tr.drop(kept["positions"])
        kept["positions"] = fresh
        if logits is not None:
            copy = tr.new(b * vocab * 4, "next-token logits (fp32 copy)")
            tr.drop(kept["copy"])
            kept["copy"] = copy
        fresh = tr.new(grown, "input_ids (torch.cat)")
        tr.drop(kept["ids"], logits, kept["mask"])
        kept["ids"], kept["mask"] = fresh, fresh_mask

    previous_fresh: list[int | None] = []
    family_steps = coded_layers.decode_layer_steps(arch, spec) if attention_temporaries else None
    logits = prompt_logits
    steps = replayed_steps(tr.at_capacity, spec.new_tokens - 1, arch.num_layers)
    for step in range(1, steps + 1):
        restarted = spec.cache_restart_step is not None and step >= spec.cache_restart_step
        tr.decode_step()
        bookkeeping(step, logits)
        caches = _StepCaches(tr, arch, spec, cache, step, restarted)
        if traced_layers:
            logits = _traced_step(tr, arch, layout, spec, step, caches)
        else:
            for index, kind in enumerate(arch.layer_types):
                projections = _dequantized_projections(tr, arch, b, spec.activation_bytes) \
                    if spec.quantization == "4bit" and attention_temporaries else None
                held = family_steps[0](tr) if family_steps else []
                length = caches.update(index, kind)
                if attention_temporaries:
                    tr.at(op="attention")
                    if family_steps:
                        family_steps[1](tr, length)
                    else:
                        layer_replay.decode_attention(tr, arch, layout, spec, kind, length)
                tr.drop(*held)
                if projections is not None:
                    _dequantized_mlp(tr, arch, b, spec.activation_bytes, projections)
                if arch.moe is not None and index in arch.moe.sparse_layers and layout.experts is not None:
                    tr.at(op="experts (batched_mm)")
                    tr.drop(mlp_layers.moe_block(tr, arch, layout, b, spec.activation_bytes, grouped=False,
                                                 upcast_softmax=spec.softmax_upcasts))
            tr.at(f"decode step {step}", "lm_head (logits)")
            logits = last_token_logits(tr, layout, b * vocab * spec.activation_bytes)
        tr.drop(*previous_fresh)  # the previous step's fresh cache goes after this step's logits
        previous_fresh = caches.fresh
    if steps:
        bookkeeping(steps + 1, logits)
    tr.drop(kept["copy"], kept["positions"], kept["mask"], kept["ids"], *previous_fresh)


class _StepCaches:
    """A decode step's cache updates, layer by layer: DynamicLayer.update's torch.cat onto the
    layer's keys and values (the old ones go as the new ones exist; a sliding layer's once both
    exist), or after a cache restart (Phi-3 past original_max_position_embeddings) the cat onto a
    fresh empty cache, kept until the next step's logits exist."""

    def __init__(self, tr: Tracer, arch: Architecture, spec: RunSpec, cache: list[int | None], step: int,
                 restarted: bool) -> None:
        self.tr, self.arch, self.spec, self.cache, self.step, self.restarted = tr, arch, spec, cache, step, restarted
        self.fresh: list[int | None] = []

    def attended(self, kind: str) -> int:
        """How many keys a layer of this kind reads at this step."""
        return 1 if self.restarted else \
            kv_cache.stored_length(kind, self.arch.sliding_window, self.spec.prompt_len, self.step)

    def update(self, index: int, kind: str) -> int:
        """Layer `index`'s cache update; returns how many keys its attention reads."""
        tr, arch, spec, b = self.tr, self.arch, self.spec, self.spec.batch
        tr.at(f"decode step {self.step} layer {index}", f"{'fresh ' if self.restarted else ''}KV cache (torch.cat)")
        length = self.attended(kind)
        if self.restarted:  # a fresh cache: the cat onto its empty tensors; the prompt's stays as it was
            self.fresh += [tr.new(kv_cache.layer_bytes(arch, b, 1, spec.kv, 0, part)) for part in ("key", "value")]
            return length
        old_key, old_value = self.cache[2 * index:2 * index + 2]
        both_first = kv_cache.releases_after_both_cats(kind)
        key = tr.new(kv_cache.layer_bytes(arch, b, length, spec.kv, self.step, "key"))
        if not both_first:
            tr.drop(old_key)
        value = tr.new(kv_cache.layer_bytes(arch, b, length, spec.kv, self.step, "value"))
        tr.drop(old_key if both_first else None, old_value)
        self.cache[2 * index:2 * index + 2] = [key, value]
        return length


def _traced_step(tr: Tracer, arch: Architecture, layout: FamilyLayout, spec: RunSpec, step: int,
                 caches: _StepCaches) -> int | None:
    """A decode step's forward through a traced model, as the prefill's over one token (the H200
    trace of Qwen2.5-0.5B's long generation): the embeddings, the step's masks over the keys so
    far and its rotary tables, every layer (layer_replay.traced_layer; the cache update inside
    it), the final norm; the last layer's output, the embeddings, masks and tables go before the
    lm_head. Returns the step's logits."""
    b, s = spec.batch, spec.activation_bytes
    hidden = b * arch.hidden_size * s
    tr.at(f"decode step {step}", "embeddings")
    held = [tr.new(hidden, "embed_tokens")]
    if layout.scaled_embeddings:  # hidden_states = inputs_embeds * normalizer
        scaled = tr.new(hidden, "embed_tokens * sqrt(hidden_size)")
        tr.drop(held[0])
        held = [scaled]
    tr.at(op="masks")
    held += layer_replay.decode_step_masks(tr, arch, spec, spec.prompt_len + step)
    if arch.rotary_dim and layout.rope_tables:
        tr.at(op="rotary tables")
        held += layer_replay.shared_rotary_tables(tr, arch, layout, b, 1, s)
    layer_input = held[0]
    for index, kind in enumerate(arch.layer_types):
        tr.at(f"decode step {step} layer {index}", "input_layernorm")
        length = caches.attended(kind)
        masked = spec.attn == "sdpa" and attention.needs_mask(arch, kind, length)
        kernel = "eager" if spec.attn == "eager" else attention.sdpa_kernel(arch, layout, s, masked)

        def update(key: int | None, value: int | None, i: int = index, k: str = kind) -> None:
            caches.update(i, k)
            tr.drop(key, value)  # copied into the cache

        output, _ = layer_replay.traced_layer(tr, arch, layout, spec, index, kernel, masked, arch.qk_norm, True,
                                              layer_input, layer_replay.DecodingLayer(length, update))
        if layer_input is not held[0]:
            tr.drop(layer_input)
        layer_input = output
    tr.at(f"decode step {step}", "final norm")
    final = layer_replay.layer_norm(layout)(tr, hidden, b, s)
    tr.drop(layer_input, *held)
    tr.at(op="lm_head (logits)")
    logits = last_token_logits(tr, layout, b * (arch.vocab_size if arch.computes_logits else 0) * s)
    tr.drop(final)
    return logits


def _dequantized_projections(tr: Tracer, arch: Architecture, b: int, s: int) -> list[int | None]:
    """q, k and v of a 4-bit layer's decode step, before its cache update (the H200 trace of
    Llama-3.1-8B nf4 at batch 372: every projection dequantizes its whole weight, every step)."""
    h, d = arch.hidden_size, arch.head_dim
    shapes = ((arch.num_heads, "q_proj"), (arch.num_kv_heads, "k_proj"), (arch.num_kv_heads, "v_proj"))
    return [mlp_layers.projection(tr, b, heads * d, h, s, name, dequantized=True) for heads, name in shapes]


def _dequantized_mlp(tr: Tracer, arch: Architecture, b: int, s: int, projections: list[int | None]) -> None:
    """The rest of the 4-bit decode step's layer: o_proj (q, k and v go), then the MLP with its
    projections dequantized: the gated MLP's three, or fc1, the activation, fc2 (Phi-2).
    bitsandbytes 0.50 runs some decode shapes through its own gemm_4bit kernel instead, without
    the dequantized weight (_gemm_4bit_use_custom_cuda: on the H200 Phi-2's fc1 at batch 8);
    that per-GPU choice is not modelled: every projection dequantizes here."""
    h, inter = arch.hidden_size, arch.intermediate_size
    attended = mlp_layers.projection(tr, b, h, arch.num_heads * arch.head_dim, s, "o_proj", dequantized=True)
    tr.drop(*projections)
    if arch.gated_mlp:
        tr.drop(mlp_layers.gated_mlp(tr, b, inter, h, s, dequantized=True), attended)
        return
    up = mlp_layers.projection(tr, b, inter, h, s, "mlp.fc1", dequantized=True)
    act = tr.new(b * inter * s, "mlp activation")
    tr.drop(up)
    down = mlp_layers.projection(tr, b, h, inter, s, "mlp.fc2", dequantized=True)
    tr.drop(act, down, attended)


def generate_steps(tr: Tracer, b: int, n: int, vocab: int, new_tokens: int, layers: int, logits: int | None,
                   unfinished: int | None, forward, position_ids: bool, inputs_hold_mask: bool) -> None:
    """generate()'s sampling loop after the prompt's forward, for the models replayed whole
    (mamba2_layers, qwen3_next_layers): per new token _update_model_kwargs_for_generation (with
    `position_ids`, the next positions and their cat; the attention_mask's new_ones and cat), the
    fp32 copy of the logits, the next tokens, input_ids' cat, the stopping criteria's flags and
    unfinished_sequences, each replacing the previous step's; the logits go (del outputs); then
    prepare_inputs_for_generation's copies and `forward(step)`, the next decode forward, which
    returns its logits. With `inputs_hold_mask` the model inputs keep the previous mask until the
    next ones exist (Qwen3-Next's H200 trace; Mamba's inputs drop it). The prompt's own ids, mask
    and position ids stay referenced by the caller. Frees what it made, `unfinished` included."""
    mask = positions = copy = tokens = ids = None
    inputs: list[int | None] = []
    steps = replayed_steps(tr.at_capacity, new_tokens - 1, layers) + 1
    for step in range(1, steps + 1):
        tr.at(f"decode step {step}", "generate() bookkeeping")
        length = b * (n + step) * 8
        fresh_positions = None
        if position_ids:
            tr.drop(tr.new(8, "arange"), tr.new(b * 8, "position_ids[..., -1:] + 1"))
            fresh_positions = tr.new(length, "position_ids (torch.cat)")
        ones = tr.new(b * 8, "attention_mask new_ones")
        fresh_mask = tr.new(length, "attention_mask (torch.cat)")
        tr.drop(ones, positions, None if inputs_hold_mask else mask)
        positions = fresh_positions
        if not inputs_hold_mask:
            mask = fresh_mask
        fresh = tr.new(b * vocab * 4, "next-token logits (fp32 copy)")
        tr.drop(copy)
        copy = fresh
        fresh = tr.new(b * 8, "next tokens")
        tr.drop(tokens)
        tokens = fresh
        fresh = tr.new(length, "input_ids (torch.cat)")
        tr.drop(ids)
        ids = fresh
        done, criterion, is_done = tr.new(b, "is_done"), tr.new(b, "max_length"), tr.new(b, "is_done |")
        tr.drop(criterion, done)
        inverse = tr.new(b, "~is_done")
        tr.drop(is_done)
        fresh = tr.new(b * 8, "unfinished_sequences & ~is_done")
        tr.drop(inverse, unfinished)
        unfinished = fresh
        tr.drop(tr.new(8, "unfinished.max()"), tr.new(1, "== 0"))
        tr.drop(logits)  # del outputs
        logits = None
        if step < steps:
            fresh_inputs = [tr.new(b * 8, "input_ids (prepare_inputs_for_generation)")]
            if position_ids:
                fresh_inputs.append(tr.new(b * 8, "position_ids (prepare_inputs_for_generation)"))
            tr.drop(*inputs)
            inputs = fresh_inputs
        if inputs_hold_mask:
            tr.drop(mask)
            mask = fresh_mask
        if step == steps:
            break
        tr.decode_step()
        logits = forward(step)
    tr.drop(mask, positions, copy, tokens, ids, unfinished, *inputs)
