"""Mixture-of-experts layers: what the experts allocate while they run.

transformers 5.17 (integrations/moe.py) runs the fused experts two ways. A forward, and the
prefill of generate(), use `grouped_mm`: the routed token copies are sorted by expert and
multiplied against all experts' weights at once. generate() switches to `batched_mm` for the
decode steps (generation/utils.py `_optimize_model_for_decode`), which *gathers a copy of each
selected expert's weights* per routed token: B x top_k x (2I x H + H x I) elements on every MoE
layer of every step, e.g. 0.66 GiB for Mixtral-8x7B at batch 1 and 5.3 GiB at batch 8
(measured: h100-families.jsonl). Llama-4 runs its own loop-free code instead: every expert on
every token, routing by zeroing the inputs (modeling_llama4.Llama4TextMoe).

Each function returns the tensors alive at the moment named, as (name, bytes, why) terms; the
sizes are counted from the source above and checked against the measured live sets of
Mixtral, Qwen1.5-MoE, Qwen3-30B-A3B, DeepSeek-V2-Lite, Llama-4-Scout and gpt-oss-20b.
"""

from __future__ import annotations

from ...base import block_bytes
from ...catalog import ExpertsLayout
from ...model.spec import Architecture, MoeSpec

Terms = list[tuple[str, int, str]]


def _routing_bytes(moe: MoeSpec, activation_bytes: int) -> int:
    return 4 if moe.routing_fp32 else activation_bytes


def router_outputs(arch: Architecture, tokens: int, s: int) -> int:
    """What the block keeps from its router while the experts run: the logits (returned and
    bound to a name), the top-k weights and indices (Llama-4: logits and dense scores)."""
    moe = arch.moe
    assert moe is not None
    logit_bytes = 4 if moe.router_fp32 else s
    if moe.all_experts:
        return 2 * block_bytes(tokens * moe.num_experts * s)
    return (block_bytes(tokens * moe.num_experts * logit_bytes)
            + block_bytes(tokens * moe.top_k * _routing_bytes(moe, s)) + block_bytes(tokens * moe.top_k * 8))


def prefill_terms(arch: Architecture, layout: ExpertsLayout, tokens: int, s: int) -> Terms:
    """The experts' own tensors at their highest moment in a prefill (or forward) of `tokens`."""
    moe = arch.moe
    assert moe is not None
    if moe.all_experts:
        return _all_experts_terms(arch, tokens, s)
    return _grouped_terms(arch, layout, tokens, s)


def _grouped_terms(arch: Architecture, layout: ExpertsLayout, tokens: int, s: int) -> Terms:
    moe = arch.moe
    assert moe is not None
    h, i = arch.hidden_size, moe.expert_intermediate
    routed = tokens * moe.top_k  # S: one row per (token, selected expert)
    r = _routing_bytes(moe, s)
    row_h, row_i = block_bytes(routed * h * s), block_bytes(routed * i * s)
    row_2i = block_bytes(routed * 2 * i * s)
    up_bias = row_2i if moe.expert_bias else 0
    down_bias = row_h if moe.expert_bias else 0
    # gate_up output and its masked copy, or the masked copy and _apply_gate's temporaries
    up_phase = max(2 * row_2i, row_2i + layout.gate_copies * row_i) + up_bias
    down_phase = max(row_i + row_h, 2 * row_h) + down_bias
    # masked down output, routing-weighted rows, the same reordered (in fp32 when the weights are)
    tail_phase = row_h + 2 * block_bytes(routed * h * r) + block_bytes(routed * 8) + down_bias
    sorted_rows = (2 * block_bytes(routed * 8) + block_bytes(routed * r) + block_bytes(routed))
    return [
        ("routed token copies", row_h, "hidden states gathered once per selected expert, sorted by expert"),
        ("expert intermediates", max(up_phase, down_phase, tail_phase),
         "grouped_mm outputs and their masked/weighted copies at the experts' highest moment"),
        ("routing order", sorted_rows, "the sort permutation, sorted expert ids and weights"),
    ]


def _all_experts_terms(arch: Architecture, tokens: int, s: int) -> Terms:
    moe = arch.moe
    assert moe is not None
    e, h, i = moe.num_experts, arch.hidden_size, moe.expert_intermediate
    rows_h = block_bytes(e * tokens * h * s)
    rows_i = block_bytes(e * tokens * i * s)
    rows_2i = block_bytes(e * tokens * 2 * i * s)
    # routed_in * scores (both alive); then gate_up, act(gate), up * act(gate); then the down bmm
    peak = max(2 * rows_h, rows_h + rows_2i + 2 * rows_i, 2 * rows_h + rows_2i + rows_i)
    return [("all-expert rows", peak,
             f"every token repeated for all {e} experts: routed input, gate/up, act(gate) and product")]


def shared_phase_terms(arch: Architecture, tokens: int, s: int) -> Terms:
    """A shared expert that runs after the routed ones (DeepSeek, Llama-4): the routed output
    plus the shared MLP's act(gate), up and product."""
    moe = arch.moe
    assert moe is not None
    if not moe.shared_intermediate or moe.shared_first:
        return []
    routed_out = block_bytes(tokens * arch.hidden_size * s)
    if moe.all_experts:
        routed_out = block_bytes(moe.num_experts * tokens * arch.hidden_size * s)
    return [("routed expert output", routed_out, "the experts' result, kept while the shared expert runs"),
            ("shared expert intermediates", 3 * block_bytes(tokens * moe.shared_intermediate * s),
             "act(gate), up and their product in the shared expert")]


def shared_output(arch: Architecture, tokens: int, s: int) -> int:
    """Qwen2-MoE computes its shared expert first and keeps the output through the experts."""
    moe = arch.moe
    assert moe is not None
    return block_bytes(tokens * arch.hidden_size * s) if moe.shared_first and moe.shared_intermediate else 0


def decode_transient(arch: Architecture, batch: int, s: int) -> int:
    """One MoE layer of a decode step. batched_mm gathers the selected experts' weights: at the
    down-projection gather the gate_up copies (and the routed inputs, the gated rows) are
    still alive beside the down copies."""
    moe = arch.moe
    if moe is None:
        return 0
    if moe.all_experts:
        return _all_experts_terms(arch, batch, s)[0][1]
    h, i = arch.hidden_size, moe.expert_intermediate
    routed = batch * moe.top_k
    gathered = block_bytes(routed * 2 * i * h * s) + block_bytes(routed * h * i * s)
    rows = block_bytes(routed * h * s) + block_bytes(routed * i * s)
    biases = block_bytes(routed * 2 * i * s) + block_bytes(routed * h * s) if moe.expert_bias else 0
    return gathered + rows + biases
