"""`evaluate`: test accuracy of any classification checkpoint: dense, gated (adapter folder) or compacted;
held-out perplexity and zero-shot accuracy of any causal LM (`finegates.workflows.evaluate_lm`).

CLI:  finegates evaluate --model runs/minilm-reuters8/compressed --task reuters8
      finegates evaluate --model runs/minilm-reuters8/gates --task reuters8  # base model from run_config.json
      finegates evaluate --model runs/posttrain/compressed  # a causal LM, on its run's held-out text
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from finegates.adapter import WEIGHTS_NAME, load_gates
from finegates.data import ClassificationData, Columns, load_classification
from finegates.io_utils import atomic_write_text
from finegates.workflows.encoding import EncodedSplit
from finegates.workflows.evaluation import classification_metrics
from finegates.workflows.finetune import silence_printer
from finegates.workflows.models import load_classifier
from finegates.workflows.run_config import base_model_of

logger = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    """Options of `evaluate`.

    >>> EvaluateConfig(model="runs/x/compressed").task
    'reuters8'
    """

    model: str = field(
        default="minilm",
        metadata={"help": "A model folder (dense or compacted), a gate adapter folder, or a hub id."},
    )
    task: str = field(default="reuters8", metadata={"help": "Task name or data source, as for `finetune`."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model of a gate adapter (default: from the run's run_config.json)."},
    )
    text_column: str = field(default="text", metadata={"help": "Text column of a `datasets` source."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Second text column (sentence-pair tasks)."}
    )
    label_column: str = field(default="label", metadata={"help": "Label column of a `datasets` source."})
    test_file: str | None = field(default=None, metadata={"help": "Test file for a local train file."})
    test_fraction: float = field(
        default=0.2, metadata={"help": "Held-out fraction when there is no test split."}
    )
    max_length: int = field(default=128, metadata={"help": "Tokens kept per example."})
    eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on a seeded random subset of the test split."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the test subset."})
    quantize: str | None = field(
        default=None,
        metadata={
            "help": "'int8': evaluate after torch's dynamic int8 quantization of the linear layers (CPU)."
        },
    )
    text: str | None = field(
        default=None,
        metadata={
            "help": "Causal LMs: text of the held-out perplexity, as `posttrain --text` (its held-out "
            "split). Default: the post-training run's own text (its run_config.json), else book-excerpts."
        },
    )
    heldout_fraction: float | None = field(
        default=None, metadata={"help": "Causal LMs: share of documents held out (default: the run's, 0.1)."}
    )
    seq_len: int | None = field(
        default=None, metadata={"help": "Causal LMs: tokens per held-out block (default: the run's, 256)."}
    )
    eval_blocks: int | None = field(
        default=None, metadata={"help": "Causal LMs: held-out blocks scored (default: all)."}
    )
    zero_shot: str | None = field(
        default="run",
        metadata={
            "help": "Causal LMs: zero-shot multiple-choice task: 'piqa', a local .jsonl file, none, or 'run' "
            "(the post-training run's task, else piqa)."
        },
    )
    zero_shot_items: int | None = field(
        default=None, metadata={"help": "Causal LMs: zero-shot items scored (default: all)."}
    )
    zero_shot_question_field: str | None = field(
        default=None, metadata={"help": "Causal LMs, zero-shot jsonl: question field (default: question)."}
    )
    zero_shot_choices_field: str | None = field(
        default=None, metadata={"help": "Causal LMs, zero-shot jsonl: list of answers (default: choices)."}
    )
    zero_shot_answer_field: str | None = field(
        default=None, metadata={"help": "Causal LMs, zero-shot jsonl: the right answer (default: answer)."}
    )
    output_file: str | None = field(default=None, metadata={"help": "Write the metrics as JSON here."})
    quiet: bool = field(default=False, metadata={"help": "No progress bars; warnings and errors only."})

    def __post_init__(self) -> None:
        if self.quantize not in (None, "int8"):
            raise ValueError(f"quantize must be 'int8' or left out, got {self.quantize!r}.")
        for name, least in (("seq_len", 2), ("eval_blocks", 1), ("zero_shot_items", 1)):
            if getattr(self, name) is not None and getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least} (or left out), got {getattr(self, name)}.")


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Test metrics (accuracy, macro F1, loss) of the checkpoint `cfg.model` on `cfg.task`; for a causal LM,
    held-out perplexity and zero-shot accuracy (`evaluate_lm`).

    >>> evaluate(EvaluateConfig(model="runs/minilm-reuters8/compressed"))["test_accuracy"]  # doctest: +SKIP
    """
    set_seed(cfg.seed)
    from finegates.workflows.evaluate_lm import evaluate_lm, is_causal_lm

    if is_causal_lm(cfg.model, cfg.base_model):
        metrics = evaluate_lm(cfg)
    else:
        metrics = _evaluate_classifier(cfg)
    if cfg.output_file:
        atomic_write_text(Path(cfg.output_file), json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def _evaluate_classifier(cfg: EvaluateConfig) -> dict[str, Any]:
    columns = Columns(text=cfg.text_column, label=cfg.label_column, text_pair=cfg.text_pair_column)
    data = load_classification(cfg.task, columns, cfg.test_file, cfg.test_fraction)
    model, tokenizer = load_for_evaluation(cfg, data)
    if cfg.quantize == "int8":
        from finegates.compress.quantize import quantize_linears

        model = quantize_linears(model)
    test, _ = data.test.sample(cfg.max_test_samples, cfg.seed)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_eval_batch_size=cfg.eval_batch_size,
            report_to=[],
            disable_tqdm=cfg.quiet,
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model,
            args=args,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=classification_metrics,
        )
        silence_printer(trainer, cfg.quiet)
        metrics = trainer.evaluate(EncodedSplit(test, tokenizer, cfg.max_length), metric_key_prefix="test")
    metrics.update(model=cfg.model, task=data.name, test_rows=len(test), quantize=cfg.quantize)
    return metrics


def load_for_evaluation(cfg: EvaluateConfig, data: ClassificationData):
    """(model, tokenizer): a gate adapter on its base model, or any sequence-classification folder / id."""
    import finegates.compress  # noqa: F401  (registers the compacted classes with the Auto classes)

    path = Path(cfg.model)
    if (path / WEIGHTS_NAME).is_file():
        base = base_model_of(path, cfg.base_model)
        model, tokenizer = load_classifier(base, data.num_labels, data.label_names)
        return load_gates(model, path).eval(), tokenizer
    model, tokenizer = _load_classifier_checkpoint(cfg.model)
    _check_labels(model, data)
    return model.eval(), tokenizer


def _load_classifier_checkpoint(name: str):
    """A saved folder, embedded name or hub id of a trained sequence classifier; refused when it is not one
    (a base model, whose new head would score at chance) or when a weight would run re-initialised (a
    damaged or foreign folder)."""
    from finegates.compress.io import load_checked
    from finegates.workflows.models import locate_model

    path = locate_model(name)
    try:
        architectures = AutoConfig.from_pretrained(path).architectures or []
    except (OSError, ValueError) as err:
        raise ValueError(f"Could not read the config of {name!r} ({err}).") from err
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        named = ", ".join(architectures) or "no architecture"
        raise ValueError(
            f"{name!r} is not a trained sequence classifier (its config names {named}): its classification "
            "head would be new and score at chance. Evaluate a finetune run's `compressed` or `gates` "
            "folder, or a classifier checkpoint."
        )
    return load_checked(AutoModelForSequenceClassification, path), AutoTokenizer.from_pretrained(path)


def _check_labels(model, data: ClassificationData) -> None:
    if model.config.num_labels != data.num_labels:
        raise ValueError(
            f"The model predicts {model.config.num_labels} labels but task {data.name!r} has "
            f"{data.num_labels}."
        )
    names = [model.config.id2label.get(i, "") for i in range(data.num_labels)]
    if not all(name.startswith("LABEL_") for name in names) and names != data.label_names:
        raise ValueError(
            f"The model's labels {names} differ from the task's {data.label_names}: was it trained on this "
            "task?"
        )
