"""CPU inference of an unstructured-sparse model through torch's CSR matmul, timed against dense.

SquareHead's speed claim rests on a sparse kernel. This measures what stock PyTorch on CPU gives at
the model's sparsity: often a slowdown at 50-75%, which is reported as it comes out.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from finegates.layer import weight_out_in
from finegates.timing import time_in_turns

logger = logging.getLogger(__name__)


class CSRLinear(nn.Module):
    """y = x W^T + b with W held as a sparse CSR (out x in) matrix."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        weight = weight_out_in(module).detach()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and the point here
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.weight = weight.to_sparse_csr()
        self.bias = None if module.bias is None else module.bias.detach()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.density = float((weight != 0).float().mean())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def to_csr(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of `model` whose layers `names` compute with CSR weights."""
    sparse = copy.deepcopy(model).eval()
    for name in names:
        sparse.set_submodule(name, CSRLinear(sparse.get_submodule(name)))
    return sparse


@dataclass
class InferenceTiming:
    dense_ms: float
    sparse_ms: float
    sparsity: float  # zero fraction of the converted layers

    @property
    def speedup(self) -> float:
        """dense time / sparse time: above 1 the sparse kernel helps, below 1 it hurts."""
        return self.dense_ms / self.sparse_ms


def measure_cpu_inference(
    model: nn.Module, names: list[str], inputs: dict[str, torch.Tensor], min_run_time: float = 1.0
) -> InferenceTiming:
    """Median forward time of `model` dense vs with layers `names` in CSR, on the same CPU inputs.

    >>> t = measure_cpu_inference(model, list(method.masks), {"input_ids": ids})  # doctest: +SKIP
    >>> t.speedup  # doctest: +SKIP
    """
    model = model.eval()
    sparse = to_csr(model, names)
    layers = [sparse.get_submodule(n) for n in names]
    zeros = sum((1 - m.density) * m.in_features * m.out_features for m in layers)
    total = sum(m.in_features * m.out_features for m in layers)
    seconds = time_in_turns(
        {"dense": partial(model, **inputs), "sparse": partial(sparse, **inputs)}, min_run_time=min_run_time
    )
    timing = InferenceTiming(1e3 * seconds["dense"], 1e3 * seconds["sparse"], zeros / max(total, 1))
    logger.info(
        "CSR vs dense on CPU at %.1f%% sparsity: %.3f ms vs %.3f ms (speedup %.2fx)",
        100 * timing.sparsity,
        timing.sparse_ms,
        timing.dense_ms,
        timing.speedup,
    )
    return timing
