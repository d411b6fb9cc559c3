"""README promises: two commands first, CI runs its test command, the accuracy table is current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.DOTALL)
    assert first_block and text.index(first_block.group(0)) < 200, "README must open with its commands"
    return [line for line in first_block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_install_and_test_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0].startswith("pip install") and "vramplan estimate" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci


def test_readme_accuracy_table_is_current():
    script = ROOT / "scripts" / "accuracy_table.py"
    assert subprocess.run([sys.executable, str(script), "--check"], check=False).returncode == 0


def test_readme_edge_table_is_current():
    script = ROOT / "scripts" / "edge_table.py"
    assert subprocess.run([sys.executable, str(script), "--check"], check=False).returncode == 0


def test_readme_vllm_table_is_current():
    script = ROOT / "scripts" / "vllm_table.py"
    assert subprocess.run([sys.executable, str(script), "--check"], check=False).returncode == 0
