"""`MethodTrainer`: transformers' Trainer driven by a compared method, so every method trains in one loop.

The method owns what differs (its parameter groups, extra loss terms, an after-step hook, a frozen
teacher, or `distill`: the gated model's own weights with the gates bypassed and the adapters off, as
FineGates distils); the Trainer owns the rest (data order, optimizer, schedule, logging, checkpoints),
the same for every method. FineGates itself trains with `FineGatesTrainer`; methods that add a teacher's
terms to it (`finegates+kd`) mix `MethodLoss` into that class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import IterableDataset
from transformers import Trainer, TrainerCallback

from finegates.distill import DistillConfig, distill_loss, teacher_and_student_inputs
from finegates.model import is_gated
from finegates.trainer import accumulation_share, average_loss_per_process

if TYPE_CHECKING:
    from finegates.baselines.base import Batch, Method


class PreBatched(IterableDataset):
    """Batches made beforehand, in their order, `epochs` times (a Trainer runs it with batch size 1 and
    `unbatch` as its collator), so every method sees the same batches in the same order."""

    def __init__(self, batches: list[Batch], epochs: int = 1) -> None:
        self.batches, self.epochs = batches, epochs

    def __len__(self) -> int:
        return self.epochs * len(self.batches)

    def __iter__(self):
        for _ in range(self.epochs):
            yield from self.batches


def unbatch(items: list[Batch]) -> Batch:
    """The collator of `PreBatched`: each item is a whole batch already."""
    (batch,) = items
    return batch


class MethodLoss:
    """Trainer mixin: the loss is the model's plus `method.loss(...)`, given a frozen teacher's outputs
    (computed under no_grad) where the method needs them. Set `self.method` and `self.teacher`."""

    method: Method
    teacher: torch.nn.Module | None

    def use_method(self, method: Method, teacher: torch.nn.Module | None) -> None:
        """Train for `method`, with `teacher` (frozen, in eval mode, on the training device) if it has one."""
        self.method, self.teacher = method, teacher
        if teacher is not None:
            teacher.to(self.args.device).eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        method = self.method
        teacher_outputs = None
        if method.needs_teacher:
            if self.teacher is None:
                raise ValueError(f"Method {method.name!r} needs a dense teacher model (teacher=...).")
            with torch.no_grad():
                teacher_outputs = self.teacher(**inputs, output_hidden_states=method.needs_hidden_states)
        if method.needs_hidden_states:
            inputs = {**inputs, "output_hidden_states": True}
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        loss = loss + method.loss(self.accelerator.unwrap_model(model), inputs, outputs, teacher_outputs)
        return (loss, outputs) if return_outputs else loss


class _AfterStep(TrainerCallback):
    """Calls `method.after_step(model, step)` after every optimizer step (step counts from 1)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer.method.after_step(trainer.accelerator.unwrap_model(trainer.model), state.global_step)


class MethodTrainer(MethodLoss, Trainer):
    """A Trainer for a prepared baseline method: its parameter groups (at `args.learning_rate`, with
    `args.weight_decay` where a group sets none), its loss terms and its after-step hook.

    >>> trainer = MethodTrainer(model=model, args=args, train_dataset=data, method=method)  # doctest: +SKIP
    """

    def __init__(
        self,
        *args,
        method: Method,
        teacher: torch.nn.Module | None = None,
        distill: DistillConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.use_method(method, teacher)
        self.distill = distill if distill is not None and distill.distill else None
        if self.distill is not None and not is_gated(self.accelerator.unwrap_model(self.model)):
            raise ValueError(
                f"distill: method {method.name!r} has no gates to bypass, so its model has no dense "
                "teacher inside; distil the gated methods (finegates, the structured one-shot baselines)."
            )
        self.distill_terms: list[float] = []  # since the last log
        if average_loss_per_process(self.accelerator.unwrap_model(self.model)):
            self.model_accepts_loss_kwargs = False
        self.add_callback(_AfterStep(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The method's loss, plus with `distill` the KL (and hidden L2) to the same frozen weights with the
        gates bypassed and the adapters off."""
        if self.distill is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)
        teacher, inputs = teacher_and_student_inputs(unwrapped, inputs, self.distill)
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        extra = distill_loss(outputs, teacher, inputs.get("attention_mask"), self.distill)
        self.distill_terms.append(float(extra.detach()))
        loss = loss + accumulation_share(self, num_items_in_batch) * extra
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.distill_terms:
            logs["distill_term"] = sum(self.distill_terms) / len(self.distill_terms)
            self.distill_terms.clear()
        super().log(logs, start_time)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            if self.state.max_steps > 0:  # inside train(): schedules of the method read the run's length
                self.method.total_steps = self.state.max_steps
            groups = self.method.param_groups(self.accelerator.unwrap_model(model), self.args.learning_rate)
            for group in groups:
                group.setdefault("weight_decay", self.args.weight_decay)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer
