"""What the structured methods (FineGates, magnitude pruning) share: counting and compacting gated models."""

from __future__ import annotations

import logging

from torch import nn

from finegates.model import is_gated, parameter_count
from finegates.report import sparsity_report

logger = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def structured_removed(model: nn.Module, dense_params: int) -> int:
    """Parameters compaction removes: from the exact plan while gated, by counting once compacted."""
    base = unwrap(model)
    if is_gated(base):
        return sparsity_report(base).model_removed
    return dense_params - parameter_count(base)


def compact(model: nn.Module) -> nn.Module:
    """Physically remove the closed rows and columns (`finegates.compress`); exact by construction."""
    from finegates.compress import compress  # imported late: compaction is a heavier, separate module

    small = compress(model)
    logger.info(
        "compacted %s: %d -> %d parameters",
        type(model).__name__,
        parameter_count(model),
        parameter_count(small),
    )
    return small
