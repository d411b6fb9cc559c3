"""Weights exact to the parameter: our inventory against transformers' own instantiation.

For every bundled config we model (and the test configs written from transformers' config
classes), every parameter name, shape and buffer must match the model transformers builds
on the meta device, and the counts must agree to the parameter.
"""

from __future__ import annotations

import pytest
from vramplan.errors import UnsupportedModelError
from vramplan.model import architecture_from_config
from vramplan.source import bundled_names, load_bundled

from .conftest import TEST_CONFIGS, load_json, transformers_model_on_meta

pytest.importorskip("transformers")

# vision towers and projectors (LLaVA, Mistral-3): those models are checked whole below
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")
CASES = [(hub_id, lambda h=hub_id: load_bundled(h).config) for hub_id, _ in bundled_names()]
CASES += [(path.name, lambda p=path: load_json(p)) for path in TEST_CONFIGS]


@pytest.mark.parametrize("name,config_of", CASES, ids=[c[0] for c in CASES])
def test_inventory_matches_transformers(name, config_of):
    config = config_of()
    try:
        arch = architecture_from_config(config, name)
    except UnsupportedModelError as exc:
        pytest.skip(f"refused on purpose: {exc}")
    if any(t.name.startswith(VISION_PREFIXES) for t in arch.tensors):
        pytest.skip("a vision-language model: checked whole in test_vision_tower_and_projector_match_transformers")
    model = transformers_model_on_meta(config)  # a multimodal config's language model only
    theirs = {n: tuple(p.shape) for n, p in model.named_parameters()}
    ours = {n: t.shape for t in arch.tensors for n in t.names()}
    assert ours == theirs, _diff("parameter", ours, theirs)
    assert arch.parameters == sum(p.numel() for p in model.parameters())
    buffers = {n: tuple(b.shape) for n, b in model.named_buffers()}
    our_buffers = {}
    for b in arch.buffers:
        names = [b.name] if b.layers is None else [b.name.replace("{i}", str(i)) for i in b.layers]
        our_buffers.update({n: b.shape for n in names})
    assert our_buffers == buffers, _diff("buffer", our_buffers, buffers)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert arch.tie_word_embeddings == tied


def _diff(what: str, ours: dict, theirs: dict) -> str:
    lines = [f"{what} {n}: ours {ours.get(n)}, transformers {theirs.get(n)}"
             for n in sorted(set(ours) | set(theirs)) if ours.get(n) != theirs.get(n)]
    return "\n".join(lines[:20])


def test_qwen3_0_6b_loaded_count_is_not_the_checkpoint_count():
    """Qwen3-0.6B's checkpoint stores 751.6M elements (lm_head written out although tied);
    the loaded model holds 596.0M: the planner counts what is loaded."""
    arch = architecture_from_config(load_bundled("Qwen/Qwen3-0.6B").config)
    assert arch.parameters == 596_049_920
    embedding = next(t for t in arch.tensors if t.kind == "embedding")
    assert arch.parameters + embedding.elements == 751_632_384


@pytest.mark.parametrize("name,config_of", CASES, ids=[c[0] for c in CASES])
def test_cache_layers_match_transformers(name, config_of):
    """Each layer's cache kind (full, sliding, chunked) and window as transformers' own
    DynamicCache builds them from the config (cache_utils.get_layer_types_and_kwargs)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = config_of()
    try:
        arch = architecture_from_config(config)
    except UnsupportedModelError as exc:
        pytest.skip(f"refused on purpose: {exc}")
    hf_config = transformers_model_on_meta(config).config
    kinds, kwargs = get_layer_types_and_kwargs(hf_config)
    names = {"full": "full_attention", "sliding": "sliding_attention", "chunked": "chunked_attention",
             "none": "linear_attention"}
    mixers = arch.recurrent.layers if arch.recurrent else ()
    # a layer with both attention and a recurrent mixer (Falcon-H1) is transformers' "hybrid"
    ours = ["hybrid" if i in mixers and k != "none" else names[k] for i, k in enumerate(arch.layer_types)]
    assert ours == list(kinds)
    if mixers:
        assert {i for i, k in enumerate(kinds) if k in ("linear_attention", "hybrid")} == set(mixers)
    elif set(arch.layer_types) != {"full"}:
        assert arch.sliding_window == kwargs["sliding_window"]


@pytest.mark.parametrize("hub_id", ["llava-hf/llava-1.5-7b-hf", "mistralai/Magistral-Small-2509"])
def test_vision_tower_and_projector_match_transformers(hub_id):
    """A vision-language model's whole model (vision tower, projector, language model) against
    transformers' image-text-to-text class on the meta device, name by name."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = load_bundled(hub_id).config
    arch = architecture_from_config(config)
    hf = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(config["model_type"], **hf))
    theirs = {n.replace("model.language_model.", "model."): tuple(p.shape) for n, p in model.named_parameters()}
    ours = {n: t.shape for t in arch.tensors for n in t.names()}
    assert ours == theirs, _diff("parameter", ours, theirs)
    assert arch.parameters == sum(p.numel() for p in model.parameters())
    buffers = {n.replace("model.language_model.", "model."): tuple(b.shape) for n, b in model.named_buffers()}
    assert {b.name: b.shape for b in arch.buffers} == buffers
