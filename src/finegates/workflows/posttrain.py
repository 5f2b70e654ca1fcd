"""`finegates posttrain`: task-agnostic sparsification of a LLaMA-family causal LM.

Gates only (no weight, bias or head trains), language-modelling loss on generic text, perplexity on
held-out text and zero-shot multiple-choice accuracy before and after, then compaction.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from finegates.adapter import save_gates
from finegates.blockwise import use_blockwise_lm_loss
from finegates.compress.linear import use_compact_linears
from finegates.config import GatesConfig
from finegates.data.registry import load_multiple_choice, load_text_corpus
from finegates.data.types import MultipleChoiceItem
from finegates.data.user_text import ChoiceFields
from finegates.distill import DistillConfig
from finegates.model import count_parameters, get_gated_model
from finegates.report import sparsity_report
from finegates.trainer import FineGatesTrainer, train_model
from finegates.workflows.causal_lm import (
    SMOLLM2,
    load_causal_lm,
    perplexity,
    split_documents,
    text_blocks,
    zero_shot_accuracy,
)
from finegates.workflows.evaluation import measure_decode, measure_latency
from finegates.workflows.results import result_from_dict
from finegates.workflows.run_config import PrecisionOptions
from finegates.workflows.run_folder import RunFolder, RunFolderOptions, trainer_loggers
from finegates.workflows.run_report import REPORT_NAME, write_run_outputs

logger = logging.getLogger(__name__)


POSTTRAIN_METHODS = ("finegates", "magnitude", "magnitude+lora", "importance", "importance+lora")
# the methods that train, and so can distil from their own weights with the gates bypassed
DISTILLABLE = ("finegates", "magnitude+lora", "importance+lora")


@dataclass
class PosttrainConfig(DistillConfig, PrecisionOptions, RunFolderOptions):
    """Options of a post-training run (the gate options live in GatesConfig)."""

    model: str = field(default=SMOLLM2, metadata={"help": "'smollm2-135m', a hub id or a local folder."})
    method: str = field(
        default="finegates",
        metadata={
            "help": "'finegates' (learned gates), or the one-shot structured baselines at the same budget, "
            "coupling and compaction: 'magnitude' (activation-weighted norms), 'importance' (mean activation "
            "magnitude, Minitron-style), each also '+lora' (LoRA recovery for max_steps)."
        },
    )
    text: str = field(
        default="book-excerpts",
        metadata={
            "help": "Training text: an embedded corpus ('book-excerpts', 'brown'), a .txt file (documents "
            "separated by blank lines), a folder of .txt files, a csv/json/jsonl/parquet file or folder, or "
            "a hub data set id."
        },
    )
    text_column: str = field(
        default="text", metadata={"help": "Column of the text in a table or hub data set."}
    )
    heldout_fraction: float = field(
        default=0.1, metadata={"help": "Share of documents held out for perplexity."}
    )
    zero_shot: str | None = field(
        default="piqa",
        metadata={
            "help": (
                "Zero-shot multiple-choice task: 'piqa', a local .jsonl file (one item per line), or none."
            )
        },
    )
    zero_shot_question_field: str = field(
        default="question", metadata={"help": "Zero-shot jsonl: question field."}
    )
    zero_shot_choices_field: str = field(
        default="choices", metadata={"help": "Zero-shot jsonl: field holding the list of candidate answers."}
    )
    zero_shot_answer_field: str = field(
        default="answer",
        metadata={"help": "Zero-shot jsonl: the right answer, as an index or a choice's text."},
    )
    zero_shot_items: int = field(
        default=200, metadata={"help": "Items of the zero-shot task to score (0: all)."}
    )
    seq_len: int = field(default=256, metadata={"help": "Tokens per training block."})
    batch_size: int = field(default=4, metadata={"help": "Blocks per step."})
    max_steps: int = field(default=100, metadata={"help": "Training steps."})
    eval_blocks: int = field(default=32, metadata={"help": "Held-out blocks for perplexity (0: all)."})
    save_steps: int | None = field(
        default=None,
        metadata={
            "help": "Checkpoint every this many steps (the newest kept; --resume continues from it). None: "
            "a quarter of max_steps."
        },
    )
    output_dir: str = field(default="runs/posttrain", metadata={"help": "Run folder."})
    seed: int = field(default=0, metadata={"help": "Seed of data order and gate noise."})
    quiet: bool = field(default=False, metadata={"help": "No progress bars."})
    report_to: list[str] = field(
        default_factory=list, metadata={"help": "Trainer loggers, e.g. tensorboard."}
    )
    distill: bool | None = field(
        default=None,
        metadata={
            "help": "Distil from the same frozen weights with the gates bypassed (no second model copy): "
            "logit KL, and optionally SquareHead's hidden-state L2. None: on for --method finegates "
            "(lower perplexity for 1.3-1.5x the step time, BENCHMARKS.md), off for the one-shot baselines; "
            "the '+lora' baselines take it too (teacher: gates bypassed, LoRA off)."
        },
    )

    def __post_init__(self) -> None:
        if self.method not in POSTTRAIN_METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose one of {list(POSTTRAIN_METHODS)}.")
        if self.distill is None:
            self.distill = self.method == "finegates"
        super().__post_init__()
        self.report_to = trainer_loggers(self.report_to)
        if self.distill and self.method not in DISTILLABLE:
            raise ValueError(
                f"--distill needs a method that trains: {self.method!r} is a one-shot cut with no training "
                f"steps. Use one of {list(DISTILLABLE)}, or drop --distill."
            )
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}.")
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError(
                f"save_steps must be >= 1 (or None: a quarter of max_steps), got {self.save_steps}."
            )
        for name, least in (("max_steps", 1), ("batch_size", 1), ("seq_len", 2)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}.")


def choice_fields(cfg: PosttrainConfig) -> ChoiceFields:
    return ChoiceFields(cfg.zero_shot_question_field, cfg.zero_shot_choices_field, cfg.zero_shot_answer_field)


def default_posttrain_gates() -> GatesConfig:
    """The reference's post-training setting: every linear gated, gates only, target 0.3. Warm-up and gate
    lr follow the run's length: the target ramps over 70% of the run (the best of the warm-up lengths
    measured on SmolLM2, BENCHMARKS.md "What the post-training quality depends on")."""
    return GatesConfig(target_sparsity=0.3, bias="none", modules_to_save=[], warmup_fraction=0.7)


@dataclass
class EvalData:
    """The user's data of a run, read (and checked) before anything is written: documents and zero-shot
    items."""

    docs: list[str]
    items: list[MultipleChoiceItem]
    zero_shot_name: str | None


def read_data(cfg: PosttrainConfig) -> EvalData:
    docs = load_text_corpus(cfg.text, cfg.text_column)
    if not cfg.zero_shot:
        return EvalData(docs, [], None)
    items = load_multiple_choice(cfg.zero_shot, choice_fields(cfg))[: cfg.zero_shot_items or None]
    name = Path(cfg.zero_shot).stem if cfg.zero_shot.endswith(".jsonl") else cfg.zero_shot
    return EvalData(docs, items, name)


def split_text(cfg: PosttrainConfig, tokenizer, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out blocks from disjoint documents (`split_documents`); at most `eval_blocks`
    held-out blocks."""
    train_docs, heldout_docs = split_documents(docs, cfg.heldout_fraction)
    train = text_blocks(tokenizer, train_docs, cfg.seq_len)
    heldout = text_blocks(tokenizer, heldout_docs, cfg.seq_len)
    return train, heldout[: cfg.eval_blocks] if cfg.eval_blocks else heldout


def evaluate_lm(
    model, tokenizer, heldout: torch.Tensor, cfg: PosttrainConfig, data: EvalData
) -> dict[str, float]:
    """Perplexity on held-out text and zero-shot accuracy, the same way for every model of a run."""
    metrics = {"perplexity": perplexity(model, heldout, quiet=cfg.quiet)}
    if data.items:
        metrics[f"{data.zero_shot_name}_accuracy"] = zero_shot_accuracy(
            model, tokenizer, data.items, quiet=cfg.quiet
        )
    return metrics


def check_one_shot_gates(method: str, gates: GatesConfig) -> None:
    """Refuse gate options a one-shot baseline would not honour, naming them (not run silently without): it
    takes the budget, the layers and the trained biases; its cut is always the fine structure's rows and
    columns by the parameter budget."""
    default = default_posttrain_gates()
    ignored = [
        f"--{name.replace('_', '-')}"
        for name in ("structure", "exclude_modules", "uniform_layers", "target_speedup", "latency_costs")
        if getattr(gates, name) != getattr(default, name)
    ]
    if ignored:
        raise ValueError(
            f"--method {method} cuts rows and columns of the target modules by the parameter budget; it does "
            f"not take {', '.join(ignored)}. Drop them, or use --method finegates."
        )


def _one_shot(
    model, train: torch.Tensor, cfg: PosttrainConfig, gates: GatesConfig, folder: RunFolder
) -> tuple[Any, dict, int, float, list]:
    """The one-shot baselines: prune at the gates' budget (`magnitude`: activation-weighted norms;
    `importance`: mean activation magnitude, Minitron-style); `+lora` then trains LoRA for max_steps, in
    the same Trainer loop, data order and schedule as FineGates, distilled from the dense weights (gates
    bypassed, LoRA off) with `cfg.distill`.

    Returns the compacted model, the sparsity report, the trainable parameters, the training seconds and
    the training log.
    """
    from finegates.baselines.magnitude import MagnitudeConfig
    from finegates.baselines.registry import make_method

    method = make_method(cfg.method)
    config = MagnitudeConfig(
        target_sparsity=gates.target_sparsity,
        target_modules=gates.target_modules,
        bias=gates.bias,  # LoRA recovery trains what FineGates would (posttrain: no biases)
        score="mean_activation" if cfg.method.startswith("importance") else "activation",
        recovery=cfg.method.endswith("+lora"),
    )
    blocks = [train[i : i + cfg.batch_size] for i in range(0, len(train), cfg.batch_size)]
    calibration = [blocks[i % len(blocks)] for i in range(min(8, cfg.max_steps))]
    model = method.prepare(model, config, [{"input_ids": b, "labels": b} for b in calibration])
    report = method.report.to_dict()
    begin, log_history = time.perf_counter(), []
    if config.recovery:
        log_history = _train(model, train, cfg, folder.work, folder.checkpoint(), method).state.log_history
    seconds = time.perf_counter() - begin
    trainable = method.trainable_parameters(model)
    return method.finalize(model).eval(), report, trainable, seconds, log_history


def _train(
    model, train: torch.Tensor, cfg: PosttrainConfig, out: Path, resume: str | None, method=None
) -> Trainer:
    """Train on the blocks of `train`: FineGates through `FineGatesTrainer`, a baseline `method` through
    its own Trainer, with the same arguments (steps, batches, cosine schedule, logging, checkpoints)."""
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=model.finegates_config.head_lr if method is None else method.default_lr,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=max(1, cfg.max_steps // 20),
        save_steps=cfg.save_steps or max(1, cfg.max_steps // 4),
        save_total_limit=1,
        seed=cfg.seed,
        report_to=cfg.report_to,
        disable_tqdm=cfg.quiet,
        use_cpu=not torch.cuda.is_available(),
        bf16=cfg.bf16,
    )
    data = [{"input_ids": block, "labels": block} for block in train]
    if method is None:
        trainer = FineGatesTrainer(model=model, args=args, train_dataset=data, distill=cfg)
    else:
        trainer = method.trainer(model, args, data, distill=cfg if cfg.distill else None)
    train_model(trainer, resume)
    return trainer


def _prefill_latency(models: dict, cfg: PosttrainConfig) -> dict[str, float]:
    """Prefill seconds of each model, timed in turns so load changes hit all alike."""
    vocab = next(iter(models.values())).config.vocab_size
    batch = {"input_ids": torch.randint(0, vocab, (1, cfg.seq_len)), "use_cache": False}
    return {name: lat.median_s for name, lat in measure_latency(models, batch).items()}


def posttrain(cfg: PosttrainConfig, gates: GatesConfig | None = None) -> dict[str, Any]:
    """Run the whole workflow; returns the metrics written to `output_dir/metrics.json`.

    >>> posttrain(PosttrainConfig(max_steps=50), GatesConfig(target_sparsity=0.2))  # doctest: +SKIP
    """
    gates = gates or default_posttrain_gates()
    if cfg.method != "finegates":
        check_one_shot_gates(cfg.method, gates)
    data = read_data(cfg)  # every input is read and checked before the run folder is touched
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_causal_lm(cfg.model)
    with RunFolder.claim(cfg.output_dir, cfg.overwrite, cfg.resume) as folder:
        folder.write_config({"posttrain": cfg, "gates": gates})
        metrics, log_history = _run(model, tokenizer, cfg, gates, data, folder)
        result = result_from_dict(metrics)
        write_run_outputs(folder.work, result, log_history)
        folder.commit()
    logger.info("Report: %s", folder.final / REPORT_NAME)
    return result.to_dict()


def _run(model, tokenizer, cfg: PosttrainConfig, gates: GatesConfig, data: EvalData, folder: RunFolder):
    out = folder.work
    use_blockwise_lm_loss(model)  # the same loss, without 200 MB float32 passes over the logits per step
    train, heldout = split_text(cfg, tokenizer, data.docs)
    metrics: dict[str, Any] = {
        "run": "posttrain",
        "method": cfg.method,
        "dense": evaluate_lm(model, tokenizer, heldout, cfg, data),
    }
    # timed side by side with the compacted model at the end, on the compacted model's GEMM routes (as in
    # `bench`: the ratio is the pruning's own speedup)
    dense = use_compact_linears(copy.deepcopy(model))
    metrics["model_params"] = count_parameters(model)[1]
    log_history: list = []
    if cfg.method == "finegates":
        small, log_history = _gates(model, train, heldout, tokenizer, cfg, gates, folder, metrics, data)
    else:
        small, metrics["sparsity"], metrics["trainable_params"], metrics["train_s"], log_history = _one_shot(
            model, train, cfg, gates, folder
        )
    small.save_pretrained(out / "compressed")
    tokenizer.save_pretrained(out / "compressed")
    metrics["compacted"] = evaluate_lm(small, tokenizer, heldout, cfg, data)
    use_compact_linears(small)  # its LM head too, as the dense model's: the same GEMM routes on both sides
    latency = _prefill_latency({"dense": dense, "compacted": small}, cfg)
    decode = measure_decode({"dense": dense, "compacted": small})
    for name in latency:
        metrics[name]["prefill_s"], metrics[name]["decode_tokens_per_s"] = latency[name], decode[name]
    metrics["prefill_speedup"] = metrics["dense"]["prefill_s"] / metrics["compacted"]["prefill_s"]
    metrics["decode_speedup"] = decode["compacted"] / decode["dense"]
    return metrics, log_history


def _gates(
    model,
    train,
    heldout,
    tokenizer,
    cfg: PosttrainConfig,
    gates: GatesConfig,
    folder: RunFolder,
    metrics: dict,
    data: EvalData,
):
    """FineGates: gate, train the gates, evaluate the gated model; fills `metrics`, returns the compacted
    model and the training log."""
    from finegates.compress import compress

    get_gated_model(model, gates)
    metrics["trainable_params"] = count_parameters(model)[0]
    begin = time.perf_counter()
    trainer = _train(model, train, cfg, folder.work, folder.checkpoint())
    metrics["train_s"] = time.perf_counter() - begin
    model.eval()
    save_gates(model, folder.work / "gates")
    metrics["sparsity"] = sparsity_report(model).to_dict()
    metrics["budget"] = trainer.budget.metrics() if trainer.budget else None
    metrics["gated"] = evaluate_lm(model, tokenizer, heldout, cfg, data)
    return compress(model), trainer.state.log_history
