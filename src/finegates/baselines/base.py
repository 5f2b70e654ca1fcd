"""The interface every compared method shares, and the defaults most methods keep.

A method turns a pretrained model into a trainable one (`prepare`), may add terms to the task loss
(`loss`), may act after each optimizer step (`after_step`, e.g. re-apply a sparsity mask), and turns
the trained model into what is deployed (`finalize`, e.g. merge adapters or compact). It also says
what it costs and what it removes, so one table can put all methods side by side.

>>> from finegates.baselines import METHODS
>>> method = METHODS["full"]()
>>> model = method.prepare(model)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from finegates.config import dataclass_from_dict
from finegates.model import parameter_count

KINDS_OF_SPARSITY = ("none", "structured", "unstructured", "2:4")
Batch = dict[str, torch.Tensor]


class MethodConfig:
    """Mixin for the dataclass configs of the methods: JSON round trip that rejects unknown keys."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        return dataclass_from_dict(cls, data, cls.__name__)


@dataclasses.dataclass
class NoConfig(MethodConfig):
    """Methods without options (full finetuning)."""


@runtime_checkable
class Method(Protocol):
    """What the comparison harness calls; `BaseMethod` gives the defaults."""

    name: str
    kind_of_sparsity: str
    needs_teacher: bool
    needs_hidden_states: bool
    total_steps: int | None

    def prepare(
        self, model: nn.Module, config: Any = None, calibration: Iterable[Batch] | None = None
    ) -> nn.Module: ...

    def loss(
        self, model: nn.Module, batch: Batch, outputs: Any, teacher_outputs: Any = None
    ) -> torch.Tensor: ...

    def after_step(self, model: nn.Module, step: int) -> None: ...

    def finalize(self, model: nn.Module) -> nn.Module: ...

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]: ...

    def trainer(
        self,
        model: nn.Module,
        args: TrainingArguments,
        train_dataset: Any,
        teacher: nn.Module | None = None,
        **kwargs: Any,
    ) -> Trainer: ...

    def trainable_parameters(self, model: nn.Module) -> int: ...

    def removed_parameters(self, model: nn.Module) -> int: ...


class BaseMethod:
    """Defaults: no extra loss, no hook, nothing merged, nothing removed, every trainable tensor one group."""

    name: ClassVar[str] = "base"
    kind_of_sparsity: ClassVar[str] = "none"
    needs_teacher: ClassVar[bool] = False
    needs_hidden_states: ClassVar[bool] = False
    default_lr: ClassVar[float] = 5e-5
    config_class: ClassVar[type] = NoConfig

    def __init__(self) -> None:
        self.config: Any = None
        self.total_steps: int | None = None  # set by the training loop; schedules read it
        self.dense_params = 0  # parameter count of the model before `prepare`

    def prepare(
        self, model: nn.Module, config: Any = None, calibration: Iterable[Batch] | None = None
    ) -> nn.Module:
        """Record the dense size, keep the config (or the default one), then do the method's own setup."""
        self.config = config if config is not None else self.config_class()
        self.dense_params = parameter_count(model)
        return self._prepare(model, calibration)

    def _prepare(self, model: nn.Module, calibration: Iterable[Batch] | None) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch, outputs: Any, teacher_outputs: Any = None) -> torch.Tensor:
        return outputs.loss.new_zeros(())

    def after_step(self, model: nn.Module, step: int) -> None:
        return None

    def finalize(self, model: nn.Module) -> nn.Module:
        return model

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def trainer(
        self,
        model: nn.Module,
        args: TrainingArguments,
        train_dataset: Any,
        teacher: nn.Module | None = None,
        **kwargs: Any,
    ) -> Trainer:
        """The Trainer that trains this method (any Trainer keyword in `kwargs`, e.g. data_collator)."""
        from finegates.baselines.trainer import MethodTrainer  # imports this module

        return MethodTrainer(
            model=model, args=args, train_dataset=train_dataset, method=self, teacher=teacher, **kwargs
        )

    def trainable_parameters(self, model: nn.Module) -> int:
        return parameter_count(model, trainable=True)

    def removed_parameters(self, model: nn.Module) -> int:
        return 0
