"""Greedy decoding of SmolLM2-135M and its compacted models in torch's row-major weights and in
`finegates.decode_layout`'s, all timed in turns in one process.

Each round times every model in both layouts (`finegates.workflows.evaluation.measure_decode`: 32 tokens
after a 16-token prompt, the prompt's prefill subtracted), the layouts alternating, so that a ratio compares
measurements taken seconds apart. Prints per round and as medians over rounds: each model's speedup from the
layout (its tokens/s in the layout over its own row-major tokens/s), and each compacted model's speedup over
the dense model in the same layout. Compacted models come from saved folders (`--compacted NAME=FOLDER`,
loaded with `from_pretrained` after `import finegates`) or from gate adapters compacted on the fly
(`--gates NAME=DIR`).

    python benchmarks/decode_layout.py --compacted stock40=runs/post-uniform-0.4/stock --rounds 3
    python benchmarks/decode_layout.py --gates r40=runs/post-runtime-0.4/gates --layout columns
"""

from __future__ import annotations

import copy
import statistics

import torch
from common import benchmark_parser, parse_benchmark_args
from inference import load_smollm2
from transformers import AutoModelForCausalLM

import finegates
from finegates.workflows.evaluation import measure_decode


def named(items: list[str], option: str) -> list[tuple[str, str]]:
    pairs = [item.partition("=") for item in items]
    bad = [item for item, (_, sep, _) in zip(items, pairs) if not sep]
    if bad:
        raise SystemExit(f"{option} takes NAME=PATH, got {bad[0]!r}")
    return [(name, path) for name, _, path in pairs]


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--compacted", nargs="*", default=[], metavar="NAME=FOLDER", help="saved models")
    parser.add_argument("--gates", nargs="*", default=[], metavar="NAME=DIR", help="gate adapters of SmolLM2")
    parser.add_argument("--layout", default="auto", choices=["auto", "columns"], help="the layout to compare")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each: every model in both layouts)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded per timing")
    args = parse_benchmark_args(parser)
    dense = load_smollm2().eval()
    models = {"dense": dense}
    for name, folder in named(args.compacted, "--compacted"):
        models[name] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for name, folder in named(args.gates, "--gates"):
        gated = finegates.load_gates(copy.deepcopy(dense), folder).eval()
        models[name] = finegates.compress(gated)
    for name, model in models.items():
        with finegates.decode_layout(model, args.layout) as chosen:
            params = sum(p.numel() for p in model.parameters())
            print(f"{name}: {params / 1e6:.2f}M parameters; {chosen}")
    print(f"\n{torch.get_num_threads()} thread(s), {args.tokens} tokens after a 16-token prompt\n")
    rates: dict[str, list[dict[str, float]]] = {"rows": [], args.layout: []}
    for round_ in range(args.rounds):
        for layout in ("rows", args.layout) if round_ % 2 == 0 else (args.layout, "rows"):
            rates[layout].append(measure_decode(models, args.tokens, repeats=3, layout=layout))
        row, new = rates["rows"][-1], rates[args.layout][-1]
        print(
            f"round {round_ + 1}: "
            + ", ".join(f"{n} {row[n]:.1f} -> {new[n]:.1f} tokens/s" for n in models)
            + " (rows -> "
            + args.layout
            + ")"
        )

    def median(layout: str, name: str, over: str | None = None) -> float:
        return statistics.median(r[name] / (r[over] if over else 1.0) for r in rates[layout])

    layout = args.layout
    print(f"\n| model | tokens/s, rows | {layout} | speedup from the layout | over dense, rows | {layout} |")
    print("|---|---|---|---|---|---|")
    for name in models:
        own = statistics.median(new[name] / row[name] for row, new in zip(rates["rows"], rates[args.layout]))
        print(
            f"| {name} | {median('rows', name):.1f} | {median(args.layout, name):.1f} | {own:.2f}x | "
            f"{median('rows', name, 'dense'):.2f}x | {median(args.layout, name, 'dense'):.2f}x |"
        )


if __name__ == "__main__":
    main()
