"""Lagrangian control of the sparsity budget (CoFi / Sheared-LLaMA style).

The penalty lambda1 (s - t) + lambda2 (s - t)^2 is minimised by the gates and maximised by the
multipliers. The maximisation needs no special optimizer: the multipliers enter the loss through a
gradient-reversal function, so one ordinary optimizer does descent on gates and ascent on multipliers.
"""

from __future__ import annotations

import torch
from torch import nn


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class SparsityController(nn.Module):
    """Multipliers and the step counter of the target warm-up (in the state dict, so resume is exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # Gates the budget projection moved over the run (see budget.budget_step): the share of the cut
        # that the Lagrangian did not make by itself.
        self.register_buffer("projected_closed", torch.zeros((), dtype=torch.long))
        self.register_buffer("projected_reopened", torch.zeros((), dtype=torch.long))

    def target(self, final_target: float, warmup_steps: int, step: int | None = None) -> float:
        """The target at `step` (default: the count of training-mode sparsity_loss calls)."""
        step = int(self.step) if step is None else step
        if warmup_steps <= 0:
            return final_target
        return final_target * min(1.0, step / warmup_steps)

    def hold_in_band(self) -> None:
        """Before an optimizer step: drop the multipliers' gradients where they are exactly 0 (the gap inside
        the dead band), so an optimizer with momentum (Adam) leaves them where they are instead of coasting
        on its moments. FineGatesTrainer calls it; a hand-written loop calls it before `optimizer.step()`."""
        for param in (self.lambda1, self.lambda2):
            if param.grad is not None and not bool(param.grad.any()):
                param.grad = None

    def penalty(self, sparsity: torch.Tensor, target: float, deadband: float = 0.0) -> torch.Tensor:
        """lambda1 gap + lambda2 gap^2, with gap = 0 (no pressure, multipliers hold) while |gap| <= deadband:
        inside the band the task loss alone moves the gates, and the multipliers cannot wind up there."""
        gap = sparsity - target
        if deadband > 0:
            gap = gap * (gap.detach().abs() > deadband)
        lambda1 = _ReverseGrad.apply(self.lambda1)
        lambda2 = _ReverseGrad.apply(self.lambda2)
        return lambda1 * gap + lambda2 * gap * gap
