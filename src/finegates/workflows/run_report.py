"""A run's outputs: metrics.json, log_history.json, report.md and its plots; re-renderable from the JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from finegates.io_utils import atomic_write_text
from finegates.workflows.plots import plot_kept_widths, plot_tradeoff, plot_training_curves
from finegates.workflows.results import (
    METRICS_NAME,
    FinetuneResult,
    PosttrainResult,
    PretrainResult,
    RunResult,
    read_result,
)

logger = logging.getLogger(__name__)

HISTORY_NAME = "log_history.json"
REPORT_NAME = "report.md"


def write_run_outputs(
    directory: Path, result: RunResult, log_history: list[dict[str, Any]] | None = None
) -> Path:
    """Write the run's record and training log (where it has one), then render the report; returns the
    report path."""
    text = json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str)
    atomic_write_text(directory / METRICS_NAME, text)
    if log_history is not None:
        atomic_write_text(directory / HISTORY_NAME, json.dumps(log_history, indent=2, default=str))
    return render_report(directory)


def render_report(directory: str | Path) -> Path:
    """(Re)write report.md and the PNG plots of a run folder from its metrics.json and log_history.json.

    >>> render_report("runs/minilm-reuters8")  # doctest: +SKIP
    PosixPath('runs/minilm-reuters8/report.md')
    """
    directory = Path(directory)
    m = read_result(directory)
    if isinstance(m, PosttrainResult):
        return atomic_write_text(directory / REPORT_NAME, posttrain_markdown(m))
    if isinstance(m, PretrainResult):
        return atomic_write_text(directory / REPORT_NAME, pretrain_markdown(m))
    history_path = directory / HISTORY_NAME
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    plot_training_curves(
        history,
        directory / "training_curves.png",
        final_removed=m.sparsity["removed_fraction"],
        trained_removed=(m.budget or {}).get("removed_by_training"),
    )
    plot_kept_widths(m.to_dict(), directory / "kept_widths.png")
    path = atomic_write_text(directory / REPORT_NAME, report_markdown(m))
    logger.info("Report written to %s", path)
    return path


def _tradeoff_point(directory: Path) -> dict[str, Any]:
    """One run's row: removed fractions, its main metric (compacted and dense), and what else it measured."""
    m = read_result(directory)
    s = m.sparsity
    point = {
        "run": str(directory),
        "target": s.get("target"),
        "removed": s["removed_fraction"],
        "model_removed": s["model_removed_fraction"],
        "method": getattr(m, "method", "finegates"),
    }
    if m.kind == "pretrain":
        raise ValueError(f"{directory} is a pretrain run: the trade-off compares finetune or posttrain runs.")
    if isinstance(m, PosttrainResult):  # perplexity, lower is better
        dense, small = m.dense, m.compacted
        extras = {
            f"{k} (compacted / dense)": f"{small[k]:.4f} / {dense[k]:.4f}"
            for k in small
            if k.endswith("_accuracy")
        }
        extras["prefill / decode speedup"] = (
            f"{m.prefill_speedup:.2f}x / {m.decode_speedup or float('nan'):.2f}x"
        )
        return {
            **point,
            "metric": "held-out perplexity",
            "value": small["perplexity"],
            "dense": dense["perplexity"],
            "train_s": m.train_s,
            "extras": extras,
        }
    acc, latency = m.accuracy, m.latency or {}
    value = acc["compacted"] if acc.get("compacted") is not None else acc["gated"]
    extras = {}
    if "dense" in latency and "compacted" in latency:
        extras["speedup"] = f"{latency['dense']['median_s'] / latency['compacted']['median_s']:.2f}x"
    return {
        **point,
        "metric": "test accuracy",
        "value": value,
        "dense": acc.get("dense_baseline"),
        "train_s": m.timings_s.get("train"),
        "extras": extras,
    }


def render_tradeoff(run_dirs: list[str | Path], output_dir: str | Path) -> Path:
    """`tradeoff.md` and `tradeoff.png` in `output_dir`: the metric of each run against its removed fraction,
    one line per method (posttrain runs may use `magnitude` or `magnitude+lora`).

    >>> render_tradeoff(["runs/t20", "runs/t40"], "runs")  # doctest: +SKIP
    PosixPath('runs/tradeoff.md')
    """
    points = sorted((_tradeoff_point(Path(d)) for d in run_dirs), key=lambda p: (p["method"], p["removed"]))
    metrics = {p["metric"] for p in points}
    if len(metrics) > 1:
        raise ValueError(
            f"The runs measure different things ({sorted(metrics)}): give only finetune runs of one "
            "task, or only posttrain runs."
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric = points[0]["metric"]
    extra_columns = list(dict.fromkeys(k for p in points for k in p["extras"]))
    rows = [
        [
            p["run"],
            p["method"],
            _pct(p["target"]) if p["target"] is not None else "-",
            _pct(p["removed"]),
            _pct(p["model_removed"]),
            f"{p['value']:.4f}",
            "-" if p["dense"] is None else f"{p['dense']:.4f}",
            *(p["extras"].get(k, "-") for k in extra_columns),
            "-" if p["train_s"] is None else f"{p['train_s']:.0f}",
        ]
        for p in points
    ]
    table = markdown_table(
        [
            "run",
            "method",
            "target",
            "removed (gated layers)",
            "removed (model)",
            f"{metric} (compacted)",
            f"{metric} (dense)",
            *extra_columns,
            "training (s)",
        ],
        rows,
    )
    plot_tradeoff(points, out / "tradeoff.png")
    return atomic_write_text(
        out / "tradeoff.md", f"# Sparsity-{metric} trade-off\n\n{table}\n\n![](tradeoff.png)\n"
    )


def budget_section(m: FinetuneResult | PosttrainResult) -> str:
    """Removed by training beside after finalize, and who made the cut; a warning line when the gates
    did not reach the target themselves."""
    b = m.budget
    if not b:
        return ""
    timed = b.get("predicted_speedup") is not None
    text = "## Budget\n\n" + markdown_table(
        [
            "target (share of predicted time)" if timed else "target",
            "removed by training",
            "after finalize",
            "gates closed",
            "closings / reopenings by the projection",
        ],
        [
            [
                _pct(b["target"]),
                _pct(b["removed_by_training"]),
                _pct(b["removed_after_finalize"]),
                f"{b['closed_gates']:,d}",
                f"{b['projected_closed']:,d} / {b['projected_reopened']:,d}",
            ]
        ],
    )
    if timed:
        text += (
            f"\n\nBudget in predicted time (`target_speedup`): predicted speedup "
            f"{b['predicted_speedup']:.2f}x at the latency costs' batch shape."
        )
    if b.get("weights_cut") is not None:
        text += (
            f"\n\nProgressive compaction cut {_pct(b['weights_cut'])} of the gated layers' weights out "
            "during training (closed heads and FFN channels; residual dims and partial heads leave at "
            "`compress`)."
        )
    if b.get("warning"):
        text += f"\n\n**Warning: {b['warning']}**"
    return text


def report_markdown(metrics: FinetuneResult) -> str:
    sections = [
        _header(metrics),
        budget_section(metrics),
        _accuracy(metrics),
        _parameters(metrics),
        _latency(metrics),
        _widths(metrics),
        _footer(),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table: one header row, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _acc(value: float | None, note: str = "not run") -> str:
    return note if value is None else f"{value:.4f}"


def _header(m: FinetuneResult) -> str:
    task, t = m.task, m.timings_s
    speedup = (m.budget or {}).get("predicted_speedup")
    if speedup is not None:
        target = f"Target speedup {1 / (1 - m.budget['target']):.2f}x (predicted time)."
    else:
        target = f"Target sparsity {m.sparsity['target']:.0%} of gated-layer parameters."
    return (
        f"# FineGates finetune: {m.model} on {task['name']}\n\n"
        f"{target} Data: "
        f"{task['train_rows']:,d} train / {task['test_rows']:,d} test rows, {task['num_labels']} labels "
        f"({task['source']}). Wall time: {t.get('total', 0):.0f} s total, {t.get('train', 0):.0f} s training."
    )


def _accuracy(m: FinetuneResult) -> str:
    acc = m.accuracy
    rows = [
        ["dense, full finetuning (baseline)", _acc(acc["dense_baseline"])],
        ["FineGates gated (eval-mode gates)", _acc(acc["gated"])],
        ["FineGates compacted", _acc(acc["compacted"], "not run")],
    ]
    text = "## Test accuracy\n\n" + markdown_table(["model", "accuracy"], rows)
    if m.validation:
        text += "\n\nValidation accuracy per epoch: " + ", ".join(
            f"{v['epoch']:.2g}: {v['accuracy']:.4f}" for v in m.validation
        )
    return text


def _parameters(m: FinetuneResult) -> str:
    s, p = m.sparsity, m.parameters
    rows = [
        [
            "gated linear layers",
            f"{s['gated_params']:,d}",
            f"{s['gated_removed']:,d}",
            _pct(s["removed_fraction"]),
        ],
        [
            "whole model",
            f"{s['model_params']:,d}",
            f"{s['model_removed']:,d}",
            _pct(s["model_removed_fraction"]),
        ],
    ]
    if p.get("compacted_model"):
        removed = p["dense_model"] - p["compacted_model"]
        rows.append(
            [
                "whole model, measured after compaction",
                f"{p['dense_model']:,d}",
                f"{removed:,d}",
                _pct(removed / p["dense_model"]),
            ]
        )
    trainable = markdown_table(
        ["trainable", "total", "trainable %"],
        [[f"{p['trainable']:,d}", f"{p['total']:,d}", _pct(p["trainable"] / p["total"])]],
    )
    return (
        "## Parameters removed\n\n"
        + markdown_table(["scope", "parameters", "removed", "removed %"], rows)
        + "\n\n## Trainable parameters (gates, biases of gated layers, task head)\n\n"
        + trainable
    )


def _latency(m: FinetuneResult) -> str:
    lat = m.latency or {}
    if not lat:
        return ""
    order = sorted(lat, key=lambda name: (name != "dense", name))
    rows = [
        [name, f"{lat[name]['median_s'] * 1000:.1f}", f"{lat[name]['iqr_s'] * 1000:.1f}"] for name in order
    ]
    first = next(iter(lat.values()))
    text = (
        f"## Latency (batch {first['batch_size']} x {first['length']} tokens, {first['threads']} threads, "
        f"median of {first['runs']})\n\n" + markdown_table(["model", "ms / batch", "IQR ms"], rows)
    )
    if "dense" in lat and "compacted" in lat:
        text += (
            "\n\nSpeedup of the compacted model: "
            f"**{lat['dense']['median_s'] / lat['compacted']['median_s']:.2f}x**"
        )
    return text


def _widths(m: FinetuneResult) -> str:
    rows = [
        [
            b["name"],
            f"{b['heads']}/{f['heads']}",
            f"{b['qk_dims']}/{f['qk_dims']}",
            f"{b['vo_dims']}/{f['vo_dims']}",
            f"{b['ffn_channels']}/{f['ffn_channels']}",
        ]
        for b, f in zip(m.sparsity["blocks"], m.full_widths)
    ]
    return "## Kept widths per block\n\n" + markdown_table(
        ["block", "heads", "q/k dims", "v dims", "FFN channels"], rows
    )


def _footer() -> str:
    return (
        "## Plots\n\n![training curves](training_curves.png)\n\n![kept widths](kept_widths.png)\n\n"
        "Files: `run_config.json` (resolved config), `gates/` (gate adapter), `compressed/` (compacted "
        f"model), `{METRICS_NAME}`, `{HISTORY_NAME}`."
    )


def posttrain_markdown(m: PosttrainResult) -> str:
    """report.md of a `finegates posttrain` run."""
    s = m.sparsity
    rows = [(name, getattr(m, name)) for name in ("dense", "gated", "compacted") if getattr(m, name)]
    keys = [k for k in rows[0][1] if k not in ("prefill_s", "decode_tokens_per_s")]
    method = m.method
    table = [[name, *(f"{v.get(k, float('nan')):.4g}" for k in keys)] for name, v in rows]
    lines = [f"# Post-training report ({method})", "", markdown_table(["model", *keys], table)]
    dense, small = m.dense, m.compacted
    lines += [
        "",
        (
            f"Removed {s['removed_fraction']:.2%} of gated-layer parameters ({s['gated_removed']:,d} of "
            f"{s['gated_params']:,d}); {s['model_removed_fraction']:.2%} of the whole model."
        ),
        (
            f"Prefill 1 x seq_len: dense {dense['prefill_s'] * 1e3:.1f} ms, compacted "
            f"{small['prefill_s'] * 1e3:.1f} ms, speedup {m.prefill_speedup:.2f}x."
        ),
        (
            f"Greedy decode: dense {dense['decode_tokens_per_s']:.1f} tokens/s, compacted "
            f"{small['decode_tokens_per_s']:.1f} tokens/s, speedup {m.decode_speedup:.2f}x."
        ),
        (
            f"Trainable parameters: {m.trainable_params:,d} of {m.model_params:,d}; training "
            f"{m.train_s:.0f} s."
        ),
    ]
    budget = budget_section(m)
    return "\n".join(lines) + ("\n\n" + budget if budget else "") + "\n"


def pretrain_markdown(m: PretrainResult) -> str:
    """report.md of a `finegates pretrain` run."""
    s = m.sparsity
    return "\n".join(
        [
            "# Pretraining report",
            "",
            markdown_table(
                ["run", "held-out perplexity (bytes)", "bits per byte", "train time (s)"],
                [
                    [
                        k,
                        f"{getattr(m, k)['perplexity']:.3f}",
                        f"{m.bits_per_byte[k]:.3f}",
                        f"{getattr(m, k)['train_s']:.0f}",
                    ]
                    for k in ("dense", "gated")
                ],
            ),
            "",
            (
                f"The gated run removes {s['removed_fraction']:.2%} of gated-layer parameters "
                f"({s['model_removed_fraction']:.2%} of the model)."
            ),
            "",
            *_pretrain_compacted(m.compacted),
        ]
    )


def _pretrain_compacted(c: dict) -> list[str]:
    if not c:  # folders written before the compacted model was recorded
        return []
    line = (
        f"Compacted: {c['params']:,d} parameters (dense {c['dense_params']:,d}), held-out perplexity "
        f"{c['perplexity']:.3f}, forward {1000 * c['forward_s']:.1f} ms vs dense "
        f"{1000 * c['dense_forward_s']:.1f} ms on {c['batch'][0]} x {c['batch'][1]} bytes "
        f"({c['speedup']:.2f}x, median of paired rounds)."
    )
    return [line, ""]
