"""Optimizer parameter groups for FineGates, and the final step that lands exactly on the budget."""

from __future__ import annotations

import logging

import torch
from torch import nn

from finegates.gates import force_gates, gate_margin
from finegates.model import CONTROLLER_ATTR, all_gates, gate_parameter_ids, gates_config
from finegates.report import sparsity_report

logger = logging.getLogger(__name__)


def optimizer_param_groups(
    model: nn.Module, gate_lr: float | None = None, head_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict]:
    """Gates, Lagrange multipliers (ascent through reversed gradients) and the rest, each with its lr.

    >>> opt = torch.optim.AdamW(optimizer_param_groups(model))  # doctest: +SKIP
    """
    cfg = gates_config(model)
    gate_lr = cfg.gate_lr if gate_lr is None else gate_lr
    head_lr = cfg.head_lr if head_lr is None else head_lr
    gate_ids = gate_parameter_ids(model)
    gates, multipliers, rest = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in gate_ids:
            gates.append(param)
        elif name.startswith(CONTROLLER_ATTR) or f".{CONTROLLER_ATTR}." in name:
            multipliers.append(param)
        else:
            rest.append(param)
    groups = [
        {"params": gates, "lr": gate_lr, "weight_decay": 0.0},
        {"params": multipliers, "lr": gate_lr * cfg.lagrangian_lr_scale, "weight_decay": 0.0},
    ]
    if rest:
        groups.append({"params": rest, "lr": head_lr, "weight_decay": weight_decay})
    return groups


def finalize_gates(model: nn.Module, target: float | None = None, tolerance: float = 0.0) -> float:
    """Move the gates nearest their closing point so that the removable fraction reaches `target`.

    Gates are ranked by their distance from closing; a single threshold on that distance decides
    which are closed. Returns the removed fraction the report then measures. Training with the budget
    objective lands near the target already, so this changes only the few gates at the margin.
    """
    target = gates_config(model).target_sparsity if target is None else target
    gates = all_gates(model)
    current = sparsity_report(model).removed_fraction
    if current >= target and current - target <= tolerance:
        return current
    originals = [{n: p.detach().clone() for n, p in g.named_parameters()} for g in gates]
    margins = torch.cat([gate_margin(g) for g in gates]).sort().values
    low, high = 0, len(margins)  # find the fewest closed gates whose removal reaches the target

    def removed_with(k: int) -> float:
        threshold = margins[k - 1] if k > 0 else margins[0] - 1
        for gate, saved in zip(gates, originals):
            for n, p in gate.named_parameters():
                p.data.copy_(saved[n])
            margin = gate_margin(gate)
            force_gates(gate, close=margin <= threshold, reopen=margin > threshold)
        return sparsity_report(model).removed_fraction

    while low < high:
        mid = (low + high) // 2
        if removed_with(mid) >= target:
            high = mid
        else:
            low = mid + 1
    achieved = removed_with(low)
    logger.info("finalize_gates: removed fraction %.4f -> %.4f (target %.4f)", current, achieved, target)
    return achieved
