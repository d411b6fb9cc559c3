"""The tensors autograd saves for backward in one training forward, walked op by op.

A small symbolic forward: each op of a family's decoder layer (transformers 5.17 code) takes
abstract activations (width per token, element bytes, requires_grad, storage) and records
what its backward node keeps, the way derivatives.yaml says it does: a Linear keeps its input
when its weight trains, a mul keeps each operand when the other needs a gradient, RMSNorm
keeps its fp32 input and rsqrt, SDPA keeps q, k, v, its output and the fp32 logsumexp.
Storages are counted once (a chunk of a fused qkv output holds the whole output), as the
caching allocator holds them. Parameters and the model's buffers are never counted here.

The walk was checked to the byte on CPU against real models built from the bundled configs
(tests/test_training.py); what differs on CUDA is in `Device` (training.yaml's `cuda`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ...base import Frozen
from ...model.spec import Architecture
from .profile import TrainingFamily


class Device(Frozen):
    """Ops whose saved tensors differ between devices. None: the activation's own dtype."""

    dropout_mask_bytes: int | None = 1
    layer_norm_stats_bytes: int | None = 4
    autocast_fp32_ops: tuple[str, ...] = ("pow",)


class Mode(Frozen):
    """What trains and in which dtypes."""

    param_bytes: int  # dtype of the unquantized parameters (and of the residual stream)
    autocast: bool  # torch.autocast(bf16/fp16) around forward and loss: Linear and SDPA in 16 bits
    full: bool  # every parameter trains (else only LoRA adapters)
    lora_modules: tuple[str, ...] = ()  # adapted Linear names, relative to the layer ("self_attn.q_proj")
    rank: int = 16
    input_requires_grad: bool = False  # enable_input_require_grads(): the embedding output needs a gradient

    @property
    def compute_bytes(self) -> int:
        return 2 if self.autocast else self.param_bytes


class SavedTensor(Frozen):
    name: str
    bytes: int  # of the storage (one allocation)


@dataclass
class Act:
    width: int  # elements per token of this tensor
    nbytes: int  # bytes per element
    grad: bool  # requires_grad
    sid: int  # storage identity
    storage: int  # elements per token of its storage (a view of a fused output keeps all of it)


_ids = itertools.count()


@dataclass
class Walk:
    arch: Architecture
    family: TrainingFamily
    mode: Mode
    device: Device
    batch: int
    seq: int
    saved: dict[int, SavedTensor] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    # -- bookkeeping -----------------------------------------------------------------------

    def new(self, width: int, nbytes: int, grad: bool) -> Act:
        return Act(width, nbytes, grad, next(_ids), width)

    def view(self, base: Act, width: int) -> Act:
        return Act(width, base.nbytes, base.grad, base.sid, base.storage)

    def cast(self, x: Act, nbytes: int) -> Act:
        return x if x.nbytes == nbytes else self.new(x.width, nbytes, x.grad)

    def save(self, x: Act, name: str) -> None:
        if x.sid not in self.saved:
            self.saved[x.sid] = SavedTensor(name=name, bytes=x.storage * x.nbytes * self.tokens)

    def fixed(self, name: str, nbytes: int) -> None:
        self.saved[next(_ids)] = SavedTensor(name=name, bytes=nbytes)

    def total(self) -> int:
        return sum(t.bytes for t in self.saved.values())

    # -- ops -------------------------------------------------------------------------------

    def linear(self, x: Act, name: str, out: int, inp: int, trains: bool | None = None) -> Act:
        trains = self.mode.full if trains is None else trains
        x_in = self.cast(x, 2) if self.mode.autocast else x
        if trains:
            self.save(x_in, f"{name} input")
        if self.mode.autocast and self.mode.param_bytes != 2 and x_in.grad:  # mm keeps the weight copy
            self.fixed(f"{name} 16-bit weight copy", out * inp * 2)
        y = self.new(out, self.mode.compute_bytes, trains or x.grad)
        if name in self.mode.lora_modules:
            r = self.mode.rank
            xa = self.cast(x, 4)  # peft's _cast_input_dtype: to lora_A's fp32
            if self.mode.autocast:  # lora_A and lora_B run under autocast again: 16-bit casts of x and weights
                xa = self.cast(xa, 2)
                if xa.grad:  # mm keeps a weight only for its input's gradient
                    self.fixed(f"{name} lora_A 16-bit copy", r * inp * 2)
                self.fixed(f"{name} lora_B 16-bit copy", out * r * 2)
            self.save(xa, f"{name} lora_A input (fp32 copy)")
            a = self.new(r, xa.nbytes, True)
            self.save(a, f"{name} lora_B input")
            y.grad = True
        return y

    def mul(self, a: Act, b: Act, name: str) -> Act:
        if b.grad:
            self.save(a, f"{name} operand")
        if a.grad:
            self.save(b, f"{name} operand")
        return self.new(max(a.width, b.width), max(a.nbytes, b.nbytes), a.grad or b.grad)

    def norm(self, x: Act, name: str, width: int, groups: int = 1) -> Act:
        """One of the family's norms over `width` elements, `groups` statistics per token."""
        trains = self.mode.full
        kind = self.family.norm
        if kind == "layernorm":
            if x.grad or trains:
                self.save(x, f"{name} input")
                stats = self.device.layer_norm_stats_bytes or x.nbytes
                self.save(self.new(groups, stats, True), f"{name} mean")
                self.save(self.new(groups, stats, True), f"{name} rstd")
            return self.new(width, x.nbytes, x.grad or trains)
        x32 = self.cast(x, 4)
        if x.grad:
            self.save(x32, f"{name} fp32 input")
            self.save(self.new(groups, 4, True), f"{name} rsqrt")
        h = self.new(width, 4, x.grad)
        if kind == "gemma_rms":  # h * (1 + weight.float()), all fp32, then type_as(x)
            if h.grad:
                self.fixed(f"{name} 1 + weight", width * 4)
            if trains:
                self.save(h, f"{name} normalized (fp32)")
            return self.cast(self.new(width, 4, x.grad or trains), x.nbytes)
        h_in = self.cast(h, x.nbytes)  # weight * h.to(input_dtype)
        if trains:
            self.save(h_in, f"{name} normalized")
        return self.new(width, x.nbytes, x.grad or trains)

    def activation(self, x: Act, name: str) -> Act:
        if self.family.activation in ("silu", "gelu_tanh"):
            if x.grad:
                self.save(x, f"{name} input")
            return self.new(x.width, x.nbytes, x.grad)
        # gelu_new: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))
        upcast = self.mode.autocast and "pow" in self.device.autocast_fp32_ops
        xp = self.cast(x, 4) if upcast else x
        if x.grad:
            self.save(xp, f"{name} pow input")
        inner = max(x.nbytes, xp.nbytes)
        tanh = self.new(x.width, inner, x.grad)
        if x.grad:
            self.save(tanh, f"{name} tanh output")
        one_plus = self.new(x.width, inner, x.grad)
        half = self.new(x.width, x.nbytes, x.grad)
        return self.mul(half, one_plus, f"{name} 0.5x * (1 + tanh)")

    def dropout(self, x: Act, p: float, name: str) -> Act:
        if p <= 0:
            return x
        if x.grad:
            mask = self.device.dropout_mask_bytes or x.nbytes
            self.save(Act(x.width, mask, True, next(_ids), x.width), f"{name} mask")
        return self.new(x.width, x.nbytes, x.grad)

    def rope(self, x: Act) -> Act:
        arch = self.arch
        cos = self.mode.param_bytes  # cos/sin follow the embedding output's dtype
        if x.grad and "rope tables" not in {t.name for t in self.saved.values()}:
            self.fixed("rope tables", 2 * self.seq * arch.head_dim * cos)  # cos and sin, [1, N, head_dim]
        return self.new(x.width, max(x.nbytes, cos), x.grad)

    def sdpa(self, q: Act, k: Act, v: Act, layer: int) -> Act:
        arch = self.arch
        if self.mode.autocast:
            q, k, v = self.cast(q, 2), self.cast(k, 2), self.cast(v, 2)
        grad = q.grad or k.grad or v.grad
        if grad:
            for name, t in (("query", q), ("key", k), ("value", v)):
                self.save(t, f"attention {name}")
        out = self.new(arch.num_heads * arch.head_dim, q.nbytes, grad)
        if grad:
            self.save(out, "attention output")
            if q.nbytes == 4 and arch.num_kv_heads != arch.num_heads:
                # fp32 GQA: no fused kernel takes it, the math kernel keeps the fp32 softmax
                self.fixed("attention softmax (math kernel)", self.batch * arch.num_heads * self.seq ** 2 * 4)
            self.save(self.new(arch.num_heads, 4, True), "attention logsumexp (fp32)")
        return out


def _has(arch: Architecture, fragment: str) -> bool:
    return any(fragment in t.name for t in arch.tensors)


def _has_bias(arch: Architecture, module: str) -> bool:
    return any(t.kind == "bias" and f".{module}." in t.name for t in arch.tensors)


def layer(w: Walk, x: Act, index: int) -> Act:
    """One decoder layer; returns its output (the next layer's input)."""
    arch, fam = w.arch, w.family
    h, nh, nkv, d, inter = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.intermediate_size
    q_w, kv_w = nh * d, nkv * d
    gpt2 = fam.norm == "layernorm" and _has(arch, ".attn.c_attn.")
    attn = "attn" if gpt2 else "self_attn"
    n = w.norm(x, "input norm", h)
    fused = gpt2 or _has(arch, ".qkv_proj.")
    if fused:
        name = "attn.c_attn" if gpt2 else "self_attn.qkv_proj"
        qkv = w.linear(n, name, q_w + 2 * kv_w, h)
        q, k, v = w.view(qkv, q_w), w.view(qkv, kv_w), w.view(qkv, kv_w)
    else:
        q = w.linear(n, "self_attn.q_proj", q_w, h)
        k = w.linear(n, "self_attn.k_proj", kv_w, h)
        v = w.linear(n, "self_attn.v_proj", kv_w, h)
    if arch.qk_norm:
        q = w.norm(q, "q norm", q_w, groups=nh)
        k = w.norm(k, "k norm", kv_w, groups=nkv)
    if arch.positions == "rope":
        q, k = w.rope(q), w.rope(k)
    a = w.sdpa(q, k, v, index)
    if fused and arch.positions == "rope":
        # rope of a chunk of the fused output (not dense) gives a contiguous [B, heads, N, d] query;
        # SDPA's output follows the query's layout, so transpose(1, 2).contiguous() copies it
        a = w.new(a.width, a.nbytes, a.grad)
    o = w.linear(a, f"{attn}.{'c_proj' if gpt2 else 'o_proj'}", h, q_w)
    o = w.dropout(o, fam.dropout.residual, "attention residual dropout")
    if fam.norm == "gemma_rms":
        o = w.norm(o, "post-attention norm", h)
    x = w.new(h, x.nbytes if not o.grad else max(x.nbytes, o.nbytes), x.grad or o.grad)
    n = w.norm(x, "pre-MLP norm", h)
    if gpt2:
        up = w.linear(n, "mlp.c_fc", inter, h)
        m = w.activation(up, "mlp activation")
        m = w.linear(m, "mlp.c_proj", h, inter)
        m = w.dropout(m, fam.dropout.residual, "MLP residual dropout")
    else:
        if _has(arch, ".gate_up_proj."):
            gu = w.linear(n, "mlp.gate_up_proj", 2 * inter, h)
            gate, up = w.view(gu, inter), w.view(gu, inter)
        else:
            gate = w.linear(n, "mlp.gate_proj", inter, h)
            up = w.linear(n, "mlp.up_proj", inter, h)
        m = w.mul(w.activation(gate, "mlp activation"), up, "act(gate) * up")
        m = w.linear(m, "mlp.down_proj", h, inter)
    if fam.norm == "gemma_rms":
        m = w.norm(m, "post-MLP norm", h)
    return w.new(h, x.nbytes, x.grad or m.grad)


def embedding(w: Walk) -> Act:
    """The embedding output, with what the embeddings save (the input ids are an input)."""
    arch, mode = w.arch, w.mode
    x = w.new(arch.hidden_size, mode.param_bytes, mode.full or mode.input_requires_grad)
    if arch.positions == "learned" and mode.full:
        w.fixed("position ids (int64)", 8 * w.seq)  # arange(N)[None], saved by the position embedding
    return w.dropout(x, w.family.dropout.embedding, "embedding dropout")


def head(w: Walk, x: Act) -> Act:
    """Final norm and lm_head: the logits as the model returns them (before the loss)."""
    arch = w.arch
    n = w.norm(x, "final norm", arch.hidden_size)
    logits = w.linear(n, "lm_head", arch.vocab_size, arch.hidden_size)
    if w.family.logit_softcapping:  # logits / cap, tanh, * cap: tanh keeps its output
        t = w.new(arch.vocab_size, logits.nbytes, logits.grad)
        if t.grad:
            w.save(t, "softcapping tanh output")
        logits = w.new(arch.vocab_size, logits.nbytes, logits.grad)
    return logits


def loss(w: Walk, logits: Act) -> None:
    """ForCausalLM loss: logits.float(), log_softmax (keeps its fp32 output), nll_loss (keeps the
    shifted labels and a scalar weight)."""
    w.save(w.new(w.arch.vocab_size, 4, True), "log_softmax output (fp32)")
    w.save(w.new(1, 8, False), "shifted labels (int64)")
    w.fixed("nll total_weight", 4)


@dataclass
class SavedSet:
    """The saved tensors of one forward, by place."""

    embedding: list[SavedTensor]
    layers: list[list[SavedTensor]]  # per decoder layer, as the forward runs (no checkpointing)
    head: list[SavedTensor]  # final norm, lm_head, softcapping
    loss: list[SavedTensor]
    layer_inputs: list[int]  # bytes of each layer's input (what checkpointing keeps instead)

    def layer_bytes(self, index: int) -> int:
        return sum(t.bytes for t in self.layers[index])


def saved_set(arch: Architecture, family: TrainingFamily, mode: Mode, batch: int, seq: int,
              device: Device | None = None) -> SavedSet:
    """What one forward saves, place by place, for a batch of `batch` sequences of `seq` tokens."""
    w = Walk(arch, family, mode, device or Device(), batch, seq)

    def take() -> list[SavedTensor]:
        out = list(w.saved.values())
        w.saved.clear()
        return out

    x = embedding(w)
    emb = take()
    layers, inputs = [], []
    for index in range(arch.num_layers):
        inputs.append(x.width * x.nbytes * w.tokens)
        x = layer(w, x, index)
        saved = take()
        if index and any(t.name == "rope tables" for t in saved):
            saved = [t for t in saved if t.name != "rope tables"]
        layers.append(saved)
    # rope tables are made once, outside the layers: move them out of the first layer's list
    rope = [t for t in layers[0] if t.name == "rope tables"] if layers else []
    if rope:
        layers[0] = [t for t in layers[0] if t.name != "rope tables"]
        emb += rope
    logits = head(w, x)
    head_saved = take()
    loss(w, logits)
    return SavedSet(embedding=emb, layers=layers, head=head_saved, loss=take(), layer_inputs=inputs)
