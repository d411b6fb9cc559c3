"""The training-step engine: saved activations against real transformers models on CPU, and the
terms it adds (optimizer states, adapters, the loss spike) checked to the byte on small cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vramplan import load_model
from vramplan.base import block_bytes
from vramplan.request import PrecisionChoice, Training
from vramplan.runtimes.training import estimate_training
from vramplan.runtimes.training.params import Param, adapters, optimizer_cost
from vramplan.runtimes.training.profile import training_profile
from vramplan.runtimes.training.saved import Device, Mode, saved_set

MODELS = Path(__file__).resolve().parents[1] / "profiles" / "models"
CPU = Device(dropout_mask_bytes=None, layer_norm_stats_bytes=None, autocast_fp32_ops=())
B, N, VOCAB = 2, 32, 1000


# -- the saved-tensor walk against transformers 5.17 on CPU ---------------------------------

def _real_saved(config_file: str, mode: str, layers: int) -> tuple[int, int]:
    """(bytes saved by the second decoder layer, bytes saved in all) by a real model's forward,
    storages counted once, parameters, buffers and the input ids left out."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    raw = json.loads((MODELS / config_file).read_text())
    raw.pop("quantization_config", None)
    for key in ("num_hidden_layers", "n_layer"):
        if key in raw:
            raw[key] = layers
    raw["vocab_size"] = VOCAB
    for key in list(raw):
        if "pdrop" in key or "dropout" in key:
            raw[key] = 0.0
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        raw.pop(key, None)
    cfg = transformers.AutoConfig.for_model(**raw)
    amp = mode == "amp"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="sdpa", dtype=torch.float32 if amp else torch.bfloat16).train()
    model.config.use_cache = False
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    stack = next(m for name, m in model.named_modules()
                 if isinstance(m, torch.nn.ModuleList) and name.endswith(("layers", ".h")))
    where = ["outside"]
    for i, layer in enumerate(stack):
        layer.register_forward_pre_hook(lambda mod, args, i=i: where.__setitem__(0, i))
        layer.register_forward_hook(lambda mod, args, out: where.__setitem__(0, "outside"))
    seen: dict[int, tuple[object, int]] = {}
    ids = torch.randint(0, VOCAB, (B, N))
    skip.add(ids.untyped_storage().data_ptr())

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and storage.nbytes():
            seen.setdefault(storage.data_ptr(), (where[0], storage.nbytes()))
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model(input_ids=ids, labels=ids).loss  # noqa: B018 - the forward is the point
    layer1 = sum(n for w, n in seen.values() if w == 1)
    return layer1, sum(n for _, n in seen.values())


def _ours(hub_id: str, mode: str, layers: int) -> tuple[int, int]:
    _, arch = load_model(hub_id)
    arch = arch.model_copy(update={"num_layers": layers, "layer_types": arch.layer_types[:layers],
                                   "vocab_size": VOCAB})
    family = training_profile().family(arch)
    family = family.model_copy(update={"dropout": type(family.dropout)()})  # the probe turns dropout off
    amp = mode == "amp"
    saved = saved_set(arch, family, Mode(param_bytes=4 if amp else 2, autocast=amp, full=True), B, N, CPU)
    total = sum(t.bytes for part in (saved.embedding, *saved.layers, saved.head, saved.loss) for t in part)
    return saved.layer_bytes(1), total


@pytest.mark.parametrize("config_file,hub_id", [
    ("meta-llama--Llama-3.2-1B.json", "meta-llama/Llama-3.2-1B"),
    ("openai-community--gpt2-medium.json", "openai-community/gpt2-medium"),
])
@pytest.mark.parametrize("mode", ["bf16", "amp"])
def test_saved_activations_match_transformers_on_cpu(config_file, hub_id, mode):
    real_layer, real_total = _real_saved(config_file, mode, layers=2)
    layer, total = _ours(hub_id, mode, layers=2)
    assert layer == real_layer, f"one layer: ours {layer:,} vs transformers {real_layer:,}"
    assert total == real_total, f"whole forward: ours {total:,} vs transformers {real_total:,}"


def test_cuda_differs_from_cpu_only_where_stated():
    """gpt2 on CUDA: bool dropout masks, fp32 LayerNorm statistics (the CPU test swaps these)."""
    _, arch = load_model("openai-community/gpt2-medium")
    arch = arch.model_copy(update={"num_layers": 1, "layer_types": arch.layer_types[:1]})
    family = training_profile().family(arch)
    mode = Mode(param_bytes=2, autocast=False, full=True)
    cuda = saved_set(arch, family, mode, B, N)
    masks = [t for t in cuda.layers[0] if t.name.endswith("mask")]
    assert [t.bytes for t in masks] == [B * N * arch.hidden_size] * 2  # attention and MLP residual dropout
    stats = [t for t in cuda.layers[0] if t.name.endswith(("mean", "rstd"))]
    assert all(t.bytes == B * N * 4 for t in stats) and len(stats) == 4


# -- terms, byte for byte ----------------------------------------------------------------------

def test_adamw_states_and_foreach_temporary():
    params = [Param(name="w", shape=(1000, 64), count=3, nbytes=2, place="layer"),
              Param(name="n", shape=(64,), count=3, nbytes=2, place="layer")]
    cost = optimizer_cost(params, "adamw", training_profile())
    each = block_bytes(1000 * 64 * 2) * 3 + block_bytes(64 * 2) * 3
    assert cost.state_bytes == 2 * each
    assert cost.temporary_bytes == each  # _foreach_sqrt copies the whole bf16 group


def test_adamw8bit_blockwise_states():
    params = [Param(name="big", shape=(5000,), count=1, nbytes=2, place="layer"),
              Param(name="small", shape=(100,), count=1, nbytes=2, place="layer")]
    cost = optimizer_cost(params, "adamw8bit", training_profile())
    big = 2 * block_bytes(5000) + 2 * block_bytes(4 * 20)  # uint8 x2, fp32 absmax of ceil(5000/256)=20 x2
    small = 2 * block_bytes(4 * 100)  # under 4096 elements: fp32
    assert cost.state_bytes == big + small + 2 * 512  # and the two 256-entry fp32 maps
    paged = optimizer_cost([Param(name="huge", shape=(200_000,), count=1, nbytes=2, place="layer")],
                           "paged_adamw8bit", training_profile())
    assert paged.paged_bytes == 2 * 200_000  # managed memory, outside torch's count
    assert paged.state_bytes == 2 * block_bytes(4 * -(-200_000 // 256)) + 2 * 512


def test_lora_adapter_bytes_llama_3_2_1b():
    _, arch = load_model("meta-llama/Llama-3.2-1B")
    found = adapters(arch, Training(method="lora", lora_rank=16), training_profile())
    h, kv, inter = 2048, 512, 8192
    per_layer = 16 * ((h + h) + (h + kv) * 2 + (h + h) + (h + inter) * 2 + (inter + h))
    assert sum(p.elements * p.count for p in found) == per_layer * 16
    assert sum(p.allocated for p in found) == per_layer * 16 * 4  # fp32, every tensor a multiple of 512
    targeted = adapters(arch, Training(method="lora", lora_targets=("q_proj", "v_proj")), training_profile())
    assert {p.name.rsplit(".", 2)[-2] for p in targeted} == {"q_proj", "v_proj"}


def test_logits_spike_10v_forward_12v_backward():
    _, arch = load_model("meta-llama/Llama-3.2-1B")
    est = estimate_training(arch, "llama", Training(method="lora", batch=2, seq_len=512), PrecisionChoice())
    tv = 2 * 512 * arch.vocab_size
    by = {m.name: {t.name: t.bytes for t in m.tensors} for m in est.moments}
    loss = by["step 2: loss, log_softmax"]
    assert loss["logits (as the model returns them)"] == block_bytes(2 * tv)
    assert loss["fp32 copy of the logits"] == block_bytes(4 * tv)
    back = by["step 2: backward, NllLoss/LogSoftmax"]
    assert back["grad of log_softmax output (fp32)"] == back["grad of the fp32 logits"] == block_bytes(4 * tv)
    assert back["saved: log_softmax output, shifted labels"] == block_bytes(4 * tv) + block_bytes(8 * 1024) + 512


@pytest.mark.parametrize("hub_id", ["meta-llama/Llama-3.2-1B", "google/gemma-2-2b-it", "openai-community/gpt2-medium",
                                    "microsoft/Phi-3.5-mini-instruct", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen3-0.6B"])
@pytest.mark.parametrize("training,choice", [
    (Training(method="full", batch=2, seq_len=256), PrecisionChoice()),
    (Training(method="full", batch=2, seq_len=256, autocast="bf16", optimizer="adafactor"),
     PrecisionChoice(name="fp32")),
    (Training(method="lora", batch=4, seq_len=128, gradient_checkpointing=True, optimizer="sgd"), PrecisionChoice()),
    (Training(method="qlora", batch=1, seq_len=512, optimizer="paged_adamw8bit", double_quant=True), PrecisionChoice()),
])
def test_every_term_has_a_why_and_the_peak_is_the_largest_moment(hub_id, training, choice):
    _, arch = load_model(hub_id)
    est = estimate_training(arch, hub_id, training, choice)
    assert est.peak_allocated_bytes == max(m.bytes for m in est.moments)
    assert est.peak_phase == max(est.moments, key=lambda m: m.bytes).name
    for m in est.moments:
        assert m.bytes == sum(t.bytes for t in m.tensors)
    allocated = [t for t in est.breakdown if t.scope == "allocated"]
    assert sum(t.bytes for t in allocated) == est.peak_allocated_bytes
    assert est.peak_device_bytes == sum(t.bytes for t in est.breakdown)
    for term in est.breakdown:
        assert term.why and term.why != term.name, term.name
    steps = {m.name.split(": ", 1)[1]: [] for m in est.moments}
    for m in est.moments:
        steps[m.name.split(": ", 1)[1]].append(m.bytes)
    assert all(second >= first for first, second in steps.values())  # step 2 holds the states as well


def test_checkpointing_keeps_layer_inputs_only():
    _, arch = load_model("meta-llama/Llama-3.2-1B")
    plain = estimate_training(arch, "l", Training(method="full", batch=4, seq_len=1024), PrecisionChoice())
    ckpt = estimate_training(arch, "l", Training(method="full", batch=4, seq_len=1024, gradient_checkpointing=True),
                             PrecisionChoice())
    inputs = {t.name: t.bytes for m in ckpt.moments for t in m.tensors}["checkpointed layer inputs"]
    assert inputs == arch.num_layers * block_bytes(4 * 1024 * arch.hidden_size * 2)
    assert ckpt.peak_allocated_bytes < plain.peak_allocated_bytes
