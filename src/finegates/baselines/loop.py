"""`train_method`: prepare, train, finalize and evaluate any compared method the same way.

Every method trains through transformers' Trainer (`method.trainer`: `MethodTrainer` for the baselines,
`FineGatesTrainer` for FineGates), on the same batches in the same order, with one optimizer and schedule.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PrinterCallback, TrainingArguments

from finegates.baselines.base import Batch, Method
from finegates.baselines.registry import make_method
from finegates.baselines.trainer import PreBatched, unbatch
from finegates.trainer import train_model

logger = logging.getLogger(__name__)


@dataclass
class MethodResult:
    name: str
    model: nn.Module  # the finalized model
    metrics: dict[str, float]
    trainable_parameters: int
    removed_parameters: int
    kind_of_sparsity: str
    steps: int
    step_seconds: float  # mean wall time of one training step
    peak_memory_bytes: int | None  # CUDA only; None on CPU
    losses: list[float] = field(default_factory=list)


def train_method(
    name: str,
    model: nn.Module,
    train_batches: Sequence[Batch],
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    *,
    config: Any = None,
    teacher: nn.Module | None = None,
    epochs: int = 1,
    lr: float | None = None,
    scheduler: str = "linear",
    warmup_ratio: float = 0.0,
    calibration_batches: Sequence[Batch] | None = None,
    progress: bool = False,
    seed: int = 0,
    bf16: bool = False,
) -> MethodResult:
    """Prepare `model` with method `name`, train it on `train_batches`, finalize it and evaluate it.

    Batches are dicts of model inputs including `labels`. `eval_fn` receives the finalized model (in
    eval mode) and returns metrics. `calibration_batches` default to the first 8 training batches.

    >>> result = train_method("lora", model, batches, evaluate, epochs=3)  # doctest: +SKIP
    >>> result.metrics, result.trainable_parameters  # doctest: +SKIP
    """
    method = make_method(name)
    calibration = list(calibration_batches) if calibration_batches is not None else list(train_batches[:8])
    model = method.prepare(model, config, calibration)
    trainable = method.trainable_parameters(model)
    losses, step, seconds = fit_method(
        method,
        model,
        train_batches,
        teacher=teacher,
        epochs=epochs,
        lr=lr,
        scheduler=scheduler,
        warmup_ratio=warmup_ratio,
        progress=progress,
        seed=seed,
        bf16=bf16,
    )
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    model = method.finalize(model).eval()
    removed = method.removed_parameters(model)  # after finalize: FineGates lands on its budget there
    metrics = eval_fn(model) if eval_fn is not None else {}
    logger.info(
        "%s: %d steps, %.3fs/step, trainable %d, removed %d (%s), %s",
        name,
        step,
        seconds,
        trainable,
        removed,
        method.kind_of_sparsity,
        metrics,
    )
    return MethodResult(
        name, model, metrics, trainable, removed, method.kind_of_sparsity, step, seconds, peak, losses
    )


def fit_method(
    method: Method,
    model: nn.Module,
    train_batches: Sequence[Batch],
    *,
    teacher: nn.Module | None = None,
    epochs: int = 1,
    lr: float | None = None,
    scheduler: str = "linear",
    warmup_ratio: float = 0.0,
    progress: bool = False,
    seed: int = 0,
    bf16: bool = False,
) -> tuple[list[float], int, float]:
    """Train a prepared model in place through the method's Trainer (`method.trainer`), on the batches in
    their order, `epochs` times; returns (logged losses, steps, mean seconds per step).

    AdamW without weight decay and without gradient clipping, the schedule `scheduler` over the whole run;
    no checkpoints (the run lives in a temporary folder). `bf16`: bfloat16 autocast (transformers' bf16)."""
    steps = epochs * len(train_batches)  # the method's Trainer gives it the run's length
    with tempfile.TemporaryDirectory(prefix="finegates-fit-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=1,  # each item is a whole batch
            learning_rate=method.default_lr if lr is None else lr,
            lr_scheduler_type=scheduler,
            warmup_steps=warmup_ratio,
            weight_decay=0.0,
            max_grad_norm=0.0,
            logging_steps=max(1, steps // 20),
            save_strategy="no",
            report_to=[],
            disable_tqdm=not progress,
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            bf16=bf16,
        )
        trainer = method.trainer(
            model, args, PreBatched(list(train_batches), epochs), teacher=teacher, data_collator=unbatch
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)
        begin = time.perf_counter()
        train_model(trainer)
        seconds = time.perf_counter() - begin
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, trainer.state.global_step, seconds / max(trainer.state.global_step, 1)
