"""`finegates` and `finegates+kd`: FineGates itself, alone or trained with SquareHead's distillation.

`finegates+kd` adds the dense teacher's logit KL and normalized hidden-state L2 (`distill.py`) to
the task and sparsity losses, a combination none of the sources offers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from finegates.baselines.base import BaseMethod, Batch, MethodConfig
from finegates.baselines.structured import compact, structured_removed
from finegates.baselines.trainer import MethodLoss
from finegates.config import GatesConfig
from finegates.distill import squarehead_loss
from finegates.model import count_parameters, get_gated_model
from finegates.optim import finalize_gates
from finegates.trainer import FineGatesTrainer


@dataclass
class FineGatesMethodConfig(MethodConfig):
    gates: dict = field(default_factory=dict, metadata={"help": "GatesConfig fields (JSON object)."})
    compact: bool = field(default=True, metadata={"help": "Physically compact the model in `finalize`."})
    kl_weight: float = field(default=1.0, metadata={"help": "finegates+kd: weight of the logit KL term."})
    feature_weight: float = field(
        default=1.0, metadata={"help": "finegates+kd: weight of the hidden-state L2 term."}
    )
    temperature: float = field(default=1.0, metadata={"help": "finegates+kd: distillation temperature."})

    def gates_config(self) -> GatesConfig:
        return GatesConfig.from_dict(dict(self.gates))


class FineGatesMethod(BaseMethod):
    """Gates, gated biases and the head train in `FineGatesTrainer`; finalize lands on the budget."""

    name = "finegates"
    kind_of_sparsity = "structured"
    default_lr = 1e-3
    config_class = FineGatesMethodConfig

    def _prepare(self, model: nn.Module, calibration: Iterable[Batch] | None) -> nn.Module:
        return get_gated_model(model, self.config.gates_config())

    def trainer(
        self,
        model: nn.Module,
        args: TrainingArguments,
        train_dataset: Any,
        teacher: nn.Module | None = None,
        **kwargs: Any,
    ) -> Trainer:
        """`FineGatesTrainer`: the gates' own learning rate, sparsity loss, budget projection and logs."""
        return FineGatesTrainer(model=model, args=args, train_dataset=train_dataset, **kwargs)

    def finalize(self, model: nn.Module) -> nn.Module:
        finalize_gates(model)
        return compact(model) if self.config.compact else model

    def trainable_parameters(self, model: nn.Module) -> int:
        return count_parameters(model)[0]  # the controller's two multipliers are not model parameters

    def removed_parameters(self, model: nn.Module) -> int:
        return structured_removed(model, self.dense_params)


class FineGatesKD(FineGatesMethod):
    """FineGates plus SquareHead distillation from a dense finetuned teacher."""

    name = "finegates+kd"
    needs_teacher = True
    needs_hidden_states = True

    def loss(self, model: nn.Module, batch: Batch, outputs: Any, teacher_outputs: Any = None) -> torch.Tensor:
        """The distillation terms (`FineGatesTrainer` adds the sparsity loss)."""
        if teacher_outputs is None:
            raise ValueError("finegates+kd needs the dense teacher's outputs (with hidden states).")
        cfg: FineGatesMethodConfig = self.config
        return squarehead_loss(
            outputs,
            teacher_outputs,
            batch.get("attention_mask"),
            cfg.kl_weight,
            cfg.feature_weight,
            cfg.temperature,
        )

    def trainer(
        self,
        model: nn.Module,
        args: TrainingArguments,
        train_dataset: Any,
        teacher: nn.Module | None = None,
        **kwargs: Any,
    ) -> Trainer:
        trainer = _TeacherFineGatesTrainer(model=model, args=args, train_dataset=train_dataset, **kwargs)
        trainer.use_method(self, teacher)
        return trainer


class _TeacherFineGatesTrainer(MethodLoss, FineGatesTrainer):
    """`FineGatesTrainer` plus the method's distillation terms from a separate dense teacher."""
