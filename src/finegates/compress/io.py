"""`load_compressed`: load a folder written by `compress(...).save_pretrained`, failing clearly if damaged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, PreTrainedModel

from finegates.compress.attention import CompactAttention
from finegates.compress.linear import ResidualLinear
from finegates.compress.models import COMPACT_BY_NAME, PREFIX, register_compact_models
from finegates.compress.quantize import QUANTIZE_CHOICES, quantize_linears
from finegates.compress.spec import CompactSpec

logger = logging.getLogger(__name__)


class CompressedCheckpointError(ValueError):
    """A compressed-model folder that is missing, damaged, or inconsistent with its config."""


def load_compressed(path: str | Path, quantize: str | None = None, **kwargs) -> PreTrainedModel:
    """Load a compacted model saved with `save_pretrained`, in eval mode; `quantize="int8"` as in `compress`.

    Unlike a plain `AutoModel...from_pretrained`, every tensor must be present with the shape the
    config records, and every kept index must be in range; anything else raises
    `CompressedCheckpointError` naming the problem. Extra keyword arguments go to `from_pretrained`.

    >>> small = load_compressed("small/")  # doctest: +SKIP
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}.")
    register_compact_models()
    path = Path(path)
    model_class = _model_class(path)
    kwargs.setdefault("ignore_mismatched_sizes", True)  # so that mismatches are reported below, by name
    try:
        model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, RuntimeError, ValueError, SafetensorError, json.JSONDecodeError) as err:
        raise CompressedCheckpointError(f"{path}: cannot load the compressed model: {err}") from err
    _check_loading_info(path, info)
    _check_indices(path, model)
    model.eval()
    return quantize_linears(model) if quantize else model


def _model_class(path: Path) -> type[PreTrainedModel]:
    if not (path / "config.json").is_file():
        raise CompressedCheckpointError(f"{path}: no config.json; is this a folder written by save_pretrained?")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CompressedCheckpointError(f"{path}: config.json cannot be read: {err}") from err
    if not config.model_type.startswith(PREFIX) or getattr(config, "finegates_compact", None) is None:
        raise CompressedCheckpointError(
            f"{path}: model_type {config.model_type!r} is not a FineGates compacted model (no finegates_compact)."
        )
    try:
        CompactSpec.from_dict(config.finegates_compact)
    except (ValueError, TypeError) as err:
        raise CompressedCheckpointError(f"{path}: config.json finegates_compact is invalid: {err}") from err
    names = list(getattr(config, "architectures", None) or [])
    if not names or names[0] not in COMPACT_BY_NAME:
        raise CompressedCheckpointError(f"{path}: config.json architectures {names} names no compact model class.")
    return COMPACT_BY_NAME[names[0]]


def _check_loading_info(path: Path, info: dict) -> None:
    problems = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k}: {v[:5]}" for k, v in problems.items())
        raise CompressedCheckpointError(f"{path}: the weights do not match config.json ({detail}).")


def _check_indices(path: Path, model: torch.nn.Module) -> None:
    """Kept indices must lie inside the widths the config records (a bound check, not a proof)."""
    for name, module in model.named_modules():
        if not isinstance(module, (ResidualLinear, CompactAttention)):
            continue
        for buffer, idx, bound in module.index_bounds():
            if idx is not None and bound is not None and idx.numel() and (idx.min() < 0 or idx.max() >= bound):
                raise CompressedCheckpointError(f"{path}: {name}.{buffer} has kept indices outside [0, {bound}).")
