"""The two training steps as moments: at each candidate peak, the explicit list of tensors alive.

Step order (the default loop): forward (each layer saves its tensors, or with checkpointing only
its input), the loss (logits -> fp32 copy -> log_softmax), backward from the logits down to the
embedding (each layer's saved tensors are freed as its node runs, its gradients appear),
optimizer.step() (the first one creates the states), zero_grad(set_to_none=True). Step 2 runs
the same with the states alive and no gradients at its start, so it is never below step 1.

The loss region follows transformers 5.17's ForCausalLMLoss (notes/training.md §1): 10V bytes
per token at log_softmax for 16-bit logits, 12V in NllLoss/LogSoftmax backward. The in-layer
backward transient is modelled from the op order, not measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...base import block_bytes
from ...result.training import AliveTensor, Moment
from ..allocator import CachingAllocator
from .params import OptimizerCost, Param
from .saved import SavedSet, SavedTensor


@dataclass
class StepInputs:
    persistent: list[AliveTensor]  # weights, quantization state, workspaces, inputs, adapters
    saved: SavedSet
    checkpointing: bool
    trainable: list[Param]
    full: bool  # the gradients of the layers' weights appear layer by layer
    tied: bool
    optimizer: OptimizerCost
    tokens: int
    vocab: int
    hidden: int
    logits_bytes: int  # element bytes of the logits the model returns
    residual_bytes: int  # element bytes of the residual stream (its gradient)
    layer_transient: int  # bytes a layer's backward holds beyond its saved tensors and grads
    forward_transient: int  # bytes a layer's forward holds beyond what it saves
    dequant_bytes: int  # bitsandbytes' [out, in] dequantized weight during a 4-bit matmul
    weight_copy_grad: int  # autocast: the 16-bit grad of the largest layer weight copy before its fp32 cast
    head_copy_grad: int  # the same for lm_head's weight copy
    embedding_grad_extra: int  # tied head: the embedding's dense grad added into the head's


def _one(name: str, nbytes: int) -> AliveTensor:
    return AliveTensor(name=name, bytes=block_bytes(nbytes))


def _sum(name: str, tensors: list[SavedTensor]) -> AliveTensor:
    return AliveTensor(name=name, bytes=sum(block_bytes(t.bytes) for t in tensors))


def _grads(params: list[Param], places: tuple[str, ...], name: str) -> AliveTensor:
    return AliveTensor(name=name, bytes=sum(p.allocated for p in params if p.place in places))


def moments(s: StepInputs) -> list[Moment]:
    saved, layers = s.saved, len(s.saved.layers)
    tv = s.tokens * s.vocab
    loss_saved = _sum("saved: log_softmax output, shifted labels", saved.loss)
    head_saved = _sum("saved: final norm, lm_head, softcapping", saved.head)
    emb_saved = _sum("saved: embeddings, rope tables", saved.embedding)
    if s.checkpointing:
        inputs = AliveTensor(name="checkpointed layer inputs", bytes=sum(block_bytes(b) for b in saved.layer_inputs))
        all_layers, first_layer_only = [inputs], [inputs]
        last_recompute = [_sum("recomputed last layer's saved tensors", saved.layers[-1])]
        first_recompute = [_sum("recomputed first layer's saved tensors", saved.layers[0])]
    else:
        all_layers = [_sum(f"saved: {layers} layers", [t for lst in saved.layers for t in lst])]
        first_layer_only = [_sum("saved: first layer", saved.layers[0])]
        last_recompute = first_recompute = []
    trainable = s.trainable
    if s.full:
        head_grads = _grads(trainable, ("head",), "grads: final norm, lm_head")
        if s.tied:  # lm_head's grad lands in the embedding weight's .grad
            head_grads = AliveTensor(name="grads: final norm, lm_head (the tied embedding's .grad)",
                                     bytes=head_grads.bytes + _grads(trainable, ("embedding",), "").bytes)
        per_layer = _grads(trainable, ("layer",), "").bytes // max(layers, 1)
        last_layer_grads = AliveTensor(name="grads: last layer", bytes=per_layer)
        all_but_embedding = AliveTensor(name="grads: layers, final norm, lm_head",
                                        bytes=head_grads.bytes + per_layer * layers)
    else:
        head_grads = AliveTensor(name="grads: none yet (adapters only)", bytes=0)
        per_layer = _grads(trainable, ("layer",), "").bytes // max(layers, 1)
        last_layer_grads = AliveTensor(name="grads: last layer's adapters", bytes=per_layer)
        all_but_embedding = AliveTensor(name="grads: adapters", bytes=sum(p.allocated for p in trainable))
    grads = AliveTensor(name="grads: every trainable parameter", bytes=sum(p.allocated for p in trainable))
    opt = s.optimizer
    out: list[Moment] = []
    for step in (1, 2):
        base = list(s.persistent)
        if step == 2 and opt.state_bytes:
            base.append(AliveTensor(name="optimizer states", bytes=opt.state_bytes))

        def add(name: str, tensors: list[AliveTensor], step: int = step, base: list[AliveTensor] = base) -> None:
            alive = [t for t in (*base, *tensors) if t.bytes > 0]
            out.append(Moment(name=f"step {step}: {name}", step=step, tensors=alive, bytes=sum(t.bytes for t in alive)))

        logits = _one("logits (as the model returns them)", tv * s.logits_bytes)
        upcast = [_one("fp32 copy of the logits", tv * 4)] if s.logits_bytes != 4 else []
        add("forward, last layer", [emb_saved, *(all_layers if not s.checkpointing else first_layer_only),
                                     *last_recompute, _one("layer forward temporaries", s.forward_transient),
                                     _one("dequantized 4-bit weight", s.dequant_bytes)])
        add("loss, log_softmax", [emb_saved, *all_layers, head_saved, logits, *upcast, loss_saved])
        add("backward, NllLoss/LogSoftmax", [emb_saved, *all_layers, head_saved, loss_saved,
                                             _one("grad of log_softmax output (fp32)", tv * 4),
                                             _one("grad of the fp32 logits", tv * 4)])
        add("backward, lm_head", [emb_saved, *all_layers, head_saved, head_grads,
                                  _one("grad of the logits", tv * s.logits_bytes),
                                  _one("grad of lm_head's input", s.tokens * s.hidden * s.residual_bytes),
                                  _one("16-bit grad of a weight copy", s.head_copy_grad)])
        add("backward, last layer", [emb_saved, *all_layers, *last_recompute, head_grads, last_layer_grads,
                                     _one("layer backward temporaries", s.layer_transient),
                                     _one("dequantized 4-bit weight", s.dequant_bytes),
                                     _one("16-bit grad of a weight copy", s.weight_copy_grad)])
        add("backward, first layer", [emb_saved, *first_layer_only, *first_recompute, all_but_embedding,
                                      _one("layer backward temporaries", s.layer_transient),
                                      _one("dequantized 4-bit weight", s.dequant_bytes)])
        add("end of backward", [grads, _one("embedding backward: dense grad added into the tied head's",
                                            s.embedding_grad_extra),
                                _one("grad of the embedding output", s.tokens * s.hidden * s.residual_bytes)])
        step_tensors = [grads, _one("optimizer step temporary", opt.temporary_bytes)]
        if step == 1 and opt.state_bytes:
            step_tensors.insert(1, AliveTensor(name="optimizer states (created now)", bytes=opt.state_bytes))
        add("optimizer.step()", step_tensors)
    return out


def replay_reserve(s: StepInputs, weight_allocations: list[int]) -> int:
    """Segments the caching allocator keeps beyond the live tensors at the peak, from replaying
    the big requests of both steps through its rules (runtimes/allocator.py)."""
    alloc = CachingAllocator()
    for size in weight_allocations:
        alloc.malloc(size)
    for t in s.persistent:
        if not t.name.startswith("weights"):
            alloc.malloc(t.bytes)
    states: list[int] = []
    for step in (1, 2):
        held = [alloc.malloc(t.bytes) for t in s.saved.embedding]
        per_layer: list[list[int]] = []
        for index, layer in enumerate(s.saved.layers):
            if s.checkpointing:
                per_layer.append([alloc.malloc(s.saved.layer_inputs[index])])
            else:
                per_layer.append([alloc.malloc(t.bytes) for t in layer])
        held += [alloc.malloc(t.bytes) for t in s.saved.head]
        tv = s.tokens * s.vocab
        logits = alloc.malloc(tv * s.logits_bytes)
        upcast = alloc.malloc(tv * 4) if s.logits_bytes != 4 else None
        loss = [alloc.malloc(t.bytes) for t in s.saved.loss]
        for h in (upcast, logits):
            if h is not None:
                alloc.free(h)
        g1, g2 = alloc.malloc(tv * 4), alloc.malloc(tv * 4)
        for h in (*loss, g1):
            alloc.free(h)
        g3 = alloc.malloc(tv * s.logits_bytes)
        alloc.free(g2)
        grads = [alloc.malloc(p.elements * p.nbytes) for p in s.trainable for _ in range(p.count)
                 if p.place != "layer"] if s.full else []
        alloc.free(g3)
        layer_params = [p for p in s.trainable if p.place == "layer"]
        for index in reversed(range(len(s.saved.layers))):
            recompute = [alloc.malloc(t.bytes) for t in s.saved.layers[index]] if s.checkpointing else []
            temp = alloc.malloc(s.layer_transient) if s.layer_transient else None
            grads += [alloc.malloc(p.elements * p.nbytes) for p in layer_params]
            for h in (*recompute, *per_layer[index]):
                alloc.free(h)
            if temp is not None:
                alloc.free(temp)
        for h in held:
            alloc.free(h)
        if step == 1 and s.optimizer.state_bytes:
            pairs = s.optimizer.state_bytes == 2 * sum(p.allocated for p in s.trainable)  # AdamW: two per param
            states = [alloc.malloc(p.elements * p.nbytes) for p in s.trainable for _ in range(2 * p.count)] \
                if pairs else [alloc.malloc(s.optimizer.state_bytes)]
        if s.optimizer.temporary_bytes:
            alloc.free(alloc.malloc(s.optimizer.temporary_bytes))
        for h in grads:
            alloc.free(h)
    del states
    return max(alloc.peak_reserved - alloc.peak_allocated, 0)
