"""`load_compressed`: load a folder written by `compress(...).save_pretrained`, failing clearly if damaged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, PreTrainedModel

from finegates.compress.checks import CompressedCheckpointError, check_loaded
from finegates.compress.models import COMPACT_BY_NAME, PREFIX, register_compact_models
from finegates.compress.quantize import QUANTIZE_CHOICES, quantize_linears
from finegates.compress.spec import CompactSpec

logger = logging.getLogger(__name__)


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
    if quantize:
        kwargs.setdefault("dtype", torch.float32)  # dynamic int8 quantizes float32 linears
    path = Path(path)
    model_class = _model_class(path)
    try:
        model = model_class.from_pretrained(path, **kwargs)  # the compact classes check what they load
    except CompressedCheckpointError:
        raise
    except (OSError, RuntimeError, ValueError, SafetensorError, json.JSONDecodeError) as err:
        raise CompressedCheckpointError(f"{path}: cannot load the compressed model: {err}") from err
    model.eval()
    return quantize_linears(model) if quantize else model


def load_checked(auto_class: type, path: str | Path, **kwargs) -> PreTrainedModel:
    """`auto_class.from_pretrained(path)` for any model folder, compacted or stock, refused with a
    CompressedCheckpointError when a weight would run re-initialised (missing, unexpected, another shape)
    or holds NaN / inf: what `evaluate` and `bench` load. Compacted folders go through `load_compressed`.
    In float32 unless `dtype` says otherwise (a folder saved in bfloat16 scores and times as a hub id does).
    """
    register_compact_models()
    kwargs.setdefault("dtype", torch.float32)
    path = Path(path)
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CompressedCheckpointError(f"{path}: config.json cannot be read: {err}") from err
    if model_type.startswith(PREFIX):
        return load_compressed(path, **kwargs)
    kwargs.setdefault("ignore_mismatched_sizes", True)
    try:
        model, info = auto_class.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, RuntimeError, ValueError, SafetensorError, json.JSONDecodeError) as err:
        raise CompressedCheckpointError(f"{path}: cannot load the model: {err}") from err
    check_loaded(path, model, info)
    return model.eval()


def _model_class(path: Path) -> type[PreTrainedModel]:
    if not (path / "config.json").is_file():
        raise CompressedCheckpointError(
            f"{path}: no config.json; is this a folder written by save_pretrained?"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CompressedCheckpointError(f"{path}: config.json cannot be read: {err}") from err
    if not config.model_type.startswith(PREFIX) or getattr(config, "finegates_compact", None) is None:
        raise CompressedCheckpointError(
            f"{path}: model_type {config.model_type!r} is not a FineGates compacted model (no "
            "finegates_compact)."
        )
    try:
        CompactSpec.from_dict(config.finegates_compact)
    except (ValueError, TypeError) as err:
        raise CompressedCheckpointError(f"{path}: config.json finegates_compact is invalid: {err}") from err
    names = list(getattr(config, "architectures", None) or [])
    if not names or names[0] not in COMPACT_BY_NAME:
        raise CompressedCheckpointError(
            f"{path}: config.json architectures {names} names no compact model class."
        )
    return COMPACT_BY_NAME[names[0]]
