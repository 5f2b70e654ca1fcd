"""`finetune`: train FineGates gates (+ head, biases) on a classification task, compact, evaluate, report.

Python:  finetune(FinetuneConfig(model="minilm", task="reuters8"), GatesConfig(target_sparsity=0.3))
CLI:     finegates finetune --model minilm --task reuters8 --target-sparsity 0.3 --output-dir runs/x
Many processes:  accelerate launch -m finegates.cli finetune ...
             |   torchrun --nproc_per_node 2 -m finegates.cli finetune ...
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments, set_seed

from finegates.adapter import save_gates
from finegates.config import GatesConfig
from finegates.data import ClassificationData, Columns, load_classification
from finegates.distill import DistillConfig
from finegates.model import count_parameters, get_gated_model, parameter_count
from finegates.report import SparsityReport, sparsity_report
from finegates.trainer import FineGatesTrainer, train_model
from finegates.workflows.encoding import EncodedSplit, benchmark_batch
from finegates.workflows.evaluation import classification_metrics, measure_latency
from finegates.workflows.models import load_classifier
from finegates.workflows.results import result_from_dict
from finegates.workflows.run_config import PrecisionOptions
from finegates.workflows.run_folder import RunFolder, RunFolderOptions, trainer_loggers
from finegates.workflows.run_report import REPORT_NAME, write_run_outputs

logger = logging.getLogger(__name__)


LR_SCHEDULERS = ("constant", "linear", "cosine")


@dataclass
class FinetuneConfig(DistillConfig, PrecisionOptions, RunFolderOptions):
    """Run options of `finetune` (the gate options live in `GatesConfig`).

    >>> FinetuneConfig(task="boolq", epochs=1).batch_size
    16
    """

    model: str = field(
        default="minilm", metadata={"help": "'minilm' (packaged), a hub id or a local model folder."}
    )
    task: str = field(
        default="reuters8",
        metadata={
            "help": (
                "reuters8, reuters52, 20newsgroups, boolq, a local csv/tsv/json/jsonl/parquet file or "
                "folder, or a hub data set id."
            )
        },
    )
    output_dir: str = field(
        default="runs/finetune",
        metadata={"help": "Folder for config, gates, compacted model, metrics, report."},
    )
    text_column: str = field(default="text", metadata={"help": "Text column of a `datasets` source."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Second text column (sentence-pair tasks)."}
    )
    label_column: str = field(default="label", metadata={"help": "Label column of a `datasets` source."})
    test_file: str | None = field(
        default=None,
        metadata={
            "help": "Test file for a local train file (else 'test'/'validation' split, else a held-out part)."
        },
    )
    test_fraction: float = field(
        default=0.2, metadata={"help": "Fraction of train held out as test when there is no test split."}
    )
    epochs: float = field(default=3.0, metadata={"help": "Training epochs."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size per process."})
    eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size per process."})
    max_length: int = field(
        default=128, metadata={"help": "Tokens kept per example (truncation); also the benchmark length."}
    )
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of head and biases (default: the gate config's head_lr)."},
    )
    lr_scheduler: str = field(
        default="cosine",
        metadata={
            "help": "Schedule of the learning rate of the head and biases (and of the dense baseline): "
            "'cosine' or 'linear' (down to 0 at the end of training), or 'constant' (the reference's). "
            "The gates keep their own constant rate. Cosine: make run's accuracy 0.9647 against 0.9597 "
            "(means of 3 seeds, BENCHMARKS.md)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of sampling, initialisation and training."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a seeded random subset of this many examples."}
    )
    validation_size: int = field(
        default=256, metadata={"help": "Train examples held out for the per-epoch evaluation (0: none)."}
    )
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on a seeded random subset of the test split."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log loss and sparsity every this many steps."})
    dense_baseline: bool = field(
        default=False, metadata={"help": "Also fully finetune the dense model for the accuracy table."}
    )
    dense_learning_rate: float = field(
        default=1e-4, metadata={"help": "Learning rate of the dense baseline."}
    )
    benchmark: bool = field(default=True, metadata={"help": "Measure dense vs compacted latency."})
    bench_batch_size: int = field(
        default=32, metadata={"help": "Benchmark batch size (x max_length tokens)."}
    )
    bench_repeats: int = field(
        default=5, metadata={"help": "Timed forward passes per model in the benchmark (interleaved)."}
    )
    threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads for torch (default: torch's choice; 1 can be faster on a busy machine)."
        },
    )
    quiet: bool = field(default=False, metadata={"help": "No progress bars; warnings and errors only."})
    report_to: list[str] = field(
        default_factory=list,
        metadata={"help": "Trainer integrations to log to, e.g. tensorboard (as in transformers)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.report_to = trainer_loggers(self.report_to)
        for name in (
            "batch_size",
            "eval_batch_size",
            "max_length",
            "logging_steps",
            "bench_batch_size",
            "bench_repeats",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs must be a finite number > 0, got {self.epochs}.")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples must be >= 1, got {self.max_train_samples}.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {list(LR_SCHEDULERS)}, got {self.lr_scheduler!r}.")


@dataclass
class Splits:
    train: EncodedSplit
    validation: EncodedSplit | None
    test: EncodedSplit


def default_finetune_gates() -> GatesConfig:
    """The gates `finetune` trains when none are given: the runtime structure (whole heads, FFN channels,
    one residual mask), which on `make run`'s settings was both more accurate and faster than the fine
    structure (figures in BENCHMARKS.md). The library's `GatesConfig()` keeps the paper's fine structure."""
    return GatesConfig(structure="runtime")


def finetune(cfg: FinetuneConfig, gates: GatesConfig | None = None) -> dict[str, Any]:
    """Run the whole workflow and return the metrics it wrote to `cfg.output_dir/metrics.json`.

    >>> metrics = finetune(  # doctest: +SKIP
    ...     FinetuneConfig(model="minilm", task="reuters8", max_train_samples=512)
    ... )
    >>> metrics["accuracy"]["compacted"]  # doctest: +SKIP
    """
    gates = gates or default_finetune_gates()
    start = time.perf_counter()
    set_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # every input is read and checked before the run folder is touched
    data = _load_data(cfg)
    model, tokenizer = load_classifier(cfg.model, data.num_labels, data.label_names)
    with RunFolder.claim(cfg.output_dir, cfg.overwrite, cfg.resume) as folder:
        folder.write_config({"finetune": cfg, "gates": gates})
        metrics = _run(cfg, gates, data, model, tokenizer, folder, start)
        folder.commit()
    return metrics


def _run(
    cfg: FinetuneConfig,
    gates: GatesConfig,
    data: ClassificationData,
    model,
    tokenizer,
    folder: RunFolder,
    start: float,
) -> dict[str, Any]:
    out = folder.work
    splits = _encode(data, tokenizer, cfg)
    metrics: dict[str, Any] = {"run": "finetune", "task": data.summary(), "model": cfg.model, "timings_s": {}}
    dense_acc = _dense_baseline(model, tokenizer, splits, cfg, out) if cfg.dense_baseline else None
    model = get_gated_model(model, gates)
    full = sparsity_report(model)
    trainer = _train(model, tokenizer, splits, cfg, out, metrics["timings_s"], folder.checkpoint())
    gated_acc = trainer.evaluate(splits.test, metric_key_prefix="test")["test_accuracy"]
    if not trainer.is_world_process_zero():  # under torchrun / accelerate only rank 0 compacts and writes
        return metrics
    save_gates(model, out / "gates")
    tokenizer.save_pretrained(out / "gates")
    report = sparsity_report(model)
    compacted = _compress_and_evaluate(model, tokenizer, splits.test, cfg, out)
    metrics["latency"] = _benchmark(cfg, data, compacted.pop("model", None)) if cfg.benchmark else {}
    metrics.update(_summary(model, full, report, trainer, dense_acc, gated_acc, compacted))
    metrics["timings_s"]["total"] = time.perf_counter() - start
    metrics["report"] = str(folder.final / REPORT_NAME)  # where it is once the run folder is swapped in
    result = result_from_dict(metrics)
    write_run_outputs(out, result, trainer.state.log_history)
    return result.to_dict()


def _load_data(cfg: FinetuneConfig) -> ClassificationData:
    columns = Columns(text=cfg.text_column, label=cfg.label_column, text_pair=cfg.text_pair_column)
    data = load_classification(cfg.task, columns, cfg.test_file, cfg.test_fraction)
    logger.info(
        "Task %s: %d train, %d test, %d labels", data.name, len(data.train), len(data.test), data.num_labels
    )
    return data


def _encode(data: ClassificationData, tokenizer, cfg: FinetuneConfig) -> Splits:
    """Validation = a seeded slice of train held out first; train = a subset of the rest; test (maybe
    subset)."""
    n_val = min(cfg.validation_size, len(data.train) // 10)
    validation, remainder = data.train.sample(n_val, cfg.seed)
    train, _ = remainder.sample(cfg.max_train_samples, cfg.seed)
    test, _ = data.test.sample(cfg.max_test_samples, cfg.seed)
    logger.info(
        "Training on %d examples, validating on %d, testing on %d", len(train), len(validation), len(test)
    )
    return Splits(
        train=EncodedSplit(train, tokenizer, cfg.max_length),
        validation=EncodedSplit(validation, tokenizer, cfg.max_length) if len(validation) else None,
        test=EncodedSplit(test, tokenizer, cfg.max_length),
    )


def training_arguments(
    cfg: FinetuneConfig,
    output_dir: Path,
    learning_rate: float,
    has_validation: bool,
    training: bool = True,
) -> TrainingArguments:
    """TrainingArguments of a run: the head's lr schedule (`cfg.lr_scheduler`), eval and a checkpoint
    every epoch.
    `training=False`: for an evaluation-only Trainer, which runs float32 whatever `cfg.bf16` says."""
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=0.0,
        eval_strategy="epoch" if has_validation else "no",
        save_strategy="epoch",
        save_total_limit=1,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=cfg.report_to,
        disable_tqdm=cfg.quiet,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 on a CPU-only machine otherwise
        bf16=cfg.bf16 and training,
    )


def _train(
    model,
    tokenizer,
    splits: Splits,
    cfg: FinetuneConfig,
    out: Path,
    timings: dict[str, float],
    resume: str | None,
) -> FineGatesTrainer:
    gates = model.finegates_config
    args = training_arguments(
        cfg, out / "checkpoints", cfg.learning_rate or gates.head_lr, splits.validation is not None
    )
    trainer = FineGatesTrainer(
        model=model, args=args, processing_class=tokenizer, distill=cfg, **_data(splits, tokenizer)
    )
    silence_printer(trainer, cfg.quiet)
    begin = time.perf_counter()
    train_model(trainer, resume)
    timings["train"] = time.perf_counter() - begin
    return trainer


def _data(splits: Splits, tokenizer) -> dict[str, Any]:
    """The Trainer arguments every classification run shares: splits, collator, metrics."""
    return {
        "train_dataset": splits.train,
        "eval_dataset": splits.validation,
        "data_collator": DataCollatorWithPadding(tokenizer),
        "compute_metrics": classification_metrics,
    }


def silence_printer(trainer: Trainer, quiet: bool) -> Trainer:
    """Without progress bars the Trainer prints every log dict; quiet runs drop that printer."""
    if quiet:
        trainer.remove_callback(PrinterCallback)
    return trainer


def baseline_trainer(
    model, tokenizer, splits: Splits, cfg: FinetuneConfig, out: Path, learning_rate: float
) -> Trainer:
    """A plain Trainer for a baseline (dense, LoRA) on the run's data and arguments, without checkpoints."""
    args = training_arguments(cfg, out, learning_rate, splits.validation is not None)
    args.save_strategy = "no"
    trainer = Trainer(model=model, args=args, **_data(splits, tokenizer))
    return silence_printer(trainer, cfg.quiet)


def _dense_baseline(model, tokenizer, splits: Splits, cfg: FinetuneConfig, out: Path) -> float:
    """Test accuracy of full finetuning (every weight trains) on the same data and epochs; the model is
    saved in `out/dense` (to evaluate, benchmark or quantize it beside the compacted one)."""
    dense = copy.deepcopy(model)
    trainer = baseline_trainer(dense, tokenizer, splits, cfg, out / "dense-baseline", cfg.dense_learning_rate)
    train_model(trainer)
    if trainer.is_world_process_zero():  # under torchrun / accelerate only rank 0 writes
        dense.save_pretrained(out / "dense")
        tokenizer.save_pretrained(out / "dense")
    return trainer.evaluate(splits.test, metric_key_prefix="test")["test_accuracy"]


def _compress_and_evaluate(
    model, tokenizer, test: EncodedSplit, cfg: FinetuneConfig, out: Path
) -> dict[str, Any]:
    """Compact the gated model, save it, and measure its accuracy and size (the model is returned too)."""
    from finegates.compress import compress

    begin = time.perf_counter()
    small = compress(model)
    seconds = time.perf_counter() - begin
    small.save_pretrained(out / "compressed")
    tokenizer.save_pretrained(out / "compressed")
    args = training_arguments(cfg, out / "checkpoints", 0.0, False, training=False)
    # No loggers: an evaluation-only Trainer never calls on_train_begin, where transformers' TensorBoard
    # callback picks its folder, so it would write into ./runs of the working directory.
    args.report_to = []
    evaluator = Trainer(
        model=small,
        args=args,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics,
    )
    silence_printer(evaluator, cfg.quiet)
    result: dict[str, Any] = {
        "accuracy": evaluator.evaluate(test, metric_key_prefix="test")["test_accuracy"],
        "params": parameter_count(small),
        "seconds": seconds,
        "model": small,
    }
    return result


def _benchmark(cfg: FinetuneConfig, data: ClassificationData, small) -> dict[str, dict]:
    """Latency of the dense model (reloaded: the trained one now carries gates) vs the compacted one.

    Both run every linear on the compacted model's GEMM routes (`use_compact_linears`, as in `bench`; the
    compacted model's task head is a stock linear): the ratio is the pruning's own speedup, not the routes'
    gain on top of it."""
    from finegates.compress.linear import use_compact_linears

    dense = use_compact_linears(load_classifier(cfg.model, data.num_labels, data.label_names)[0])
    batch = benchmark_batch(cfg.bench_batch_size, cfg.max_length, dense.config.vocab_size, cfg.seed)
    models = {"dense": dense} if small is None else {"dense": dense, "compacted": use_compact_linears(small)}
    return {name: lat.to_dict() for name, lat in measure_latency(models, batch, cfg.bench_repeats).items()}


def _summary(
    model, full: SparsityReport, report: SparsityReport, trainer, dense_acc, gated_acc, compacted
) -> dict[str, Any]:
    trainable, total = count_parameters(model)
    evals = [row for row in trainer.state.log_history if "eval_accuracy" in row]
    return {
        "accuracy": {"dense_baseline": dense_acc, "gated": gated_acc, "compacted": compacted.get("accuracy")},
        "validation": [{"epoch": row["epoch"], "accuracy": row["eval_accuracy"]} for row in evals],
        "parameters": {
            "trainable": trainable,
            "total": total,
            "dense_model": full.model_params,
            "compacted_model": compacted.get("params"),
        },
        "sparsity": {key: value for key, value in report.to_dict().items() if key != "layers"},
        "full_widths": [vars(block) for block in full.blocks],
        "layers": [{**vars(row), "removed": row.removed} for row in report.layers],
        "compress": {"seconds": compacted.get("seconds")},
        "budget": trainer.budget.metrics() if trainer.budget else None,
    }
