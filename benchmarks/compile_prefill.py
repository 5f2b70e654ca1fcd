"""SmolLM2-135M prefill (1 x 256), eager vs `torch.compile`, dense vs compacted, paired ratios.

The compacted model uses the magnitude gate pattern of `benchmarks/inference.py` at `--fraction`, or a saved
compacted folder (`--compacted`, e.g. a trained run's; a stock class is given the compact GEMM routes, as
`compress` builds them). Beside the stock dense model runs the same-GEMM dense model (the dense weights on
the compacted model's GEMM routes: the model the speedups of record are taken against). Each round times
every model, eager and compiled, in turn; a ratio is taken within a round (same machine load). Compilation
(Inductor, needs a C++ compiler) is timed once per model. The FLOP ideal (linear layers and attention) is
printed beside the speedups.

    python benchmarks/compile_prefill.py --fraction 0.4 --rounds 5
    python benchmarks/compile_prefill.py --compacted runs/post-uniform-0.4/stock-40 --rounds 5
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from common import benchmark_parser, parse_benchmark_args
from inference import compacted_smollm2, flops, load_smollm2

from finegates.compress.linear import use_compact_linears
from finegates.timing import seconds


def main() -> None:
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--fraction", type=float, default=0.4, help="fraction of gated parameters removed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument(
        "--compacted", help="a saved compacted SmolLM2 folder instead of the magnitude pattern"
    )
    args = parse_benchmark_args(parser)
    dense = load_smollm2().eval()
    small = compacted_smollm2(dense, args.compacted, args.fraction)
    same_gemm = use_compact_linears(copy.deepcopy(dense)).eval()
    ids = torch.randint(100, 40000, (1, 256), generator=torch.Generator().manual_seed(0))
    models = {"dense": dense, "same-GEMM dense": same_gemm, "compacted": small}
    call = {"input_ids": ids, "logits_to_keep": 1, "use_cache": False}
    ideal = flops(lambda: same_gemm(**call), same_gemm) / flops(lambda: small(**call), small)
    with torch.inference_mode():
        reference = {name: m(**call).logits for name, m in models.items()}
        for name in list(models):
            begin = time.perf_counter()
            compiled = torch.compile(models[name])
            logits = compiled(**call).logits
            print(
                f"{name}: compiled in {time.perf_counter() - begin:.0f} s, max |compiled - eager| "
                f"{(logits - reference[name]).abs().max().item():.1e}",
                flush=True,
            )
            models[f"{name}, compiled"] = compiled
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, m in models.items():
                times[name].append(seconds(lambda m=m: m(**call), args.min_run_time))
    what = args.compacted or f"{args.fraction:.0%} removed, magnitude pattern"
    print(f"\nprefill 1 x 256, {what}, {args.threads} thread(s), {args.rounds} rounds")
    print(f"FLOP ideal over the dense model (linear layers and attention): {ideal:.2f}x\n")
    print(
        "| model | median time (ms) | speedup over dense eager | over the same-GEMM dense model of the same "
        "mode | of the FLOP ideal |"
    )
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        over_eager = [d / t for d, t in zip(times["dense"], ts)]
        base = "same-GEMM dense, compiled" if "compiled" in name else "same-GEMM dense"
        over_same = statistics.median(d / t for d, t in zip(times[base], ts))
        print(
            f"| {name} | {1e3 * statistics.median(ts):.0f} | {statistics.median(over_eager):.2f}x (range "
            f"{min(over_eager):.2f}-{max(over_eager):.2f}) | {over_same:.2f}x | {over_same / ideal:.2f} |"
        )


if __name__ == "__main__":
    main()
