"""Compact linear layers that read or write only some residual-stream dimensions.

A residual dim can be closed in one layer and open in the next, so it cannot leave the hidden state;
a layer instead gathers its kept inputs (`x[..., cols]`) and scatters its kept outputs into a zero
full-width tensor. Layers that need neither are plain `nn.Linear`, so stock tooling (e.g. torch's
dynamic quantization) sees ordinary linear layers everywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from finegates.compress.slicing import new_linear
from finegates.compress.spec import LinearSpec


class ResidualLinear(nn.Module):
    """y[..., rows] = linear(x[..., cols]), zero elsewhere; `cols`/`rows` are None when not needed.

    >>> layer = ResidualLinear(nn.Linear(2, 1), torch.tensor([0, 3]), torch.tensor([1]), out_full=3, in_full=4)
    >>> layer(torch.ones(5, 4)).shape
    torch.Size([5, 3])
    """

    def __init__(self, linear: nn.Linear, cols: torch.Tensor | None, rows: torch.Tensor | None,
                 out_full: int | None, in_full: int | None = None) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("cols", cols)
        self.register_buffer("rows", rows)
        self.out_full, self.in_full = out_full, in_full

    def index_bounds(self) -> list[tuple[str, torch.Tensor | None, int | None]]:
        """(buffer, indices, exclusive upper bound) for checking a loaded checkpoint."""
        return [("cols", self.cols, self.in_full), ("rows", self.rows, self.out_full)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cols is not None:
            x = x.index_select(-1, self.cols)
        y = self.linear(x)
        if self.rows is None:
            return y
        return y.new_zeros(*y.shape[:-1], self.out_full).index_copy_(-1, self.rows, y)

    def extra_repr(self) -> str:
        full_in = "" if self.cols is None else f"gather {len(self.cols)} dims"
        full_out = "" if self.rows is None else f"scatter into {self.out_full} dims"
        return ", ".join(s for s in (full_in, full_out) if s)


def build_linear(spec: LinearSpec) -> nn.Module:
    """An empty (uninitialised) module of the spec's shape; weights and indices come from the checkpoint."""
    linear = new_linear(spec.in_features, spec.out_features, spec.bias)
    if not spec.wrapped:
        return linear
    cols = torch.zeros(spec.in_features, dtype=torch.long) if spec.gather_from is not None else None
    rows = torch.zeros(spec.out_features, dtype=torch.long) if spec.scatter_to is not None else None
    return ResidualLinear(linear, cols, rows, spec.scatter_to, spec.gather_from)
