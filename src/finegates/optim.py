"""Optimizer parameter groups for FineGates, the gates' own lr schedule, and the final step that lands
exactly on the budget."""

from __future__ import annotations

import logging

import torch
from torch import nn

from finegates.budget import FINAL_MARGIN, project_budget
from finegates.budget import gate_lr as resolved_gate_lr
from finegates.latency import budget_fraction, budget_target
from finegates.model import CONTROLLER_ATTR, gate_parameter_ids, gates_config
from finegates.uniform_layers import equalize_layers

logger = logging.getLogger(__name__)


def optimizer_param_groups(
    model: nn.Module, gate_lr: float | None = None, head_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict]:
    """Gates, Lagrange multipliers (ascent through reversed gradients) and the rest, each with its lr.
    An explicit `gate_lr` becomes the model's `GatesConfig.gate_lr`. `weight_decay` applies to the rest's
    matrices only: biases and norm weights (the pretrained model's own,
    where they train) are not pulled towards 0, as transformers' Trainer leaves them.

    A hand-written loop attaches the budget to its optimizer once, `attach_budget(optimizer, model)`, or
    calls `budget_step(model)` after every `optimizer.step()` (FineGatesTrainer attaches it).

    >>> opt = torch.optim.AdamW(optimizer_param_groups(model))  # doctest: +SKIP
    """
    cfg = gates_config(model)
    if gate_lr is not None:  # the rate the gates train at: the budget's landing margin (and the saved
        cfg.gate_lr = gate_lr  # config) follow it, not the one the config would have derived
    gate_lr = resolved_gate_lr(cfg)
    head_lr = cfg.head_lr if head_lr is None else head_lr
    gate_ids = gate_parameter_ids(model)
    gates, multipliers, rest, no_decay = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in gate_ids:
            gates.append(param)
        elif name.startswith(CONTROLLER_ATTR) or f".{CONTROLLER_ATTR}." in name:
            multipliers.append(param)
        elif param.ndim < 2 and weight_decay:
            no_decay.append(param)
        else:
            rest.append(param)
    groups = [
        {"params": gates, "lr": gate_lr, "weight_decay": 0.0, "finegates": "gates"},
        {
            "params": multipliers,
            "lr": gate_lr * cfg.lagrangian_lr_scale,
            "weight_decay": 0.0,
            "finegates": "multipliers",
        },
    ]
    if rest:
        groups.append({"params": rest, "lr": head_lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": head_lr, "weight_decay": 0.0})
    return groups


def _constant(_: int) -> float:
    return 1.0


def keep_gate_lr_constant(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Take the gate and multiplier groups out of a LambdaLR schedule (transformers' `get_scheduler`):
    how fast a gate can close must not depend on the head's warm-up or decay."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(
            f"Expected a LambdaLR schedule (transformers.get_scheduler), got {type(scheduler).__name__}."
        )
    for i, group in enumerate(scheduler.optimizer.param_groups):
        if group.get("finegates") in ("gates", "multipliers"):
            scheduler.lr_lambdas[i] = _constant
            group["lr"] = scheduler.base_lrs[i]


def finalize_gates(model: nn.Module, target: float | None = None, tolerance: float = 0.0) -> float:
    """Move the gates nearest their closing point so that the removable fraction lands in
    [target, target + tolerance] (at least the target); returns the fraction the report then measures.

    After training with the budget objective the fraction is already within `budget_tolerance` of the
    target, so this moves only the few gates at the margin.
    """
    cfg = gates_config(model)
    target = budget_target(cfg) if target is None else target
    before = budget_fraction(model)
    achieved = project_budget(model, target, target + tolerance).removed
    if cfg.uniform_layers:  # equal counts; FFN channels leave alike until at least the target is removed
        equalize_layers(model, FINAL_MARGIN, final=True, target=target)
        achieved = budget_fraction(model)
    logger.info("finalize_gates: removed fraction %.4f -> %.4f (target %.4f)", before, achieved, target)
    return achieved
