"""Loading the data vramplan ships in `vramplan.profiles`: precisions, GPUs, runtime constants.

Each YAML file is read with importlib.resources and validated by pydantic when first asked
for; a broken file is a `CatalogError` that names it, not a traceback from deep in the math.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from .base import Frozen
from .errors import CatalogError, SourceError, WorkloadError
from .quantized import QuantScheme
from .source import read_regular_file

DType = Literal["fp32", "fp16", "bf16"]
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2}


class Precision(Frozen):
    name: str
    kind: Literal["dtype", "bnb_int8", "bnb_4bit", "prequantized"]
    description: str
    dtype: DType | None = None  # for kind=dtype: every tensor and activation
    weight_bits: int | None = None
    block_size: int | None = None
    scheme: QuantScheme | None = None  # kind=prequantized: the checkpoint's layout


class PrecisionCatalog(Frozen):
    precisions: dict[str, Precision]
    double_quant_block_size: int


class Constant(Frozen):
    value: int
    why: str
    provenance: str


class OutsideTorch(Frozen):
    bytes: int
    samples: int
    low: int
    high: int


class Calibration(Frozen):
    """Constants fitted from the committed measurements by scripts/calibrate.py."""

    fitted_from: list[str]
    measured_with: MeasuredWith
    outside_torch: dict[str, OutsideTorch]  # by GPU key; "default" for GPUs never measured
    bitsandbytes_outside_torch_bytes: int  # bitsandbytes' CUDA library, loaded with it
    outside_torch_growth_bytes: int  # outside-torch memory added after start-up by the first run
    bnb_load_transient: dict[str, float]  # int8 / 4bit: load peak above the model / largest Linear's bf16 bytes
    # by attention kernel (attention.decode_kernel): what memory outside torch grows by per decode step
    decode_outside_torch_per_step: dict[str, OutsideTorch] = Field(default_factory=dict)


class PointCounts(Frozen):
    hidden: int
    intermediate: int = 0
    query: int = 0
    fused_qkv: bool = False
    latent_kv: bool = False  # latent attention: kv_b_proj's per-head keys+values and the assembled keys
    partial_rotary_copies: int = 0
    fp32_query_key: bool = False


class EagerScores(Frozen):
    """B x heads x N x N tensors alive at once in the family's eager attention."""

    dtype_copies: int  # in the activation dtype
    fp32_copies: int  # fp32 whatever the activation dtype
    upcast_copies: int = 0  # fp32 copies of dtype tensors: absent when the dtype is fp32
    weights_held: Literal["layer", "next_layer"] = "layer"  # how long the returned weights live


class ExpertsLayout(Frozen):
    """How a family's mixture-of-experts block runs (transformers 5.17 integrations/moe.py)."""

    gate_copies: int = 2  # routed-tokens x intermediate tensors its _apply_gate holds beside gate/up
    # gpt-oss's own _apply_gate: clamped gate and up, gate * sigmoid(alpha * gate), (up + 1) * glu
    clamped_glu: bool = False


class FamilyLayout(Frozen):
    """Which activations transformers keeps alive at each candidate peak, for one family."""

    applies_to: list[str]
    provenance: str
    mlp_point: PointCounts
    attention_point: PointCounts
    eager_scores: EagerScores
    rope_tables: int
    rope_fp32: bool = False
    forward_logit_copies: int = 1
    sdpa_kernel: Literal["dispatch", "math"] = "dispatch"
    repeats_kv: bool = True  # False: K/V broadcast in the matmul (falcon's multi-query)
    experts: ExpertsLayout | None = None  # mixture-of-experts families
    # request order of the traced layer replay (runtimes/transformers/layer_replay.py)
    # gemma: x.float() normed, * (1 + weight) in fp32, cast; olmo2: (weight * x) in fp32, then cast
    norm_order: Literal["llama", "gemma", "olmo2"] = "llama"
    sandwich_norms: bool = False  # norms on the attention and MLP outputs before each residual add
    scaled_embeddings: bool = False  # inputs_embeds * sqrt(hidden_size): a second hidden-sized tensor
    logit_softcapping: bool = False  # logits / cap, tanh, * cap after the lm_head
    # q_norm and k_norm once q, k and v are all projected (Gemma-3), not each after its own (Qwen3)
    qk_norm_after_projections: bool = False
    rotary_per_layer_type: bool = False  # one cos/sin pair per attention kind (Gemma-3's local and global)
    # create_causal_mask runs before the learned position embeddings are added (OPT, GPT-BigCode; GPT-2 after)
    mask_before_positions: bool = False
    materialized_mask: bool = False  # the family builds its causal mask for SDPA even when none is needed (Falcon)
    bool_causal_mask: bool = False  # the eager mask cast back to booleans and held so (MPT's masked_fill)
    rope_half: bool = False  # cos and sin of the frequencies alone, rotary_dim / 2 wide (gpt-oss: emb = freqs)
    complex_rotary: bool = False  # one complex64 rotary table (torch.polar), not cos and sin (DeepSeek-V2)


class MeasuredWith(Frozen):
    gpu: str
    driver: str
    cuda: str
    torch: str
    transformers: str
    bitsandbytes: str


class RuntimeProfile(Frozen):
    measured_with: MeasuredWith
    constants: dict[str, Constant]
    families: dict[str, FamilyLayout]
    serving: dict[str, Constant]

    def serving_constant(self, name: str) -> int:
        return self.serving[name].value

    def constant(self, name: str) -> int:
        return self.constants[name].value


class Gpu(Frozen):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
    aliases: list[str] = Field(default_factory=list, max_length=32)
    vendor: Literal["nvidia", "amd"]
    memory_bytes: int = Field(gt=0, le=1 << 44)  # at most 16 TiB per GPU
    memory_source: str = Field(max_length=500)
    bandwidth_gbps: float = Field(gt=0, le=1e6, allow_inf_nan=False)
    bf16: bool
    fp8: bool
    int8: bool
    # NVIDIA's CUDA compute capability ("9.0"); none for other vendors or when unknown
    compute_capability: str | None = Field(None, pattern=r"^\d{1,2}\.\d$")
    gpus_per_node: int = Field(ge=1, le=1024)
    interconnect: str = Field(max_length=200)
    outside_torch_key: str = "default"  # calibration.yaml's outside_torch entry; "default": no rows
    price_per_hour_usd: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)
    price_source: str | None = Field(None, max_length=500)
    price_date: str | None = Field(None, max_length=40)

    @property
    def prefers_cudnn_attention(self) -> bool:
        """torch 2.11 tries cuDNN's attention before flash on compute capability 9.0 and 10.0
        (sdp_utils.cpp check_prefer_cudnn_attention: major 9 or 10, minor 0)."""
        return self.vendor == "nvidia" and self.compute_capability in ("9.0", "10.0")

    @property
    def measured(self) -> bool:
        """Whether committed rows measured this GPU (its memory outside torch is fitted, not assumed)."""
        return self.outside_torch_key != "default" and self.outside_torch_key in calibration().outside_torch


class GpuCatalog(Frozen):
    gpus: list[Gpu]

    def find(self, name: str) -> Gpu:
        key = _gpu_key(name) if name.isprintable() and len(name) <= 200 else ""
        for gpu in self.gpus:
            if key and (key == _gpu_key(gpu.name) or key in {_gpu_key(a) for a in gpu.aliases}):
                return gpu
        known = ", ".join(g.name for g in self.gpus)
        shown = repr(name[:60]) + (f"... ({len(name)} characters)" if len(name) > 60 else "")
        raise CatalogError(f"Unknown GPU {shown}; known: {known} (or pass --gpu-catalog FILE).")


def _gpu_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


CATALOG_LIMIT = 4 * 2**20  # a user's GPU catalog: no real one is near this
MAX_USER_GPUS = 1000


def _read_yaml(name: str, path: Path | None = None) -> dict:
    try:
        if path is not None:
            raw = read_regular_file(path, CATALOG_LIMIT, "GPU catalog")
            text = raw.decode("utf-8")
        else:
            text = (resources.files("vramplan.profiles") / name).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except SourceError as exc:
        raise CatalogError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path or name} is not UTF-8 text (invalid byte at offset {exc.start}).") from None
    except RecursionError:
        raise CatalogError(f"{path or name} nests deeper than any GPU catalog.") from None
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CatalogError(f"Cannot read {path or name}: {first.rstrip('.:')}.") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{path or name} must hold a YAML mapping.")
    return data


def _validate(model: type[Frozen], data: dict, where: str):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise CatalogError(f"{where} is invalid at {field}: {first['msg']}.") from None
    except RecursionError:
        raise CatalogError(f"{where} nests deeper than any profile.") from None


@lru_cache(maxsize=1)
def precisions() -> PrecisionCatalog:
    data = _read_yaml("precisions.yaml")
    entries = {name: {"name": name, **body} for name, body in (data.get("precisions") or {}).items()}
    return _validate(PrecisionCatalog, {**data, "precisions": entries}, "precisions.yaml")


@lru_cache(maxsize=1)
def runtime_profile() -> RuntimeProfile:
    return _validate(RuntimeProfile, _read_yaml("runtimes.yaml"), "runtimes.yaml")


@lru_cache(maxsize=1)
def calibration() -> Calibration:
    return _validate(Calibration, _read_yaml("calibration.yaml"), "calibration.yaml")


@lru_cache(maxsize=4)
def gpu_catalog(extra: Path | None = None) -> GpuCatalog:
    built_in = _validate(GpuCatalog, {"gpus": list(_read_yaml("gpus.yaml").get("gpus") or [])}, "gpus.yaml")
    if extra is None:
        return built_in
    return GpuCatalog(gpus=[*built_in.gpus, *_user_gpus(extra, built_in)])


def _user_gpus(path: Path, built_in: GpuCatalog) -> list[Gpu]:
    """A user's extra GPUs, each validated; a name (or alias) of a built-in GPU is refused, not
    silently replaced: the built-in entries carry the sources their numbers came from."""
    more = _read_yaml(path.name, path).get("gpus")
    where = f"GPU catalog {path}"
    if not isinstance(more, list) or not more:
        raise CatalogError(f"{where} must hold a non-empty list under `gpus:`.")
    if len(more) > MAX_USER_GPUS:
        raise CatalogError(f"{where} lists {len(more)} GPUs; at most {MAX_USER_GPUS} are read.")
    taken = {_gpu_key(k): g.name for g in built_in.gpus for k in (g.name, *g.aliases)}
    keys = {g.outside_torch_key for g in built_in.gpus}
    gpus: list[Gpu] = []
    for i, entry in enumerate(more):
        if not isinstance(entry, dict):
            raise CatalogError(f"{where} is invalid at gpus.{i}: each GPU must be a mapping.")
        gpu = _validate(Gpu, entry, f"{where}, gpus.{i}")
        for label in (gpu.name, *gpu.aliases):
            key = _gpu_key(label)
            if not key:
                raise CatalogError(f"{where} is invalid at gpus.{i}: the name or alias {label!r} has no letter "
                                   "or digit.")
            if key in taken:
                raise CatalogError(f"{where} is invalid at gpus.{i}.name: {label!r} is already the GPU "
                                   f"{taken[key]!r}; built-in GPUs cannot be replaced, give yours another name.")
            taken[key] = gpu.name
        if gpu.outside_torch_key not in keys:
            raise CatalogError(f"{where} is invalid at gpus.{i}.outside_torch_key: {gpu.outside_torch_key!r} is "
                               f"not one of {', '.join(sorted(keys))}.")
        gpus.append(gpu)
    return gpus


def precision(name: str) -> Precision:
    catalog = precisions()
    if name not in catalog.precisions:
        known = ", ".join(catalog.precisions)
        raise WorkloadError(f"Unknown precision {name!r}; choose one of: {known}.")
    return catalog.precisions[name]
