"""`vramplan plot`: memory against context length (or batch) per precision, with the chosen
GPUs' capacity as horizontal lines. matplotlib is an optional dependency (the [plot] extra),
imported only here."""

from __future__ import annotations

from pathlib import Path

from .base import gib
from .catalog import Gpu
from .errors import WorkloadError
from .model.spec import Architecture
from .request import PrecisionChoice, Workload
from .runtimes.transformers.estimate import estimate_architecture, resolve_attention


def series(arch: Architecture, model: str, axis: str, values: list[int], precisions: list[str],
           base: Workload) -> dict[str, list[float | None]]:
    """peak_device_bytes (GiB) per precision at each x value; None where the workload is invalid."""
    out: dict[str, list[float | None]] = {}
    for precision in precisions:
        ys: list[float | None] = []
        for x in values:
            workload = base.model_copy(update={"prompt_len": x} if axis == "context" else {"batch": x})
            try:
                est = estimate_architecture(arch, model, workload, PrecisionChoice(name=precision))
                ys.append(gib(est.peak_device_bytes))
            except Exception:
                ys.append(None)
        out[precision] = ys
    return out


def axis_values(axis: str, arch: Architecture, upto: int | None) -> list[int]:
    if axis == "batch":
        top = upto or 64
        return [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= top]
    top = upto or min(arch.max_positions or 131072, 131072)
    values, x = [], 256
    while x <= top:
        values.append(x)
        x *= 2
    return values


def write_plot(path: Path, arch: Architecture, model: str, axis: str, precisions: list[str], gpus: list[Gpu],
               base: Workload, upto: int | None = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise WorkloadError("vramplan plot needs matplotlib: pip install 'vramplan[plot]'.") from None
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise WorkloadError(f"Write the plot to a .png, .svg or .pdf file, not {path.name!r}.")
    values = axis_values(axis, arch, upto)
    data = series(arch, model, axis, values, precisions, base)
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for precision, ys in data.items():
        points = [(x, y) for x, y in zip(values, ys, strict=True) if y is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=precision)
    for gpu in gpus:
        ax.axhline(gib(gpu.memory_bytes), linestyle="--", linewidth=1, color="grey")
        ax.text(values[0], gib(gpu.memory_bytes), f" {gpu.name} ({gib(gpu.memory_bytes):.0f} GiB)",
                va="bottom", fontsize=8, color="dimgrey")
    ax.set_xscale("log", base=2)
    ax.set_xticks(values)
    ax.set_xticklabels([f"{v // 1024}k" if v >= 1024 else str(v) for v in values])
    ax.set_xlabel("prompt tokens" if axis == "context" else "batch (sequences)")
    ax.set_ylabel("peak GPU memory per process (GiB)")
    fixed = (f"batch {base.batch}" if axis == "context" else f"prompt {base.prompt_len}")
    attn = resolve_attention(arch, base).attn
    ax.set_title(f"{model}: {fixed}, {base.new_tokens} new tokens, {attn} attention")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="precision")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
