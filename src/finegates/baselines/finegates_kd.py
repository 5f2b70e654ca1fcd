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

from finegates.baselines.base import BaseMethod, Batch, MethodConfig
from finegates.baselines.structured import compact, structured_removed
from finegates.budget import budget_step, set_training_steps
from finegates.config import GatesConfig
from finegates.distill import squarehead_loss
from finegates.model import count_parameters, get_gated_model
from finegates.objectives import sparsity_loss
from finegates.optim import finalize_gates, optimizer_param_groups


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
    """Gates, gated biases and the head train; the sparsity loss drives the budget; finalize lands on it."""

    name = "finegates"
    kind_of_sparsity = "structured"
    default_lr = 1e-3
    config_class = FineGatesMethodConfig

    def _prepare(self, model: nn.Module, calibration: Iterable[Batch] | None) -> nn.Module:
        return get_gated_model(model, self.config.gates_config())

    def loss(self, model: nn.Module, batch: Batch, outputs: Any, teacher_outputs: Any = None) -> torch.Tensor:
        return sparsity_loss(model)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        set_training_steps(model, self.total_steps)
        return optimizer_param_groups(model, head_lr=lr)

    def after_step(self, model: nn.Module, step: int) -> None:
        budget_step(model)

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
        if teacher_outputs is None:
            raise ValueError("finegates+kd needs the dense teacher's outputs (with hidden states).")
        cfg: FineGatesMethodConfig = self.config
        distill = squarehead_loss(
            outputs,
            teacher_outputs,
            batch.get("attention_mask"),
            cfg.kl_weight,
            cfg.feature_weight,
            cfg.temperature,
        )
        return super().loss(model, batch, outputs) + distill
