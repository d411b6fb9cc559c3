"""config.json -> `Architecture`: the typed, normalized description of a model.

One small adapter per config family (registered by `model_type`) reads the config the way
transformers' own config class and modeling code would, and lists every parameter tensor
under transformers' own name. Naming tensors exactly is what lets the exactness test compare
our inventory with transformers' instantiation name by name, and what lets quantization
decide per tensor what it converts.

Mixture-of-experts families are listed the way transformers 5.17 holds them: every layer's
experts fused into two 3-D Parameters (gate_up_proj, down_proj), a router, and shared experts
where the family has them. Families we do not model yet (remote-code families, hybrid linear
attention, state-space layers) are refused with a message that says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

from pydantic import field_validator

from .base import Frozen
from .config import MAX_LAYERS, RawConfig
from .errors import ConfigError, UnsupportedModelError
from .quantized import QuantScheme, scheme_from_config

TensorKind = Literal[
    "embedding",  # token embedding table (never quantized by bitsandbytes)
    "position_embedding",  # learned absolute positions
    "linear",  # a Linear/Conv1D weight inside the decoder: what weight quantization converts
    "bias",  # a Linear's bias
    "norm",  # layer-norm / RMS-norm weights and biases
    "lm_head",  # output projection when not tied to the embedding
    "lm_head_bias",
    "expert",  # fused 3-D expert weights [experts, ...]: a Parameter, not an nn.Linear
    "router",  # a mixture-of-experts router's own Parameter (not an nn.Linear)
    "other",  # other parameters (attention sinks)
]
BufferDtype = Literal["fp32", "bool", "int64", "activation"]
LayerKind = Literal["full", "sliding", "chunked", "none"]  # none: no attention (a recurrent mixer)
DType = Literal["fp32", "fp16", "bf16"]
# the attention implementations transformers 5.17 offers most families
ALL_ATTENTION = ("sdpa", "eager", "flash_attention_2")

_TORCH_DTYPE_NAMES: dict[str, DType] = {
    "float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
}


class TensorSpec(Frozen):
    """One parameter, or the same parameter in several layers (`{i}` in the name)."""

    name: str
    shape: tuple[int, ...]
    kind: TensorKind
    layers: tuple[int, ...] | None = None  # None: a single tensor outside the layer stack
    # GPT-2's Conv1D stores [in, out] instead of nn.Linear's [out, in]; fused experts likewise
    # [E, in, out] instead of [E, out, in]
    transposed: bool = False

    @property
    def elements_each(self) -> int:
        return math.prod(self.shape)

    @property
    def count(self) -> int:
        return 1 if self.layers is None else len(self.layers)

    @property
    def elements(self) -> int:
        return self.elements_each * self.count

    def names(self) -> list[str]:
        if self.layers is None:
            return [self.name]
        return [self.name.replace("{i}", str(i)) for i in self.layers]


class BufferSpec(Frozen):
    """A non-persistent buffer the model allocates on the GPU (not in the checkpoint)."""

    name: str
    shape: tuple[int, ...]
    dtype: BufferDtype
    layers: tuple[int, ...] | None = None
    why: str

    @property
    def count(self) -> int:
        return 1 if self.layers is None else len(self.layers)

    @property
    def elements_each(self) -> int:
        return math.prod(self.shape)


class MoeSpec(Frozen):
    """A mixture-of-experts MLP as transformers 5.17 runs it (integrations/moe.py)."""

    num_experts: int
    top_k: int
    expert_intermediate: int
    shared_intermediate: int = 0  # shared expert(s), one dense gated MLP of this width
    sparse_layers: tuple[int, ...]  # positions of the layers whose MLP is the mixture (others are dense)
    routing_fp32: bool = False  # top-k weights in fp32 (Mixtral, DeepSeek): weighted outputs are fp32
    router_fp32: bool = False  # the router's logits themselves in fp32 (DeepSeek)
    all_experts: bool = False  # Llama-4: every expert runs on every token (routing by masking)
    expert_bias: bool = False  # gpt-oss
    shared_first: bool = False  # the shared expert runs before the routed ones (Qwen2-MoE)
    # the checkpoint stores one tensor per expert, merged into the fused 3-D parameters while
    # loading (a transient copy of the largest); gpt-oss, Llama-4 and Granite store them fused
    stored_per_expert: bool = True


class MlaSpec(Frozen):
    """Multi-head latent attention (DeepSeek-V2/V3)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


class RecurrentSpec(Frozen):
    """The recurrent token mixer of state-space and linear-attention layers (hybrid.py reads
    it from the config): a fixed-size state per layer instead of a growing KV cache.

    mamba: Mamba-1's selective scan (Mamba, Jamba): `inner` channels, `state_size` each.
    mamba2: Mamba-2's chunked scan (Mamba2, Falcon-H1, Granite-4.0-H): `heads` x `head_dim`
    channels sharing `groups` B/C groups of `state_size`.
    gated_delta: Qwen3-Next's gated DeltaNet: `heads` value heads of `head_dim`, `groups` key
    heads of `state_size` (the key head width).
    """

    kind: Literal["mamba", "mamba2", "gated_delta"]
    layers: tuple[int, ...]  # the layers that have the mixer
    inner: int  # channels on the scan path (value width for gated_delta)
    state_size: int
    heads: int = 0
    head_dim: int = 0
    groups: int = 1
    conv_kernel: int
    conv_dim: int  # channels of the causal conv1d (and of its cached state)
    in_proj: int  # output features of the mixer's input projection(s)
    dt_rank: int = 0  # mamba: the time-step projection's rank
    chunk_size: int = 0  # mamba2 / gated_delta: the scan's chunk length
    gate_copies: int = 4  # mamba: B x N x inner tensors alive beside the scan (gate, conv, masks)

    def conv_state_elements(self, batch: int) -> int:
        return batch * self.conv_dim * self.conv_kernel

    def recurrent_state_elements(self, batch: int) -> int:
        """The scan state, kept in fp32 whatever the model dtype (measured)."""
        if self.kind == "mamba":
            return batch * self.inner * self.state_size
        return batch * self.heads * self.head_dim * self.state_size


class EncoderSpec(Frozen):
    """The encoder stack of an encoder-decoder model (seq2seq.py): the prompt runs through it
    once; every decoder layer then caches the encoder output's keys and values
    (cross-attention) beside its own growing self-attention cache."""

    layers: int
    ffn: int  # the encoder's feed-forward width
    gated_ffn: bool = False  # T5's gated-GELU (wi_0, wi_1)
    relative_bias: bool = False  # T5: a B-independent heads x N x N position bias, SDPA's math kernel
    forced_eos: bool = False  # forced_eos_token_id: a logits processor adds fp32 copies of the scores


class Architecture(Frozen):
    """What the memory of a decoder depends on, read from its config."""

    model_type: str
    family: str  # the runtime layout (profiles/runtimes.yaml) this model's forward follows
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    cache_heads: int | None = None  # heads the KV cache holds, when not num_kv_heads
    cache_key_dim: int | None = None  # per-head width of cached keys / values, when not head_dim
    cache_value_dim: int | None = None
    rotary_dim: int  # 0: no rotary embedding
    positions: Literal["rope", "learned", "alibi", "none"]
    max_positions: int | None  # a hard limit (a learned table), None where positions extrapolate
    layer_types: tuple[LayerKind, ...]
    sliding_window: int | None
    tie_word_embeddings: bool
    config_dtype: DType | None
    attention_implementations: tuple[str, ...]
    tensors: tuple[TensorSpec, ...]
    buffers: tuple[BufferSpec, ...] = ()
    notes: tuple[str, ...] = ()
    computes_logits: bool = True  # False for pipeline stages before the last
    quantization: QuantScheme | None = None  # a pre-quantized checkpoint's scheme
    moe: MoeSpec | None = None
    mla: MlaSpec | None = None
    attention_sinks: bool = False  # gpt-oss: a learned sink logit per head joins the softmax
    recurrent: RecurrentSpec | None = None  # state-space / linear-attention layers
    mlp_free: bool = False  # no MLP at all (Mamba, Mamba-2: the mixer is the whole layer)
    use_cache: bool = True  # the config's use_cache, which generate() follows
    encoder: EncoderSpec | None = None  # encoder-decoder models (T5, BART)

    @field_validator("layer_types")
    @classmethod
    def _one_kind_per_layer(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("layer_types must name at least one layer")
        return value

    @property
    def parameters(self) -> int:
        return sum(t.elements for t in self.tensors)

    @property
    def gated_mlp(self) -> bool:
        """A GLU-style MLP (act(gate) * up), whose act(gate) is alive while `up` runs."""
        return any(".gate_proj." in t.name or ".gate_up_proj." in t.name for t in self.tensors)

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def cache_width(self, part: Literal["key", "value"]) -> int:
        """Elements one token adds to one layer's cached keys (or values): heads x width."""
        heads = self.cache_heads or self.num_kv_heads
        width = self.cache_key_dim if part == "key" else self.cache_value_dim
        return heads * (width or self.head_dim)

    @property
    def dense_mlp_layers(self) -> int:
        """Layers whose MLP is a plain (dense) one."""
        if self.mlp_free:
            return 0
        return self.num_layers - (len(self.moe.sparse_layers) if self.moe else 0)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, kind in enumerate(self.layer_types) if kind != "none")


# --------------------------------------------------------------------------------------------
# Adapter registry
# --------------------------------------------------------------------------------------------

Adapter = Callable[[RawConfig], Architecture]
_ADAPTERS: dict[str, Adapter] = {}

# Families transformers 5.17 has no code for, or whose configs need trust_remote_code.
REMOTE_CODE_FAMILIES = {"chatglm", "internlm2", "phi-msft", "minicpm", "phi3_v", "kimi_k2"}
# Modelled in a later release of vramplan; refused clearly until then.
NOT_YET_MODELLED = {
    "mbart": "encoder-decoder layers in mBART's pre-norm layout",
}
# Multimodal wrappers whose language model is a family we model: the text config is used.
MULTIMODAL_TEXT_CONFIG = {"llava", "mistral3", "gemma3", "llava_next", "paligemma", "qwen2_vl", "llama4"}


def adapter(*model_types: str) -> Callable[[Adapter], Adapter]:
    def register(fn: Adapter) -> Adapter:
        for model_type in model_types:
            _ADAPTERS[model_type] = fn
        return fn

    return register


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def architecture_from_config(config: dict, where: str = "config") -> Architecture:
    """The one entry point: a raw config dict in, a strict `Architecture` out."""
    raw = RawConfig(config, where)
    model_type = raw.str("model_type", default=None)
    if not model_type:
        raise ConfigError(f"{where} has no model_type; vramplan cannot tell which architecture it is.")
    if model_type in MULTIMODAL_TEXT_CONFIG and isinstance(config.get("text_config"), dict):
        text = dict(config["text_config"])
        text.setdefault("model_type", _default_text_model_type(model_type))
        if "quantization_config" in config and "quantization_config" not in text:
            text["quantization_config"] = config["quantization_config"]
        arch = architecture_from_config(text, f"{where}.text_config")
        towered = vision.with_vision_tower(arch, model_type, raw, config.get("vision_config"), where)
        if towered is not None:
            return towered
        note = (f"{model_type} is multimodal: only its language model ({arch.model_type}) is "
                "estimated; the vision tower and projector are not included.")
        return arch.model_copy(update={"notes": (*arch.notes, note)})
    if model_type in REMOTE_CODE_FAMILIES:
        raise UnsupportedModelError(
            f"{model_type!r} needs the model repository's own code (trust_remote_code), which "
            "vramplan never runs; use a checkpoint converted to a transformers-native family.")
    if model_type in NOT_YET_MODELLED:
        raise UnsupportedModelError(
            f"{model_type!r} uses {NOT_YET_MODELLED[model_type]}, which this vramplan release "
            f"does not estimate yet; supported: {', '.join(supported_model_types())}.")
    fn = _ADAPTERS.get(model_type)
    if fn is None:
        raise UnsupportedModelError(
            f"Unknown model_type {model_type!r}; supported: {', '.join(supported_model_types())}.")
    arch = fn(raw)
    update: dict = {"use_cache": raw.bool("use_cache", default=True)}
    scheme = scheme_from_config(raw)
    if scheme is not None:
        update["quantization"] = scheme
    return arch.model_copy(update=update)


def _default_text_model_type(wrapper: str) -> str:
    return {"llava": "llama", "mistral3": "mistral", "gemma3": "gemma3_text", "llama4": "llama4_text",
            "llava_next": "llama", "paligemma": "gemma", "qwen2_vl": "qwen2"}[wrapper]


# --------------------------------------------------------------------------------------------
# Building blocks shared by the adapters
# --------------------------------------------------------------------------------------------


class _Inventory:
    """Collects TensorSpecs with transformers' names while an adapter walks a layer."""

    def __init__(self, num_layers: int) -> None:
        self.layers = tuple(range(num_layers))
        self.items: list[TensorSpec] = []

    def one(self, name: str, shape: Iterable[int], kind: TensorKind) -> None:
        self.items.append(TensorSpec(name=name, shape=tuple(shape), kind=kind))

    def per_layer(self, name: str, shape: Iterable[int], kind: TensorKind,
                  transposed: bool = False, layers: tuple[int, ...] | None = None) -> None:
        chosen = self.layers if layers is None else layers
        if chosen:
            self.items.append(TensorSpec(name=name, shape=tuple(shape), kind=kind, layers=chosen,
                                         transposed=transposed))

    def linear(self, name: str, out_features: int, in_features: int, bias: bool,
               conv1d: bool = False, layers: tuple[int, ...] | None = None) -> None:
        """A per-layer nn.Linear (weight [out, in]) or GPT-2's Conv1D (weight [in, out])."""
        shape = (in_features, out_features) if conv1d else (out_features, in_features)
        self.per_layer(f"{name}.weight", shape, "linear", transposed=conv1d, layers=layers)
        if bias:
            self.per_layer(f"{name}.bias", (out_features,), "bias", layers=layers)

    def norm(self, name: str, size: int, bias: bool, per_layer: bool = True) -> None:
        add = self.per_layer if per_layer else self.one
        add(f"{name}.weight", (size,), "norm")
        if bias:
            add(f"{name}.bias", (size,), "norm")

    def head(self, name: str, vocab: int, hidden: int, tied: bool, bias: bool = False) -> None:
        if not tied:
            self.one(f"{name}.weight", (vocab, hidden), "lm_head")
        if bias:
            self.one(f"{name}.bias", (vocab,), "lm_head_bias")


def _config_dtype(raw: RawConfig) -> DType | None:
    name = raw.raw("torch_dtype", "dtype", default=None)
    if isinstance(name, str):
        return _TORCH_DTYPE_NAMES.get(name.removeprefix("torch."))
    return None


def _rope_buffers(prefix: str, rotary_dim: int, name: str = "rotary_emb") -> list[BufferSpec]:
    """transformers 5 keeps `inv_freq` and `original_inv_freq` (rotary_dim / 2 fp32 each)."""
    half = rotary_dim // 2
    why = "rotary frequencies (fp32), kept twice: current and original"
    return [BufferSpec(name=f"{prefix}{name}.inv_freq", shape=(half,), dtype="fp32", why=why),
            BufferSpec(name=f"{prefix}{name}.original_inv_freq", shape=(half,), dtype="fp32", why=why)]


def _heads(raw: RawConfig, hidden: int, heads_keys: tuple[str, ...] = ("num_attention_heads",),
           kv_keys: tuple[str, ...] = ("num_key_value_heads",)) -> tuple[int, int, int]:
    heads = raw.int(*heads_keys)
    kv_heads = raw.int(*kv_keys, default=heads)
    head_dim = raw.int("head_dim", default=None) or raw.divides(hidden, heads, "hidden size / heads")
    if heads % kv_heads:
        raise ConfigError(f"{raw.where}: {heads} attention heads cannot be shared by {kv_heads} "
                          "key/value heads (not a divisor).")
    return heads, kv_heads, head_dim


def _rotary_dim(raw: RawConfig, head_dim: int, factor_keys: tuple[str, ...] = ("partial_rotary_factor",)
                ) -> int:
    # transformers 5 configs keep it in `rope_parameters`; older ones at the top level
    nested = raw.raw("rope_parameters", default=None)
    if isinstance(nested, dict) and nested.get("partial_rotary_factor") is not None:
        raw = RawConfig({**raw.data, factor_keys[0]: nested["partial_rotary_factor"]}, raw.where)
    factor = raw.float(*factor_keys, default=1.0)
    if not 0 < factor <= 1:
        raise ConfigError(f"{raw.where}: {factor_keys[0]} must be in (0, 1], not {factor}.")
    return int(head_dim * factor)


def _layer_types(raw: RawConfig, num_layers: int, default: Callable[[int], LayerKind]
                 ) -> tuple[LayerKind, ...]:
    """Per-layer attention kind: the config's `layer_types` when given, else the family's rule."""
    names = raw.list("layer_types", default=None)
    if names is None:
        return tuple(default(i) for i in range(num_layers))
    kinds = {"full_attention": "full", "sliding_attention": "sliding",
             "chunked_attention": "chunked", "linear_attention": "none",
             "mamba": "none", "attention": "full"}  # the last two: Granite-4.0-H's legacy names
    if len(names) != num_layers or any(n not in kinds for n in names):
        raise ConfigError(f"{raw.where}: layer_types must list one of {sorted(kinds)} per layer "
                          f"({num_layers} layers).")
    return tuple(kinds[n] for n in names)  # type: ignore[misc]


def _window(raw: RawConfig) -> int | None:
    return raw.int("sliding_window", default=None)


def _tied(raw: RawConfig, default: bool) -> bool:
    return raw.bool("tie_word_embeddings", default=default)


# --------------------------------------------------------------------------------------------
# The llama-shaped families: model.embed_tokens, model.layers.{i}.self_attn / mlp, model.norm
# --------------------------------------------------------------------------------------------


def _llama_like(raw: RawConfig, *, family: str, tied_default: bool, qkv_bias: bool = False,
                o_bias: bool = False, mlp_bias: bool = False, qk_norm: str = "none",
                norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm"),
                norm_bias: bool = False, final_norm: str = "norm", mlp: str = "gated",
                fused_qkv: bool = False, o_name: str = "o_proj", head_bias: bool = False,
                rotary_dim: int | None = None, layer_rule: Callable[[int], LayerKind] | None = None,
                window: int | None = None, extra_buffers: tuple[BufferSpec, ...] = (),
                attention: tuple[str, ...] = ALL_ATTENTION,
                intermediate_keys: tuple[str, ...] = ("intermediate_size",),
                moe: MoeSpec | None = None, moe_layout: MoeLayout | None = None,
                mla: MlaSpec | None = None, mlp_module: str = "mlp") -> Architecture:
    hidden = raw.int("hidden_size")
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    vocab = raw.int("vocab_size")
    heads, kv_heads, head_dim = _heads(raw, hidden)
    intermediate = raw.int(*intermediate_keys)
    tied = _tied(raw, tied_default)
    inv = _Inventory(layers)
    inv.one("model.embed_tokens.weight", (vocab, hidden), "embedding")
    att = "model.layers.{i}.self_attn"
    if mla is not None:
        _mla_attention(inv, att, mla, heads, hidden, qkv_bias)
    elif fused_qkv:
        inv.linear(f"{att}.qkv_proj", (heads + 2 * kv_heads) * head_dim, hidden, qkv_bias)
    else:
        inv.linear(f"{att}.q_proj", heads * head_dim, hidden, qkv_bias)
        inv.linear(f"{att}.k_proj", kv_heads * head_dim, hidden, qkv_bias)
        inv.linear(f"{att}.v_proj", kv_heads * head_dim, hidden, qkv_bias)
    if mla is None:
        inv.linear(f"{att}.{o_name}", hidden, heads * head_dim, o_bias)
    if qk_norm == "per_head":  # one norm over head_dim, shared by all heads (qwen3, gemma3)
        inv.norm(f"{att}.q_norm", head_dim, False)
        inv.norm(f"{att}.k_norm", head_dim, False)
    elif qk_norm == "full":  # one norm over all heads' features (olmo2)
        inv.norm(f"{att}.q_norm", heads * head_dim, False)
        inv.norm(f"{att}.k_norm", kv_heads * head_dim, False)
    m = f"model.layers.{{i}}.{mlp_module}"
    dense_layers = tuple(i for i in range(layers) if moe is None or i not in moe.sparse_layers)
    if moe is not None:
        _moe_mlp(inv, m, moe, moe_layout or MoeLayout(), hidden)
    if mlp == "gated":
        inv.linear(f"{m}.gate_proj", intermediate, hidden, mlp_bias, layers=dense_layers)
        inv.linear(f"{m}.up_proj", intermediate, hidden, mlp_bias, layers=dense_layers)
        inv.linear(f"{m}.down_proj", hidden, intermediate, mlp_bias, layers=dense_layers)
    elif mlp == "gate_up_fused":
        inv.linear(f"{m}.gate_up_proj", 2 * intermediate, hidden, mlp_bias)
        inv.linear(f"{m}.down_proj", hidden, intermediate, mlp_bias)
    elif mlp == "c_fc":
        inv.linear(f"{m}.c_fc", intermediate, hidden, mlp_bias)
        inv.linear(f"{m}.c_proj", hidden, intermediate, mlp_bias)
    elif mlp == "fc":
        inv.linear(f"{m}.fc1", intermediate, hidden, mlp_bias)
        inv.linear(f"{m}.fc2", hidden, intermediate, mlp_bias)
    for name in norms:
        inv.norm(f"model.layers.{{i}}.{name}", hidden, norm_bias)
    inv.norm(f"model.{final_norm}", hidden, norm_bias, per_layer=False)
    inv.head("lm_head", vocab, hidden, tied, head_bias)
    rot = head_dim if rotary_dim is None else rotary_dim
    rule = layer_rule or (lambda i: "full")
    mla_fields = {} if mla is None else {
        # transformers 5.17 caches the compressed latent as "keys" and the rope key as
        # "values", one of each per token (measured on DeepSeek-V2-Lite)
        "cache_heads": 1, "cache_key_dim": mla.kv_lora_rank, "cache_value_dim": mla.qk_rope_head_dim,
    }
    return Architecture(
        model_type=raw.str("model_type"), family=family, hidden_size=hidden, num_layers=layers,
        vocab_size=vocab, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=intermediate, rotary_dim=rot, positions="rope", max_positions=None,
        layer_types=_layer_types(raw, layers, rule), sliding_window=window,
        tie_word_embeddings=tied, config_dtype=_config_dtype(raw),
        attention_implementations=attention, tensors=tuple(inv.items),
        buffers=(*_rope_buffers("model.", rot), *extra_buffers), moe=moe, mla=mla, **mla_fields,
    )


# transformers' LlamaConfig / MistralConfig defaults for the keys we read: multimodal wrappers
# (llava) ship a text_config that names only what differs from them.
_LLAMA_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "vocab_size": 32000}
_MISTRAL_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                     "sliding_window": 4096}


class MoeLayout(Frozen):
    """Where a family's mixture-of-experts block keeps its tensors (module names, layout)."""

    router: str = "gate"  # the router module under the MLP
    router_bias: bool = False
    transposed: bool = False  # experts stored [E, in, out] (gpt-oss, Llama-4) instead of [E, out, in]
    shared: str | None = None  # the shared expert's module, a gated MLP of MoeSpec.shared_intermediate
    shared_gate: bool = False  # Qwen2-MoE: a Linear(hidden, 1) scales the shared expert's output


def _sparse_layers(num_layers: int, *, first_dense: int = 0, step: int = 1,
                   dense: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Layers whose MLP is the mixture: from `first_dense` on, every `step`-th ((i + 1) % step
    == 0, transformers' Qwen-MoE rule), except those listed in `dense`."""
    if step < 1:
        raise ConfigError(f"the MoE layer step must be at least 1, not {step}.")
    return tuple(i for i in range(num_layers) if i >= first_dense and (i + 1) % step == 0 and i not in dense)


def _moe_mlp(inv: _Inventory, module: str, moe: MoeSpec, layout: MoeLayout, hidden: int) -> None:
    layers = moe.sparse_layers
    experts, width = moe.num_experts, moe.expert_intermediate
    inv.per_layer(f"{module}.{layout.router}.weight", (experts, hidden), "router", layers=layers)
    if layout.router_bias:
        inv.per_layer(f"{module}.{layout.router}.bias", (experts,), "router", layers=layers)
    gate_up = (experts, hidden, 2 * width) if layout.transposed else (experts, 2 * width, hidden)
    down = (experts, width, hidden) if layout.transposed else (experts, hidden, width)
    inv.per_layer(f"{module}.experts.gate_up_proj", gate_up, "expert", transposed=layout.transposed, layers=layers)
    if moe.expert_bias:
        inv.per_layer(f"{module}.experts.gate_up_proj_bias", (experts, 2 * width), "expert", layers=layers)
    inv.per_layer(f"{module}.experts.down_proj", down, "expert", transposed=layout.transposed, layers=layers)
    if moe.expert_bias:
        inv.per_layer(f"{module}.experts.down_proj_bias", (experts, hidden), "expert", layers=layers)
    if moe.shared_intermediate and layout.shared:
        shared = f"{module}.{layout.shared}"
        inv.linear(f"{shared}.gate_proj", moe.shared_intermediate, hidden, False, layers=layers)
        inv.linear(f"{shared}.up_proj", moe.shared_intermediate, hidden, False, layers=layers)
        inv.linear(f"{shared}.down_proj", hidden, moe.shared_intermediate, False, layers=layers)
    if layout.shared_gate:
        inv.linear(f"{module}.shared_expert_gate", 1, hidden, False, layers=layers)


def _mla_attention(inv: _Inventory, module: str, mla: MlaSpec, heads: int, hidden: int, bias: bool) -> None:
    """DeepSeek's multi-head latent attention: queries (optionally through a low-rank
    bottleneck), one compressed key/value latent plus a shared rotary key, expanded per head."""
    qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    if mla.q_lora_rank is None:
        inv.linear(f"{module}.q_proj", heads * qk, hidden, False)
    else:
        inv.linear(f"{module}.q_a_proj", mla.q_lora_rank, hidden, bias)
        inv.norm(f"{module}.q_a_layernorm", mla.q_lora_rank, False)
        inv.linear(f"{module}.q_b_proj", heads * qk, mla.q_lora_rank, False)
    inv.linear(f"{module}.kv_a_proj_with_mqa", mla.kv_lora_rank + mla.qk_rope_head_dim, hidden, bias)
    inv.norm(f"{module}.kv_a_layernorm", mla.kv_lora_rank, False)
    inv.linear(f"{module}.kv_b_proj", heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank, False)
    inv.linear(f"{module}.o_proj", hidden, heads * mla.v_head_dim, bias)


def _sliding_everywhere(window: int | None) -> Callable[[int], LayerKind]:
    return lambda i: "sliding" if window else "full"


@adapter("llama")
def _llama(raw: RawConfig) -> Architecture:
    raw = raw.with_defaults(_LLAMA_DEFAULTS)
    bias = raw.bool("attention_bias", default=False)
    return _llama_like(raw, family="llama", tied_default=False, qkv_bias=bias, o_bias=bias,
                       mlp_bias=raw.bool("mlp_bias", default=False))


@adapter("mistral")
def _mistral(raw: RawConfig) -> Architecture:
    raw = raw.with_defaults(_MISTRAL_DEFAULTS)
    window = _window(raw)
    return _llama_like(raw, family="llama", tied_default=False, window=window,
                       layer_rule=_sliding_everywhere(window))


@adapter("qwen2")
def _qwen2(raw: RawConfig) -> Architecture:
    # transformers' Qwen2Config: sliding window only with use_sliding_window, and only from
    # layer max_window_layers on
    use = raw.bool("use_sliding_window", default=False)
    window = _window(raw) if use else None
    first = raw.int("max_window_layers", default=28, minimum=0)
    return _llama_like(raw, family="llama", tied_default=False, qkv_bias=True, window=window,
                       layer_rule=lambda i: "sliding" if window and i >= first else "full")


@adapter("qwen3")
def _qwen3(raw: RawConfig) -> Architecture:
    bias = raw.bool("attention_bias", default=False)
    use = raw.bool("use_sliding_window", default=False)
    window = _window(raw) if use else None
    first = raw.int("max_window_layers", default=28, minimum=0)
    return _llama_like(raw, family="llama", tied_default=False, qkv_bias=bias, o_bias=bias,
                       qk_norm="per_head", window=window,
                       layer_rule=lambda i: "sliding" if window and i >= first else "full")


def _embed_scale(prefix: str = "model.") -> BufferSpec:
    return BufferSpec(name=f"{prefix}embed_tokens.embed_scale", shape=(), dtype="activation",
                      why="Gemma's embedding scale, a scalar in the model dtype")


@adapter("gemma")
def _gemma(raw: RawConfig) -> Architecture:
    return _llama_like(raw, family="llama", tied_default=True, extra_buffers=(_embed_scale(),))


@adapter("gemma2")
def _gemma2(raw: RawConfig) -> Architecture:
    window = _window(raw)
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm")
    # transformers' Gemma2Config: even layers slide, odd layers see everything
    return _llama_like(raw, family="gemma2", tied_default=True, norms=norms, window=window,
                       layer_rule=lambda i: "sliding" if (i + 1) % 2 else "full",
                       extra_buffers=(_embed_scale(),))


@adapter("gemma3_text")
def _gemma3(raw: RawConfig) -> Architecture:
    window = _window(raw)
    pattern = raw.int("sliding_window_pattern", "_sliding_window_pattern", default=6)
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm")
    arch = _llama_like(raw, family="gemma3", tied_default=True, norms=norms, qk_norm="per_head",
                       window=window,
                       layer_rule=lambda i: "full" if (i + 1) % pattern == 0 else "sliding")
    # two rotary embeddings (local and global), each with inv_freq and original_inv_freq
    half = arch.head_dim // 2
    buffers = [BufferSpec(name=f"model.rotary_emb.{kind}_{which}", shape=(half,), dtype="fp32",
                          why="rotary frequencies of local and global layers (fp32)")
               for kind in ("full_attention", "sliding_attention")
               for which in ("inv_freq", "original_inv_freq")]
    return arch.model_copy(update={"buffers": (*buffers, _embed_scale())})


@adapter("cohere")
def _cohere(raw: RawConfig) -> Architecture:
    if raw.bool("use_qk_norm", default=False):
        raise UnsupportedModelError(f"{raw.where}: cohere with use_qk_norm is not modelled yet.")
    bias = raw.bool("attention_bias", default=False)
    # one bias-free LayerNorm feeds attention and MLP in parallel
    return _llama_like(raw, family="cohere", tied_default=True, qkv_bias=bias, o_bias=bias,
                       norms=("input_layernorm",))


@adapter("olmo2")
def _olmo2(raw: RawConfig) -> Architecture:
    bias = raw.bool("attention_bias", default=False)
    # norms after attention and MLP, none before; q/k norms span all heads
    return _llama_like(raw, family="olmo2", tied_default=False, qkv_bias=bias, o_bias=bias,
                       qk_norm="full", norms=("post_attention_layernorm", "post_feedforward_layernorm"))


@adapter("stablelm")
def _stablelm(raw: RawConfig) -> Architecture:
    if raw.bool("qk_layernorm", default=False):
        raise UnsupportedModelError(f"{raw.where}: stablelm with qk_layernorm is not modelled yet.")
    if raw.bool("use_parallel_residual", default=False):
        raise UnsupportedModelError(f"{raw.where}: stablelm with use_parallel_residual is not "
                                    "modelled yet.")
    _, _, head_dim = _heads(raw, raw.int("hidden_size"))
    return _llama_like(raw, family="stablelm", tied_default=False,
                       qkv_bias=raw.bool("use_qkv_bias", default=False), norm_bias=True,
                       rotary_dim=_rotary_dim(raw, head_dim))


@adapter("starcoder2")
def _starcoder2(raw: RawConfig) -> Architecture:
    bias = raw.bool("use_bias", default=True)
    window = _window(raw)
    return _llama_like(raw, family="starcoder2", tied_default=True, qkv_bias=bias, o_bias=bias,
                       mlp_bias=bias, mlp="c_fc", norm_bias=True, window=window,
                       layer_rule=_sliding_everywhere(window))


@adapter("phi3")
def _phi3(raw: RawConfig) -> Architecture:
    _, _, head_dim = _heads(raw, raw.int("hidden_size"))
    window = _window(raw)
    return _llama_like(raw, family="phi3", tied_default=False, fused_qkv=True,
                       mlp="gate_up_fused", rotary_dim=_rotary_dim(raw, head_dim), window=window,
                       layer_rule=_sliding_everywhere(window))


@adapter("phi")
def _phi(raw: RawConfig) -> Architecture:
    if raw.bool("qk_layernorm", default=False):
        raise UnsupportedModelError(f"{raw.where}: phi with qk_layernorm is not modelled yet.")
    _, _, head_dim = _heads(raw, raw.int("hidden_size"))
    # attention and MLP read the same LayerNorm output in parallel
    return _llama_like(raw, family="phi", tied_default=False, qkv_bias=True, o_bias=True,
                       mlp_bias=True, mlp="fc", o_name="dense", norms=("input_layernorm",),
                       norm_bias=True, final_norm="final_layernorm", head_bias=True,
                       rotary_dim=_rotary_dim(raw, head_dim))


# --------------------------------------------------------------------------------------------
# GPT-2-shaped and other families with their own module names
# --------------------------------------------------------------------------------------------


def _whole_model_arch(raw: RawConfig, inv: _Inventory, **fields) -> Architecture:
    """The Architecture of a family written out in full (here, hybrid.py, seq2seq.py): the
    config's model_type and dtype, the inventory's tensors, no sliding window, and every layer
    attending to all tokens unless `layer_types` says otherwise."""
    fields.setdefault("layer_types", ("full",) * fields["num_layers"])
    return Architecture(model_type=raw.str("model_type"), sliding_window=None, config_dtype=_config_dtype(raw),
                        tensors=tuple(inv.items), **fields)


@adapter("gpt2")
def _gpt2(raw: RawConfig) -> Architecture:
    hidden = raw.int("n_embd", "hidden_size")
    layers = raw.int("n_layer", "num_hidden_layers", maximum=MAX_LAYERS)
    heads = raw.int("n_head", "num_attention_heads")
    head_dim = raw.divides(hidden, heads, "n_embd / n_head")
    vocab = raw.int("vocab_size")
    positions = raw.int("n_positions", "max_position_embeddings")
    inner = raw.int("n_inner", default=None) or 4 * hidden
    tied = _tied(raw, True)
    inv = _Inventory(layers)
    inv.one("transformer.wte.weight", (vocab, hidden), "embedding")
    inv.one("transformer.wpe.weight", (positions, hidden), "position_embedding")
    h = "transformer.h.{i}"
    inv.norm(f"{h}.ln_1", hidden, True)
    inv.linear(f"{h}.attn.c_attn", 3 * hidden, hidden, True, conv1d=True)
    inv.linear(f"{h}.attn.c_proj", hidden, hidden, True, conv1d=True)
    inv.norm(f"{h}.ln_2", hidden, True)
    inv.linear(f"{h}.mlp.c_fc", inner, hidden, True, conv1d=True)
    inv.linear(f"{h}.mlp.c_proj", hidden, inner, True, conv1d=True)
    inv.norm("transformer.ln_f", hidden, True, per_layer=False)
    inv.head("lm_head", vocab, hidden, tied)
    return _whole_model_arch(
        raw, inv, family="gpt2", hidden_size=hidden, num_layers=layers, vocab_size=vocab,
        num_heads=heads, num_kv_heads=heads, head_dim=head_dim, intermediate_size=inner,
        rotary_dim=0, positions="learned", max_positions=positions, tie_word_embeddings=tied,
        attention_implementations=ALL_ATTENTION)


@adapter("gpt_bigcode")
def _gpt_bigcode(raw: RawConfig) -> Architecture:
    hidden = raw.int("n_embd", "hidden_size")
    layers = raw.int("n_layer", "num_hidden_layers", maximum=MAX_LAYERS)
    heads = raw.int("n_head", "num_attention_heads")
    head_dim = raw.divides(hidden, heads, "n_embd / n_head")
    kv_heads = 1 if raw.bool("multi_query", default=True) else heads
    vocab = raw.int("vocab_size")
    positions = raw.int("n_positions", "max_position_embeddings")
    inner = raw.int("n_inner", default=None) or 4 * hidden
    tied = _tied(raw, True)
    inv = _Inventory(layers)
    inv.one("transformer.wte.weight", (vocab, hidden), "embedding")
    inv.one("transformer.wpe.weight", (positions, hidden), "position_embedding")
    h = "transformer.h.{i}"
    inv.norm(f"{h}.ln_1", hidden, True)
    inv.linear(f"{h}.attn.c_attn", hidden + 2 * kv_heads * head_dim, hidden, True)
    inv.linear(f"{h}.attn.c_proj", hidden, hidden, True)
    inv.norm(f"{h}.ln_2", hidden, True)
    inv.linear(f"{h}.mlp.c_fc", inner, hidden, True)
    inv.linear(f"{h}.mlp.c_proj", hidden, inner, True)
    inv.norm("transformer.ln_f", hidden, True, per_layer=False)
    inv.head("lm_head", vocab, hidden, tied)
    mask = BufferSpec(name="transformer.bias", shape=(positions, positions), dtype="bool",
                      why="GPT-BigCode's causal-mask table, n_positions^2 booleans")
    return _whole_model_arch(
        raw, inv, family="gpt_bigcode", hidden_size=hidden, num_layers=layers, vocab_size=vocab,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=inner,
        rotary_dim=0, positions="learned", max_positions=positions, tie_word_embeddings=tied,
        attention_implementations=ALL_ATTENTION, buffers=(mask,))


@adapter("opt")
def _opt(raw: RawConfig) -> Architecture:
    hidden = raw.int("hidden_size")
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    heads = raw.int("num_attention_heads")
    head_dim = raw.divides(hidden, heads, "hidden_size / num_attention_heads")
    vocab = raw.int("vocab_size")
    ffn = raw.int("ffn_dim")
    positions = raw.int("max_position_embeddings")
    proj = raw.int("word_embed_proj_dim", default=hidden)
    bias = raw.bool("enable_bias", default=True)
    affine = raw.bool("layer_norm_elementwise_affine", default=True)
    before = raw.bool("do_layer_norm_before", default=True)
    final_norm = before and not raw.bool("_remove_final_layer_norm", default=False)
    tied = _tied(raw, True)
    inv = _Inventory(layers)
    d = "model.decoder"
    inv.one(f"{d}.embed_tokens.weight", (vocab, proj), "embedding")
    # OPT's learned positions are offset by 2 rows
    inv.one(f"{d}.embed_positions.weight", (positions + 2, hidden), "position_embedding")
    if final_norm and affine:
        inv.norm(f"{d}.final_layer_norm", hidden, True, per_layer=False)
    if proj != hidden:
        inv.one(f"{d}.project_out.weight", (proj, hidden), "linear")
        inv.one(f"{d}.project_in.weight", (hidden, proj), "linear")
    lay = f"{d}.layers.{{i}}"
    for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
        inv.linear(f"{lay}.self_attn.{name}", hidden, hidden, bias)
    if affine:
        inv.norm(f"{lay}.self_attn_layer_norm", hidden, True)
    inv.linear(f"{lay}.fc1", ffn, hidden, bias)
    inv.linear(f"{lay}.fc2", hidden, ffn, bias)
    if affine:
        inv.norm(f"{lay}.final_layer_norm", hidden, True)
    inv.head("lm_head", vocab, proj, tied)
    return _whole_model_arch(
        raw, inv, family="opt", hidden_size=hidden, num_layers=layers, vocab_size=vocab,
        num_heads=heads, num_kv_heads=heads, head_dim=head_dim, intermediate_size=ffn,
        rotary_dim=0, positions="learned", max_positions=positions, tie_word_embeddings=tied,
        attention_implementations=ALL_ATTENTION)


@adapter("falcon")
def _falcon(raw: RawConfig) -> Architecture:
    hidden = raw.int("hidden_size")
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    heads = raw.int("num_attention_heads")
    head_dim = raw.divides(hidden, heads, "hidden_size / num_attention_heads")
    vocab = raw.int("vocab_size")
    new_arch = raw.bool("new_decoder_architecture", default=False)
    multi_query = raw.bool("multi_query", default=True)
    # transformers' Falcon: the new decoder layout uses num_kv_heads; the old one uses ONE kv
    # head when multi_query, whatever num_kv_heads says (re-saved configs carry both)
    if new_arch:
        kv_heads = raw.int("num_kv_heads", default=heads)
    else:
        kv_heads = 1 if multi_query else heads
    if raw.bool("alibi", default=False):
        raise UnsupportedModelError(f"{raw.where}: falcon with alibi is not modelled yet.")
    bias = raw.bool("bias", default=False)
    ffn = raw.int("ffn_hidden_size", default=None) or 4 * hidden
    parallel = raw.bool("parallel_attn", default=True)
    tied = _tied(raw, True)
    inv = _Inventory(layers)
    inv.one("transformer.word_embeddings.weight", (vocab, hidden), "embedding")
    h = "transformer.h.{i}"
    qkv_out = (heads + 2 * kv_heads) * head_dim
    inv.linear(f"{h}.self_attention.query_key_value", qkv_out, hidden, bias)
    inv.linear(f"{h}.self_attention.dense", hidden, hidden, bias)
    inv.linear(f"{h}.mlp.dense_h_to_4h", ffn, hidden, bias)
    inv.linear(f"{h}.mlp.dense_4h_to_h", hidden, ffn, bias)
    if new_arch and raw.int("num_ln_in_parallel_attn", default=2) == 2:
        inv.norm(f"{h}.ln_attn", hidden, True)
        inv.norm(f"{h}.ln_mlp", hidden, True)
    else:
        inv.norm(f"{h}.input_layernorm", hidden, True)
        if not new_arch and not parallel:
            inv.norm(f"{h}.post_attention_layernorm", hidden, True)
    inv.norm("transformer.ln_f", hidden, True, per_layer=False)
    inv.head("lm_head", vocab, hidden, tied)
    family = "falcon_mqa" if kv_heads != heads and not new_arch else "falcon"
    return _whole_model_arch(
        raw, inv, family=family, hidden_size=hidden, num_layers=layers,
        vocab_size=vocab, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        # the new decoder layout broadcasts K and V to every query head before caching them
        # (FalconAttention: num_kv_heads = num_heads if new_decoder_architecture)
        cache_heads=heads if new_arch else None,
        intermediate_size=ffn, rotary_dim=head_dim, positions="rope", max_positions=None,
        tie_word_embeddings=tied, attention_implementations=ALL_ATTENTION,
        buffers=tuple(_rope_buffers("transformer.", head_dim)),
    )


@adapter("bloom")
def _bloom(raw: RawConfig) -> Architecture:
    hidden = raw.int("hidden_size", "n_embed")
    layers = raw.int("n_layer", "num_hidden_layers", maximum=MAX_LAYERS)
    heads = raw.int("n_head", "num_attention_heads")
    head_dim = raw.divides(hidden, heads, "hidden_size / n_head")
    vocab = raw.int("vocab_size")
    tied = _tied(raw, True)
    inv = _Inventory(layers)
    inv.one("transformer.word_embeddings.weight", (vocab, hidden), "embedding")
    inv.norm("transformer.word_embeddings_layernorm", hidden, True, per_layer=False)
    h = "transformer.h.{i}"
    inv.norm(f"{h}.input_layernorm", hidden, True)
    inv.linear(f"{h}.self_attention.query_key_value", 3 * hidden, hidden, True)
    inv.linear(f"{h}.self_attention.dense", hidden, hidden, True)
    inv.norm(f"{h}.post_attention_layernorm", hidden, True)
    inv.linear(f"{h}.mlp.dense_h_to_4h", 4 * hidden, hidden, True)
    inv.linear(f"{h}.mlp.dense_4h_to_h", hidden, 4 * hidden, True)
    inv.norm("transformer.ln_f", hidden, True, per_layer=False)
    inv.head("lm_head", vocab, hidden, tied)
    return _whole_model_arch(
        raw, inv, family="bloom", hidden_size=hidden, num_layers=layers,
        vocab_size=vocab, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        intermediate_size=4 * hidden, rotary_dim=0, positions="alibi", max_positions=None,
        tie_word_embeddings=tied,
        # transformers 5.17 raises for bloom with sdpa: only its own (eager) attention exists
        attention_implementations=("eager",),
    )


@adapter("gpt_neox")
def _gpt_neox(raw: RawConfig) -> Architecture:
    hidden = raw.int("hidden_size")
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    heads = raw.int("num_attention_heads")
    head_dim = raw.divides(hidden, heads, "hidden_size / num_attention_heads")
    vocab = raw.int("vocab_size")
    inner = raw.int("intermediate_size")
    bias = raw.bool("attention_bias", default=True)
    # parallel residual (attention and MLP read the same input) or GPT-2-like sequential
    family = "gpt_neox" if raw.bool("use_parallel_residual", default=True) else "gpt_neox_sequential"
    rotary = _rotary_dim(raw, head_dim, ("rotary_pct", "partial_rotary_factor"))
    tied = _tied(raw, False)
    inv = _Inventory(layers)
    inv.one("gpt_neox.embed_in.weight", (vocab, hidden), "embedding")
    lay = "gpt_neox.layers.{i}"
    inv.norm(f"{lay}.input_layernorm", hidden, True)
    inv.norm(f"{lay}.post_attention_layernorm", hidden, True)
    inv.linear(f"{lay}.attention.query_key_value", 3 * hidden, hidden, bias)
    inv.linear(f"{lay}.attention.dense", hidden, hidden, bias)
    inv.linear(f"{lay}.mlp.dense_h_to_4h", inner, hidden, True)
    inv.linear(f"{lay}.mlp.dense_4h_to_h", hidden, inner, True)
    inv.norm("gpt_neox.final_layer_norm", hidden, True, per_layer=False)
    inv.head("lm_head", vocab, hidden, tied)
    return _whole_model_arch(
        raw, inv, family=family, hidden_size=hidden, num_layers=layers,
        vocab_size=vocab, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        intermediate_size=inner, rotary_dim=rotary, positions="rope", max_positions=None,
        tie_word_embeddings=tied, attention_implementations=ALL_ATTENTION,
        buffers=tuple(_rope_buffers("gpt_neox.", rotary)),
    )


@adapter("gptj")
def _gptj(raw: RawConfig) -> Architecture:
    hidden = raw.int("n_embd", "hidden_size")
    layers = raw.int("n_layer", "num_hidden_layers", maximum=MAX_LAYERS)
    heads = raw.int("n_head", "num_attention_heads")
    head_dim = raw.divides(hidden, heads, "n_embd / n_head")
    vocab = raw.int("vocab_size")
    positions = raw.int("n_positions", "max_position_embeddings")
    inner = raw.int("n_inner", default=None) or 4 * hidden
    rotary = raw.int("rotary_dim", default=None) or head_dim
    tied = _tied(raw, False)
    inv = _Inventory(layers)
    inv.one("transformer.wte.weight", (vocab, hidden), "embedding")
    h = "transformer.h.{i}"
    inv.norm(f"{h}.ln_1", hidden, True)
    for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
        inv.linear(f"{h}.attn.{name}", hidden, hidden, False)
    inv.linear(f"{h}.mlp.fc_in", inner, hidden, True)
    inv.linear(f"{h}.mlp.fc_out", hidden, inner, True)
    inv.norm("transformer.ln_f", hidden, True, per_layer=False)
    inv.head("lm_head", vocab, hidden, tied, bias=True)
    table = BufferSpec(name="transformer.h.{i}.attn.embed_positions", shape=(positions, rotary),
                       dtype="fp32", layers=tuple(range(layers)),
                       why="GPT-J's sin/cos table, n_positions x rotary_dim fp32, one per layer")
    return _whole_model_arch(
        raw, inv, family="gptj", hidden_size=hidden, num_layers=layers,
        vocab_size=vocab, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        intermediate_size=inner, rotary_dim=rotary, positions="rope",
        # positions index the sin/cos table: past it is an out-of-range index on the GPU
        max_positions=positions, tie_word_embeddings=tied,
        # transformers 5.17 raises for GPT-J with sdpa
        attention_implementations=("eager", "flash_attention_2"), buffers=(table,),
    )


@adapter("mpt")
def _mpt(raw: RawConfig) -> Architecture:
    hidden = raw.int("d_model", "hidden_size")
    layers = raw.int("n_layers", "num_hidden_layers", maximum=MAX_LAYERS)
    heads = raw.int("n_heads", "num_attention_heads")
    head_dim = raw.divides(hidden, heads, "d_model / n_heads")
    vocab = raw.int("vocab_size")
    ratio = raw.int("expansion_ratio", default=4)
    no_bias = raw.bool("no_bias", default=True)
    attn_config = raw.raw("attn_config", default={}) or {}
    if not isinstance(attn_config, dict):
        raise ConfigError(f"{raw.where}: attn_config must be an object.")
    if attn_config.get("alibi", True) is not True:
        raise UnsupportedModelError(f"{raw.where}: mpt without alibi is not modelled.")
    tied = _tied(raw, True)
    inv = _Inventory(layers)
    inv.one("transformer.wte.weight", (vocab, hidden), "embedding")
    b = "transformer.blocks.{i}"
    inv.norm(f"{b}.norm_1", hidden, not no_bias)
    inv.linear(f"{b}.attn.Wqkv", 3 * hidden, hidden, not no_bias)
    inv.linear(f"{b}.attn.out_proj", hidden, hidden, not no_bias)
    inv.norm(f"{b}.norm_2", hidden, not no_bias)
    inv.linear(f"{b}.ffn.up_proj", ratio * hidden, hidden, not no_bias)
    inv.linear(f"{b}.ffn.down_proj", hidden, ratio * hidden, not no_bias)
    inv.norm("transformer.norm_f", hidden, not no_bias, per_layer=False)
    inv.head("lm_head", vocab, hidden, tied)
    return _whole_model_arch(
        raw, inv, family="mpt", hidden_size=hidden, num_layers=layers, vocab_size=vocab,
        num_heads=heads, num_kv_heads=heads, head_dim=head_dim, intermediate_size=ratio * hidden,
        rotary_dim=0, positions="alibi", max_positions=None, tie_word_embeddings=tied,
        attention_implementations=("eager",),
    )


# --------------------------------------------------------------------------------------------
# Mixture-of-experts and latent-attention families
# --------------------------------------------------------------------------------------------


def _qwen_sparse_layers(raw: RawConfig, layers: int) -> tuple[int, ...]:
    """transformers' Qwen2/3-MoE: every decoder_sparse_step-th layer, unless listed in
    mlp_only_layers."""
    dense = tuple(raw.list("mlp_only_layers", default=None) or ())
    return _sparse_layers(layers, step=raw.int("decoder_sparse_step", default=1), dense=dense)


@adapter("mixtral")
def _mixtral(raw: RawConfig) -> Architecture:
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    window = _window(raw)
    moe = MoeSpec(num_experts=raw.int("num_local_experts", "num_experts"), top_k=raw.int("num_experts_per_tok"),
                  expert_intermediate=raw.int("intermediate_size"), sparse_layers=tuple(range(layers)),
                  routing_fp32=True)  # MixtralTopKRouter returns its fp32 softmax values
    return _llama_like(raw, family="moe", tied_default=False, window=window, moe=moe,
                       layer_rule=_sliding_everywhere(window))


@adapter("qwen2_moe")
def _qwen2_moe(raw: RawConfig) -> Architecture:
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    moe = MoeSpec(num_experts=raw.int("num_experts", "num_local_experts"), top_k=raw.int("num_experts_per_tok"),
                  expert_intermediate=raw.int("moe_intermediate_size"),
                  shared_intermediate=raw.int("shared_expert_intermediate_size", default=0, minimum=0),
                  sparse_layers=_qwen_sparse_layers(raw, layers), shared_first=True)
    # Qwen2MoeConfig: with use_sliding_window, the even layers below max_window_layers slide
    window = _window(raw) if raw.bool("use_sliding_window", default=False) else None
    first_full = raw.int("max_window_layers", default=28, minimum=0)
    return _llama_like(raw, family="moe", tied_default=False, qkv_bias=True, moe=moe, window=window,
                       layer_rule=lambda i: "sliding" if window and i % 2 == 0 and i < first_full else "full",
                       moe_layout=MoeLayout(shared="shared_expert", shared_gate=True))


@adapter("qwen3_moe")
def _qwen3_moe(raw: RawConfig) -> Architecture:
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    bias = raw.bool("attention_bias", default=False)
    moe = MoeSpec(num_experts=raw.int("num_experts", "num_local_experts"), top_k=raw.int("num_experts_per_tok"),
                  expert_intermediate=raw.int("moe_intermediate_size"),
                  sparse_layers=_qwen_sparse_layers(raw, layers))
    # Qwen3MoeConfig keeps sliding_window only with use_sliding_window; then every layer slides
    window = _window(raw) if raw.bool("use_sliding_window", default=False) else None
    return _llama_like(raw, family="moe", tied_default=False, qkv_bias=bias, o_bias=bias,
                       qk_norm="per_head", moe=moe, window=window, layer_rule=_sliding_everywhere(window))


@adapter("olmoe")
def _olmoe(raw: RawConfig) -> Architecture:
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    moe = MoeSpec(num_experts=raw.int("num_experts", "num_local_experts"), top_k=raw.int("num_experts_per_tok"),
                  expert_intermediate=raw.int("intermediate_size"), sparse_layers=tuple(range(layers)))
    return _llama_like(raw, family="moe", tied_default=False, qk_norm="full", moe=moe)


def _deepseek(raw: RawConfig, correction_bias: bool) -> Architecture:
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    experts = raw.int("n_routed_experts", "num_local_experts")
    width = raw.int("moe_intermediate_size")
    # transformers 5.17 makes layer i sparse when i >= first_k_dense_replace (moe_layer_freq
    # is read by the remote code only)
    moe = MoeSpec(num_experts=experts, top_k=raw.int("num_experts_per_tok"), expert_intermediate=width,
                  shared_intermediate=raw.int("n_shared_experts", default=0, minimum=0) * width,
                  sparse_layers=_sparse_layers(layers, first_dense=raw.int("first_k_dense_replace", default=0,
                                                                           minimum=0)),
                  routing_fp32=True, router_fp32=True)  # the router runs in fp32, returns fp32 weights
    mla = MlaSpec(q_lora_rank=raw.int("q_lora_rank", default=None), kv_lora_rank=raw.int("kv_lora_rank"),
                  qk_nope_head_dim=raw.int("qk_nope_head_dim"), qk_rope_head_dim=raw.int("qk_rope_head_dim"),
                  v_head_dim=raw.int("v_head_dim"))
    raw = raw.with_defaults({"head_dim": mla.qk_nope_head_dim + mla.qk_rope_head_dim})
    extra = ()
    if correction_bias:
        extra = (BufferSpec(name="model.layers.{i}.mlp.gate.e_score_correction_bias", shape=(experts,),
                            dtype="activation", layers=moe.sparse_layers,
                            why="DeepSeek-V3's per-expert routing score correction"),)
    return _llama_like(raw, family="deepseek", tied_default=False, moe=moe, mla=mla,
                       qkv_bias=raw.bool("attention_bias", default=False),
                       moe_layout=MoeLayout(shared="shared_experts"), rotary_dim=mla.qk_rope_head_dim,
                       extra_buffers=extra)


@adapter("deepseek_v2")
def _deepseek_v2(raw: RawConfig) -> Architecture:
    return _deepseek(raw, correction_bias=False)


@adapter("deepseek_v3")
def _deepseek_v3(raw: RawConfig) -> Architecture:
    return _deepseek(raw, correction_bias=True)


@adapter("gpt_oss")
def _gpt_oss(raw: RawConfig) -> Architecture:
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    window = _window(raw)
    moe = MoeSpec(num_experts=raw.int("num_local_experts", "num_experts"), top_k=raw.int("num_experts_per_tok"),
                  expert_intermediate=raw.int("intermediate_size"), sparse_layers=tuple(range(layers)),
                  expert_bias=True, stored_per_expert=False)
    arch = _llama_like(raw, family="gpt_oss", tied_default=False, qkv_bias=True, o_bias=True, moe=moe,
                       moe_layout=MoeLayout(router="router", router_bias=True, transposed=True), window=window,
                       layer_rule=lambda i: "sliding" if i % 2 == 0 else "full",
                       # transformers 5.17 raises for gpt-oss with sdpa (measured): eager or flash
                       attention=("eager", "flash_attention_2"))
    sinks = TensorSpec(name="model.layers.{i}.self_attn.sinks", shape=(arch.num_heads,), kind="other",
                       layers=tuple(range(layers)))
    return arch.model_copy(update={"tensors": (sinks, *arch.tensors), "attention_sinks": True})


@adapter("llama4_text")
def _llama4_text(raw: RawConfig) -> Architecture:
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    step = raw.int("interleave_moe_layer_step", default=1)
    listed = raw.list("moe_layers", default=None)
    sparse = tuple(listed) if listed is not None else tuple(range(step - 1, layers, step))
    if any(not isinstance(i, int) or not 0 <= i < layers for i in sparse):
        raise ConfigError(f"{raw.where}: moe_layers must list layer indices below {layers}.")
    width = raw.int("intermediate_size")
    moe = MoeSpec(num_experts=raw.int("num_local_experts", "num_experts"), top_k=raw.int("num_experts_per_tok"),
                  expert_intermediate=width, shared_intermediate=width, sparse_layers=sparse,
                  all_experts=True, stored_per_expert=False)
    # Llama4TextConfig: a layer without rope (every no_rope_layer_interval-th) attends to all
    # tokens; the others attend within chunks of attention_chunk_size
    interval = raw.int("no_rope_layer_interval", default=4)
    no_rope = raw.list("no_rope_layers", default=None) or [int((i + 1) % interval != 0) for i in range(layers)]
    if len(no_rope) < layers:
        raise ConfigError(f"{raw.where}: no_rope_layers must have one entry per layer ({layers}).")
    chunk = raw.int("attention_chunk_size", default=8192)
    return _llama_like(raw, family="llama4", tied_default=False, moe=moe, mlp_module="feed_forward",
                       intermediate_keys=("intermediate_size_mlp",), window=chunk,
                       moe_layout=MoeLayout(router="router", transposed=True, shared="shared_expert"),
                       layer_rule=lambda i: "chunked" if no_rope[i] else "full")


from . import hybrid, seq2seq, vision  # noqa: E402,F401  (register the state-space, hybrid, seq2seq adapters)
