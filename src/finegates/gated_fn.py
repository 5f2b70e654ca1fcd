"""The gated linear map as one autograd function: the gates folded into the weight, little saved.

y = (W (x * g_col) + b) * g_row = x (g_row W g_col)^T + b * g_row. Scaling the (out x in) weight costs
out * in products where gating the activations costs tokens * (in + out), and the backward pass needs no
elementwise pass to form dz = dy * g_row or to gate dx: dx = dy (g_row W g_col). The gates' gradients come
from what the backward pass has anyway:

    dL/dg_row = sum_t dy * z = sum_t (dy * y) / g_row     (z = y / g_row, the pre-gate output)
    dL/dg_col = sum_t du * x = sum_t (dx * x) / g_col     (du = dx / g_col, the gradient before the gate)

so the function keeps the layer's input x (for the column gate) and output y (for the row gate; the next
operation, attention or the activation, usually keeps it anyway), each only when that gate trains. Where a
gate is 0 it was clamped, so its gradient is zero whatever the sum is; the division is by gates above
`OPEN` (1e-30: the products stay normal floats, so the quotient keeps float precision). Either gate may be
None (that axis is not gated): nothing is multiplied or saved for it.

`act` (optional): an elementwise activation applied to the input first, y = act(x) W'^T + b', the FFN's
activation moved into its down projection (`GatedLinear.input_act`). The function then keeps the
activation's input x instead of both x (for the activation's backward) and act(x) (for the column gate)
and recomputes act(x) in the backward pass: one activation less per token kept, for one elementwise
activation more computed.

Mixed precision (`torch.autocast`, e.g. transformers' `bf16=True`): the gates are folded into the float32
weight first and the product cast once to the autocast dtype, so the GEMMs of both passes run in it, as
an autocast `F.linear` would; the gates' gradients are summed in float32 and every gradient leaves in
the dtype of its input (float32 gates and weights, whatever the activations are).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

OPEN = 1e-30


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (tokens, n); also for n = 0 (a layer cut to no rows or columns)."""
    return t.flatten(0, -2) if t.dim() > 1 else t.unsqueeze(0)  # a 1-D input is one row


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _sum_rows(t: torch.Tensor) -> torch.Tensor:
    return _rows(t).sum(0, dtype=torch.float32 if t.dtype in LOW_PRECISION else t.dtype)


def _sum_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over rows of a * b in float32 for low precision. float16's products are formed in float32 too:
    its range (normal from 6e-5, at most 65504) would flush the products of a nearly closed gate to
    subnormals and overflow under a loss scale, where bfloat16's range is float32's."""
    if a.dtype == torch.float16:
        a, b = a.float(), b.float()
    return _sum_rows(a * b)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype an `F.linear` of `x` and `weight` computes in here: autocast's where it is on for the
    input's device type, else the weight's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def gated_weight(
    weight: torch.Tensor, g_row: torch.Tensor | None, g_col: torch.Tensor | None
) -> torch.Tensor:
    """g_row[:, None] * weight * g_col[None, :], `weight` (out, in); the weight itself if both are None."""
    scaled = weight if g_row is None else weight * g_row[:, None]
    if g_col is not None:
        scaled = scaled * g_col if scaled is weight else scaled.mul_(g_col)
    return scaled


def _unscale(total: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """total / gate where the gate is open, 0 where it is closed."""
    open_ = gate > OPEN
    return torch.where(open_, total / torch.where(open_, gate, torch.ones_like(gate)), 0.0)


class GatedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g_col, g_row, weight, bias, act=None):  # weight is (out, in), as for F.linear
        dtype = compute_dtype(x, weight)
        gated_bias = bias if bias is None or g_row is None else bias * g_row
        a = x if act is None else act(x)
        y = F.linear(a.to(dtype), gated_weight(weight, g_row, g_col).to(dtype), _cast(gated_bias, dtype))
        col_trains = g_col is not None and ctx.needs_input_grad[1]
        row_trains = g_row is not None and ctx.needs_input_grad[2]
        weight_trains = ctx.needs_input_grad[3]
        keep_x = col_trains or weight_trains or (act is not None and ctx.needs_input_grad[0])
        ctx.save_for_backward(x if keep_x else None, y if row_trains else None, g_col, g_row, weight)
        ctx.act, ctx.dtype, ctx.x_dtype = act, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, g_col, g_row, weight = ctx.saved_tensors
        need_x, need_col, need_row, need_w, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_col = grad_row = grad_w = grad_b = None
        dy = dy.to(ctx.dtype)
        act_out, x_in = x, None  # the activation's output (with its graph) and input, where one is fused in
        if ctx.act is not None and x is not None:
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(need_x)
                act_out = ctx.act(x_in)
        a = None if act_out is None else act_out.detach().to(ctx.dtype)  # the linear map's input
        if need_x or need_col:
            grad_x = dy @ gated_weight(weight, g_row, g_col).to(ctx.dtype)
        if need_col:
            grad_col = _unscale(_sum_products(grad_x, a), g_col)
        if need_row:
            grad_row = _unscale(_sum_products(dy, y), g_row)
        if need_w:  # dL/dW = g_row[:, None] * (dy^T a) * g_col[None, :]
            grad_w = gated_weight((_rows(dy).t() @ _rows(a)).to(weight.dtype), g_row, g_col)
        if ctx.bias_dtype is not None and need_b:
            grad_b = _sum_rows(dy) if g_row is None else _sum_rows(dy) * g_row
        if need_x and x_in is not None:
            (grad_x,) = torch.autograd.grad(act_out, x_in, grad_x.to(act_out.dtype))
        return (
            _cast(grad_x, ctx.x_dtype) if need_x else None,
            _cast(grad_col, None if g_col is None else g_col.dtype),
            _cast(grad_row, None if g_row is None else g_row.dtype),
            grad_w,
            _cast(grad_b, ctx.bias_dtype),
            None,
        )


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)
