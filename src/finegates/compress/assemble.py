"""Assembling a compact or stock model: which attention module an architecture needs, and loading a state
dict into a model built on the meta device."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from finegates.architectures import Architecture


def family(arch: Architecture) -> str:
    """Which compact attention module the architecture needs."""
    return "rope" if arch.rope else ("gpt2" if "qkv" in arch.roles else "bert")


def attention_path(arch: Architecture) -> str:
    """Path of the attention module inside a block: the parent of the q (or fused qkv) projection."""
    return arch.roles["qkv" if "qkv" in arch.roles else "q"].rpartition(".")[0]


def _non_persistent_buffers(model: nn.Module) -> list[str]:
    return [
        f"{m}.{b}" if m else b
        for m, module in model.named_modules()
        for b in module._non_persistent_buffers_set
    ]


def load_into(small: PreTrainedModel, state: dict[str, torch.Tensor], source: nn.Module) -> None:
    """Load `state` into the meta-device `small`; non-persistent buffers (e.g. RoPE) come from `source`."""
    result = small.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(small, "all_tied_weights_keys", {}) or {})
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"compress built inconsistent shapes: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]} (a bug: please report it)."
        )
    for name in _non_persistent_buffers(small):
        module_name, _, buffer = name.rpartition(".")
        owner = small.get_submodule(module_name) if module_name else small
        owner._buffers[buffer] = source.get_buffer(name).clone()
    small.tie_weights()
