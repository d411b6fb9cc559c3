"""Builders the family adapters share: the tensor inventory, config readers with
transformers' defaults, and whole blocks (llama-shaped decoders, MoE MLPs, latent attention).

Every builder lists tensors under transformers 5.17's own names, so the exactness test can
compare an adapter's inventory with transformers' instantiation name by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from ..base import Frozen
from ..config import MAX_LAYERS, RawConfig
from ..errors import ConfigError
from .spec import (
    ALL_ATTENTION,
    Architecture,
    BufferSpec,
    DType,
    LayerKind,
    MlaSpec,
    MoeSpec,
    TensorKind,
    TensorSpec,
)

TORCH_DTYPE_NAMES: dict[str, DType] = {
    "float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
}


class Inventory:
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


def read_config_dtype(raw: RawConfig) -> DType | None:
    name = raw.raw("torch_dtype", "dtype", default=None)
    if isinstance(name, str):
        return TORCH_DTYPE_NAMES.get(name.removeprefix("torch."))
    return None


def rope_buffers(prefix: str, rotary_dim: int, name: str = "rotary_emb") -> list[BufferSpec]:
    """transformers 5 keeps `inv_freq` and `original_inv_freq` (rotary_dim / 2 fp32 each)."""
    half = rotary_dim // 2
    why = "rotary frequencies (fp32), kept twice: current and original"
    return [BufferSpec(name=f"{prefix}{name}.inv_freq", shape=(half,), dtype="fp32", why=why),
            BufferSpec(name=f"{prefix}{name}.original_inv_freq", shape=(half,), dtype="fp32", why=why)]


class HeadShape(NamedTuple):
    """A decoder's widths, the first thing every adapter reads from its config."""

    hidden: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int

    def arch_fields(self) -> dict[str, int]:
        """The Architecture fields these widths fill."""
        return {"hidden_size": self.hidden, "num_layers": self.layers, "vocab_size": self.vocab,
                "num_heads": self.heads, "num_kv_heads": self.kv_heads, "head_dim": self.head_dim}


def read_head_shape(raw: RawConfig, hidden_keys: tuple[str, ...] = ("hidden_size",),
                    layer_keys: tuple[str, ...] = ("num_hidden_layers",),
                    head_keys: tuple[str, ...] = ("num_attention_heads",)) -> HeadShape:
    """GPT-style widths under the family's own key names: as many key/value heads as query
    heads, each hidden / heads wide (a family with fewer key/value heads replaces kv_heads)."""
    hidden = raw.int(*hidden_keys)
    layers = raw.int(*layer_keys, maximum=MAX_LAYERS)
    heads = raw.int(*head_keys)
    head_dim = raw.divides(hidden, heads, f"{hidden_keys[0]} / {head_keys[0]}")
    return HeadShape(hidden, layers, raw.int("vocab_size"), heads, heads, head_dim)


def read_decoder_shape(raw: RawConfig) -> HeadShape:
    """Llama-style widths: hidden_size, num_hidden_layers, vocab_size, then grouped key/value
    heads and head_dim as `read_heads` reads them."""
    hidden = raw.int("hidden_size")
    layers = raw.int("num_hidden_layers", maximum=MAX_LAYERS)
    vocab = raw.int("vocab_size")
    return HeadShape(hidden, layers, vocab, *read_heads(raw, hidden))


def read_heads(raw: RawConfig, hidden: int, heads_keys: tuple[str, ...] = ("num_attention_heads",),
           kv_keys: tuple[str, ...] = ("num_key_value_heads",)) -> tuple[int, int, int]:
    heads = raw.int(*heads_keys)
    kv_heads = raw.int(*kv_keys, default=heads)
    head_dim = raw.int("head_dim", default=None) or raw.divides(hidden, heads, "hidden size / heads")
    if heads % kv_heads:
        raise ConfigError(f"{raw.where}: {heads} attention heads cannot be shared by {kv_heads} "
                          "key/value heads (not a divisor).")
    return heads, kv_heads, head_dim


def read_rotary_dim(raw: RawConfig, head_dim: int, factor_keys: tuple[str, ...] = ("partial_rotary_factor",)
                ) -> int:
    # transformers 5 configs keep it in `rope_parameters`; older ones at the top level
    nested = raw.raw("rope_parameters", default=None)
    if isinstance(nested, dict) and nested.get("partial_rotary_factor") is not None:
        raw = RawConfig({**raw.data, factor_keys[0]: nested["partial_rotary_factor"]}, raw.where)
    factor = raw.float(*factor_keys, default=1.0)
    if not 0 < factor <= 1:
        raise ConfigError(f"{raw.where}: {factor_keys[0]} must be in (0, 1], not {factor}.")
    return int(head_dim * factor)


def read_layer_types(raw: RawConfig, num_layers: int, default: Callable[[int], LayerKind]
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


def read_window(raw: RawConfig) -> int | None:
    return raw.int("sliding_window", default=None)


def read_tied(raw: RawConfig, default: bool) -> bool:
    return raw.bool("tie_word_embeddings", default=default)



def gated_mlp(inv: Inventory, prefix: str, hidden: int, width: int, bias: bool,
              layers: tuple[int, ...] | None = None) -> None:
    """act(gate_proj(x)) * up_proj(x), then down_proj: the GLU MLP of llama and its kin."""
    inv.linear(f"{prefix}.gate_proj", width, hidden, bias, layers=layers)
    inv.linear(f"{prefix}.up_proj", width, hidden, bias, layers=layers)
    inv.linear(f"{prefix}.down_proj", hidden, width, bias, layers=layers)


def attention_block(inv: Inventory, prefix: str, shape: HeadShape, bias: bool, layers: tuple[int, ...],
                    gated_query: bool = False) -> None:
    """Separate q/k/v/o projections on the given layers; `gated_query`: q_proj also yields the
    output gate of a gated attention, twice the query width."""
    hidden, heads, kv_heads, head_dim = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim
    inv.linear(f"{prefix}.q_proj", (2 if gated_query else 1) * heads * head_dim, hidden, bias, layers=layers)
    inv.linear(f"{prefix}.k_proj", kv_heads * head_dim, hidden, bias, layers=layers)
    inv.linear(f"{prefix}.v_proj", kv_heads * head_dim, hidden, bias, layers=layers)
    inv.linear(f"{prefix}.o_proj", hidden, heads * head_dim, bias, layers=layers)


def attention_and_mixer_layers(kinds: tuple[LayerKind, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A hybrid's attention layers and its recurrent-mixer layers (kind "none"), by position."""
    return (tuple(i for i, k in enumerate(kinds) if k != "none"),
            tuple(i for i, k in enumerate(kinds) if k == "none"))


def layer_norms_and_head(raw: RawConfig, inv: Inventory, shape: HeadShape, norms: tuple[str, ...],
                         final: str) -> bool:
    """Each layer's `norms` and the `final` norm (weights only: RMS norms), then lm_head unless
    the config ties it (untied by default). Returns whether it is tied."""
    for name in norms:
        inv.norm(f"model.layers.{{i}}.{name}", shape.hidden, False)
    inv.norm(final, shape.hidden, False, per_layer=False)
    tied = read_tied(raw, False)
    inv.head("lm_head", shape.vocab, shape.hidden, tied)
    return tied


def torch_fallback_note(mixer: str) -> str:
    """What a recurrent family's estimate assumes about the mixer's kernels."""
    return (f"{mixer} layers keep a fixed-size state (conv1d window + scan state, the scan state in fp32) "
            "instead of a KV cache. Runtime terms follow transformers' torch fallback (no mamba-ssm / "
            "causal-conv1d / flash-linear-attention kernels installed), as measured; with those kernels the "
            "prefill transient is far smaller.")


def llama_like(raw: RawConfig, *, family: str, tied_default: bool, qkv_bias: bool = False,
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
    hidden, layers, vocab, heads, kv_heads, head_dim = read_decoder_shape(raw)
    intermediate = raw.int(*intermediate_keys)
    tied = read_tied(raw, tied_default)
    inv = Inventory(layers)
    inv.one("model.embed_tokens.weight", (vocab, hidden), "embedding")
    att = "model.layers.{i}.self_attn"
    if mla is not None:
        mla_attention(inv, att, mla, heads, hidden, qkv_bias)
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
        moe_mlp(inv, m, moe, moe_layout or MoeLayout(), hidden)
    if mlp == "gated":
        gated_mlp(inv, m, hidden, intermediate, mlp_bias, dense_layers)
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
        layer_types=read_layer_types(raw, layers, rule), sliding_window=window,
        tie_word_embeddings=tied, config_dtype=read_config_dtype(raw),
        attention_implementations=attention, tensors=tuple(inv.items),
        buffers=(*rope_buffers("model.", rot), *extra_buffers), moe=moe, mla=mla, **mla_fields,
    )


# transformers' LlamaConfig / MistralConfig defaults for the keys we read: multimodal wrappers


class MoeLayout(Frozen):
    """Where a family's mixture-of-experts block keeps its tensors (module names, layout)."""

    router: str = "gate"  # the router module under the MLP
    router_bias: bool = False
    transposed: bool = False  # experts stored [E, in, out] (gpt-oss, Llama-4) instead of [E, out, in]
    shared: str | None = None  # the shared expert's module, a gated MLP of MoeSpec.shared_intermediate
    shared_gate: bool = False  # Qwen2-MoE: a Linear(hidden, 1) scales the shared expert's output


def moe_sparse_layers(num_layers: int, *, first_dense: int = 0, step: int = 1,
                   dense: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Layers whose MLP is the mixture: from `first_dense` on, every `step`-th ((i + 1) % step
    == 0, transformers' Qwen-MoE rule), except those listed in `dense`."""
    if step < 1:
        raise ConfigError(f"the MoE layer step must be at least 1, not {step}.")
    return tuple(i for i in range(num_layers) if i >= first_dense and (i + 1) % step == 0 and i not in dense)


def moe_mlp(inv: Inventory, module: str, moe: MoeSpec, layout: MoeLayout, hidden: int) -> None:
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
        gated_mlp(inv, f"{module}.{layout.shared}", hidden, moe.shared_intermediate, False, layers)
    if layout.shared_gate:
        inv.linear(f"{module}.shared_expert_gate", 1, hidden, False, layers=layers)


def mla_attention(inv: Inventory, module: str, mla: MlaSpec, heads: int, hidden: int, bias: bool) -> None:
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


def sliding_everywhere(window: int | None) -> Callable[[int], LayerKind]:
    return lambda i: "sliding" if window else "full"



def whole_model_arch(raw: RawConfig, inv: Inventory, **fields) -> Architecture:
    """The Architecture of a family written out in full (here, hybrid.py, seq2seq.py): the
    config's model_type and dtype, the inventory's tensors, no sliding window, and every layer
    attending to all tokens unless `layer_types` says otherwise."""
    fields.setdefault("layer_types", ("full",) * fields["num_layers"])
    return Architecture(model_type=raw.str("model_type"), sliding_window=None, config_dtype=read_config_dtype(raw),
                        tensors=tuple(inv.items), **fields)



def qwen_sparse_layers(raw: RawConfig, layers: int) -> tuple[int, ...]:
    """transformers' Qwen2/3-MoE: every decoder_sparse_step-th layer, unless listed in
    mlp_only_layers."""
    dense = tuple(raw.list("mlp_only_layers", default=None) or ())
    return moe_sparse_layers(layers, step=raw.int("decoder_sparse_step", default=1), dense=dense)

