"""`vramplan plot`: a `MemorySeries` (memory against context length or batch, per precision,
from `vramplan.memory_series`) drawn with the chosen GPUs' capacity as horizontal lines.
matplotlib is an optional dependency (the [plot] extra), imported only here."""

from __future__ import annotations

import os
from pathlib import Path

from .base import GIB
from .errors import WorkloadError
from .planning import MemorySeries

SUFFIXES = (".png", ".svg", ".pdf")


def check_output(path: Path) -> None:
    """Refuse a chart path that cannot be written, before any work is done."""
    if path.suffix.lower() not in SUFFIXES:
        raise WorkloadError(f"Write the plot to a .png, .svg or .pdf file, not {path.name[:80]!r}.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise WorkloadError(f"Cannot write {path}: the directory {parent} does not exist.")
    if path.is_dir() or (os.path.lexists(path) and not path.is_file()):
        raise WorkloadError(f"Cannot write {path}: it exists and is not a regular file.")
    if not os.access(parent, os.W_OK):
        raise WorkloadError(f"Cannot write {path}: the directory {parent} is not writable.")


def write_plot(path: Path, series: MemorySeries) -> None:
    check_output(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise WorkloadError("vramplan plot needs matplotlib: pip install 'vramplan[plot]'.") from None
    values = series.values
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for line in series.lines:
        points = [(x, y / GIB) for x, y in zip(values, line.peak_device_bytes, strict=True) if y is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=line.precision)
    for gpu in series.gpus:
        ax.axhline(gpu.memory_bytes / GIB, linestyle="--", linewidth=1, color="grey")
        ax.text(values[0], gpu.memory_bytes / GIB, f" {gpu.name} ({gpu.memory_bytes / GIB:.0f} GiB)",
                va="bottom", fontsize=8, color="dimgrey")
    ax.set_xscale("log", base=2)
    ax.set_xticks(values)
    ax.set_xticklabels([f"{v // 1024}k" if v >= 1024 else str(v) for v in values])
    ax.set_xlabel("prompt tokens" if series.axis == "context" else "batch (sequences)")
    ax.set_ylabel("peak GPU memory per process (GiB)")
    base = series.workload
    fixed = f"batch {base.batch}" if series.axis == "context" else f"prompt {base.prompt_len}"
    ax.set_title(f"{series.model}: {fixed}, {base.new_tokens} new tokens, {series.attn} attention")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="precision")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as exc:
        raise WorkloadError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    finally:
        plt.close(fig)
