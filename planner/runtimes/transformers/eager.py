"""Eager attention as a request sequence: transformers' eager_attention_forward, in the prefill
and in every decode step, for the traced llama-shaped layer and the coded layers alike."""

from __future__ import annotations

from typing import Any

from .activations import RunSpec

Tracer = Any  # tracer.Tracer: new(), drop(), temp(), at(), matmul()

def eager_attention(tr: Tracer, spec: RunSpec, heads: int, kv_heads: int, q_len: int, kv_len: int, d: int,
                    query_contiguous: bool) -> tuple[int | None, int | None]:
    """eager_attention_forward (transformers 5.17; GPT-BigCode's copy is the same), as the H200
    trace of SantaCoder at batch 32 shows it: repeat_kv copies K and V when there are several
    key/value heads, but one head repeats as a stride-0 view, which torch.matmul materializes
    for its bmm (and lets go after it), as it does a query that is not contiguous; q @ k^T, then
    * scaling and + mask, each replacing the one before; softmax in fp32 (the input's upcast,
    the output, the upcast goes), .to(dtype) (the fp32 softmax and the masked scores go);
    weights @ v (with V broadcast the same way) and transpose(1, 2).contiguous(); K and V's
    repeats go when the function returns. The decode steps run the same with one query. Returns the
    output and the softmax weights, which the caller holds as long as its code keeps them."""
    b, s = spec.batch, spec.activation_bytes
    q_bytes, scores = b * heads * q_len * d * s, b * heads * q_len * kv_len
    expanded = b * heads * kv_len * d * s
    repeats = [tr.new(expanded, "repeat_kv") for _ in range(2)] if 1 < kv_heads < heads else []
    # matmul folds batch and heads into bmm's one batch dimension: a view when the batch is one
    # (OctoCoder's trace at batch 1: no copies), a copy otherwise
    broadcast = kv_heads == 1 < heads and b > 1
    query_copy = None if query_contiguous or b == 1 else tr.new(q_bytes, "query copy for q @ k^T")
    key_copy = tr.new(expanded, "key broadcast for q @ k^T") if broadcast else None
    chain = tr.new(scores * s, "q @ k^T")
    tr.drop(key_copy, query_copy)
    for op in ("* scaling", "+ mask"):
        step = tr.new(scores * s, f"scores {op}")
        tr.drop(chain)
        chain = step
    weights = fp32_softmax(tr, scores, s, spec.softmax_upcasts)
    tr.drop(chain)
    value_copy = tr.new(expanded, "value broadcast for weights @ v") if broadcast else None
    raw = tr.new(q_bytes, "weights @ v")
    tr.drop(value_copy)
    out = raw
    if q_len > 1:  # one query token: the transposed output is contiguous already
        out = tr.new(q_bytes, "attention output (contiguous)")
        tr.drop(raw)
    tr.drop(*repeats)
    return out, weights


def fp32_softmax(tr: Tracer, scores: int, s: int, upcast_input: bool = True) -> int | None:
    """softmax in fp32, then .to(dtype): scores in the model dtype are upcast into a copy first
    (it goes once the softmax exists; `upcast_input` False for scores already fp32, and for fp16
    scores, which torch's fused half-to-float softmax reads as they are); the fp32
    softmax goes once cast, and in an fp32 run it is the weights. Returns the weights."""
    upcast = tr.new(scores * 4, "softmax upcast") if upcast_input and s < 4 else None
    soft = tr.new(scores * 4, "softmax")
    tr.drop(upcast)
    if s >= 4:
        return soft
    weights = tr.new(scores * s, "softmax .to(dtype)")
    tr.drop(soft)
    return weights
