"""Which modules of a model get gates: defaults per model type, names, suffixes, regex, all-linear."""

from __future__ import annotations

import re

from torch import nn

from finegates.architectures import architecture_for
from finegates.layer import LINEAR_TYPES

ALL_LINEAR = "all-linear"
_ALWAYS_EXCLUDED = ("lm_head", "classifier", "score", "pooler", "qa_outputs")


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def resolve_targets(
    model: nn.Module,
    target_modules: list[str] | str | None,
    exclude_modules: list[str] | str | None = None,
) -> list[str]:
    """Names of the modules to gate; raises a clear error when the selection is empty or not linear."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if target_modules is None:
        arch = architecture_for(model_type)
        if arch is None:
            raise ValueError(
                f"No default target modules for model_type {model_type!r}; pass target_modules "
                "(a list of names/suffixes, a regex, or 'all-linear')."
            )
        target_modules = list(arch.default_targets)
    names = []
    for name, module in model.named_modules():
        if not name or (exclude_modules and _matches(name, exclude_modules)):
            continue
        if target_modules == ALL_LINEAR:
            selected = isinstance(module, LINEAR_TYPES) and not _is_head(model, name, module)
        else:
            selected = _matches(name, target_modules)
        if selected:
            if not isinstance(module, LINEAR_TYPES):
                raise TypeError(
                    f"Target {name!r} is a {type(module).__name__}, not a linear layer; FineGates gates "
                    "nn.Linear and transformers Conv1D only. Narrow target_modules."
                )
            names.append(name)
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}.")
    return names


def _is_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    top = name.split(".")
    return module is output or any(part in _ALWAYS_EXCLUDED for part in top)


def default_modules_to_save(model: nn.Module) -> list[str]:
    """Task heads that are new or task-specific: trained in full and saved with the gates."""
    arch = architecture_for(getattr(getattr(model, "config", None), "model_type", None))
    candidates = arch.head_modules if arch else ("classifier", "score")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, module in model.named_children():
        if name in candidates and module is not output:
            found.append(name)
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(base, nn.Module) and base is not model:
        prefix = model.base_model_prefix
        for name, module in base.named_children():
            if (
                name in candidates
                and module is not None
                and type(model).__name__.endswith(
                    ("ForSequenceClassification", "ForTokenClassification", "ForMultipleChoice")
                )
            ):
                found.append(f"{prefix}.{name}")
    return found
