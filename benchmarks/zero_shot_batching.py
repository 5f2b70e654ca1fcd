"""Zero-shot scoring, one sequence a forward pass against right-padded batches (`choice_logprobs`).

Scores the (context, choice) pairs of the first `--items` PIQA items with a causal LM (a saved folder, or
`smollm2-135m`) both ways, in turns, and prints the times, the ratio per round and the largest difference
between the two ways' scores.

    python benchmarks/zero_shot_batching.py --model runs/post/compressed --items 60 --rounds 2
"""

from __future__ import annotations

import time

from common import benchmark_parser, parse_benchmark_args

from finegates.data.registry import load_multiple_choice
from finegates.workflows.causal_lm import choice_logprobs, zero_shot_pairs
from finegates.workflows.evaluate import EvaluateConfig
from finegates.workflows.evaluate_lm import load_lm


def main() -> None:
    parser = benchmark_parser(__doc__, threads=2)
    parser.add_argument("--model", default="smollm2-135m", help="a saved causal LM folder or smollm2-135m")
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parse_benchmark_args(parser)
    model, tokenizer = load_lm(EvaluateConfig(model=args.model))
    items = load_multiple_choice("piqa")[: args.items]
    pairs = zero_shot_pairs(items)
    print(f"{len(pairs)} sequences ({args.items} PIQA items), {args.threads} thread(s)")
    for _ in range(args.rounds):
        begin = time.perf_counter()
        alone = [choice_logprobs(model, tokenizer, [pair])[0] for pair in pairs]
        one_s = time.perf_counter() - begin
        begin = time.perf_counter()
        batched = choice_logprobs(model, tokenizer, pairs, batch_size=args.batch_size)
        batch_s = time.perf_counter() - begin
        gap = max(abs(a - b) for a, b in zip(alone, batched, strict=True))
        print(
            f"one at a time {one_s:.1f} s, batches of {args.batch_size} {batch_s:.1f} s: "
            f"{one_s / batch_s:.2f}x; largest score difference {gap:.1e}"
        )


if __name__ == "__main__":
    main()
