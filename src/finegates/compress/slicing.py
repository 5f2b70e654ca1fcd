"""Slicing linear layers: small pure functions that keep some output rows or input columns.

Gates are folded into the weights first (`folded_linear`): eval-mode gates may be fractional, and a
compacted layer is exact only if it computes Diag(g_row) W Diag(g_col) x + g_row * b.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from finegates.layer import LINEAR_TYPES, GatedLinear, weight_out_in


def new_linear(in_features: int, out_features: int, bias: bool, device: str | None = None) -> nn.Linear:
    """nn.Linear(in, out); a layer whose rows (or columns) all left is legitimately empty."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return nn.Linear(in_features, out_features, bias=bias, device=device)


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding `weight` (out x in) and `bias`, with no random initialisation."""
    out_features, in_features = weight.shape
    linear = new_linear(in_features, out_features, bias is not None, device="meta")  # no init cost
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return linear


def keep_rows(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    """A new nn.Linear with only the output rows `idx` (in that order).

    >>> keep_rows(nn.Linear(4, 3), torch.tensor([0, 2])).out_features
    2
    """
    idx = idx.to(linear.weight.device)
    bias = linear.bias.index_select(0, idx) if linear.bias is not None else None
    return linear_from(linear.weight.index_select(0, idx), bias)


def keep_cols(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    """A new nn.Linear that reads only the input columns `idx` (in that order); the bias is unchanged.

    >>> keep_cols(nn.Linear(4, 3), torch.tensor([1, 3])).in_features
    2
    """
    idx = idx.to(linear.weight.device)
    return linear_from(linear.weight.index_select(1, idx), linear.bias)


def folded_linear(module: nn.Module) -> nn.Linear:
    """The eval-mode map of a GatedLinear, nn.Linear or Conv1D as one plain nn.Linear (gates multiplied
    in)."""
    with torch.no_grad():
        if isinstance(module, GatedLinear):
            return linear_from(*module.folded_weight())
        if isinstance(module, LINEAR_TYPES):
            return linear_from(weight_out_in(module), module.bias)
    raise TypeError(f"Cannot slice a {type(module).__name__}: only GatedLinear, nn.Linear and Conv1D.")
