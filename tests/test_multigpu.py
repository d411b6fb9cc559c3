"""The multi-GPU validation path, tested where it can be without GPUs: placement, per-GPU
predictions, the launch command, and clear refusals."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from vramplan import Workload, load_model
from vramplan.catalog import gpu_catalog
from vramplan.cli import main
from vramplan.errors import WorkloadError
from vramplan.parallel import stage_layers
from vramplan.validate import multigpu

from .conftest import transformers_model_on_meta


@pytest.mark.parametrize("name", ["llama-3.2-1b", "gpt2", "falcon-7b-instruct", "opt-125m", "bloomz-560m",
                                  "gemma-2-2b-it", "phi-2"])
def test_device_map_places_every_parameter_by_stage(name):
    source, arch = load_model(name)
    model = transformers_model_on_meta(source.config)
    names = [n for n, _ in model.named_parameters()]
    for pp in (2, 3):
        device_map = multigpu.device_map_for_stages(arch, pp)
        assert multigpu.covers_every_parameter(device_map, names) == []
        stack = multigpu.layer_stack_prefix(arch)
        for stage in range(pp):
            for layer in stage_layers(arch.num_layers, pp, stage):
                assert device_map[f"{stack}.{layer}"] == stage
        embedding = next(t for t in arch.tensors if t.kind == "embedding")
        assert device_map[embedding.name.rsplit(".", 1)[0]] == 0


def test_predicted_per_gpu_matches_the_planner():
    _, arch = load_model("llama-3.1-8b")
    h100 = gpu_catalog().find("h100")
    workload = Workload(batch=4, prompt_len=2048, new_tokens=32, attn="sdpa")
    stages = multigpu.predicted_per_gpu(arch, "llama-3.1-8b", workload, "bf16", h100, 1, 2)
    assert len(stages) == 2
    assert stages[0].weights_bytes + stages[1].weights_bytes > 0
    single = multigpu.predicted_per_gpu(arch, "llama-3.1-8b", workload, "bf16", h100, 1, 1)[0]
    assert max(s.peak_allocated_bytes for s in stages) < single.peak_allocated_bytes
    tp = multigpu.predicted_per_gpu(arch, "llama-3.1-8b", workload, "bf16", h100, 2, 1)
    assert any(t.name == "communication buffers" for t in tp[0].breakdown)


def test_torchrun_command_and_layout_checks():
    command = multigpu.torchrun_command(4, "job.json", "rows.jsonl")
    assert "--nproc-per-node=4" in command and "vramplan.validate.parallel_worker" in command
    with pytest.raises(WorkloadError, match="one at a time"):
        multigpu.check_layout(2, 2, 8)
    with pytest.raises(WorkloadError, match="visible"):
        multigpu.check_layout(4, 1, 1)
    multigpu.check_layout(2, 1, 2)


def test_validate_tp_without_gpus_is_a_clear_error():
    result = CliRunner().invoke(main, ["validate", "llama-3.2-1b", "--tp", "2"])
    assert result.exit_code == 2 and result.output.startswith("vramplan: ")


def test_the_device_matrix_holds_only_layouts_the_planner_can_split():
    """scripts/multigpu-on-device.sh (issue 15) waits for a multi-GPU machine: each of its cases
    must be a layout vramplan can estimate per rank, so the call is not wasted when it comes."""
    from pathlib import Path

    from vramplan.config import shrink_config
    from vramplan.model import architecture_from_config
    from vramplan.parallel import shard
    from vramplan.source import resolve

    script = Path(__file__).resolve().parents[1] / "scripts" / "multigpu-on-device.sh"
    text = script.read_text()
    body = text[text.index('cases="') + len('cases="'):text.index('"\necho')]
    cases = [line.split() for line in body.strip().splitlines()]
    assert len(cases) >= 20
    assert {c[6] for c in cases} == {"tp", "pp"} and {int(c[7]) for c in cases} >= {2, 4, 8}
    assert "NCCL_NVLS_ENABLE=0" in text and "NVSHMEM_DISABLE_NVLS=1" in text
    for model, layers, _precision, _batch, _prompt, _new, layout, size in cases:
        arch = architecture_from_config(shrink_config(resolve(model).config, None if layers == "-" else int(layers)))
        tp, pp = (int(size), 1) if layout == "tp" else (1, int(size))
        for stage in range(pp):
            shard(arch, tp, pp, stage, replicate_kv=False)
