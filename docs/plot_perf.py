"""Draws docs/perf_h200.png from the measured tables in docs/PERF.md (needs matplotlib).

    python docs/plot_perf.py

Left: the dense DeepSeek-V3 shapes (the "Kernel v5, JAX benchmark" table); right: the
grouped workloads (the "Grouped FP8 GEMM" table). A range such as 151-178 (two runs of one
call) is drawn at its midpoint; a figure in parentheses (another run) as it stands.
"""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DOCS = Path(__file__).resolve().parent


def table_after(text, heading):
    """The first markdown table after the line starting with `heading`: header, rows."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("*") for c in line.strip("|").split("|")])
    return rows[0], rows[2:]


def number(cell):
    """151-178 -> 164.5; (318, v3 run) -> 318; - -> nan."""
    found = [float(v) for v in re.findall(r"\d+(?:\.\d+)?", cell.split(",")[0])]
    return float(np.mean(found)) if found else float("nan")


def columns(head, rows, names):
    """{legend name: the numbers of table column `key`} for (legend name, key) in names."""
    return {name: [number(r[head.index(key)]) for r in rows] for name, key in names}


def bars(ax, labels, series, title):
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("TFLOP/s")
    ax.set_ylim(0, 1.3 * np.nanmax([np.nanmax(v) for v in series.values()]))  # room for the legend
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def main():
    text = (DOCS / "PERF.md").read_text()
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 2]})

    head, rows = table_after(text, "### Kernel v7 beside DeepGEMM, same run")
    rows = [r for r in rows if r[4] != "-"]  # the DeepSeek-V3 shapes and the squares
    labels = [f"{r[0]}x{r[1]}x{r[2]}" for r in rows]
    series = columns(head, rows, (
        ("jax_fp8gemm (fine-grained)", "ours fine-grained"),
        ("DeepGEMM (same run)", "DeepGEMM"),
        ("XLA FP8 dot (unscaled)", "XLA FP8 dot (cuBLASLt, unscaled)"),
        ("XLA BF16 dot", "XLA BF16")))
    bars(left, labels, series, "Dense FP8 GEMM, DeepSeek-V3 shapes (H200)")

    head, rows = table_after(text, "## Grouped FP8 GEMM")
    labels = [r[0] for r in rows]
    series = columns(head, rows, (
        ("jax_fp8gemm grouped", "ours v7"),
        ("padded batch (ours, vmap)", "padded (vmap of our GEMM)"),
        ("jax.lax.ragged_dot BF16", "ragged_dot BF16")))
    bars(right, labels, series, "Grouped FP8 GEMM for MoE (H200)")

    fig.tight_layout()
    out = DOCS / "perf_h200.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
