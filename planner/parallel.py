"""Architecture + (tensor, pipeline) layout -> the Architecture one GPU holds.

Tensor parallelism splits attention by heads (query heads and key/value heads; when there are
fewer key/value heads than ranks, each rank keeps a replica of one, as vLLM does), the MLP by
its intermediate size, the embedding and output head by vocabulary, and replicates norms and
position tables. Column-parallel layers (q/k/v, gate/up, fc1) split their output features and
biases; row-parallel layers (o_proj, down, fc2) split their input features and keep the bias
whole. Pipeline parallelism gives each stage a contiguous run of layers, the embeddings to the
first stage and the final norm and output head to the last (a tied head is a copy there).
Mixture-of-experts layers split every expert along its intermediate size (tensor-parallel
experts, vLLM's default without --enable-expert-parallel) and replicate the router; latent
attention (DeepSeek) splits its heads and keeps the whole compressed latent cache on every rank.

The result is an ordinary `Architecture`, so the single-GPU engine (exact inventory, runtime
points, allocator replay) estimates one rank.
"""

from __future__ import annotations

from .errors import WorkloadError
from .model.spec import Architecture, TensorSpec

# transformers' parameter names (last component before .weight/.bias) by parallel style
COLUMN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "gate_proj",
          "up_proj", "gate_up_proj", "c_fc", "fc1", "fc_in", "dense_h_to_4h", "q_b_proj", "kv_b_proj"}
ROW = {"o_proj", "dense", "c_proj", "out_proj", "down_proj", "fc2", "fc_out", "dense_4h_to_h"}


def kv_heads_per_rank(arch: Architecture, tp: int, replicate_kv: bool) -> int:
    """Key/value heads one rank holds, or an error saying why this tp cannot split them."""
    if arch.num_heads % tp:
        raise WorkloadError(f"tensor parallel size {tp} does not divide the {arch.num_heads} attention heads.")
    kv = arch.num_kv_heads
    if kv % tp == 0:
        return kv // tp
    if replicate_kv and tp % kv == 0:
        return 1
    raise WorkloadError(f"tensor parallel size {tp} cannot split {kv} key/value heads"
                        + (" (nor replicate them: it is not a multiple)." if replicate_kv else
                           "; transformers' tensor-parallel plan needs them divisible."))


def stage_layers(num_layers: int, pp: int, stage: int) -> tuple[int, ...]:
    """Contiguous layers of one pipeline stage; the first stages take one extra layer each when
    the layers do not divide evenly."""
    if pp > num_layers:
        raise WorkloadError(f"pipeline parallel size {pp} exceeds the {num_layers} layers.")
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return tuple(range(start, start + base + (1 if stage < extra else 0)))


def _module(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else name


def _shard_tensor(t: TensorSpec, arch: Architecture, tp: int, kv_rank: int) -> TensorSpec:
    if tp == 1:
        return t
    module = _module(t.name)
    shape = list(t.shape)
    if t.kind == "expert":
        return t.model_copy(update={"shape": _shard_expert(t, tp)})
    if t.kind in ("embedding", "lm_head", "lm_head_bias"):
        shape[0] = -(-shape[0] // tp)
    elif module in COLUMN and t.kind in ("linear", "bias"):
        out_axis = 1 if t.transposed and t.kind == "linear" else 0
        shape[out_axis] = _column_width(module, shape[out_axis], arch, tp, kv_rank)
    elif module in ROW and t.kind == "linear":
        in_axis = 0 if t.transposed else 1
        shape[in_axis] = shape[in_axis] // tp
    return t.model_copy(update={"shape": tuple(shape)})


def _shard_expert(t: TensorSpec, tp: int) -> tuple[int, ...]:
    """Fused experts [E, out, in] (or [E, in, out] when transposed): the intermediate axis is
    split; down_proj's bias (over the hidden size) stays whole."""
    field = t.name.rsplit(".", 1)[-1]
    shape = list(t.shape)
    if field == "gate_up_proj_bias":
        shape[1] //= tp
    elif field == "gate_up_proj":
        shape[2 if t.transposed else 1] //= tp
    elif field == "down_proj":
        shape[1 if t.transposed else 2] //= tp
    return tuple(shape)


def _column_width(module: str, width: int, arch: Architecture, tp: int, kv_rank: int) -> int:
    d = arch.head_dim
    if module in ("k_proj", "v_proj"):
        return kv_rank * d
    if module in ("qkv_proj", "query_key_value", "c_attn", "Wqkv") and arch.num_kv_heads != arch.num_heads:
        return (arch.num_heads // tp + 2 * kv_rank) * d
    return width // tp


def shard(arch: Architecture, tp: int = 1, pp: int = 1, stage: int = 0,
          replicate_kv: bool = True) -> Architecture:
    """The architecture held by one rank of `stage` in a tp x pp layout."""
    if tp < 1 or pp < 1 or not 0 <= stage < pp:
        raise WorkloadError("tensor and pipeline parallel sizes must be at least 1.")
    if tp == 1 and pp == 1:
        return arch
    if arch.encoder is not None:
        raise WorkloadError(f"{arch.model_type}: splitting an encoder-decoder model across GPUs is not modelled yet.")
    if arch.recurrent is not None and tp > 1:
        raise WorkloadError(f"{arch.model_type}: tensor parallelism of its {arch.recurrent.kind} mixer layers is "
                            "not modelled yet; plan it with pipeline parallelism (--tp 1).")
    kv_rank = kv_heads_per_rank(arch, tp, replicate_kv)
    if arch.dense_mlp_layers and arch.intermediate_size % tp:
        raise WorkloadError(f"tensor parallel size {tp} does not divide the MLP width {arch.intermediate_size}.")
    moe = arch.moe
    if moe is not None:
        for width, what in ((moe.expert_intermediate, "expert"), (moe.shared_intermediate, "shared expert")):
            if width % tp:
                raise WorkloadError(f"tensor parallel size {tp} does not divide the {what} width {width}.")
    layers = stage_layers(arch.num_layers, pp, stage)
    first, last = stage == 0, stage == pp - 1
    tensors = []
    for t in arch.tensors:
        if t.layers is not None:
            kept = tuple(i for i in t.layers if i in layers)
            if not kept:
                continue
            t = t.model_copy(update={"layers": kept})
        elif t.kind in ("embedding", "position_embedding") and not first:
            if not (last and t.kind == "embedding" and arch.tie_word_embeddings):
                continue
            # a tied output head on the last stage is its own copy of the embedding
            t = TensorSpec(name="lm_head.weight", shape=t.shape, kind="lm_head")
        elif t.kind == "norm" and "embed" in t.name:  # BLOOM's embedding LayerNorm
            if not first:
                continue
        elif t.kind in ("lm_head", "lm_head_bias", "norm") and not last:
            continue
        tensors.append(_shard_tensor(t, arch, tp, kv_rank))
    cache_heads = arch.cache_heads // tp if arch.cache_heads and arch.mla is None else arch.cache_heads
    if moe is not None:
        moe = moe.model_copy(update={
            "expert_intermediate": moe.expert_intermediate // tp,
            "shared_intermediate": moe.shared_intermediate // tp,
            "sparse_layers": tuple(pos for pos, i in enumerate(layers) if i in moe.sparse_layers),
        })
    recurrent = arch.recurrent
    if recurrent is not None:
        mixers = tuple(pos for pos, i in enumerate(layers) if i in recurrent.layers)
        recurrent = recurrent.model_copy(update={"layers": mixers}) if mixers else None
    return arch.model_copy(update={
        "moe": moe, "recurrent": recurrent,
        "num_heads": arch.num_heads // tp, "num_kv_heads": kv_rank, "cache_heads": cache_heads,
        "intermediate_size": arch.intermediate_size // tp, "num_layers": len(layers),
        "layer_types": tuple(arch.layer_types[i] for i in layers), "tensors": tuple(tensors),
        "computes_logits": last, "notes": arch.notes,
    })
