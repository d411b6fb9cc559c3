"""Runs that fail whatever the memory: kernels that index a tensor with 32-bit integers.

bitsandbytes' LLM.int8 (precision int8) runs every converted Linear as: the input cast to fp16
and quantized row by row (int8_vectorwise_quant: the kernel kInt8VectorQuant addresses element
`row_id * cols + i` as an int), an int8 matmul into int32, and that product dequantized to fp16
(dequant_mm_int32_fp16: `n = numRows * numCols` as an int). Read from bitsandbytes 0.50
(csrc/kernels.cu, csrc/ops.cu, backends/cuda/ops.py; the carried wheel is 0.50.2). So a forward
whose Linear input has more than 2^31 elements, or whose output has more than 2^31 - 1, fails:
the quantizer reads and writes at negative offsets (an illegal memory access), the dequantizer's
grid size goes negative (bitsandbytes prints the launch error and exits the process). Measured on
the H200: Qwen2.5-0.5B in int8 at batch 655 x 4096 tokens (q_proj's input 2.40e9 elements) stopped
with an illegal memory access where its memory would have held it (h200-edge.jsonl).

The prefill is the forward with the most tokens (batch x prompt, every one through every Linear);
a decode step's batch x 1 never comes near.
"""

from __future__ import annotations

from ...base import Frozen
from ...catalog import Precision
from ...model.spec import Architecture
from .activations import RunSpec

INPUT_ELEMENTS = 2**31  # kInt8VectorQuant: the last element's int offset, rows * cols - 1, stays below 2^31
OUTPUT_ELEMENTS = 2**31 - 1  # dequant_mm_int32_fp16: rows * cols itself is an int


class TokenLimit(Frozen):
    """The most tokens one forward can run, and the Linear that sets it."""

    tokens: int
    module: str  # model.layers.*.mlp.down_proj
    side: str  # input or output
    features: int

    def why(self, tokens: int | None = None) -> str:
        """What fails past the limit; with `tokens`, at that many."""
        elements = INPUT_ELEMENTS if self.side == "input" else OUTPUT_ELEMENTS
        where = f"{self.module}'s {self.side} ({self.features:,} features)"
        at = (f"at {tokens:,} tokens in one forward (batch x prompt) {where} has {tokens * self.features:,} elements"
              if tokens is not None else f"{where} passes {elements:,} elements beyond {self.tokens:,} tokens in one "
              "forward (batch x prompt)")
        return (f"bitsandbytes int8 indexes a Linear's input and output with 32-bit integers: {at}, and the run stops "
                "with an illegal memory access or a kernel launch error" + (f" (at most {self.tokens:,} tokens per "
                                                                            "forward)" if tokens is not None else ""))


def token_limit(arch: Architecture, precision: Precision) -> TokenLimit | None:
    """The most tokens a forward of `arch` at `precision` can run through its Linears (None: no
    such limit)."""
    if precision.kind != "bnb_int8":
        return None
    tightest: TokenLimit | None = None
    for tensor in arch.tensors:
        if tensor.kind != "linear" or len(tensor.shape) != 2:
            continue
        out_features, in_features = reversed(tensor.shape) if tensor.transposed else tensor.shape
        for side, features, elements in (("input", in_features, INPUT_ELEMENTS),
                                         ("output", out_features, OUTPUT_ELEMENTS)):
            module = tensor.name.removesuffix(".weight").replace("{i}", "*")
            limit = TokenLimit(tokens=elements // features, module=module, side=side, features=features)
            if tightest is None or limit.tokens < tightest.tokens:
                tightest = limit
    return tightest


def forward_tokens(spec: RunSpec) -> int:
    """The most tokens one forward of the run takes: the prefill's batch x prompt (with use_cache
    off, the last re-run's whole sequence)."""
    return spec.batch * spec.prompt_len


def passed_limit(arch: Architecture, precision: Precision, spec: RunSpec) -> str | None:
    """Why the run's largest forward fails whatever the memory, or None."""
    limit = token_limit(arch, precision)
    tokens = forward_tokens(spec)
    if limit is None or tokens <= limit.tokens:
        return None
    return limit.why(tokens)
