"""`full`: full finetuning, the accuracy ceiling and the dense teacher of the distillation methods."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from finegates.baselines.base import BaseMethod, Batch


class FullFinetuning(BaseMethod):
    """Every parameter trains; nothing is merged or removed."""

    name = "full"
    default_lr = 1e-4  # as the dense baseline of `finetune`: 5e-5 undertrains MiniLM in a few hundred steps

    def _prepare(self, model: nn.Module, calibration: Iterable[Batch] | None) -> nn.Module:
        model.requires_grad_(True)
        return model
