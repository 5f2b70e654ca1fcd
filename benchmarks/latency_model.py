"""The latency cost model behind `target_speedup`: predicted vs measured speedup of trained gate patterns.

Calibrates the cost model of `--model` at the batch shape (`finegates bench --calibrate`'s code; the
cached costs are reused with `--costs-file`), then for each gate adapter: the speedup the model predicts
from the adapter's kept units and the one measured (compacted model vs the dense model, paired rounds,
median ratio), in this process.

    python benchmarks/latency_model.py --model smollm2-135m --batch-size 1 --length 256 --threads 1 \
        --gates runs/post-runtime-0.2/gates runs/post-runtime-0.4/gates
    python benchmarks/latency_model.py --model minilm --batch-size 32 --length 128 --threads 1 \
        --gates runs/minilm-runtime-0.3/gates runs/minilm-runtime-0.4/gates
"""

from __future__ import annotations

import platform
from pathlib import Path

from common import benchmark_parser, parse_benchmark_args

from finegates import compress, load_gates
from finegates.compress.linear import use_compact_linears
from finegates.latency import LatencyCosts, predicted_speedup
from finegates.workflows.bench import BenchConfig, calibrate
from finegates.workflows.encoding import benchmark_batch
from finegates.workflows.evaluation import paired_speedup
from finegates.workflows.export import _load_base, _num_labels


def main() -> None:
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--model", required=True)
    parser.add_argument("--gates", nargs="+", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--costs-file", default=None, help="reuse these costs instead of calibrating")
    args = parse_benchmark_args(parser)
    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} thread(s)")
    if args.costs_file and Path(args.costs_file).is_file():
        costs = LatencyCosts.load(args.costs_file)
    else:
        cfg = BenchConfig(
            model=args.model,
            calibrate=True,
            batch_size=args.batch_size,
            length=args.length,
            repeats=args.repeats,
            threads=args.threads,
            costs_file=args.costs_file,
        )
        costs, path = calibrate(cfg)
        print(f"calibrated: {path}")
    print("per-unit costs:", {k: f"{v:.3e}" for k, v in costs.coefficients.items()})
    base = costs.points[0]["seconds"]
    for point in costs.points:
        print(
            f"  calibration point: measured {base / point['seconds']:.2f}x, predicted "
            f"{costs.predict(costs.points[0]) / costs.predict(point):.2f}x"
        )
    for adapter in args.gates:
        labels = _num_labels(adapter)
        dense = use_compact_linears(_load_base(args.model, labels)[0].eval())  # the same GEMM routes
        gated = load_gates(_load_base(args.model, labels)[0], adapter).eval()
        predicted = predicted_speedup(gated, costs)
        small = compress(gated).eval()
        batch = benchmark_batch(args.batch_size, args.length, dense.config.vocab_size)
        _, _, measured = paired_speedup(small, dense, batch, args.repeats)
        print(f"{adapter}: predicted {predicted:.2f}x, measured {measured:.2f}x", flush=True)


if __name__ == "__main__":
    main()
