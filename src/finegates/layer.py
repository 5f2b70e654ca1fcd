"""`GatedLinear`: a frozen linear layer with a gate on every output row and input column."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from finegates.config import GatesConfig
from finegates.gated_fn import GatedLinearFunction
from finegates.gates import Gate, TiedGate, make_gate

LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a transformers Conv1D (whose weight is in x out)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear or transformers Conv1D).")


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear or Conv1D (or a GatedLinear's base) as an (out, in) matrix: the weight
    itself, or a transposed view of a Conv1D's (in, out) one (writes through it reach the module)."""
    module = module.base_layer if isinstance(module, GatedLinear) else module
    linear_shape(module)  # a clear error for anything else
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def as_stored(module: nn.Module, out_in: torch.Tensor) -> torch.Tensor:
    """An (out, in) matrix in the orientation `module` (or a GatedLinear's base) stores its weight."""
    module = module.base_layer if isinstance(module, GatedLinear) else module
    return out_in.t().contiguous() if isinstance(module, Conv1D) else out_in


class GatedLinear(nn.Module):
    """y = (W (x * g_col) + b) * g_row, with W and b those of the wrapped `base_layer`.

    With `structure="runtime"` (`finegates.ties`) an axis's gate is a `TiedGate` view of a vector
    shared with other layers, or None (that axis is not gated).

    >>> layer = GatedLinear(nn.Linear(4, 3), GatesConfig()).eval()
    >>> torch.equal(layer(torch.ones(2, 4)), layer.base_layer(torch.ones(2, 4)))
    True
    """

    def __init__(self, base_layer: nn.Module, cfg: GatesConfig) -> None:
        super().__init__()
        out_features, in_features = linear_shape(base_layer)
        self.base_layer = base_layer
        self.row_gate: Gate | TiedGate | None = make_gate(out_features, cfg)
        self.col_gate: Gate | TiedGate | None = make_gate(in_features, cfg)
        self.out_features, self.in_features = out_features, in_features
        self.enabled = True  # False: the gates are bypassed (e.g. before they switch on in pretraining)
        self.row_gate.to(base_layer.weight.device)
        self.col_gate.to(base_layer.weight.device)
        # Progressive compaction (`finegates.progressive`): the kept rows and columns (original indices) and
        # the frozen weight cut to them, (kept rows, kept cols). None: the layer has its full width.
        self.register_buffer("kept_rows", None, persistent=False)
        self.register_buffer("kept_cols", None, persistent=False)
        self.register_buffer("kept_weight", None, persistent=False)
        self.dense_kept = True  # False once compaction dropped the full weight (no bypass any more)
        # The FFN activation moved into this (down) projection (`defer_activation`): the layer receives
        # the activation's input and applies it first, so training keeps one tensor, not two.
        self.input_act: nn.Module | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def set_gates(self, row: Gate | TiedGate | None, col: Gate | TiedGate | None) -> None:
        """Replace both gates (views of shared gates are kept as plain attributes, not submodules)."""
        for name, gate in (("row_gate", row), ("col_gate", col)):
            self._modules.pop(name, None)
            if isinstance(gate, nn.Module):
                self.add_module(name, gate)
            else:
                object.__setattr__(self, name, gate)

    def _applied(self, axis: str, dtype: torch.dtype, eval_values: bool = False) -> torch.Tensor | None:
        """The values multiplied into an axis (None where nothing is): sampled in training unless
        `eval_values`."""
        gate = self.gates().get(axis)
        if gate is None or not getattr(gate, "applied", True):
            return None
        return (gate.deterministic() if eval_values else gate.value()).to(dtype)

    def layer_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the linear map reads from the module's input `x`: `x`, or its activation where the FFN's
        activation was moved into this layer."""
        return x if self.input_act is None else self.input_act(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            if not self.dense_kept:
                raise RuntimeError(
                    "The gates of this layer cannot be bypassed: progressive compaction dropped its full "
                    "weight. Keep it (keep_dense=True, as distillation does) to run the dense model."
                )
            return self.base_layer(self.layer_input(x))
        if self.kept_weight is not None:
            return self._compacted_forward(x)
        # The fused function reads the weight directly, so a wrapped base (e.g. a peft LoRA layer) keeps
        # its own forward. It folds the gates into the weight in the weight's dtype (float32 under autocast).
        fused = torch.is_grad_enabled() and self.training and isinstance(self.base_layer, LINEAR_TYPES)
        dtype = self.weight.dtype if fused else x.dtype
        g_col, g_row = self._applied("col", dtype), self._applied("row", dtype)
        if g_col is None and g_row is None:  # e.g. q/k in the runtime structure: nothing to multiply or save
            return self.base_layer(self.layer_input(x))
        if fused:
            return GatedLinearFunction.apply(
                x, g_col, g_row, weight_out_in(self.base_layer), self.base_layer.bias, self.input_act
            )
        x = self.layer_input(x)
        y = self.base_layer(x if g_col is None else x * g_col)
        return y if g_row is None else y * g_row

    def _compacted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same map on the kept rows and columns: the trained bias and the gate vectors keep their
        full length (the optimizer's state and saved adapters too) and are read at the kept indices."""
        weight, bias = self.kept_weight, self.base_layer.bias
        bias = None if bias is None else bias.index_select(0, self.kept_rows)
        fused = torch.is_grad_enabled() and self.training
        dtype = weight.dtype if fused else x.dtype
        g_col, g_row = self._applied("col", dtype), self._applied("row", dtype)
        g_col = None if g_col is None else g_col.index_select(0, self.kept_cols)
        g_row = None if g_row is None else g_row.index_select(0, self.kept_rows)
        if fused and (g_col is not None or g_row is not None):
            return GatedLinearFunction.apply(x, g_col, g_row, weight, bias, self.input_act)
        x = self.layer_input(x)
        if g_col is None and g_row is None:
            return F.linear(x, weight, bias)
        y = F.linear(x if g_col is None else x * g_col, weight, bias)
        return y if g_row is None else y * g_row

    def keep_(self, rows: torch.Tensor, cols: torch.Tensor, keep_dense: bool = False) -> None:
        """Cut the frozen weight to rows `rows` and columns `cols` (sorted original indices, a subset of
        what the layer keeps now). `keep_dense=False` frees the full weight; True keeps it for running
        the layer with its gates bypassed (a distillation teacher)."""
        if not isinstance(self.base_layer, LINEAR_TYPES):
            raise TypeError(
                "Progressive compaction cuts nn.Linear / Conv1D weights only; this layer wraps a "
                f"{type(self.base_layer).__name__}."
            )
        if self.base_layer.weight.requires_grad:
            raise ValueError(
                "Progressive compaction cuts frozen weights only; this layer's weight trains (pretraining?)."
            )
        with torch.no_grad():
            weight = self.kept_weight if self.kept_weight is not None else weight_out_in(self.base_layer)
            had_rows, had_cols = self.kept_axes()
            weight = weight.index_select(0, _positions(had_rows, rows)).index_select(
                1, _positions(had_cols, cols)
            )
            self.kept_rows, self.kept_cols = rows.to(weight.device), cols.to(weight.device)
            self.kept_weight = weight.contiguous()
        if not keep_dense and self.dense_kept:
            stored = self.base_layer.weight
            self.base_layer.weight = nn.Parameter(stored.new_empty(0), requires_grad=False)
            self.dense_kept = False

    def kept_axes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) the layer computes, as original indices."""
        if self.kept_weight is not None:
            return self.kept_rows, self.kept_cols
        device = self.base_layer.weight.device
        return torch.arange(self.out_features, device=device), torch.arange(self.in_features, device=device)

    def full_weight(self) -> torch.Tensor:
        """The (out, in) weight at the base model's width: after compaction, removed rows and columns are
        zero (their gates are closed, so nothing the model computes changes)."""
        if self.kept_weight is None:
            return weight_out_in(self.base_layer)
        full = self.kept_weight.new_zeros(self.out_features, self.in_features)
        full[self.kept_rows[:, None], self.kept_cols[None, :]] = self.kept_weight
        return full

    def gates(self) -> dict[str, Gate | TiedGate]:
        """The gates of the axes that have one ("row", "col")."""
        return {axis: g for axis, g in (("row", self.row_gate), ("col", self.col_gate)) if g is not None}

    def folded_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eval-mode (weight, bias) as an (out, in) matrix with the applied gate values multiplied in."""
        weight = self.full_weight()
        g_row, g_col = (self._applied(axis, weight.dtype, eval_values=True) for axis in ("row", "col"))
        folded = weight if g_row is None else g_row[:, None] * weight
        folded = folded if g_col is None else folded * g_col[None, :]
        bias = self.base_layer.bias
        return folded, (bias * g_row if bias is not None and g_row is not None else bias)

    def extra_repr(self) -> str:
        kept = "" if self.kept_weight is None else f", kept={tuple(self.kept_weight.shape)}"
        return f"in_features={self.in_features}, out_features={self.out_features}{kept}"


class DeferredActivation(nn.Module):
    """Stands in for an FFN's activation that `defer_activation` moved into the down projection: passes
    its input through (the original module is kept as `act`)."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def defer_activation(block: nn.Module, act_path: str, down: GatedLinear) -> None:
    """Move the elementwise activation at `act_path` (relative to `block`) into `down`, the gated layer
    that reads its output: `down` then keeps the activation's input for its backward pass and recomputes
    the activation, where the activation and the gated layer would each keep a tensor of the FFN's width."""
    try:
        act = block.get_submodule(act_path)
    except AttributeError:  # a plain function, not a module: it stays where it is
        return
    block.set_submodule(act_path, DeferredActivation(act))
    object.__setattr__(down, "input_act", act)  # not a submodule: the module tree holds it once


def _positions(have: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Where each of `keep` sits in `have` (both sorted); a clear error for an index `have` lacks."""
    keep = keep.to(have.device)
    at = torch.searchsorted(have, keep)
    if len(keep) and (at.max() >= len(have) or not torch.equal(have[at], keep)):
        raise ValueError("keep_ can only narrow a layer: some indices were removed before.")
    return at
