"""The gated linear map as one autograd function that saves less for backward.

Autograd on `base(x * g_col) * g_row` keeps the pre-gate output z of every layer for g_row's
gradient. This function keeps the output y = z * g_row instead, which the next operation (attention,
the activation) usually keeps anyway, and uses sum(dy * z) = sum(dy * y) / g_row where g_row > 0.
Where g_row == 0 the gate was clamped, so its gradient is zero whatever z is. Either gate may be None
(that axis is not gated): nothing is multiplied or saved for it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _sum_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).sum(0)


class GatedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g_col, g_row, weight, bias):  # weight is (out, in), as for F.linear
        y = F.linear(x if g_col is None else x * g_col, weight, bias)
        y = y if g_row is None else y * g_row
        ctx.save_for_backward(x, y, g_col, g_row, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, g_col, g_row, weight = ctx.saved_tensors
        need_x, need_col, need_row, need_w, need_b = ctx.needs_input_grad
        dz = dy if g_row is None else dy * g_row
        du = dz @ weight
        grad_x = (du if g_col is None else du * g_col) if need_x else None
        grad_col = _sum_rows(du * x) if need_col else None
        grad_row = None
        if need_row:  # sum(dy * z) = sum(dy * y) / g_row: one division per row, not per element
            open_rows = g_row > 0
            safe = torch.where(open_rows, g_row, torch.ones_like(g_row))
            grad_row = torch.where(open_rows, _sum_rows(dy * y) / safe, 0.0)
        x_in = x if g_col is None else x * g_col
        grad_w = dz.reshape(-1, dz.shape[-1]).t() @ x_in.reshape(-1, x.shape[-1]) if need_w else None
        grad_b = _sum_rows(dz) if ctx.has_bias and need_b else None
        return grad_x, grad_col, grad_row, grad_w, grad_b
