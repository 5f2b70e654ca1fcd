"""`squarehead`: sparse finetuning with unstructured magnitude masks and SquareHead distillation.

All weights train; after every optimizer step the mask is re-applied, so the pruned weights are
exactly zero whenever the model is used. The mask comes from one-shot magnitude pruning at the start
or from gradual magnitude pruning (cubic schedule, recomputed every `prune_every` steps). Sparsity
brings speed only through a sparse kernel: see `sparse_inference.measure_cpu_inference`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from finegates.baselines.base import BaseMethod, Batch, MethodConfig
from finegates.baselines.masks import apply_mask, cubic_sparsity, magnitude_mask, target_linears
from finegates.distill import squarehead_loss

logger = logging.getLogger(__name__)


@dataclass
class SquareHeadConfig(MethodConfig):
    target_sparsity: float = field(
        default=0.5, metadata={"help": "Unstructured sparsity of each target layer (0.5-0.75)."}
    )
    pruning: str = field(default="oneshot", metadata={"help": "'oneshot' magnitude mask or 'gradual' (GMP)."})
    gradual_end: float = field(
        default=0.7, metadata={"help": "GMP: fraction of training after which the final sparsity holds."}
    )
    prune_every: int = field(default=10, metadata={"help": "GMP: steps between mask updates."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Layers to sparsify; None: FineGates' defaults for the model type."}
    )
    kl_weight: float = field(default=1.0, metadata={"help": "Weight of the logit KL term."})
    feature_weight: float = field(
        default=1.0, metadata={"help": "Weight of the normalized hidden-state L2 term."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Distillation temperature of the KL term."})

    def __post_init__(self) -> None:
        if self.pruning not in ("oneshot", "gradual"):
            raise ValueError(f"pruning must be 'oneshot' or 'gradual', got {self.pruning!r}.")


class SquareHead(BaseMethod):
    """Masks live on the method (name -> keep-mask in the layer's weight layout)."""

    name = "squarehead"
    kind_of_sparsity = "unstructured"
    needs_teacher = True
    needs_hidden_states = True
    default_lr = 1e-4  # as the dense baseline of `finetune`: 5e-5 undertrains MiniLM in a few hundred steps
    config_class = SquareHeadConfig

    def __init__(self) -> None:
        super().__init__()
        self.masks: dict[str, torch.Tensor] = {}

    def _prepare(self, model: nn.Module, calibration: Iterable[Batch] | None) -> nn.Module:
        model.requires_grad_(True)
        cfg: SquareHeadConfig = self.config
        initial = cfg.target_sparsity if cfg.pruning == "oneshot" else 0.0
        self._update_masks(model, initial)
        return model

    def _update_masks(self, model: nn.Module, sparsity: float) -> None:
        for name, module in target_linears(model, self.config.target_modules).items():
            self.masks[name] = magnitude_mask(module.weight, sparsity)
            apply_mask(module, self.masks[name])

    def current_sparsity(self, step: int) -> float:
        cfg: SquareHeadConfig = self.config
        if cfg.pruning == "oneshot":
            return cfg.target_sparsity
        return cubic_sparsity(step, self.total_steps or step, cfg.target_sparsity, cfg.gradual_end)

    def after_step(self, model: nn.Module, step: int) -> None:
        """Re-apply the mask (optimizer updates touch pruned weights); with GMP, grow it on schedule."""
        cfg: SquareHeadConfig = self.config
        if cfg.pruning == "gradual" and (step % cfg.prune_every == 0 or step == self.total_steps):
            self._update_masks(model, self.current_sparsity(step))
            return
        for name, mask in self.masks.items():
            apply_mask(model.get_submodule(name), mask)

    def loss(self, model: nn.Module, batch: Batch, outputs: Any, teacher_outputs: Any = None) -> torch.Tensor:
        if teacher_outputs is None:
            raise ValueError("squarehead needs the dense teacher's outputs (with hidden states).")
        cfg: SquareHeadConfig = self.config
        return squarehead_loss(
            outputs,
            teacher_outputs,
            batch.get("attention_mask"),
            cfg.kl_weight,
            cfg.feature_weight,
            cfg.temperature,
        )

    def finalize(self, model: nn.Module) -> nn.Module:
        """The deployed model is dense with exact zeros: a sparse runtime is what could exploit them."""
        for name, mask in self.masks.items():
            apply_mask(model.get_submodule(name), mask)
        return model

    def removed_parameters(self, model: nn.Module) -> int:
        return int(sum((~mask).sum() for mask in self.masks.values()))
