"""`train_method`: one small training loop that runs every method the same way.

The loop owns what must be identical across methods (data order, optimizer, schedule, timing); the
method owns what differs (which parameters train, extra loss terms, per-step hooks, finalization).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from finegates.baselines.base import Batch, Method
from finegates.baselines.registry import make_method
from finegates.optim import keep_gate_lr_constant

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


def _teacher_outputs(teacher: nn.Module | None, batch: Batch, method: Method) -> Any:
    if not method.needs_teacher:
        return None
    if teacher is None:
        raise ValueError(f"Method {method.name!r} needs a dense teacher model (teacher=...).")
    with torch.no_grad():
        return teacher(**batch, output_hidden_states=method.needs_hidden_states)


def _step(model: nn.Module, method: Method, batch: Batch, teacher: nn.Module | None) -> torch.Tensor:
    outputs = model(**batch, output_hidden_states=method.needs_hidden_states)
    return outputs.loss + method.loss(model, batch, outputs, _teacher_outputs(teacher, batch, method))


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
) -> tuple[list[float], int, float]:
    """Train a prepared model in place; returns (losses, steps, mean seconds per step)."""
    method.total_steps = total = epochs * len(train_batches)
    lr = method.default_lr if lr is None else lr
    optimizer = torch.optim.AdamW(method.param_groups(model, lr), weight_decay=0.0)
    schedule = get_scheduler(scheduler, optimizer, int(warmup_ratio * total), total)
    if any("finegates" in group for group in optimizer.param_groups):
        keep_gate_lr_constant(schedule)
    if teacher is not None:
        teacher.eval()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model.train()
    losses, start, step = [], time.perf_counter(), 0
    for _ in range(epochs):
        for batch in tqdm(train_batches, disable=not progress, desc=method.name):
            loss = _step(model, method, batch, teacher)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            method.after_step(model, step)
            losses.append(float(loss.detach()))
    return losses, step, (time.perf_counter() - start) / max(step, 1)
