"""Pre-quantized checkpoints: `quantization_config` -> what each converted Linear stores.

Layouts follow the libraries that load them into transformers 5.17 (not measured here: no
quantized checkpoint could be fetched by the GPU machines):

* GPTQ (gptqmodel / AutoGPTQ QuantLinear): qweight int32 [in*bits/32, out], qzeros int32
  [ceil(in/g), out*bits/32], scales fp16 [ceil(in/g), out], g_idx int32 [in] (the act-order
  permutation, present in every GPTQ checkpoint);
* AWQ (WQLinear_GEMM): qweight int32 [in, out*bits/32], qzeros int32 [ceil(in/g), out*bits/32],
  scales fp16 [ceil(in/g), out];
* fp8 (transformers' FP8Linear): weight float8 [out, in] and weight_scale_inv fp32, one per
  tensor or [ceil(out/b0), ceil(in/b1)] blocks (DeepSeek-V3's 128 x 128), plus an fp32
  activation scale when activations are static;
* compressed-tensors: packed int weights (weight_packed int32 [out, in*bits/32]), or int8 /
  float8 weights, with scales (and zero points when asymmetric) per tensor, channel or group,
  and weight_shape;
* bitsandbytes-serialized: the on-the-fly int8 / nf4 / fp4 layouts (weights.py);
* mxfp4 (gpt-oss experts): 4-bit blocks of 32 values with one uint8 scale each; transformers
  dequantizes to bf16 unless the `kernels` package, Triton >= 3.4 and compute capability >= 7.5
  are present.
"""

from __future__ import annotations

from typing import Any, Literal

from .base import Frozen
from .config import RawConfig
from .errors import ConfigError, UnsupportedModelError

Method = Literal["gptq", "awq", "fp8", "compressed-tensors", "bitsandbytes", "mxfp4"]


class QuantScheme(Frozen):
    method: Method
    bits: int
    group_size: int | None = None  # elements per scale along the input features; None: per channel
    block: tuple[int, int] | None = None  # fp8 block-wise scales
    symmetric: bool = True
    static_activations: bool = False
    float_weights: bool = False  # compressed-tensors float8 weights
    packed: bool = True  # compressed-tensors: int weights packed into int32
    strategy: Literal["tensor", "channel", "group"] = "group"  # compressed-tensors scales
    scale_bytes: int = 2
    skip: tuple[str, ...] = ()  # module names (or their last component) left unquantized
    bnb_4bit_type: str | None = None  # bitsandbytes-serialized
    double_quant: bool = False

    @property
    def label(self) -> str:
        if self.method == "bitsandbytes":
            return "int8" if self.bits == 8 else (self.bnb_4bit_type or "nf4")
        extra = f"-g{self.group_size}" if self.group_size else ""
        if self.block:
            extra = f"-block{self.block[0]}x{self.block[1]}"
        return f"{self.method}-{self.bits}bit{extra}"

    def converts(self, module: str) -> bool:
        last = module.rsplit(".", 1)[-1]
        return not any(s in (module, last) or module.endswith("." + s) for s in self.skip)

    def linear_allocations(self, out_features: int, in_features: int) -> list[int]:
        """Bytes of each tensor one converted Linear stores, weight and scales, no bias."""
        n_out, n_in, b = out_features, in_features, self.bits
        groups = -(-n_in // self.group_size) if self.group_size else 1
        if self.method == "gptq":
            return [n_in * n_out * b // 8, groups * n_out * b // 8, groups * n_out * 2, n_in * 4]
        if self.method == "awq":
            return [n_in * n_out * b // 8, groups * n_out * b // 8, groups * n_out * 2]
        if self.method == "fp8":
            if self.block:
                scales = -(-n_out // self.block[0]) * -(-n_in // self.block[1]) * 4
            else:
                scales = 4
            return [n_out * n_in, scales] + ([4] if self.static_activations else [])
        if self.method == "compressed-tensors":
            packed = self.packed and not self.float_weights
            weight = n_out * n_in * b // 8 if packed else n_out * n_in * max(b // 8, 1)
            scale_count = {"group": n_out * groups, "channel": n_out, "tensor": 1}[self.strategy]
            out = [weight, scale_count * self.scale_bytes] + ([16] if packed else [])  # weight_shape: 2 x int64
            if not self.symmetric:
                out.append(scale_count * self.scale_bytes)
            return out
        raise ValueError(f"{self.method} layouts are computed elsewhere")


def scheme_from_config(raw: RawConfig) -> QuantScheme | None:
    """The checkpoint's quantization, or None for an unquantized config."""
    qc = raw.raw("quantization_config", default=None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"{raw.where}: quantization_config must be an object.")
    q = RawConfig(qc, f"{raw.where}.quantization_config")
    method = q.str("quant_method", default=None) or ("bitsandbytes" if q.has("load_in_4bit", "load_in_8bit") else None)
    skip = tuple(q.list("modules_to_not_convert", "ignore", default=None) or ())
    if not all(isinstance(s, str) for s in skip):
        raise ConfigError(f"{q.where}: modules_to_not_convert / ignore must be a list of module names.")
    if method == "gptq":
        bits = q.int("bits")
        group = q.int("group_size", default=128, minimum=-1)
        if group == 0:
            raise ConfigError(f"{q.where}: group_size must be -1 or at least 1, not 0.")
        return QuantScheme(method="gptq", bits=bits, group_size=None if group == -1 else group, skip=skip)
    if method == "awq":
        bits = q.int("bits", "w_bit", default=4)
        return QuantScheme(method="awq", bits=bits, group_size=q.int("group_size", "q_group_size", default=128),
                           symmetric=not q.bool("zero_point", default=True), skip=skip)
    if method == "fp8":
        block = q.list("weight_block_size", default=None)
        if block is not None and (len(block) != 2 or not all(isinstance(x, int) and x > 0 for x in block)):
            raise ConfigError(f"{q.where}: weight_block_size must be two positive integers.")
        return QuantScheme(method="fp8", bits=8, block=tuple(block) if block else None,
                           static_activations=q.str("activation_scheme", default="dynamic") == "static",
                           skip=skip)
    if method == "compressed-tensors":
        return _compressed_tensors(q, skip)
    if method == "bitsandbytes":
        if q.bool("load_in_8bit", default=False):
            return QuantScheme(method="bitsandbytes", bits=8, skip=skip)
        return QuantScheme(method="bitsandbytes", bits=4, bnb_4bit_type=q.str("bnb_4bit_quant_type", default="fp4"),
                           double_quant=q.bool("bnb_4bit_use_double_quant", default=False), skip=skip)
    if method == "mxfp4":
        return QuantScheme(method="mxfp4", bits=4, group_size=32, skip=skip)
    raise UnsupportedModelError(f"{q.where}: quant_method {method!r} is not modelled; known: gptq, awq, fp8, "
                                "compressed-tensors, bitsandbytes, mxfp4.")


def _compressed_tensors(q: RawConfig, skip: tuple[str, ...]) -> QuantScheme:
    groups: dict[str, Any] = q.raw("config_groups", default={}) or {}
    if not isinstance(groups, dict):
        raise ConfigError(f"{q.where}: config_groups must be an object.")
    weights = [g["weights"] for g in groups.values() if isinstance(g, dict) and isinstance(g.get("weights"), dict)]
    if len(weights) != 1:
        raise UnsupportedModelError(
            f"{q.where}: compressed-tensors with {len(weights)} weight schemes is not modelled.")
    w = RawConfig(weights[0], f"{q.where}.config_groups")
    strategy = w.str("strategy", default="tensor")
    if strategy not in ("tensor", "channel", "group"):
        raise UnsupportedModelError(f"{w.where}: compressed-tensors strategy {strategy!r} is not modelled.")
    float_weights = w.str("type", default="int") == "float"
    return QuantScheme(
        method="compressed-tensors", bits=w.int("num_bits"), float_weights=float_weights, strategy=strategy,
        group_size=w.int("group_size") if strategy == "group" else None,
        symmetric=w.bool("symmetric", default=True),
        packed=q.str("format", default="pack-quantized") == "pack-quantized",
        scale_bytes=4 if float_weights else 2, skip=skip,
    )
