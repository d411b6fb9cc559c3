"""Memory outside torch that a generation adds per decode step (profiles/measurements/
h200-outside-growth.jsonl): cuDNN's attention, SDPA's first choice on compute capability 9.0
and 10.0, keeps a graph for every new key length; the replay's capacity shrinks by it."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from vramplan.catalog import calibration, gpu_catalog, runtime_profile
from vramplan.config import shrink_config
from vramplan.model import architecture_from_config
from vramplan.request import PrecisionChoice, Workload
from vramplan.runtimes.allocator import capacity
from vramplan.runtimes.transformers import attention
from vramplan.runtimes.transformers.estimate import _family_layout, estimate_architecture
from vramplan.source import resolve
from vramplan.validate.edgecheck import decode_kernel

MIB = 2**20
ROWS = [json.loads(line) for line in
        (resources.files("vramplan.profiles") / "measurements" / "h200-outside-growth.jsonl").read_text().splitlines()
        if line.strip()]


def _arch(model: str, layers: int | None = None):
    return architecture_from_config(shrink_config(resolve(model).config, layers))


@pytest.mark.parametrize("row", [r for r in ROWS if r["status"] == "ok" and not r["case"].get("sdpa_backends")],
                         ids=lambda r: f"{r['case']['model']}-{r['case']['precision']}-{r['case']['attn']}-"
                                       f"t{r['case']['new_tokens']}-b{r['case']['batch']}")
def test_decode_growth_follows_each_measured_generation(row):
    """The planner's kernel for the row's run and its per-step rate give the growth the H200 showed
    from the prompt's forward to the end, within its 2 MiB steps."""
    per_step = calibration().decode_outside_torch_per_step[decode_kernel(row)].bytes
    after_prompt = row["steps"][0]
    steps = row["case"]["new_tokens"] - 1 - after_prompt["step"]
    measured = row["at_end"]["nvml"] - after_prompt["nvml"]
    assert abs(per_step * steps - measured) <= 4 * MIB, (per_step * steps, measured)


def test_only_cudnn_attention_grows_outside_torch():
    rates = calibration().decode_outside_torch_per_step
    assert {k for k, v in rates.items() if v.bytes} == {"cudnn"}
    assert 80 * 2**10 <= rates["cudnn"].bytes <= 110 * 2**10
    assert {"flash", "math", "eager"} <= set(rates)


@pytest.mark.parametrize(("gpu", "attn", "precision", "expected"), [
    ("H200", "sdpa", "bf16", "cudnn"), ("H100", "sdpa", "fp16", "cudnn"), ("B200", "sdpa", "bf16", "cudnn"),
    ("A100-80GB", "sdpa", "bf16", "flash"), ("RTX-4090", "sdpa", "bf16", "flash"), ("MI300X", "sdpa", "bf16", "flash"),
    ("H200", "sdpa", "fp32", "math"), ("H200", "eager", "bf16", "eager"),
])
def test_decode_kernel_follows_torch_dispatch(gpu, attn, precision, expected):
    arch = _arch("qwen3-0.6b")
    layout = _family_layout(arch, runtime_profile())
    got = attention.decode_kernel(arch, layout, attn, 4 if precision == "fp32" else 2, gpu_catalog().find(gpu))
    assert got == expected


def test_a_long_generation_on_the_h200_has_less_capacity_at_its_end():
    h200 = gpu_catalog().find("H200")
    per_step = calibration().decode_outside_torch_per_step["cudnn"].bytes
    at_start = capacity(h200, decode_kernel="cudnn").bytes
    workload = Workload(batch=8, prompt_len=512, new_tokens=512, attn="sdpa")
    sdpa = estimate_architecture(_arch("qwen3-0.6b"), "qwen3-0.6b", workload, PrecisionChoice(name="bf16"), h200)
    assert sdpa.verdict.capacity_bytes == at_start - 511 * per_step
    graphs = next(t for t in sdpa.breakdown if t.name == "attention graphs outside torch")
    assert graphs.bytes == 511 * per_step
    eager = estimate_architecture(_arch("qwen3-0.6b"), "qwen3-0.6b", workload.model_copy(update={"attn": "eager"}),
                                  PrecisionChoice(name="bf16"), h200)
    # no growth, and the eager edge figure: none of SDPA's kernels loaded (8 MiB more for torch)
    assert eager.verdict.capacity_bytes == capacity(h200, decode_kernel="eager").bytes == at_start + 8 * 2**20
    assert all(t.name != "attention graphs outside torch" for t in eager.breakdown)


# -- the driver's last bytes: what a new segment or page needs beyond its size (scripts/driver_slack.py) --

SLACK_ROWS = [json.loads(line) for line in
              (resources.files("vramplan.profiles") / "measurements" / "driver" / "h100-slack.jsonl").read_text()
              .splitlines() if line.strip()]


def _driver_slack_bytes() -> int:
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "calibrate.py"
    spec = importlib.util.spec_from_file_location("calibrate", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DRIVER_SLACK_BYTES


def test_the_driver_needs_the_same_slack_whatever_the_request():
    """cuMemAlloc (a default-mode segment) and cuMemCreate (an expandable page) from 2 MiB to 64 GiB:
    each is refused with the same margin beyond its size and granted with 2 MiB more, and keeps nothing
    beyond its size: the capacity's slack is one constant, not a share of the request. The constant the
    edge calibration keeps (calibrate.py's DRIVER_SLACK_BYTES) covers every refused margin."""
    assert {r["mode"] for r in SLACK_ROWS} == {"cuMemAlloc", "cuMemCreate"}
    assert max(r["size"] for r in SLACK_ROWS) >= 64 << 30
    for mode in ("cuMemAlloc", "cuMemCreate"):
        rows = [r for r in SLACK_ROWS if r["mode"] == mode]
        refused = max(r["margin"] for r in rows if not r["ok"])
        granted = min(r["margin"] for r in rows if r["ok"])
        assert granted - refused <= 2 * MIB  # one threshold for every size, to the filler's 2 MiB step
        assert all(r["ok"] == (r["margin"] >= granted) for r in rows)
        assert all(r["kept"] == 0 for r in rows if r["ok"])
        assert refused < _driver_slack_bytes()
