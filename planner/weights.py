"""Architecture + precision -> the exact bytes the loaded weights occupy on the GPU.

Every parameter of the inventory is one allocation (per layer), so bytes are computed per
tensor and rounded to the caching allocator's 512-byte blocks, the way memory_allocated()
counts them. bitsandbytes converts only the decoder's Linear weights; what it stores for each
one is listed in `_bnb_allocations` as bitsandbytes 0.50.2 allocates it.
"""

from __future__ import annotations

from .base import Frozen, block_bytes
from .catalog import DTYPE_BYTES, Precision, precision, precisions
from .errors import UnsupportedModelError
from .model.spec import Architecture, TensorSpec
from .quantized import QuantScheme
from .request import PrecisionChoice

BUFFER_BYTES = {"fp32": 4, "bool": 1, "int64": 8}


class WeightBreakdown(Frozen):
    precision: str
    parameters: int  # transformers' count of the unquantized model
    weight_bytes: int  # data bytes of every parameter as stored on the GPU
    quant_state_bytes: int  # bitsandbytes scales, absmax, codes
    buffer_bytes: int  # non-persistent buffers the model allocates
    rounding_bytes: int  # the allocator's 512-byte block rounding of all of the above
    largest_linear_elements: int  # what a 4-bit matmul dequantizes at most at once
    by_kind: dict[str, int]  # data bytes per tensor kind

    @property
    def allocated_bytes(self) -> int:
        return self.weight_bytes + self.quant_state_bytes + self.buffer_bytes + self.rounding_bytes


def compute_dtype(precision: Precision, requested: str) -> str:
    """The dtype of activations and of every tensor a scheme leaves unquantized."""
    return precision.dtype if precision.kind == "dtype" and precision.dtype else requested


def _converted(tensor: TensorSpec, precision: Precision) -> bool:
    if tensor.kind == "expert":
        return _fp8_experts(tensor, precision)
    if tensor.kind != "linear":
        return False
    if precision.kind in ("bnb_int8", "bnb_4bit"):
        return True
    return precision.kind == "prequantized" and precision.scheme is not None and \
        precision.scheme.converts(tensor.name.removesuffix(".weight"))


def _fp8_experts(tensor: TensorSpec, precision: Precision) -> bool:
    """transformers' fp8 integration swaps a family's fused experts for FP8Experts; no other
    scheme (bitsandbytes included: it converts nn.Linear only) quantizes 3-D expert weights."""
    scheme = precision.scheme
    field = tensor.name.rsplit(".", 1)[-1]
    return (precision.kind == "prequantized" and scheme is not None and scheme.method == "fp8"
            and field in ("gate_up_proj", "down_proj") and scheme.converts(tensor.name.rsplit(".", 1)[0]))


def _fp8_expert_allocations(tensor: TensorSpec, scheme: QuantScheme) -> tuple[list[int], list[int]]:
    """FP8Experts (integrations/finegrained_fp8.py): float8 weights [E, out, in] and fp32
    scale_inv [E, ceil(out/b0), ceil(in/b1)] (one per expert without blocks; the fused gate_up
    keeps at least two rows of scales), plus an fp32 activation scale per expert if static."""
    experts, first, second = tensor.shape
    out_features, in_features = (second, first) if tensor.transposed else (first, second)
    gate_up = tensor.name.endswith(".gate_up_proj")
    if scheme.block:
        rows, cols = -(-out_features // scheme.block[0]), -(-in_features // scheme.block[1])
    else:
        rows, cols = 1, 1
    rows = max(rows, 2) if gate_up else rows
    states = [experts * rows * cols * 4] + ([experts * 4] if scheme.static_activations else [])
    return [experts * out_features * in_features], states


def _stored_module_sizes(stored: dict[str, tuple[int, tuple[int, ...]]] | None, module: str) -> list[int]:
    """Exact bytes of each tensor a checkpoint stores for one module's weight and scales (not
    its bias); empty when the checkpoint's header is unknown or lacks the module."""
    if not stored:
        return []
    prefix = module + "."
    return [nbytes for name, (nbytes, _shape) in stored.items()
            if name.startswith(prefix) and not name.endswith(".bias")]


def _linear_allocations(tensor: TensorSpec, precision: Precision, double_quant: bool,
                        nested_block: int) -> tuple[list[int], list[int]]:
    """(weight allocations, scale/state allocations) of one converted Linear (or fp8 experts)."""
    if tensor.kind == "expert" and precision.scheme is not None:
        return _fp8_expert_allocations(tensor, precision.scheme)
    if precision.kind == "prequantized" and precision.scheme is not None:
        out_features = tensor.shape[1] if tensor.transposed else tensor.shape[0]
        in_features = tensor.shape[0] if tensor.transposed else tensor.shape[1]
        parts = precision.scheme.linear_allocations(out_features, in_features)
        return parts[:1], parts[1:]
    return _bnb_allocations(tensor, precision, double_quant, nested_block)


def _bnb_allocations(tensor: TensorSpec, precision: Precision, double_quant: bool,
                     nested_block: int) -> tuple[list[int], list[int]]:
    """(weight allocations, quantization-state allocations) of one converted Linear weight."""
    n = tensor.elements_each
    out_features = tensor.shape[1] if tensor.transposed else tensor.shape[0]
    if precision.kind == "bnb_int8":
        return [n], [out_features * 4]  # int8 weight; SCB: one fp32 scale per output row
    block = precision.block_size or 64
    blocks = -(-n // block)
    weight = [-(-n // 2)]  # two 4-bit values per byte
    code = 16 * 4  # the 16-entry fp32 lookup table each QuantState carries
    if not double_quant:
        return weight, [blocks * 4, code]
    nested = -(-blocks // nested_block)
    return weight, [blocks, nested * 4, 4, code]  # uint8 absmax, fp32 absmax of it, offset


def allocation_sizes(arch: Architecture, precision: Precision, compute: str,
                     double_quant: bool = False) -> list[int]:
    """Every allocation the loaded weights make, in the order the model is constructed
    (embeddings, then layer by layer, then the final norm and head), for the allocator
    simulation."""
    element = DTYPE_BYTES[compute]
    nested_block = precisions().double_quant_block_size

    def sizes(tensor: TensorSpec) -> list[int]:
        if _converted(tensor, precision):
            weights, states = _linear_allocations(tensor, precision, double_quant, nested_block)
            return [*weights, *states]
        return [tensor.elements_each * element]

    first = [t for t in arch.tensors if t.layers is None and t.kind in ("embedding", "position_embedding")]
    last = [t for t in arch.tensors if t.layers is None and t not in first]
    layered = [t for t in arch.tensors if t.layers is not None]
    out = [x for t in first for x in sizes(t)]
    # layer by layer; a tensor only in the layers it lists (MoE models mix dense and sparse MLPs)
    for index in sorted({i for t in layered for i in t.layers or ()}):
        out += [x for t in layered if index in (t.layers or ()) for x in sizes(t)]
    out += [x for t in last for x in sizes(t)]
    for buf in arch.buffers:
        out += [max(1, buf.elements_each * (BUFFER_BYTES.get(buf.dtype) or element))] * buf.count
    return out


def weight_breakdown(arch: Architecture, precision: Precision, compute: str, double_quant: bool = False,
                     stored: dict[str, tuple[int, tuple[int, ...]]] | None = None) -> WeightBreakdown:
    """`stored` (name -> (bytes, shape)) is the checkpoint's safetensors header when known: a
    pre-quantized Linear then takes its exact stored bytes instead of the layout formula."""
    element = DTYPE_BYTES[compute]
    nested_block = precisions().double_quant_block_size
    data = state = allocated = 0
    by_kind: dict[str, int] = {}
    largest = 0
    for tensor in arch.tensors:
        if _converted(tensor, precision):
            weights, states = _linear_allocations(tensor, precision, double_quant, nested_block)
            if tensor.kind == "linear":
                largest = max(largest, tensor.elements_each)
            exact = [_stored_module_sizes(stored, n.removesuffix(".weight")) for n in tensor.names()] \
                if precision.kind == "prequantized" and tensor.kind == "linear" else []
            if exact and all(exact):
                total = sum(sum(sizes) for sizes in exact)
                data += total
                allocated += sum(block_bytes(x) for sizes in exact for x in sizes)
                by_kind[tensor.kind] = by_kind.get(tensor.kind, 0) + total
                continue
        else:
            weights, states = [tensor.elements_each * element], []
        tensor_data = sum(weights) * tensor.count
        data += tensor_data
        state += sum(states) * tensor.count
        allocated += sum(block_bytes(x) for x in (*weights, *states)) * tensor.count
        by_kind[tensor.kind] = by_kind.get(tensor.kind, 0) + tensor_data
    if precision.kind == "bnb_4bit" and double_quant:
        state += 256 * 4  # one shared 256-entry fp32 map for the nested quantization
        allocated += block_bytes(256 * 4)
    buffers = buffer_alloc = 0
    for buf in arch.buffers:
        size = buf.elements_each * (BUFFER_BYTES.get(buf.dtype) or element)
        buffers += size * buf.count
        buffer_alloc += block_bytes(max(size, 1)) * buf.count
    return WeightBreakdown(
        precision=precision.name, parameters=arch.parameters, weight_bytes=data,
        quant_state_bytes=state, buffer_bytes=buffers,
        rounding_bytes=allocated + buffer_alloc - data - state - buffers,
        largest_linear_elements=largest, by_kind=by_kind,
    )


def resolve_precision(arch: Architecture, choice: PrecisionChoice) -> tuple[Precision, str, PrecisionChoice]:
    """The precision a run uses: an explicit one, or `auto`: the checkpoint's own quantization
    when its config has one, else its torch_dtype (bf16 when it has none)."""
    scheme = arch.quantization
    if choice.name == "auto" and scheme is not None:
        if scheme.method == "bitsandbytes":  # serialized bitsandbytes loads like the on-the-fly scheme
            chosen = precision(scheme.label)
            dq = choice.model_copy(update={"double_quant": scheme.double_quant})
            return chosen, compute_dtype(chosen, arch.config_dtype or choice.compute_dtype), dq
        if scheme.method == "mxfp4":
            return precision("bf16"), "bf16", choice
        if arch.moe is not None and scheme.method != "fp8":
            raise UnsupportedModelError(
                f"a {scheme.method} checkpoint of a mixture-of-experts model is not modelled: transformers 5.17 "
                "fuses the experts into 3-D parameters, which only its fp8 integration quantizes. Estimate "
                "the model at --precision bf16 for an upper bound.")
        pre = Precision(name=scheme.label, kind="prequantized", scheme=scheme,
                        description=f"pre-quantized checkpoint ({scheme.method})")
        return pre, arch.config_dtype or ("fp16" if scheme.method in ("gptq", "awq") else "bf16"), choice
    name = arch.config_dtype or "bf16" if choice.name == "auto" else choice.name
    chosen = precision(name)
    return chosen, compute_dtype(chosen, choice.compute_dtype), choice
