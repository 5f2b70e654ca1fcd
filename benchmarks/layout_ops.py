"""CPU cost of the layout operators around compact layers: attention head sizes, residual gathers/scatters.

1. The fused attention kernel (`scaled_dot_product_attention`, causal, SmolLM2's 9 query heads over 3 KV
   heads, `--tokens` tokens) at every head size from 24 to 64, next to the size compact attention hands it
   (`kernel_head_size`: rounded up to a multiple of 8 where 3-7 above one): checks that rule on this CPU.
2. Gathering `--kept` of `--width` residual dims from a `--tokens` x `--width` float32 hidden state, and
   scattering them back, by several operators (the compact layers use `index_select` and `scatter_`).

    python benchmarks/layout_ops.py
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from common import benchmark_parser, parse_benchmark_args

from finegates.compress.attention import kernel_head_size
from finegates.timing import seconds


def attention(tokens: int, size: int, min_run_time: float) -> float:
    q = torch.randn(1, 9, tokens, size)
    k, v = torch.randn(1, 3, tokens, size), torch.randn(1, 3, tokens, size)
    return seconds(
        partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True), min_run_time
    )


def gathers_and_scatters(tokens: int, width: int, kept: int) -> dict[str, object]:
    """Label -> call; every gather returns x[:, idx], every scatter a zero tensor with y at columns idx
    (checked against each other before timing)."""
    x, y = torch.randn(tokens, width), torch.randn(tokens, kept)
    idx = torch.randperm(width, generator=torch.Generator().manual_seed(0))[:kept].sort().values
    wide = idx.expand(tokens, -1)
    flat = (torch.arange(tokens)[:, None] * width + idx).flatten()
    x_np, idx_np = x.numpy(), idx.numpy()
    return {
        "gather: copy of the whole tensor (reference)": x.clone,
        "gather: index_select over dim 1 (used)": partial(torch.index_select, x, 1, idx),
        "gather: torch.gather": partial(torch.gather, x, 1, wide),
        "gather: index_select of the flattened tensor": lambda: (
            x.view(-1).index_select(0, flat).view(tokens, kept)
        ),
        "gather: numpy.take": lambda: torch.from_numpy(np.take(x_np, idx_np, axis=1)),
        "gather: advanced indexing x[:, idx]": lambda: x[:, idx],
        "scatter: scatter_ into zeros (used)": lambda: y.new_zeros(tokens, width).scatter_(1, wide, y),
        "scatter: index_copy_ into zeros": lambda: y.new_zeros(tokens, width).index_copy_(1, idx, y),
        "scatter: index_add_ into a copy of the residual": lambda: x.clone().index_add_(1, idx, y),
        "scatter: scatter_ into zeros, then the residual add": lambda: (
            x + y.new_zeros(tokens, width).scatter_(1, wide, y)
        ),
    }


def main() -> None:
    parser = benchmark_parser(__doc__, threads=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--width", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    parser.add_argument("--kept", type=int, default=480, help="residual dims a layer keeps")
    parser.add_argument("--min-run-time", type=float, default=0.2)
    args = parse_benchmark_args(parser)
    torch.set_num_threads(1)
    with torch.inference_mode():
        times = {size: attention(args.tokens, size, args.min_run_time) for size in range(24, 65)}
        print(
            f"SDPA, 9 query / 3 KV heads, {args.tokens} tokens, causal, 1 thread\n\n"
            "| head size | ms | kernel_head_size | ms at that size | gain |\n|---|---|---|---|---|"
        )
        for size, t in times.items():
            padded = kernel_head_size(size)
            print(
                f"| {size} | {1e3 * t:.2f} | {padded} | {1e3 * times[padded]:.2f} | "
                f"{t / times[padded]:.2f}x |"
            )
        calls = gathers_and_scatters(args.tokens, args.width, args.kept)
        results = {label: call() for label, call in calls.items()}
        gathered, scattered = (
            results["gather: index_select over dim 1 (used)"],
            results["scatter: scatter_ into zeros (used)"],
        )
        x_plus_scattered = results["scatter: scatter_ into zeros, then the residual add"]
        for label, out in results.items():
            if label.startswith("gather:") and "reference" not in label:
                assert torch.equal(out, gathered), label
            if label.startswith("scatter:"):  # the residual variants also add the hidden state x
                expected = x_plus_scattered if "residual" in label else scattered
                torch.testing.assert_close(out, expected, atol=1e-6, rtol=0, msg=label)
        print(
            f"\n{args.tokens} x {args.width} float32, {args.kept} dims kept, 1 thread\n\n"
            "| operator | us |\n|---|---|"
        )
        for label, call in calls.items():
            print(f"| {label} | {1e6 * seconds(call, args.min_run_time):.0f} |")


if __name__ == "__main__":
    main()
