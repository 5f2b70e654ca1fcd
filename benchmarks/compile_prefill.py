"""SmolLM2-135M prefill (1 x 256), eager vs `torch.compile`, dense vs compacted, paired ratios.

The compacted model uses the magnitude gate pattern of `benchmarks/inference.py` at `--fraction`. Each
round times dense eager, compacted eager, dense compiled and compacted compiled in turn; a ratio is taken
within a round (same machine load). Compilation (Inductor, needs a C++ compiler) is timed once per model.

    python benchmarks/compile_prefill.py --fraction 0.4 --rounds 5
"""

from __future__ import annotations

import statistics
import time

import torch
from common import benchmark_parser, parse_benchmark_args
from inference import load_smollm2, prune

import finegates
from finegates.timing import seconds


def main() -> None:
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--fraction", type=float, default=0.4, help="fraction of gated parameters removed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parse_benchmark_args(parser)
    dense = load_smollm2().eval()
    small = finegates.compress(prune(dense, args.fraction)).eval()
    ids = torch.randint(100, 40000, (1, 256), generator=torch.Generator().manual_seed(0))
    models = {"dense": dense, "compacted": small}
    with torch.inference_mode():
        reference = {
            name: m(input_ids=ids, logits_to_keep=1, use_cache=False).logits for name, m in models.items()
        }
        for name in list(models):
            begin = time.perf_counter()
            compiled = torch.compile(models[name])
            logits = compiled(input_ids=ids, logits_to_keep=1, use_cache=False).logits
            print(
                f"{name}: compiled in {time.perf_counter() - begin:.0f} s, max |compiled - eager| "
                f"{(logits - reference[name]).abs().max().item():.1e}",
                flush=True,
            )
            models[f"{name}, compiled"] = compiled
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, m in models.items():
                times[name].append(
                    seconds(
                        lambda m=m: m(input_ids=ids, logits_to_keep=1, use_cache=False), args.min_run_time
                    )
                )
    print(f"\nprefill 1 x 256, {args.fraction:.0%} removed, {args.threads} thread(s), {args.rounds} rounds\n")
    print("| model | median time (ms) | speedup over dense eager | speedup over dense of the same mode |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        over_eager = [d / t for d, t in zip(times["dense"], ts)]
        over_same = [d / t for d, t in zip(times["dense, compiled" if "compiled" in name else "dense"], ts)]
        print(
            f"| {name} | {1e3 * statistics.median(ts):.0f} | {statistics.median(over_eager):.2f}x (range "
            f"{min(over_eager):.2f}-{max(over_eager):.2f}) | {statistics.median(over_same):.2f}x |"
        )


if __name__ == "__main__":
    main()
