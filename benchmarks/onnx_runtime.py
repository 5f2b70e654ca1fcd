"""ONNX Runtime latency, dense vs compacted, beside torch's: MiniLM batch 32 x 128.

Models: the packaged MiniLM (dense), its magnitude-pattern compactions at the given fractions (as in
`inference.py`), and the compacted models of trained gate adapters (`--trained-gates DIR ...`). Each is
exported with `finegates.compress.onnx.export_onnx` and run by an ONNX Runtime session of `--threads`
threads; torch runs the same model in the same process. Outputs are checked against torch's (max abs
difference printed). Speedups are medians over rounds of paired ratios (dense timed just before and after
each model, as in `inference.py`), so slow drifts of a shared machine's load cancel.

    python benchmarks/onnx_runtime.py --fractions 0.4 --threads 1 --rounds 5
    python benchmarks/onnx_runtime.py --fractions 0.3 --trained-gates runs/minilm-runtime-0.3/gates
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import benchmark_parser, parse_benchmark_args
from inference import load_minilm, prune

import finegates
from finegates.compress.onnx import export_onnx, takes_segments
from finegates.timing import time_in_turns


def _best(fn, repeats: int) -> float:
    return time_in_turns({0: fn}, repeats, reduce=min)[0]


def main() -> None:
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--fractions", nargs="*", type=float, default=[0.4])
    parser.add_argument("--trained-gates", nargs="*", type=Path, default=[])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="calls per timing (the fastest counts)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    args = parse_benchmark_args(parser)
    dense = load_minilm().eval()
    models = [("dense", 0.0, dense)]
    for folder in args.trained_gates:
        gated = finegates.load_gates(copy.deepcopy(dense), folder).eval()
        structure = finegates.model.gates_config(gated).structure
        removed = finegates.sparsity_report(gated).removed_fraction
        models.append((f"trained, {structure}", removed, finegates.compress(gated)))
    for fraction in args.fractions:
        gated = prune(dense, fraction)
        models.append(
            ("magnitude", finegates.sparsity_report(gated).removed_fraction, finegates.compress(gated))
        )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.length), generator=gen)
    mask = torch.ones_like(ids)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, removed, model) in enumerate(models):
            folder = export_onnx(model, Path(tmp) / str(i))
            session = ort.InferenceSession(str(folder / "model.onnx"), options)
            feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
            if takes_segments(model):
                feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
            with torch.inference_mode():
                expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
            diff = float(np.abs(session.run(["logits"], feed)[0] - expected).max())

            def run_torch(model=model):
                with torch.inference_mode():
                    model(input_ids=ids, attention_mask=mask)

            rows.append(
                {
                    "name": name,
                    "removed": removed,
                    "ort": lambda session=session, feed=feed: session.run(["logits"], feed),
                    "torch": run_torch,
                    "diff": diff,
                    "ratios": {"ort": [], "torch": []},
                    "best": {"ort": float("inf"), "torch": float("inf")},
                }
            )
        base = rows[0]
        for _ in range(args.rounds):
            for row in rows:
                for engine in ("ort", "torch"):
                    before = _best(base[engine], args.repeats)
                    t = _best(row[engine], args.repeats)
                    after = _best(base[engine], args.repeats)
                    row["ratios"][engine].append((before + after) / 2 / t)
                    row["best"][engine] = min(row["best"][engine], t)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads, "
        f"load average at the end {load:.1f}"
    )
    print(f"\nMiniLM batch {args.batch} x {args.length}\n")
    print("| model | removed | ONNX Runtime (ms) | speedup | torch (ms) | speedup | ORT vs torch logits |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ort_x, torch_x = (statistics.median(row["ratios"][e]) for e in ("ort", "torch"))
        print(
            f"| {row['name']} | {row['removed']:.1%} | {1000 * row['best']['ort']:.1f} | {ort_x:.2f}x | "
            f"{1000 * row['best']['torch']:.1f} | {torch_x:.2f}x | {row['diff']:.1e} |"
        )


if __name__ == "__main__":
    main()
