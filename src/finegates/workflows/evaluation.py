"""Accuracy (scikit-learn) and latency (torch.utils.benchmark) of classification models."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.utils import benchmark

logger = logging.getLogger(__name__)


def classification_metrics(eval_pred) -> dict[str, float]:
    """`compute_metrics` for the Trainer: accuracy and macro F1 of the argmax predictions."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    predictions = np.argmax(logits, axis=-1)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro")),
    }


@dataclass
class Latency:
    """Median seconds per forward pass of one batch, and how it was measured."""

    median_s: float
    iqr_s: float
    runs: int
    batch_size: int
    length: int
    threads: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def measure_latency(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 3) -> Latency:
    """Forward-pass latency of `model` in eval mode on `batch` (one warm-up call, then `repeats` timed)."""
    model.eval()
    threads = torch.get_num_threads()
    timer = benchmark.Timer(
        stmt="model(**batch)",
        globals={"model": model, "batch": batch},
        num_threads=threads,
        label=type(model).__name__,
    )
    with torch.inference_mode():
        model(**batch)
        runs = [timer.timeit(1).median for _ in range(repeats)]
    runs_array = np.array(runs)
    iqr = float(np.percentile(runs_array, 75) - np.percentile(runs_array, 25))
    size, length = batch["input_ids"].shape
    return Latency(float(np.median(runs_array)), iqr, repeats, size, length, threads)
