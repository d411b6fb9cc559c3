"""The typed, normalized description of a model: `Architecture` and the specs of its parts.

`Architecture` is what every later step reads (weights, parallel split, runtimes); it is built
by the family adapters in `model/families/` from a config.json and never from anything else.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import field_validator

from ..base import Frozen
from ..quantized import QuantScheme

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
    # DeepSeek-V3's router: sigmoid scores, top-k among the experts of the best `kept` of `groups`
    # expert groups (n_group, topk_group)
    sigmoid_groups: tuple[int, int] | None = None
    softmax_after_top_k: bool = False  # gpt-oss: top-k of the logits first, softmax over those k only
    # the top-k weights divided by their sum (norm_topk_prob; Mixtral always)
    normalized_top_k: bool = False
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
    # DeepSeek-V3's rotary over interleaved pairs (its config's rope_interleave); V2 multiplies in complex64
    rope_interleave: bool = False


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
    residual_in_fp32: bool = False  # Mamba and Mamba-2 blocks keep their residual stream in fp32 (config flag)

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
    # T5 scales the decoder's output by d_model**-0.5 before the lm_head unless the config's
    # tie_word_embeddings is false (T5Config.scale_decoder_outputs, transformers 5.17)
    scaled_decoder_output: bool = False


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
    # Phi-3's switch from short to long rope factors (Phi3ForCausalLM.prepare_inputs_for_generation,
    # transformers 5.17): generate() drops its cache at the step whose input first passes this many
    # positions while the cache holds no more, and at every step after (config's
    # original_max_position_embeddings; None for the families that never drop it)
    cache_restart_positions: int | None = None
    # the config's MLP activation, for the families whose replayed request order depends on it
    # (GPT-2's gelu_new runs op by op; StarCoder2's and OPT's are one kernel)
    activation: str | None = None
    # Qwen2MoeModel (transformers 5.17) builds a sliding-window mask for every forward even when no
    # layer slides (its config sets the window to 0 then): a batch x tokens x tokens mask nothing reads
    unused_sliding_mask: bool = False
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
    def qk_norm(self) -> bool:
        """Norms over the projected queries and keys (q_norm / k_norm: Qwen3, Gemma-3, OLMo-2)."""
        return any(".q_norm." in t.name for t in self.tensors)

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

