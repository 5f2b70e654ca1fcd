"""`save_gates` / `load_gates`: a small adapter folder (config JSON + safetensors of what was trained)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from finegates.config import GatesConfig
from finegates.io_utils import atomic_write
from finegates.model import gates_config, get_gated_model, optional_state, trainable_state_dict

WEIGHTS_NAME = "finegates_adapter.safetensors"


def save_gates(model: nn.Module, directory: str | Path) -> Path:
    """Write the gate adapter of `model` into `directory`; returns the folder.

    >>> save_gates(model, "out/")  # doctest: +SKIP
    """
    directory = Path(directory)
    tensors = {name: t.detach().contiguous().cpu() for name, t in trainable_state_dict(model).items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    gates_config(model).save(directory)
    return directory


def load_gates(model: nn.Module, directory: str | Path, config: GatesConfig | None = None) -> nn.Module:
    """Gate a fresh `model` as the saved adapter says and load its trained tensors (in place).

    >>> model2 = load_gates(fresh_hf_model, "out/")  # doctest: +SKIP
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Gate adapter folder {str(directory)!r} does not exist.")
    config = config or GatesConfig.load(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the adapter folder is incomplete; save it again with save_gates."
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path} is damaged or not a safetensors file ({err}); save the adapter again."
        ) from err
    model = get_gated_model(model, config)
    _load_into(model, tensors, path)
    return model


def _load_into(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    state = model.state_dict()
    missing = sorted(n for n in set(trainable_state_dict(model)) - set(tensors) if not optional_state(n))
    unknown = sorted(set(tensors) - set(state))
    if missing or unknown:
        raise ValueError(
            f"{path} does not fit this model: missing {missing[:5]}, unexpected {unknown[:5]}. Load it into "
            "the same architecture the adapter was trained on."
        )
    for name, tensor in tensors.items():
        if state[name].shape != tensor.shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(state[name].shape)}."
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"{path}: {name} holds NaN or infinite values (a diverged run?); it cannot be loaded."
            )
    model.load_state_dict(tensors, strict=False)
