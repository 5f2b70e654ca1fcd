"""The `finegates` command line.

finegates finetune --model minilm --task reuters8 --target-sparsity 0.3 --output-dir runs/minilm-reuters8
finegates finetune --config run.yaml --epochs 2        # file values, overridden by flags
finegates evaluate --model runs/minilm-reuters8/compressed --task reuters8 --max-length 64
finegates report runs/minilm-reuters8                   # re-render report.md and plots
finegates report runs/t20 runs/t40 runs/t60             # and the sparsity trade-off of several runs
finegates posttrain --model smollm2-135m --target-sparsity 0.3 --max-steps 100
finegates pretrain --max-steps 300 --gate-start-step 100
finegates compare --model minilm --task reuters8 --methods full,lora,finegates --sparsity 0.2,0.4
accelerate launch -m finegates.cli finetune ...         # many processes (or torchrun -m finegates.cli)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from finegates.cli_args import add_dataclass_arguments, build_configs, changed_fields, configure_logging
from finegates.cli_workflows import add_workflow_commands
from finegates.config import GatesConfig
from finegates.data.packaged import MissingPackageError

# Mistakes in what the user asked for: reported in one line, not as a traceback (--debug shows it).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, MissingPackageError, NotImplementedError)


def _finetune_sections() -> dict[str, type]:
    from finegates.workflows.finetune import FinetuneConfig

    return {"finetune": FinetuneConfig, "gates": GatesConfig}


def _add_finetune(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="Train gates (+ task head, biases) on a classification task, compact, evaluate, report.",
        description="Sequence classification with FineGates: train, evaluate each epoch, compact, evaluate "
        "the compacted model, benchmark, and write config, gates, model, metrics and report to --output-dir.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of options (flat, or sections 'finetune' and 'gates').",
    )
    sections = _finetune_sections()
    add_dataclass_arguments(parser.add_argument_group("run options"), sections["finetune"])
    from finegates.workflows.finetune import default_finetune_gates

    add_dataclass_arguments(
        parser.add_argument_group("gate options (GatesConfig)"),
        sections["gates"],
        changed_fields(default_finetune_gates()),
    )
    parser.set_defaults(handler=_run_finetune)


def _add_evaluate(subparsers) -> None:
    from finegates.workflows.evaluate import EvaluateConfig

    parser = subparsers.add_parser(
        "evaluate",
        help="Test accuracy of a checkpoint (dense or compacted folder, or a gate adapter folder); for a "
        "causal LM, held-out perplexity and zero-shot accuracy.",
        description="Evaluate any sequence-classification checkpoint on a task's test split, or any causal "
        "LM on held-out text (by default its post-training run's own held-out documents) and a zero-shot "
        "multiple-choice task.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options.")
    add_dataclass_arguments(parser.add_argument_group("options"), EvaluateConfig)
    parser.set_defaults(handler=_run_evaluate)


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="Re-render report.md and plots of finished run folders; with several, the trade-off plot.",
    )
    parser.add_argument(
        "run_dir", nargs="+", help="Folders written by `finegates finetune` or `finegates posttrain`."
    )
    parser.add_argument(
        "--tradeoff-dir",
        metavar="DIR",
        help="Where tradeoff.md/.png go when several runs are given (default: their common parent).",
    )
    parser.set_defaults(handler=_run_report)


def _run_finetune(args: argparse.Namespace) -> int:
    from finegates.workflows.finetune import default_finetune_gates, finetune

    configs = build_configs(
        args, _finetune_sections(), defaults={"gates": default_finetune_gates().to_dict()}
    )
    configure_logging(configs["finetune"].quiet)
    metrics = finetune(configs["finetune"], configs["gates"])
    acc, s = metrics["accuracy"], metrics["sparsity"]
    print(
        f"test accuracy: gated {acc['gated']:.4f}, compacted {_fmt(acc['compacted'])}; "
        f"removed {s['removed_fraction']:.2%} of gated-layer parameters"
        + (
            f"; predicted speedup {metrics['budget']['predicted_speedup']:.2f}x"
            if (metrics.get("budget") or {}).get("predicted_speedup")
            else ""
        )
    )
    print(f"Report: {metrics['report']}")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from finegates.workflows.evaluate import EvaluateConfig, evaluate

    cfg = build_configs(args, {"evaluate": EvaluateConfig})["evaluate"]
    configure_logging(cfg.quiet)
    metrics = evaluate(cfg)
    if "perplexity" in metrics:
        task, blocks = metrics["zero_shot"], metrics["heldout_blocks"]
        line = f"{metrics['model']}: held-out perplexity {metrics['perplexity']:.2f} ({blocks} blocks of "
        line += f"{metrics['seq_len']} tokens of {metrics['text']})"
        if task:
            items = metrics["zero_shot_items"]
            stderr = metrics[f"{task}_accuracy_stderr"]
            line += f", {task} accuracy {metrics[f'{task}_accuracy']:.4f} +- {stderr:.4f} ({items} items)"
        print(line)
        return 0
    print(
        f"{metrics['model']} on {metrics['task']} ({metrics['test_rows']} test rows): accuracy "
        f"{metrics['test_accuracy']:.4f}"
    )
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from finegates.workflows.run_report import render_report, render_tradeoff

    for run_dir in args.run_dir:
        print(f"Report: {render_report(Path(run_dir))}")
    if len(args.run_dir) > 1:
        parent = Path(os.path.commonpath([Path(d).resolve() for d in args.run_dir]))
        print(f"Trade-off: {render_tradeoff(args.run_dir, args.tradeoff_dir or parent)}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finegates", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks of errors.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_finetune(subparsers)
    _add_evaluate(subparsers)
    _add_report(subparsers)
    add_workflow_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `finegates` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"finegates {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
