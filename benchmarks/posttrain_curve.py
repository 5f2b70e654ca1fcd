"""SmolLM2-135M post-training quality against training length at equal tokens: every method, target and
step count of the grid as one `finegates posttrain` run each, one after the other, then one table.

Each point is a run folder `OUTPUT_ROOT/METHOD[-bf16]-TARGET-STEPS` with the settings of BENCHMARKS.md's
curve (Brown, 4 x 256 tokens a step, 32 held-out blocks, PIQA on 300 items). A point whose folder holds a
finished run (metrics.json) is read, not run again; a point stopped midway (`FOLDER.partial`) is continued
with `--resume`; so the script can be stopped and started again across sessions (`--save-steps 100`: a
checkpoint every 100 steps, so a stop loses less of a long point; the default is a quarter of a run). The
table gives the compacted model's held-out perplexity / PIQA per point, the removed fraction by training,
and the training time. Methods: the `posttrain --method` names, `finegates-nodistill` (FineGates
without distillation), and `magnitude+lora-distill` / `importance+lora-distill` (the recovered baselines
with FineGates' distillation: the same dense teacher, gates bypassed and LoRA off), and
`finegates-early-cut` (the target ramped over 30% of the run instead of 70%, with progressive compaction:
whether a long run keeps its quality with the cut made earlier, and what the earlier cut saves in time).

`--rescore` trains nothing: it scores every finished point's compacted model, and the dense model once, again
with `finegates evaluate` on every held-out block and every PIQA item (1,500: +-0.013 where 300 items are
+-0.03), into `FOLDER/evaluation.json`, and gives the table of those figures.

    python benchmarks/posttrain_curve.py --methods finegates magnitude+lora --targets 0.2 --steps 1000 --bf16
    python benchmarks/posttrain_curve.py --steps 100 300 --dry-run      # the commands, nothing run
    python benchmarks/posttrain_curve.py --steps 100 1000 --bf16 --rescore
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

COMMON = ["--model", "smollm2-135m", "--text", "brown", "--seq-len", "256", "--batch-size", "4"]
COMMON += ["--zero-shot-items", "300", "--eval-blocks", "32", "--quiet"]
METHODS = {
    "finegates": ["--method", "finegates"],
    "finegates-nodistill": ["--method", "finegates", "--no-distill"],
    "magnitude+lora": ["--method", "magnitude+lora"],
    "importance+lora": ["--method", "importance+lora"],
    "magnitude+lora-distill": ["--method", "magnitude+lora", "--distill"],
    "importance+lora-distill": ["--method", "importance+lora", "--distill"],
    # the target ramped over 30% of the run instead of 70%, closed units leaving the weights as they close
    "finegates-early-cut": ["--method", "finegates", "--warmup-fraction", "0.3", "--compact-every", "10"],
}


def folder(root: Path, method: str, target: float, steps: int, bf16: bool) -> Path:
    return root / f"{method}{'-bf16' if bf16 else ''}-{target:g}-{steps}"


def command(
    out: Path, method: str, target: float, steps: int, bf16: bool, save_steps: int | None = None
) -> list[str]:
    """The `finegates posttrain` command of one point (with --resume when a stopped run is there)."""
    finegates = shutil.which("finegates") or str(Path(sys.executable).with_name("finegates"))
    argv = [finegates, "posttrain", *COMMON, *METHODS[method], "--target-sparsity", f"{target:g}"]
    argv += ["--max-steps", str(steps), "--output-dir", str(out)]
    if bf16:
        argv.append("--bf16")
    if save_steps:
        argv += ["--save-steps", str(save_steps)]
    if out.with_name(out.name + ".partial").is_dir():
        argv.append("--resume")
    return argv


EVALUATION = "evaluation.json"


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def point(out: Path, rescored: bool = False) -> dict | None:
    """The figures of a finished run folder (with `rescored`, those of its `evaluation.json`), or None."""
    metrics = _json(out / "metrics.json")
    if metrics is None:
        return None
    compacted, budget = metrics.get("compacted", {}), metrics.get("budget") or {}
    if rescored:
        compacted = _json(out / EVALUATION)
        dense = _json(out.parent / f"dense-{EVALUATION}")
        if compacted is None:
            return None
        metrics["dense"] = dense or {}
    return {
        "perplexity": compacted.get("perplexity"),
        "piqa": compacted.get("piqa_accuracy"),
        "piqa_stderr": compacted.get("piqa_accuracy_stderr"),
        "piqa_correct": compacted.get("piqa_correct"),
        "dense": metrics.get("dense", {}).get("perplexity"),
        "removed": budget.get("removed_by_training"),  # FineGates only: one-shot cuts are exact
        "train_s": metrics.get("train_s"),
    }


def table(
    root: Path, methods: list[str], targets: list[float], steps: list[int], bf16: bool, rescored: bool = False
) -> str:
    lines = ["| removed | method | " + " | ".join(f"{n:,} steps" for n in steps) + " |"]
    lines.append("|---|---|" + "---|" * len(steps))
    dense = None
    for target in targets:
        for method in methods:
            cells = []
            for n in steps:
                p = point(folder(root, method, target, n, bf16), rescored)
                if p is None:
                    cells.append("-")
                    continue
                dense = dense or p["dense"]
                removed = f", {p['removed']:.1%} by training" if isinstance(p["removed"], float) else ""
                seconds = f", {p['train_s']:,.0f} s" if isinstance(p["train_s"], (int, float)) else ""
                stderr = f" +- {p['piqa_stderr']:.3f}" if p["piqa_stderr"] else ""
                cells.append(f"{p['perplexity']:.2f} / {p['piqa']:.3f}{stderr}{removed}{seconds}")
            lines.append(f"| {target:.0%} | {method} | " + " | ".join(cells) + " |")
    dense_text = f"dense perplexity {dense:.2f}" if dense else "no point finished yet"
    if rescored:
        dense_text += ", rescored: every held-out block and PIQA item"
    return f"held-out perplexity / PIQA of the compacted model ({dense_text})\n\n" + "\n".join(lines)


def _outcomes(root: Path, method: str, target: float, steps: int, bf16: bool) -> list[int] | None:
    """A rescored point's PIQA outcome per item, or None."""
    return (point(folder(root, method, target, steps, bf16), rescored=True) or {}).get("piqa_correct")


def paired(root: Path, methods: list[str], targets: list[float], steps: list[int], bf16: bool) -> str:
    """Each method's PIQA accuracy minus FineGates' at the same point, on the same items: the mean of the
    per-item differences +- its standard error (paired, so far tighter than the two accuracies' errors).
    The first row per target is the dense model's (what FineGates lost), where its items were kept."""
    dense = (_json(root / f"dense-{EVALUATION}") or {}).get("piqa_correct")
    lines = ["| removed | method | " + " | ".join(f"{n:,} steps" for n in steps) + " |"]
    lines.append("|---|---|" + "---|" * len(steps))
    for target in targets:
        for method in ("dense", *(m for m in methods if m != "finegates")):
            cells = []
            for n in steps:
                ours = point(folder(root, "finegates", target, n, bf16), rescored=True) or {}
                theirs = dense if method == "dense" else _outcomes(root, method, target, n, bf16)
                if not (ours.get("piqa_correct") and theirs):
                    cells.append("-")
                    continue
                diffs = [b - a for a, b in zip(ours["piqa_correct"], theirs, strict=True)]
                mean = sum(diffs) / len(diffs)
                spread = sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1)
                cells.append(f"{mean:+.3f} +- {(spread / len(diffs)) ** 0.5:.3f}")
            lines.append(f"| {target:.0%} | {method} | " + " | ".join(cells) + " |")
    return "PIQA accuracy minus FineGates' on the same items (paired)\n\n" + "\n".join(lines)


def rescore(args, env: dict) -> None:
    """`finegates evaluate` on the dense model and every finished point's compacted model, once each."""
    finegates = shutil.which("finegates") or str(Path(sys.executable).with_name("finegates"))
    jobs = [(["--model", "smollm2-135m", "--text", "brown"], args.output_root / f"dense-{EVALUATION}")]
    for steps in sorted(args.steps, reverse=True):  # the long points first: the figures of record
        for target in args.targets:
            for method in args.methods:
                out = folder(args.output_root, method, target, steps, args.bf16)
                if point(out) is not None:
                    jobs.append((["--model", str(out / "compressed")], out / EVALUATION))
    for model, result in jobs:
        if "piqa_correct" in (_json(result) or {}):
            continue  # scored, with each item's outcome (older files lack them: scored again)
        argv = [finegates, "evaluate", *model, "--quiet", "--output-file", str(result)]
        print(" ".join(argv), flush=True)
        if not args.dry_run:
            args.output_root.mkdir(parents=True, exist_ok=True)
            code = subprocess.call(argv, env=env)
            if code:
                print(f"  exit {code}", flush=True)


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--targets", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument("--steps", nargs="+", type=int, default=[100, 300, 1000])
    parser.add_argument("--bf16", action="store_true", help="train in bfloat16 autocast (`posttrain --bf16`)")
    parser.add_argument("--output-root", type=Path, default=Path("runs/curve"))
    parser.add_argument(
        "--save-steps", type=int, help="checkpoint period of each run (`posttrain --save-steps`)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the missing points")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="train nothing: score the finished points again on every held-out block and PIQA item",
    )
    args = parser.parse_args()
    if any(n <= 0 for n in args.steps) or any(not 0 < t < 1 for t in args.targets):
        parser.error("--steps must be positive and --targets in (0, 1)")
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if args.rescore:
        rescore(args, env)
        print(table(args.output_root, args.methods, args.targets, args.steps, args.bf16, rescored=True))
        print()
        print(paired(args.output_root, args.methods, args.targets, args.steps, args.bf16))
        return
    for steps in sorted(args.steps):  # the short points first: a stopped series has the most points
        for target in args.targets:
            for method in args.methods:
                out = folder(args.output_root, method, target, steps, args.bf16)
                if point(out) is not None:
                    continue
                argv = command(out, method, target, steps, args.bf16, args.save_steps)
                print(" ".join(argv), flush=True)
                if not args.dry_run:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with open(out.with_name(out.name + ".log"), "a") as log:
                        code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                    if code:
                        print(f"  exit {code}: see {out.with_name(out.name + '.log')}", flush=True)
    print(table(args.output_root, args.methods, args.targets, args.steps, args.bf16))


if __name__ == "__main__":
    main()
