"""Compact linear layers: GEMM routes for arbitrary widths, and residual-stream gather/scatter.

A residual dim can be closed in one layer and open in the next, so it cannot leave the hidden state;
a layer instead gathers its kept inputs (`x[..., cols]`) and scatters its kept outputs into a zero
full-width tensor (`ResidualLinear`). Both run on a 2-D view: on CPU, `index_select` / `scatter_`
over the last dim of a 3-D tensor are several times slower than over dim 1 of a 2-D one.
"""

from __future__ import annotations

import contextlib
import os
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from finegates.compress.slicing import new_linear
from finegates.compress.spec import LinearSpec

ALIGN = 16  # elements: output rows start on 64-byte boundaries (float32)
MIN_ROWS = 16  # below this many rows (e.g. decoding) the GEMM is a GEMV and alignment does not pay
ONEDNN_MIN_ROWS = (
    128  # from this many rows on, float32 GEMMs on x86 CPUs run through oneDNN (see CompactLinear)
)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear through oneDNN's matmul (x86 builds with oneDNN: see ONEDNN); no autograd."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_linear_works() -> bool:
    """oneDNN's linear op is in this torch build, on an x86 CPU, and computes F.linear (checked once on
    a tiny input, so that a torch release that changes the op's signature falls back to BLAS)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w, b = torch.ones(2, 3), torch.arange(12.0).view(4, 3), torch.arange(4.0)
        return torch.equal(onednn_linear(x, w, b), F.linear(x, w, b))
    except (AttributeError, RuntimeError, TypeError):
        return False


ONEDNN = _onednn_linear_works()
# The one switch for the GEMM routes of compact linears (`gemm_routes`): off, every compact linear is
# plain F.linear. The environment variable FINEGATES_GEMM_ROUTES=0 turns them off for a whole process.
_ROUTES = {"enabled": os.environ.get("FINEGATES_GEMM_ROUTES", "1") != "0"}


@contextlib.contextmanager
def gemm_routes(enabled: bool):
    """Run compact linears through their measured CPU GEMM routes (oneDNN from ONEDNN_MIN_ROWS rows,
    row-aligned output buffers from MIN_ROWS rows; the default) or as plain F.linear (`enabled=False`),
    within the block. The routes change speed only; outputs agree to float32 rounding. Their
    measurements: BENCHMARKS.md, inference run 4 and `benchmarks/gemm_routes.py`.

    >>> with gemm_routes(False):  # doctest: +SKIP
    ...     slow = small(**batch)
    """
    before = _ROUTES["enabled"]
    _ROUTES["enabled"] = enabled
    try:
        yield
    finally:
        _ROUTES["enabled"] = before


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN pays for this GEMM, and no dispatch mode is active: modes such as FlopCounterMode know
    aten.mm / addmm but not the oneDNN op, so under one the GEMM stays an aten op they can see."""
    return (
        ONEDNN
        and x.shape[0] >= ONEDNN_MIN_ROWS
        and x.dtype == torch.float32
        and weight.numel() > 0
        and torch.backends.mkldnn.enabled
        and not is_in_torch_dispatch_mode()
    )


def compact_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear of a 2-D input through the fastest CPU route measured for its shape (see CompactLinear).

    Below MIN_ROWS rows, with autograd, off the CPU and under torch.compile it is plain F.linear: dynamo
    cannot trace a non-contiguous `out=`, and a graph break per layer would make it recompile for every
    layer's shapes.
    """
    rows, n = x.shape[0], weight.shape[0]
    if (
        not _ROUTES["enabled"]
        or rows < MIN_ROWS
        or x.device.type != "cpu"
        or torch.compiler.is_compiling()
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return F.linear(x, weight, bias)  # decoding takes the first test: a GEMV is fastest as it is
    if _onednn(x, weight):
        return onednn_linear(x, weight, bias)
    if n % ALIGN == 0:
        return F.linear(x, weight, bias)
    out = x.new_empty(rows, -(-n // ALIGN) * ALIGN)[:, :n]
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


class CompactLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) with an inference forward for arbitrary widths.

    Kept widths are arbitrary (e.g. 923 FFN channels by 531 inputs), and the GEMM that runs them fastest
    depends on the row count (measured per SmolLM2 layer shape, BENCHMARKS.md inference run 4): float32
    inputs of at least ONEDNN_MIN_ROWS rows go through oneDNN's matmul on x86; fewer, down to MIN_ROWS,
    are written into a buffer whose rows have a stride rounded up to ALIGN and returned as a view; a GEMV
    (decoding) and autograd are plain F.linear. `gemm_routes(False)` (or FINEGATES_GEMM_ROUTES=0) turns
    the routes off; `torch.backends.mkldnn.flags(enabled=False)` only the oneDNN one.
    `use_compact_linears` gives a dense model the same GEMMs, for like-for-like speed comparisons.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return routed_linear(x, self.weight, self.bias)


def routed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear of an input of any shape through `compact_linear`'s routes (CompactLinear's forward)."""
    if x.numel() < MIN_ROWS * weight.shape[1]:  # a GEMV (decoding): no reshaping, ~3 us less per call
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    # flatten, not reshape(lead.numel(), ...): a size product makes torch.export fix the batch axis
    y = compact_linear(x.flatten(0, -2), weight, bias)
    return y.view(*lead, y.shape[-1])


def use_compact_linears(model: nn.Module) -> nn.Module:
    """Switch every plain nn.Linear of `model` (in place) to CompactLinear: same state, same outputs to
    float32 rounding, the GEMM routes of a compacted model. Returns `model`."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = CompactLinear
    return model


class ResidualLinear(nn.Module):
    """y[..., rows] = linear(x[..., cols]), zero elsewhere; `cols`/`rows` are None when not needed.

    >>> layer = ResidualLinear(
    ...     nn.Linear(2, 1), torch.tensor([0, 3]), torch.tensor([1]), out_full=3, in_full=4
    ... )
    >>> layer(torch.ones(5, 4)).shape
    torch.Size([5, 3])
    """

    def __init__(
        self,
        linear: nn.Linear,
        cols: torch.Tensor | None,
        rows: torch.Tensor | None,
        out_full: int | None,
        in_full: int | None = None,
    ) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("cols", cols)
        self.register_buffer("rows", rows)
        self.out_full, self.in_full = out_full, in_full

    def index_bounds(self) -> list[tuple[str, torch.Tensor | None, int | None]]:
        """(buffer, indices, exclusive upper bound) for checking a loaded checkpoint."""
        return [("cols", self.cols, self.in_full), ("rows", self.rows, self.out_full)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.flatten(0, -2)
        if self.cols is not None:
            x = x.index_select(1, self.cols)
        linear = self.linear
        # A direct call: at one token per step (decoding) the Python of a nested module call costs about
        # what the gather saves. Other linears (e.g. int8 dynamic quantized ones) are called as modules.
        y = compact_linear(x, linear.weight, linear.bias) if type(linear) is CompactLinear else linear(x)
        if self.rows is not None:
            y = y.new_zeros(y.shape[0], self.out_full).scatter_(1, self.rows.expand(y.shape[0], -1), y)
        return y.view(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        full_in = "" if self.cols is None else f"gather {len(self.cols)} of {self.in_full} dims"
        full_out = "" if self.rows is None else f"scatter into {self.out_full} dims"
        return ", ".join(s for s in (full_in, full_out) if s)


def build_linear(spec: LinearSpec) -> nn.Module:
    """An empty (uninitialised) module of the spec's shape; weights and indices come from the checkpoint."""
    linear = new_linear(spec.in_features, spec.out_features, spec.bias)
    linear.__class__ = CompactLinear  # no extra state: only the forward differs
    if not spec.wrapped:
        return linear
    cols = torch.zeros(spec.in_features, dtype=torch.long) if spec.gather_from is not None else None
    rows = torch.zeros(spec.out_features, dtype=torch.long) if spec.scatter_to is not None else None
    return ResidualLinear(linear, cols, rows, spec.scatter_to, spec.gather_from)
