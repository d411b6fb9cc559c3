"""The MLP side of a decoder layer as a request sequence, in the order transformers 5.17 allocates
and frees: a linear layer (dequantized under bitsandbytes 4-bit), the gated MLP, and the
mixture-of-experts block (`moe_block`: the shared expert, the router of routers.py, the experts
through grouped_mm in a prefill or batched_mm in a decode step; experts.py describes the kernels).
"""

from __future__ import annotations

from typing import Any

from ...catalog import FamilyLayout
from ...model.spec import Architecture
from .routers import router

Tracer = Any  # tracer.Tracer: new(), drop(), temp(), at(), matmul()


def projection(tr: Tracer, rows: int, out_features: int, in_features: int, s: int, name: str,
               dequantized: bool = False) -> int | None:
    """A linear layer's output; under bitsandbytes 4-bit (`dequantized`) the weight is first
    dequantized to the compute dtype (bitsandbytes 0.50 _dequant_linear_fallback) and goes once
    the output exists, in the prefill as in every decode step."""
    weight = tr.new(out_features * in_features * s, f"{name} (dequantized weight)") if dequantized else None
    out = tr.new(rows * out_features * s, name)
    tr.drop(weight)
    return out


def gated_mlp(tr: Tracer, tokens: int, width: int, hidden: int, s: int, dequantized: bool = False) -> int | None:
    """down(act(gate(x)) * up(x)), each input going once the next op has read it: returns the output."""
    gate = projection(tr, tokens, width, hidden, s, "mlp.gate_proj", dequantized)
    act = tr.new(tokens * width * s, "mlp.act_fn")
    tr.drop(gate)
    up = projection(tr, tokens, width, hidden, s, "mlp.up_proj", dequantized)
    product = tr.new(tokens * width * s, "mlp act * up")
    tr.drop(act, up)
    out = projection(tr, tokens, hidden, width, s, "mlp.down_proj", dequantized)
    tr.drop(product)
    return out


def apply_gate(tr: Tracer, nbytes: int, copies: int, clamped_glu: bool) -> int | None:
    """The experts' activation over the routed rows' gate and up halves; returns its output.
    gpt-oss (H200 trace of gpt-oss-20b): gate.clamp and up.clamp, gate * alpha and its sigmoid
    (the product goes), glu = gate * sigmoid (the sigmoid goes), up + 1 and (up + 1) * glu (the sum
    goes), then the clamps and glu as the function returns. The others: act(gate) and the
    product, beside the copies their layout names."""
    if clamped_glu:
        gate, up = tr.new(nbytes, "gate.clamp"), tr.new(nbytes, "up.clamp")
        scaled = tr.new(nbytes, "gate * alpha")
        sigmoid = tr.new(nbytes, "sigmoid(gate * alpha)")
        tr.drop(scaled)
        glu = tr.new(nbytes, "gate * sigmoid")
        tr.drop(sigmoid)
        shifted = tr.new(nbytes, "up + 1")
        out = tr.new(nbytes, "(up + 1) * glu")
        tr.drop(shifted, gate, up, glu)
        return out
    temps = [tr.new(nbytes) for _ in range(max(copies - 1, 0))]
    out = tr.new(nbytes)
    tr.drop(*temps)
    return out


INT32_MAX = 2**31 - 1
ONESWEEP_TILE_ITEMS = 4608  # cub's onesweep tile for 64-bit keys on the H200 (fitted below)
CUB_ALIGN = 256


def radix_sort_scratch(pairs: int) -> int:
    """cub::DeviceRadixSort::SortPairs' temporary storage for int64 keys and values, all 64 bits
    sorted (torch.sort of the routed expert ids): the onesweep layout of DispatchRadixSort, each
    piece aligned to 256 bytes plus 255 for the base: the bins (8 passes x 256 digits, int64), the
    look-back counters (256 uint32 per tile of ONESWEEP_TILE_ITEMS), the alternate keys and values,
    the pass counters. Holds to the byte on the H200 traces of Qwen3-MoE (5.9M and 6.0M pairs),
    Qwen1.5-MoE (4.75M, 4.8M) and Qwen3-Next (4.3M), which fix the tile size."""
    def aligned(nbytes: int) -> int:
        return -(-nbytes // CUB_ALIGN) * CUB_ALIGN

    passes, digits, offset = 8, 256, 8
    tiles = -(-pairs // ONESWEEP_TILE_ITEMS)
    pieces = (passes * digits * offset, tiles * digits * 4, pairs * 8, pairs * 8, passes * offset)
    return sum(aligned(piece) for piece in pieces) + CUB_ALIGN - 1


def moe_block(tr: Tracer, arch: Architecture, layout: FamilyLayout, tokens: int, s: int,
               grouped: bool, upcast_softmax: bool) -> int:
    """One sparse MLP in the order transformers runs it (experts.py describes the kernels);
    returns its output (tokens x hidden)."""
    moe, experts = arch.moe, layout.experts
    assert moe is not None and experts is not None
    h, i, k = arch.hidden_size, moe.expert_intermediate, moe.top_k
    shared_first = None
    if moe.shared_first and moe.shared_intermediate:
        shared_first = gated_mlp(tr, tokens, moe.shared_intermediate, h, s)
    kept = router(tr, arch, tokens, s, upcast_softmax)
    if moe.all_experts:
        e = moe.num_experts
        routed_in = tr.new(e * tokens * h * s)
        scaled = tr.new(e * tokens * h * s)
        tr.drop(routed_in)
        gate_up = tr.new(e * tokens * 2 * i * s)
        act = tr.new(e * tokens * i * s)
        product = tr.new(e * tokens * i * s)
        tr.drop(act)
        routed_out = tr.new(e * tokens * h * s)
        tr.drop(product, gate_up, scaled)
    else:
        routed = tokens * k
        r = 4 if moe.routing_fp32 else s
        bias = moe.expert_bias
        if grouped:
            order = [tr.new(routed * 8), tr.new(routed * 8)]  # sorted ids, permutation
            # torch.sort's pairs: the input indices, then cub's scratch (its alternate key and value
            # buffers and the onesweep radix sort's counters)
            tr.drop(tr.new(routed * 8), tr.new(radix_sort_scratch(routed)))
            token_index = tr.new(routed * 8)  # perm // top_k, gone once the rows are gathered
            rows = tr.new(routed * h * s)
            tr.drop(token_index)
            # sorted weights, histc's int32 copy of the ids (a local to the end), sentinel mask
            order += [tr.new(routed * r), tr.new(routed * 4), tr.new(routed)]
            up_bias = tr.new(routed * 2 * i * s) if bias else None
            up = tr.new(routed * 2 * i * s)
            masked = tr.new(routed * 2 * i * s)
            tr.drop(up)
        else:  # batched_mm: each routed token gets a copy of its expert's weights
            rows = tr.new(routed * h * s)  # repeat_interleave, then the clamped ids (out of place)
            order = [tr.new(routed * 8)]
            gathered_up = tr.new(routed * 2 * i * h * s)
            up_bias = tr.new(routed * 2 * i * s) if bias else None
            masked = tr.new(routed * 2 * i * s)
        gated = apply_gate(tr, routed * i * s, experts.gate_copies, experts.clamped_glu)
        tr.drop(masked)
        if not grouped:
            gathered_down = tr.new(routed * h * i * s)
            tr.drop(gathered_up)
        down_bias = tr.new(routed * h * s) if bias else None
        tr.drop(up_bias)
        down = tr.new(routed * h * s)
        tr.drop(gated)
        if not grouped:  # the gathered weights stay a local to the end (H200 trace of Qwen3-Next)
            order.append(gathered_down)
        if grouped:
            masked_down = tr.new(routed * h * s)
            tr.drop(down)
            down = masked_down
        weighted = tr.new(routed * h * r)
        if grouped:
            order.append(tr.new(routed * 8))  # inverse permutation
            tr.temp(routed * 8)
            reordered = tr.new(routed * h * r)
            tr.drop(weighted)
            weighted = reordered
        routed_out = tr.new(tokens * h * r)
        if r < 4 and routed * h * r > INT32_MAX:
            # a half-precision sum over the top-k whose input passes 32-bit byte offsets: the reduction
            # is split and accumulates in an fp32 buffer (the prefills of the H200 traces; not their
            # decode steps)
            tr.temp(tokens * h * 4)
        if r != s:  # the fp32 sum's cast back is the function's return value: before its locals go
            summed = routed_out
            routed_out = tr.new(tokens * h * s)
            tr.drop(summed)
        tr.drop(weighted, down, rows, down_bias, *order)
    out = routed_out
    if moe.shared_intermediate and not moe.shared_first:
        shared = gated_mlp(tr, tokens, moe.shared_intermediate, h, s)
        out = tr.new(tokens * h * s)  # routed + shared
        tr.drop(shared, routed_out)
    if shared_first is not None:
        scaled_shared = tr.new(tokens * h * s)  # sigmoid(shared_expert_gate(x)) * shared
        tr.drop(shared_first)
        out = tr.new(tokens * h * s)
        tr.drop(scaled_shared, routed_out)
    tr.drop(*kept)
    return out
