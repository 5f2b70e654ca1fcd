"""Slicing functions and the residual gather/scatter layer, tested alone on plain linear layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from finegates import GatedLinear, GatesConfig
from finegates.compress.linear import AlignedLinear, ResidualLinear, build_linear
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


@pytest.mark.parametrize("bias", [True, False])
def test_aligned_linear_computes_what_linear_computes(bias):
    torch.manual_seed(1)
    linear = nn.Linear(7, 23, bias=bias)
    aligned = nn.Linear(7, 23, bias=bias)
    aligned.load_state_dict(linear.state_dict())
    aligned.__class__ = AlignedLinear
    x = torch.randn(4, 9, 7)
    with torch.no_grad():
        out = aligned(x)
    assert out.shape == (4, 9, 23) and out.stride()[-2] == 32  # rows written at an aligned stride
    torch.testing.assert_close(out, linear(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(aligned(x[:1, :1]), linear(x[:1, :1]), atol=1e-6, rtol=0)  # decoding: plain GEMV
    aligned(x).sum().backward()  # with autograd it is plain F.linear
    assert aligned.weight.grad.shape == (23, 7)
