"""Slicing functions and the residual gather/scatter layer, tested alone on plain linear layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

from finegates import GatedLinear, GatesConfig
from finegates.compress.linear import (
    MIN_ROWS,
    ONEDNN,
    ONEDNN_MIN_ROWS,
    CompactLinear,
    ResidualLinear,
    build_linear,
    use_compact_linears,
)
from finegates.compress.slicing import folded_linear, keep_cols, keep_rows
from finegates.compress.spec import LinearSpec


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(6, 5)


def test_keep_rows_is_the_row_subset(linear):
    idx = torch.tensor([4, 0, 2])
    x = torch.randn(3, 6)
    small = keep_rows(linear, idx)
    assert (small.in_features, small.out_features) == (6, 3)
    torch.testing.assert_close(small(x), linear(x)[:, idx], atol=1e-6, rtol=0)


def test_keep_cols_reads_only_the_kept_inputs(linear):
    idx = torch.tensor([1, 3, 5])
    x = torch.randn(3, 6)
    masked = x.clone()
    masked[:, [0, 2, 4]] = 0
    torch.testing.assert_close(keep_cols(linear, idx)(x[:, idx]), linear(masked), atol=1e-6, rtol=0)


def test_slicing_copies_and_keeps_bias_free_layers_bias_free():
    linear = nn.Linear(4, 3, bias=False)
    small = keep_cols(keep_rows(linear, torch.tensor([0, 1])), torch.tensor([2]))
    assert small.bias is None and small.weight.shape == (2, 1)
    small.weight.data.zero_()
    assert linear.weight.abs().sum() > 0


def test_empty_selection_gives_an_empty_layer(linear):
    small = keep_rows(linear, torch.tensor([], dtype=torch.long))
    assert small(torch.randn(2, 6)).shape == (2, 0)


def test_folded_linear_of_conv1d_and_gated_layer():
    conv = Conv1D(4, 5)
    x = torch.randn(2, 5)
    torch.testing.assert_close(folded_linear(conv)(x), conv(x))
    gated = GatedLinear(nn.Linear(5, 4), GatesConfig()).eval()
    with torch.no_grad():
        gated.row_gate.theta.copy_(torch.tensor([2.0, -2.0, 0.1, 2.0]))
        gated.col_gate.theta.copy_(torch.tensor([-2.0, 2.0, 0.3, 2.0, 2.0]))
    torch.testing.assert_close(folded_linear(gated)(x), gated(x))
    with pytest.raises(TypeError):
        folded_linear(nn.LayerNorm(3))


def test_residual_linear_gathers_and_scatters(linear):
    cols, rows = torch.tensor([0, 2, 5]), torch.tensor([1, 3])
    layer = ResidualLinear(keep_cols(keep_rows(linear, rows), cols), cols, rows, out_full=5, in_full=6)
    x = torch.randn(2, 7, 6)
    masked = torch.zeros_like(x)
    masked[..., cols] = x[..., cols]
    expected = torch.zeros(2, 7, 5)
    expected[..., rows] = linear(masked)[..., rows]
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_build_linear_shapes():
    assert isinstance(build_linear(LinearSpec(3, 4, bias=True)), nn.Linear)
    wrapped = build_linear(LinearSpec(3, 4, bias=False, scatter_to=8, gather_from=9))
    assert isinstance(wrapped, ResidualLinear)
    assert wrapped.linear.weight.shape == (3, 4) and wrapped(torch.randn(2, 9)).shape == (2, 8)


def _compact_copy(linear: nn.Linear) -> CompactLinear:
    return use_compact_linears(copy.deepcopy(linear))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's, from mkldnn.flags
def test_compact_linear_computes_what_linear_computes_on_every_route(bias):
    torch.manual_seed(1)
    linear = nn.Linear(7, 23, bias=bias)
    compact = _compact_copy(linear)
    assert type(compact) is CompactLinear
    with torch.no_grad():
        for rows in (1, MIN_ROWS + 4, ONEDNN_MIN_ROWS + 3):  # GEMV, aligned rows, oneDNN (where available)
            x = torch.randn(rows, 7)
            torch.testing.assert_close(compact(x), linear(x), atol=1e-5, rtol=0)
            x = torch.randn(rows, 12)[:, 3:10]  # rows of a wider tensor: a strided input
            torch.testing.assert_close(compact(x), linear(x), atol=1e-5, rtol=0)
        x = torch.randn(2, MIN_ROWS, 7)  # leading dims are flattened into rows and restored
        out = compact(x)
        torch.testing.assert_close(out, linear(x), atol=1e-5, rtol=0)
        assert out.shape == (2, MIN_ROWS, 23) and out.stride()[-2] == 32  # rows written at an aligned stride
        with torch.backends.mkldnn.flags(enabled=False):  # torch's switch turns the oneDNN route off
            assert compact(torch.randn(ONEDNN_MIN_ROWS, 7)).stride()[-2] == 32
    compact(x).sum().backward()  # with autograd it is plain F.linear
    assert compact.weight.grad.shape == (23, 7)


@pytest.mark.skipif(not ONEDNN, reason="the oneDNN route is taken on x86 CPUs with oneDNN only")
def test_onednn_route_is_taken_and_stays_visible_to_flop_counting():
    torch.manual_seed(2)
    compact = _compact_copy(nn.Linear(64, 40))
    x = torch.randn(ONEDNN_MIN_ROWS, 64)
    with torch.no_grad(), torch.profiler.profile() as prof:
        compact(x)
    assert "mkldnn::_linear_pointwise" in {e.key for e in prof.key_averages()}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # a dispatch mode sees an aten GEMM
        compact(x)
    assert counter.get_total_flops() == 2 * ONEDNN_MIN_ROWS * 64 * 40


def test_use_compact_linears_switches_plain_linears_only():
    special = nn.modules.linear.NonDynamicallyQuantizableLinear(
        4, 4
    )  # an nn.Linear subclass with its own role
    model = nn.Sequential(
        nn.Linear(4, 4), ResidualLinear(nn.Linear(4, 2), None, torch.tensor([0, 2]), out_full=3), special
    )
    use_compact_linears(model)
    assert type(model[0]) is CompactLinear and type(model[1].linear) is CompactLinear
    assert type(model[2]) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_one_switch_turns_the_gemm_routes_off():
    """gemm_routes(False): a compact linear is plain F.linear (a contiguous result, not the row-aligned
    view the BLAS route writes), with the same values; the routes come back after the block."""
    from finegates.compress.linear import MIN_ROWS, compact_linear, gemm_routes

    torch.manual_seed(0)
    x, weight, bias = torch.randn(MIN_ROWS, 8), torch.randn(17, 8), torch.randn(17)
    with torch.backends.mkldnn.flags(enabled=False):  # the aligned BLAS route, whatever the CPU
        routed = compact_linear(x, weight, bias)
        with gemm_routes(False):
            plain = compact_linear(x, weight, bias)
        again = compact_linear(x, weight, bias)
    assert not routed.is_contiguous() and plain.is_contiguous() and not again.is_contiguous()
    torch.testing.assert_close(routed, plain)
    torch.testing.assert_close(plain, torch.nn.functional.linear(x, weight, bias), rtol=0, atol=0)
