"""Checks of a loaded model folder: every weight present with its recorded shape and finite, every kept index
in range, every compact module consistent with its spec. One path for `load_compressed`, the compact classes'
own `from_pretrained` (so the Auto classes check too), and the folders `evaluate` and `bench` load."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from finegates.compress.attention import CompactAttention
from finegates.compress.linear import CompactLinear, ResidualLinear

COMPACT = "Compact"  # name prefix of the compact model classes (compress/models.py)


class CompressedCheckpointError(ValueError):
    """A model folder that is missing, damaged, or inconsistent with its config."""


def check_loaded(path: str | Path, model: nn.Module, info: dict) -> None:
    """Raise CompressedCheckpointError naming the first problem of a model loaded from `path` with
    `output_loading_info=True`: weights missing, unexpected or of another shape (they would run
    re-initialised), kept indices out of range, compact shapes that contradict the spec, non-finite values."""
    problems = {
        k: list(info.get(k) or [])
        for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    }
    saved = (getattr(getattr(model, "config", None), "architectures", None) or [None])[0]
    loaded = type(model).__name__
    if saved is not None and saved.startswith(COMPACT) and not loaded.startswith(COMPACT):
        raise CompressedCheckpointError(
            f"{path}: saved by {saved}, a FineGates compacted model, but config.json's model_type makes it "
            f"load as {loaded}, which would run re-initialised weights: the config was edited; compact the "
            "model again."
        )
    if saved is not None and saved != loaded:
        # another head than the folder's (e.g. the bare model of a classifier): as in transformers, heads are
        # left out or created; only the compacted modules must load whole
        compact = [
            n
            for n, m in model.named_modules()
            if isinstance(m, (ResidualLinear, CompactAttention, CompactLinear))
        ]
        problems["unexpected_keys"] = []
        problems["missing_keys"] = [
            k for k in problems["missing_keys"] if any(k.startswith(c + ".") for c in compact)
        ]
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k}: {v[:5]}" for k, v in problems.items())
        raise CompressedCheckpointError(f"{path}: the weights do not match config.json ({detail}).")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    for name, module in model.named_modules():
        if isinstance(module, ResidualLinear):
            for side, width in (("scatter_to", module.out_full), ("gather_from", module.in_full)):
                if width is not None and hidden is not None and width != hidden:
                    raise CompressedCheckpointError(
                        f"{path}: {name} {side} is {width}, but the residual stream has hidden_size {hidden}."
                    )
        if isinstance(module, (ResidualLinear, CompactAttention)):
            for buffer, idx, bound in module.index_bounds():
                if (
                    idx is not None
                    and bound is not None
                    and idx.numel()
                    and (idx.min() < 0 or idx.max() >= bound)
                ):
                    raise CompressedCheckpointError(
                        f"{path}: {name}.{buffer} has kept indices outside [0, {bound})."
                    )
        problems = module.shape_problems() if isinstance(module, CompactAttention) else []
        if problems:
            raise CompressedCheckpointError(
                f"{path}: {name}: {problems[0]}; config.json's finegates_compact is damaged."
            )
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CompressedCheckpointError(f"{path}: {name} holds NaN or infinite values.")
