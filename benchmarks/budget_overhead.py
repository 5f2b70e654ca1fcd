"""Per-step cost of the budget's bookkeeping on a SmolLM2-shaped model, and how many exact plans it builds.

One training step of FineGates does, besides the model's own forward and backward: the budget objective
(`sparsity_loss`, whose value is the exact removed fraction with the 'ste' estimator), its backward, the
gates' optimizer step, `budget_step` (bounds, the exact fraction, the projection when it leaves its band)
and, on logged steps, the log's `expected_sparsity` and `budget_fraction`. This times that part alone
(random weights of SmolLM2-135M's shape, no data), per piece, and counts the compaction plans built.

    python benchmarks/budget_overhead.py [--steps 12] [--threads 1] [--structure fine|runtime]
    python benchmarks/budget_overhead.py --shape minilm --structure runtime

`--shape minilm`: a BERT of MiniLM's shape (6 layers, hidden 384, 12 heads, FFN 1,536), sequence
classification, as `finetune` gates it.

Run it with another checkout first on PYTHONPATH to compare two versions side by side.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import torch
from common import benchmark_parser, parse_benchmark_args
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import finegates
from finegates import latency, plan, report
from finegates.budget import budget_step
from finegates.objectives import expected_sparsity, sparsity_loss

try:  # versions before it walked the module tree at every look-up
    from finegates import structure as finegates_structure

    frozen_available = True
except ImportError:
    frozen_available = False

SMOLLM2_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


MINILM_SHAPE = {
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "vocab_size": 30522,
    "num_labels": 8,
}


def count_plans() -> list[int]:
    """Counts every plan built (the builder where plans are cached, else every compaction_plan call)."""
    calls = [0]

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            return fn(*args, **kwargs)

        return wrapper

    if hasattr(plan, "_build_plan"):
        plan._build_plan = counted(plan._build_plan)
    else:
        for module in (report, latency):
            module.compaction_plan = counted(module.compaction_plan)
    return calls


def log(model, step: int) -> None:
    """The Trainer's log of the budget (versions before `budget_logs`: its two measures)."""
    from finegates import trainer

    if hasattr(trainer, "budget_logs"):
        trainer.budget_logs(model, step)
        return
    with torch.no_grad():
        float(expected_sparsity(model))
    latency.budget_fraction(model)


def main() -> None:
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--structure", default="fine", choices=["fine", "runtime"])
    parser.add_argument("--shape", default="smollm2", choices=["smollm2", "minilm"])
    parser.add_argument(
        "--unfrozen", action="store_true", help="walk the module tree at every look-up (no frozen_structure)"
    )
    args = parse_benchmark_args(parser)
    torch.manual_seed(0)
    if args.shape == "minilm":
        model = BertForSequenceClassification(BertConfig(**MINILM_SHAPE))
        options = {"modules_to_save": ["classifier", "bert.pooler"]}
    else:
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE))
        options = {"bias": "none"}
    cfg = finegates.GatesConfig(
        target_sparsity=0.2, warmup_steps=4, gate_lr=0.2, structure=args.structure, **options
    )
    finegates.get_gated_model(model, cfg)
    model.train()
    head = ("classifier", "bert.pooler")  # MiniLM's task head trains too, but is not the budget's
    gates = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(head)]
    optimizer = torch.optim.AdamW(gates, lr=0.2)
    plans = count_plans()
    pieces: dict[str, list[float]] = {"objective": [], "optimizer": [], "budget_step": [], "log": []}
    built: list[int] = []
    frozen = (
        finegates_structure.frozen_structure(model)
        if frozen_available and not args.unfrozen
        else nullcontext()
    )
    with frozen:
        _steps(model, optimizer, args.steps, plans, pieces, built)
    removed = latency.budget_fraction(model)
    skip = 2  # the first steps allocate
    print(f"finegates from {finegates.__file__}")
    print(
        f"{args.shape}, structure {args.structure}, {args.threads} thread(s), {args.steps} steps"
        f"{', module tree walked every look-up' if args.unfrozen or not frozen_available else ''}; CPU s per "
        "step (median)"
    )
    for name, values in pieces.items():
        print(f"  {name:12s} {statistics.median(values[skip:]):.4f}")
    total = [sum(values[i] for values in pieces.values()) for i in range(skip, args.steps)]
    print(f"  {'total':12s} {statistics.median(total):.4f}")
    print(f"plans built per step: {built[skip:]} (removed at the end: {removed:.4f})")


def _steps(model, optimizer, steps: int, plans, pieces, built) -> None:
    for step in range(steps):
        start, before = time.process_time(), plans[0]
        loss = sparsity_loss(model, step=step)
        loss.backward()
        t1 = time.process_time()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.process_time()
        budget_step(model, step + 1)
        t3 = time.process_time()
        log(model, step + 1)
        t4 = time.process_time()
        for name, seconds in zip(pieces, (t1 - start, t2 - t1, t3 - t2, t4 - t3)):
            pieces[name].append(seconds)
        built.append(plans[0] - before)


if __name__ == "__main__":
    main()
