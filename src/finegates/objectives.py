"""The two sparsity objectives: the reference's soft loss and the budget that is hit."""

from __future__ import annotations

import torch
from torch import nn

from finegates.coupling import OpenFn, expected_widths, find_blocks, full_shape, has_bias
from finegates.latency import budget_fraction, budget_target, soft_time_fraction
from finegates.layer import GatedLinear
from finegates.model import controller, gated_layers, gates_config


def _prob_open(module: nn.Module, axis: str) -> torch.Tensor:
    """Differentiable open probabilities of a module's gates (ones where the module or axis is not gated)."""
    gate = module.gates().get(axis) if isinstance(module, GatedLinear) else None
    if gate is not None:
        return gate.prob_open()
    out_features, in_features = full_shape(module)
    return torch.ones(out_features if axis == "row" else in_features, device=next(module.parameters()).device)


def _kept_params(model: nn.Module, open_state: OpenFn) -> torch.Tensor:
    widths = {}
    for block in find_blocks(model):
        for role, rows_cols in expected_widths(block, open_state).items():
            widths[block.modules[role][0]] = rows_cols
    kept = []
    for name, layer in gated_layers(model).items():
        rows, cols = widths.get(name) or (open_state(layer, "row").sum(), open_state(layer, "col").sum())
        kept.append(rows * cols + (rows if has_bias(layer) else 0))
    return torch.stack(kept).sum()


def gated_parameter_count(model: nn.Module) -> int:
    total = 0
    for layer in gated_layers(model).values():
        out_features, in_features = full_shape(layer)
        total += out_features * in_features + (out_features if has_bias(layer) else 0)
    return total


def expected_sparsity(model: nn.Module) -> torch.Tensor:
    """Fraction of gated-layer parameters that compaction removes, differentiable in the gates.

    With the 'expected' estimator: the expected fraction under independent open probabilities. With
    'ste': the value is the fraction the current eval-mode gates remove (counted from the exact
    compaction plan), and the gradient is that of the expected fraction.
    """
    cfg = gates_config(model)
    if cfg.target_speedup:  # the removed share of predicted time (finegates.latency)
        soft = soft_time_fraction(model)
    else:
        soft = 1 - _kept_params(model, _prob_open) / gated_parameter_count(model)
    if cfg.budget_estimator == "expected":
        return soft
    return budget_fraction(model) + soft - soft.detach()


def warmup_steps(cfg) -> int:
    if cfg.warmup_steps is None:
        raise ValueError(
            "warmup_steps is None (a share of the run): call finegates.set_training_steps(model, "
            "total_steps) before training, or give GatesConfig(warmup_steps=N)."
        )
    return cfg.warmup_steps


def paper_loss(model: nn.Module) -> torch.Tensor:
    """The reference loss: mean over layers of mean(|mean P_rows - keep|, |mean P_cols - keep|)."""
    cfg = gates_config(model)
    keep = 1 - cfg.target_sparsity
    terms = [
        (
            (layer.row_gate.paper_prob().mean() - keep).abs()
            + (layer.col_gate.paper_prob().mean() - keep).abs()
        )
        / 2
        for layer in gated_layers(model).values()
    ]
    return cfg.lambda_sparsity * torch.stack(terms).mean()


def sparsity_loss(model: nn.Module, step: int | None = None) -> torch.Tensor:
    """The sparsity term to add to the task loss, per the model's `GatesConfig.objective`.

    With the budget objective, `step` sets the target warm-up; without it the model counts its own
    training-mode calls. Multipliers receive reversed gradients, so one optimizer minimising the
    total loss raises them while the budget is missed.

    >>> loss = task_loss + sparsity_loss(model)  # doctest: +SKIP
    """
    cfg = gates_config(model)
    if cfg.objective == "paper":
        return paper_loss(model)
    ctrl = controller(model)
    target = ctrl.target(budget_target(cfg), warmup_steps(cfg), step)
    if step is None and model.training:
        ctrl.step += 1
    # Half the projection's band: the Lagrangian pushes before the projection (budget.budget_step) must.
    deadband = cfg.budget_tolerance / 2 if cfg.budget_tolerance else 0.0
    return ctrl.penalty(expected_sparsity(model), target, deadband)
