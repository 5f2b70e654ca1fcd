"""Unstructured magnitude masks and the layer lookup that the sparse baselines share."""

from __future__ import annotations

import math

import torch
from torch import nn

from finegates.targets import resolve_targets


def target_linears(model: nn.Module, target_modules: list[str] | str | None) -> dict[str, nn.Module]:
    """The linear layers a baseline sparsifies: by default the ones FineGates gates (same budget base)."""
    return {name: model.get_submodule(name) for name in resolve_targets(model, target_modules)}


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask pruning exactly round(sparsity * numel) entries of smallest magnitude.

    Ranking by a stable sort (not a threshold) makes the count exact even with ties, e.g. weights
    already zeroed by an earlier mask.

    >>> magnitude_mask(torch.tensor([[0.1, -3.0], [2.0, 0.0]]), 0.5)
    tensor([[False,  True],
            [ True, False]])
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}.")
    flat = weight.detach().abs().flatten()
    pruned = round(sparsity * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:pruned]] = False
    return keep.view_as(weight)


def apply_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Zero the pruned weights in place (mask in the module's own weight layout)."""
    with torch.no_grad():
        module.weight.mul_(mask.to(module.weight.device, module.weight.dtype))


def cubic_sparsity(step: int, total_steps: int, final: float, end_fraction: float = 0.7) -> float:
    """Gradual magnitude pruning schedule (Zhu & Gupta): s_t = final * (1 - (1 - t / T)^3),
    T = end_fraction * total.

    >>> cubic_sparsity(0, 100, 0.5), cubic_sparsity(70, 100, 0.5)
    (0.0, 0.5)
    """
    horizon = max(1, math.ceil(end_fraction * total_steps))
    progress = min(1.0, step / horizon)
    return final * (1.0 - (1.0 - progress) ** 3)
