"""State-space and hybrid families: the cached states and the scan's largest tensor against the
measured live sets (h100-hybrid.jsonl), pipeline stages, and what is refused on purpose."""

from __future__ import annotations

import pytest
from vramplan.config import shrink_config
from vramplan.errors import UnsupportedModelError, WorkloadError
from vramplan.model import architecture_from_config
from vramplan.parallel import shard
from vramplan.request import Workload
from vramplan.runtimes.transformers import recurrent
from vramplan.runtimes.transformers.estimate import estimate_architecture
from vramplan.source import resolve

from .conftest import committed_rows

DIAGNOSED = [r for r in committed_rows()
             if r.get("status") == "ok" and r.get("peak_live_set") and r["case"]["precision"] == "bf16"
             and any(f in r["case"]["model"] for f in ("mamba", "jamba", "falcon-h1", "granite", "Qwen3-Next"))]


def _modelled(config):
    """The Architecture of a config, or a skip when this release does not model its family
    (a row measured for a family removed or not yet added stays committed)."""
    try:
        return architecture_from_config(config)
    except UnsupportedModelError as exc:
        pytest.skip(f"refused on purpose: {exc}")


def _arch(case):
    return _modelled(shrink_config(resolve(case["model"]).config, case.get("layers")))


def _groups(row, where: str) -> set[int]:
    return {g["bytes"] for g in row["peak_live_set"]["live"] if where in g["where"].split(" < ")[1]}


@pytest.mark.parametrize("row", DIAGNOSED, ids=lambda r: f"{r['case']['model']}-b{r['case']['batch']}")
def test_cached_states_match_the_measured_blocks(row):
    """transformers allocates the conv window in update_conv_state and the fp32 scan state in
    update_recurrent_state (or both at a hybrid layer's lazy_initialization)."""
    arch = _arch(row["case"])
    if row["case"]["mode"] != "generate" or arch.recurrent is None:
        pytest.skip("no cache in forward()")
    conv, scan = recurrent.layer_state_bytes(arch.recurrent, row["case"]["batch"], 2)
    states = _groups(row, "update_conv_state") | _groups(row, "update_recurrent_state") \
        | _groups(row, "cache_utils.py:1123:lazy_initialization")
    if not states:
        pytest.skip("the peak came before the first mixer layer cached anything")
    assert states <= {conv, scan}, (states, conv, scan)


@pytest.mark.parametrize("row", [r for r in DIAGNOSED if "scan" in r["peak_live_set"]["trigger"]],
                         ids=lambda r: f"{r['case']['model']}-b{r['case']['batch']}-n{r['case']['prompt_len']}")
def test_largest_scan_tensor_is_predicted_to_the_byte(row):
    """Mamba-2's C x B product, Mamba's discretized inputs, DeltaNet's chunked copies: the
    largest block alive at the measured peak is one of the predicted scan tensors."""
    case = row["case"]
    arch = _arch(case)
    largest = max(g["bytes"] for g in row["peak_live_set"]["live"])
    terms = dict((name, nbytes) for name, nbytes, _ in
                 recurrent.scan_terms(arch, case["batch"], case["prompt_len"], 2))
    spec = arch.recurrent
    if spec.kind == "mamba":
        assert 3 * largest == terms["discretized scan inputs"]
    elif spec.kind == "mamba2":
        assert largest == terms["C x B product"]
    else:
        assert largest in (terms["mixer input projection"],)


def test_pipeline_stages_split_the_mixer_layers():
    arch = architecture_from_config(resolve("tests/configs/jamba-v0.1.json").config)
    whole = recurrent.state_bytes(arch, 4, 2)
    stages = [shard(arch, pp=4, stage=s) for s in range(4)]
    assert sum(recurrent.state_bytes(s, 4, 2) for s in stages) == whole
    for s in stages:
        assert s.recurrent is not None and max(s.recurrent.layers) < s.num_layers
        assert sum(1 for k in s.layer_types if k != "none") == 1  # one attention layer in every 8


def test_tensor_parallel_mixers_are_refused_not_guessed():
    arch = _modelled(resolve("Qwen/Qwen3-Next-80B-A3B-Instruct").config)
    with pytest.raises(WorkloadError, match="pipeline parallelism"):
        shard(arch, tp=2)


def test_use_cache_false_keeps_no_cache_and_says_so():
    arch = architecture_from_config(resolve("mosaicml/mpt-7b-instruct").config)
    assert not arch.use_cache
    est = estimate_architecture(arch, "mpt", Workload(batch=2, prompt_len=500, new_tokens=20, attn="eager"))
    assert est.kv_cache_bytes == 0
    assert any("use_cache: false" in n for n in est.notes)
    longer = estimate_architecture(arch, "mpt", Workload(batch=2, prompt_len=519, new_tokens=1, attn="eager"))
    def runtime(e):  # the inputs stay the 500-token prompt
        return e.peak_allocated_bytes - next(t.bytes for t in e.breakdown if t.name == "inputs")

    assert runtime(est) == runtime(longer)  # the last step is a 519-token forward


def test_mbart_is_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="mBART"):
        architecture_from_config({"model_type": "mbart", "d_model": 1024})


SEQ2SEQ = [r for r in committed_rows() if r.get("status") == "ok" and r.get("peak_live_set")
           and any(f in r["case"]["model"] for f in ("t5", "bart"))]


@pytest.mark.parametrize("row", SEQ2SEQ, ids=lambda r: f"{r['case']['model']}-b{r['case']['batch']}")
def test_seq2seq_caches_match_the_measured_blocks(row):
    """Every decoder layer caches its self-attention keys/values (start token + steps) and the
    cross-attention keys/values of the whole prompt: the DynamicLayer blocks alive at a decode
    peak are of those sizes, one key and one value of each per decoder layer."""
    case = row["case"]
    arch = _arch(case)
    blocks = [g for g in row["peak_live_set"]["live"] if "cache_utils.py:14" in g["where"].split(" < ")[0]]
    if not blocks:
        pytest.skip("the peak is in the encoder, before any cache exists")
    width = case["batch"] * arch.num_kv_heads * arch.head_dim * (4 if case["precision"] == "fp32" else 2)
    cross = case["prompt_len"] * width
    sizes = {g["bytes"] for g in blocks}
    assert cross in sizes
    # self-attention: the start token plus the steps run so far (the peak can come at any step)
    assert all(size % width == 0 and 1 <= size // width <= case["new_tokens"] for size in sizes - {cross})
    assert sum(g["count"] for g in blocks) == 4 * arch.num_layers


def test_t5_always_ties_its_head_in_transformers_5_17():
    """Flan-T5's Hub config unties lm_head; T5Config forces the tie: one tensor in memory."""
    config = dict(resolve("tests/configs/flan-t5-base.json").config, tie_word_embeddings=False)
    arch = architecture_from_config(config)
    assert arch.tie_word_embeddings and not any(t.kind == "lm_head" for t in arch.tensors)
    assert any("always ties" in n for n in arch.notes)


def test_bart_positions_bound_prompt_and_new_tokens_separately():
    arch = architecture_from_config(resolve("tests/configs/bart-large.json").config)
    estimate_architecture(arch, "bart", Workload(prompt_len=1000, new_tokens=1000))
    with pytest.raises(WorkloadError, match="1024 positions"):
        estimate_architecture(arch, "bart", Workload(prompt_len=1025, new_tokens=8))


def test_granite_legacy_layer_names_read_like_the_new_ones():
    """Granite-4.0-H configs written before transformers 5 say "mamba"/"attention"."""
    config = dict(resolve("tests/configs/granite-4.0-h-small.json").config)
    new = architecture_from_config(config)
    config["layer_types"] = ["attention" if t == "full_attention" else "mamba" for t in config["layer_types"]]
    legacy = architecture_from_config(config)
    assert legacy.layer_types == new.layer_types and legacy.parameters == new.parameters
