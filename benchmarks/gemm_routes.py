"""GEMM time of SmolLM2-135M's linear layers, dense vs compacted, per role and per CPU GEMM route.

For every linear layer of the dense model and of the compacted one (magnitude gate pattern of
`benchmarks/inference.py` at `--fraction`), times one `--rows` x in_features GEMM of its shape
alone, through both CPU routes of `CompactLinear`, whatever `--rows`: BLAS (`compact_linear` with
`torch.backends.mkldnn` disabled: rows written at an aligned stride, plain F.linear below 16 rows) and
oneDNN (`onednn_linear`, x86 only), so that the row threshold of the oneDNN route can be checked. Prints, per
role (q/k/v/o/gate/up/down), the dense and compacted times, their ratio, the FLOP ratio and their quotient:
the GEMM efficiency of the compact shapes relative to the dense ones (1.0 = a compact GEMM runs at the dense
FLOP rate). `--compacted FOLDER` takes the shapes of a saved compacted SmolLM2 (e.g. a trained run's
`compressed/`) instead of the magnitude pattern.

    python benchmarks/gemm_routes.py --fraction 0.4
    python benchmarks/gemm_routes.py --compacted runs/post/compressed
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from functools import partial

import torch
import torch.nn.functional as F
from common import benchmark_parser, parse_benchmark_args
from inference import compacted_smollm2, load_smollm2

from finegates.compress.linear import ONEDNN, compact_linear, onednn_linear
from finegates.timing import seconds


def role_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, int]]]:
    """(role, (out, in)) of every linear layer in the decoder blocks."""
    shapes = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            parts = name.split(".")
            shapes.append((parts[-2] if parts[-1] == "linear" else parts[-1], tuple(module.weight.shape)))
    return shapes


def main() -> None:
    parser = benchmark_parser(__doc__, threads=None)
    parser.add_argument("--fraction", type=float, default=0.4, help="fraction of gated parameters removed")
    parser.add_argument(
        "--compacted", help="a saved compacted SmolLM2 folder instead of the magnitude pattern"
    )
    parser.add_argument("--rows", type=int, default=256, help="rows of the GEMM input (tokens)")
    parser.add_argument(
        "--min-run-time", type=float, default=0.05, help="seconds of timing per shape and route"
    )
    args = parse_benchmark_args(parser)
    torch.set_num_threads(1)
    warnings.filterwarnings(
        "ignore", message="TF32 acceleration on top of oneDNN"
    )  # torch's, from mkldnn.flags
    dense = load_smollm2().eval()
    small = compacted_smollm2(dense, args.compacted, args.fraction)
    pattern = args.compacted or f"{args.fraction:.0%} removed (magnitude pattern)"
    times: dict[tuple[str, str, str], float] = defaultdict(float)  # (route, model, role) -> us
    flops: dict[tuple[str, str], int] = defaultdict(int)
    source = torch.randn(args.rows, 4096)
    # compact_linear takes the BLAS route while mkldnn is disabled; onednn_linear calls oneDNN regardless
    routes = {"BLAS (aligned rows)": compact_linear, **({"oneDNN": onednn_linear} if ONEDNN else {})}
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False):
        for label, model in (("dense", dense), ("compacted", small)):
            for role, (n, k) in role_shapes(model):
                x, w = source[:, :k].contiguous(), torch.randn(n, k)
                flops[label, role] += 2 * args.rows * n * k
                for route, linear in routes.items():
                    torch.testing.assert_close(linear(x, w, None), F.linear(x, w), atol=1e-3, rtol=1e-4)
                    times[route, label, role] += seconds(partial(linear, x, w, None), args.min_run_time) * 1e6
    roles = list(dict.fromkeys(r for _, _, r in times))
    print(f"SmolLM2-135M, {pattern}, {args.rows} rows, 1 thread; ms summed over layers")
    for route in routes:
        print(
            f"\n{route}\n\n| role | dense (ms) | compacted (ms) | time ratio | FLOP ratio | efficiency |\n"
            "|---|---|---|---|---|---|"
        )
        for role in [*roles, "all"]:
            pick = roles if role == "all" else [role]
            d = sum(times[route, "dense", r] for r in pick) / 1e3
            c = sum(times[route, "compacted", r] for r in pick) / 1e3
            fr = sum(flops["dense", r] for r in pick) / sum(flops["compacted", r] for r in pick)
            print(f"| {role} | {d:.1f} | {c:.1f} | {d / c:.2f}x | {fr:.2f}x | {d / c / fr:.2f} |")
    if len(routes) > 1:
        a, b = list(routes)
        for label in ("dense", "compacted"):
            ta, tb = (sum(times[r, label, role] for role in roles) for r in (a, b))
            print(f"\n{label}: {b} {tb / 1e3:.1f} ms vs {a} {ta / 1e3:.1f} ms: {ta / tb:.2f}x")


if __name__ == "__main__":
    main()
