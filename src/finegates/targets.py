"""Which modules of a model get gates: defaults per model type, names, suffixes, regex, all-linear."""

from __future__ import annotations

import re

from torch import nn

from finegates.architectures import architecture_for
from finegates.layer import LINEAR_TYPES

ALL_LINEAR = "all-linear"
_ALWAYS_EXCLUDED = ("lm_head", "classifier", "score", "pooler", "qa_outputs")


def _matching(name: str, spec: list[str] | str) -> list[str]:
    """The entries of `spec` (a regex, or names/suffixes) that `name` matches."""
    if isinstance(spec, str):
        return [spec] if re.fullmatch(spec, name) is not None else []
    return [key for key in spec if name == key or name.endswith("." + key)]


def _matches(name: str, spec: list[str] | str) -> bool:
    return bool(_matching(name, spec))


def _unmatched(spec: list[str] | str, used: set[str]) -> list[str]:
    return [key for key in ([spec] if isinstance(spec, str) else spec) if key not in used]


def resolve_targets(
    model: nn.Module,
    target_modules: list[str] | str | None,
    exclude_modules: list[str] | str | None = None,
) -> list[str]:
    """Names of the modules to gate; raises a clear error when the selection is empty or not linear."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    given = target_modules is not None and target_modules != ALL_LINEAR
    if target_modules is None:
        arch = architecture_for(model_type)
        if arch is None:
            raise ValueError(
                f"No default target modules for model_type {model_type!r}; pass target_modules "
                "(a list of names/suffixes, a regex, or 'all-linear')."
            )
        target_modules = list(arch.default_targets)
    names, targeted, excluded = [], set(), set()
    for name, module in model.named_modules():
        if not name:
            continue
        if target_modules == ALL_LINEAR:
            selected = isinstance(module, LINEAR_TYPES) and not _is_head(model, name, module)
        else:
            hits = _matching(name, target_modules)
            targeted.update(hits)
            selected = bool(hits)
        if exclude_modules and (hits := _matching(name, exclude_modules)):
            excluded.update(hits)
            continue
        if selected:
            if not isinstance(module, LINEAR_TYPES):
                raise TypeError(
                    f"Target {name!r} is a {type(module).__name__}, not a linear layer; FineGates gates "
                    "nn.Linear and transformers Conv1D only. Narrow target_modules."
                )
            names.append(name)
    kind = type(model).__name__
    if given and (missing := _unmatched(target_modules, targeted)):
        raise ValueError(f"target_modules entries {missing} match no module of {kind}: check their spelling.")
    if exclude_modules and (missing := _unmatched(exclude_modules, excluded)):
        raise ValueError(
            f"exclude_modules entries {missing} match no module of {kind}: check their spelling (a single "
            "string is a regex over the whole module name; a list takes names or name suffixes)."
        )
    if not names and excluded:
        raise ValueError(f"exclude_modules left nothing of {kind} to gate (it is {exclude_modules!r}).")
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no module of {kind}.")
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
