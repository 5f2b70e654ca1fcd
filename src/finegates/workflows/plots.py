"""Run plots (PNG, matplotlib Agg): training curves, per-layer kept widths, the sparsity trade-off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

WIDTHS = (
    ("heads", "heads"),
    ("qk_dims", "q/k dims"),
    ("vo_dims", "v dims"),
    ("ffn_channels", "FFN channels"),
)


def _series(log_history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    rows = [row for row in log_history if key in row and "step" in row]
    return [row["step"] for row in rows], [row[key] for row in rows]


def plot_training_curves(
    log_history: list[dict[str, Any]],
    path: Path,
    final_removed: float | None = None,
    trained_removed: float | None = None,
) -> Path:
    """Left: task loss (train and validation); right: achieved vs target sparsity per step.

    The total loss is not drawn: its Lagrangian term is signed, so it says little about the task.

    `trained_removed` (the exact fraction when training ended) and `final_removed` (after
    `finalize_gates`) are drawn at the last step.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (
        ("task_loss", "task loss (train)"),
        ("eval_loss", "task loss (validation)"),
    ):
        steps, values = _series(log_history, key)
        if steps:
            left.plot(steps, values, marker="o" if key == "eval_loss" else ".", label=label)
    left.set(xlabel="step", ylabel="loss", title="Loss", yscale="log")
    for key, label in (
        ("sparsity_removed", "removed (exact plan)"),
        ("sparsity_expected", "expected"),
        ("sparsity_target", "target"),
        ("weights_cut", "cut from the weights in training (progressive compaction)"),
    ):
        steps, values = _series(log_history, key)
        if steps:
            right.plot(
                steps, values, linestyle="--" if key == "sparsity_target" else "-", marker=".", label=label
            )
    last_step = max((row["step"] for row in log_history if "step" in row), default=0)
    if trained_removed is not None:
        right.plot(
            [last_step],
            [trained_removed],
            marker="o",
            markersize=9,
            linestyle="",
            fillstyle="none",
            label=f"removed by training ({trained_removed:.1%})",
        )
    if final_removed is not None:
        right.plot(
            [last_step],
            [final_removed],
            marker="*",
            markersize=12,
            linestyle="",
            label=f"after finalize ({final_removed:.1%})",
        )
    right.set(xlabel="step", ylabel="fraction of gated params removed", title="Sparsity")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    return _save(fig, path)


def plot_kept_widths(metrics: dict[str, Any], path: Path) -> Path:
    """Heatmaps: kept fraction of heads / head dims / FFN channels per block, and of rows / cols per layer."""
    blocks, full = metrics["sparsity"]["blocks"], metrics["full_widths"]
    layers = metrics["layers"]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(12, max(3.0, 0.28 * len(layers) + 1)), width_ratios=(1, 1)
    )
    block_grid = np.array([[_fraction(b[key], f[key]) for key, _ in WIDTHS] for b, f in zip(blocks, full)])
    _heatmap(left, block_grid, [b["name"] for b in blocks], [label for _, label in WIDTHS], "Kept per block")
    layer_grid = np.array(
        [[r["kept_shape"][0] / r["shape"][0], r["kept_shape"][1] / r["shape"][1]] for r in layers]
    )
    _heatmap(
        right,
        layer_grid,
        [r["name"] for r in layers],
        ["rows (out)", "cols (in)"],
        "Kept per layer (cols of readers = residual dims)",
    )
    return _save(fig, path)


def _fraction(kept: int | None, total: int | None) -> float:
    return float("nan") if not total else kept / total


def _heatmap(axis, grid: np.ndarray, rows: list[str], cols: list[str], title: str) -> None:
    image = axis.imshow(
        grid if grid.size else np.zeros((1, len(cols))), vmin=0, vmax=1, cmap="viridis", aspect="auto"
    )
    axis.set_xticks(range(len(cols)), cols, rotation=20)
    axis.set_yticks(range(len(rows)), rows, fontsize=7)
    axis.set_title(title)
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            axis.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value < 0.6 else "black",
            )
    axis.figure.colorbar(image, ax=axis, fraction=0.04)


def plot_tradeoff(points: list[dict[str, Any]], path: Path) -> Path:
    """The metric of the compacted model (and of its dense baseline, where known) against the removed
    fraction."""
    fig, axis = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(p["method"] for p in points):
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["removed"])
        axis.plot(
            [100 * p["removed"] for p in mine], [p["value"] for p in mine], "o-", label=f"{method}, compacted"
        )
    dense = [p["dense"] for p in points if p["dense"] is not None]
    if dense:
        axis.axhline(float(np.mean(dense)), color="gray", ls="--", label="dense")
    axis.set(
        xlabel="parameters removed from the gated layers (%)",
        ylabel=points[0]["metric"],
        title="Sparsity trade-off",
    )
    if "perplexity" in points[0]["metric"]:
        axis.set_yscale("log")  # perplexities of pruned LMs span orders of magnitude
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(fig, path)


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> Path:
    """`finegates compare`: accuracy of each method's model against its batch-32 latency."""
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        axis.scatter(
            r["latency_b32_s"] * 1e3, r["accuracy"], label=f"{r['method']} {r['sparsity'] or ''}".strip()
        )
    axis.set(xlabel="CPU latency, batch 32 (ms)", ylabel="test accuracy", title="Accuracy vs latency")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
