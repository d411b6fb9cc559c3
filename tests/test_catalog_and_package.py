"""Packaged data validates, GPU names resolve, and the estimate path stays torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest
from vramplan.catalog import calibration, gpu_catalog, precisions, runtime_profile
from vramplan.errors import CatalogError


def test_profiles_load():
    assert {"fp32", "fp16", "bf16", "int8", "nf4", "fp4"} <= set(precisions().precisions)
    assert runtime_profile().measured_with.transformers == "5.17.0"
    assert calibration().outside_torch["H100"].samples > 100


def test_gpu_catalog_has_the_promised_accelerators():
    names = {g.name for g in gpu_catalog().gpus}
    assert len(names) >= 25
    for wanted in ("V100-16GB", "T4", "A10G", "L4", "L40S", "A100-80GB", "H100", "H200", "B200",
                   "RTX-4090", "MI300X"):
        assert wanted in names


@pytest.mark.parametrize("alias", ["h100", "H100-80GB-SXM", "h100_sxm", " H100 "])
def test_gpu_aliases(alias):
    assert gpu_catalog().find(alias).name == "H100"


def test_extra_catalog_overrides_and_extends(tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("""gpus:
  - {name: MyCard, vendor: nvidia, memory_bytes: 1000, memory_source: test, bandwidth_gbps: 1,
     bf16: true, fp8: false, int8: true, gpus_per_node: 1, interconnect: none}
""")
    catalog = gpu_catalog(extra)
    assert catalog.find("mycard").memory_bytes == 1000
    assert catalog.find("h100").name == "H100"
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus:\n  - {name: X}\n")
    with pytest.raises(CatalogError):
        gpu_catalog(bad)


def test_estimate_path_never_imports_torch_or_transformers():
    code = ("import sys; from vramplan.cli import main; from vramplan import estimate; "
            "estimate('llama-3.1-8b'); "
            "bad = [m for m in ('torch', 'transformers', 'accelerate', 'bitsandbytes') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_wheel_installs_only_vramplan(tmp_path):
    """The built distribution holds one top-level package, vramplan: no generic `planner`,
    `validate` or `profiles` module lands in site-packages. Profiles ship as package data."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path), str(root)], capture_output=True, text=True, check=False)
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip()[-200:]}")
    wheel = next(tmp_path.glob("vramplan-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"vramplan"}
    for data in ("vramplan/profiles/gpus.yaml", "vramplan/profiles/runtimes.yaml",
                 "vramplan/profiles/calibration.yaml", "vramplan/profiles/models/openai-community--gpt2.json",
                 "vramplan/validate/worker.py", "vramplan/runtimes/transformers/kv_cache.py"):
        assert data in names
    assert any(n.startswith("vramplan/profiles/measurements/") and n.endswith(".jsonl") for n in names)
    assert any(n.startswith("vramplan/profiles/matrices/") for n in names)


def test_calibration_is_fresh():
    """profiles/calibration.yaml is what scripts/calibrate.py fits from the committed rows."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "calibrate.py"
    assert subprocess.run([sys.executable, str(script), "--check"], check=False).returncode == 0
