"""Decode-shaped GEMMs (one token) at the widths a compacted SmolLM2 gets, odd and aligned, from memory.

Greedy decoding multiplies one token by every weight matrix: it reads each weight once per token, so its
time is the bytes read over the memory bandwidth. This times `F.linear` of one row against `--count`
matrices of a shape in turn (more bytes than the caches hold, as in a real decode), for the dense model's
shapes, the shapes of a compacted one (odd widths such as 450) and aligned neighbours (448, 464, or the
same odd width stored with an aligned row stride): whether aligning the kept widths would pay. Also the LM
head (49,152 rows), which every token reads whole. Each shape is timed row-major (torch's layout) and
column-major (the transpose of a contiguous matrix, what `finegates.decode_layout` stores where it is
faster), in turns.

    python benchmarks/gemv_widths.py [--threads 1] [--count 60]
"""

from __future__ import annotations

import time

import torch
from common import benchmark_parser, parse_benchmark_args
from torch.nn import functional as F

# (rows, cols, row stride): SmolLM2's dense FFN and attention shapes, a compacted model's (hidden 450,
# 1,228 FFN channels, 6 query heads), aligned neighbours, the same odd widths with aligned strides, and q/k/v
# stacked into one matrix.
SHAPES = [
    (1536, 576, None),
    (1228, 576, None),
    (1228, 450, None),
    (1228, 450, 464),
    (1228, 448, None),
    (1228, 464, None),
    (576, 1536, None),
    (450, 1228, None),
    (450, 1228, 1232),
    (448, 1232, None),
    (384, 450, None),
    (384, 448, None),
    # q, k and v one at a time or stacked into one matrix (dense: 576 + 2 x 192 rows; 6 query heads and
    # 2 KV heads at hidden 450: 384 + 2 x 128)
    (576, 576, None),
    (192, 576, None),
    (960, 576, None),
    (128, 450, None),
    (640, 450, None),
    (49152, 576, None),
    (49152, 450, None),
    (49152, 448, None),
]


def time_shape(
    rows: int, cols: int, stride: int | None, count: int, repeats: int = 5, columns: bool = False
) -> float:
    """Best mean seconds of one `F.linear(x, w)` over `count` distinct (rows x cols) matrices, stored
    column-major if `columns` (then `stride` is ignored)."""
    count = max(2, min(count, (2 << 30) // (rows * (stride or cols) * 4)))  # at most ~2 GB of weights
    if columns:
        weights = [torch.randn(cols, rows).t() for _ in range(count)]
    else:
        weights = [torch.randn(rows, stride or cols)[:, :cols] for _ in range(count)]
    x = torch.randn(1, cols)
    for w in weights:
        F.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            F.linear(x, w)
        best = min(best, (time.perf_counter() - start) / count)
    return best


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--count", type=int, default=60, help="matrices per shape, timed in turn")
    args = parse_benchmark_args(parser)
    print(f"{torch.get_num_threads()} thread(s), {args.count} matrices per shape, best of 5 passes\n")
    print("| rows x cols | row stride | us per matrix | GB/s read | column-major: us | GB/s | speedup |")
    print("|---|---|---|---|---|---|---|")
    for rows, cols, stride in SHAPES:
        seconds = time_shape(rows, cols, stride, args.count)
        size = rows * cols * 4
        line = f"| {rows} x {cols} | {stride or cols} | {seconds * 1e6:.1f} | {size / seconds / 1e9:.2f} |"
        if stride is None:
            columns = time_shape(rows, cols, None, args.count, columns=True)
            line += f" {columns * 1e6:.1f} | {size / columns / 1e9:.2f} | {seconds / columns:.2f}x |"
        print(line + ("" if stride is None else " | | |"))


if __name__ == "__main__":
    main()
