"""Injecting gates into a model in place, and the model-level views the rest of the library uses."""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from finegates.architectures import architecture_for
from finegates.config import GatesConfig
from finegates.controller import SparsityController
from finegates.coupling import find_blocks
from finegates.gates import REMOVED, Gate, TiedGate
from finegates.layer import GatedLinear, defer_activation
from finegates.structure import remembered
from finegates.targets import default_modules_to_save, resolve_targets
from finegates.ties import TIES_ATTR, runtime_gates, tie_runtime_gates

logger = logging.getLogger(__name__)

CONTROLLER_ATTR = "finegates_controller"
# On an attention module that progressive compaction narrowed: {gates enabled: {attribute: value}}
HEAD_ATTRS = "finegates_head_attrs"
CONTROLLER_STATE = ("lambda1", "lambda2", "step", "projected_closed", "projected_reopened")
# Controller entries that adapters saved before they existed may lack.
OPTIONAL_STATE = tuple(f"{CONTROLLER_ATTR}.{n}" for n in ("projected_closed", "projected_reopened"))


def get_gated_model(model: nn.Module, config: GatesConfig | None = None) -> nn.Module:
    """Wrap the target linear layers of `model` in `GatedLinear`, freeze the rest, return `model`.

    The model is changed in place; it keeps a copy of `config`. Trainable afterwards: the gates, the biases
    the config's `bias` policy names, and `modules_to_save` (by default the task head of a classification
    model).

    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> m = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=4, intermediate_size=37, vocab_size=99))
    >>> get_gated_model(m, GatesConfig(target_sparsity=0.4)) is m
    True
    """
    # A copy: gating fills in modules_to_save and training the run-length schedule, which must not
    # leak into the caller's config (reused for another model or another run).
    config = dataclasses.replace(config) if config is not None else GatesConfig()
    if is_gated(model):
        raise ValueError("This model already has FineGates gates; gating it twice is not supported.")
    if config.structure == "runtime":
        _check_runtime_head(model)
    if config.uniform_layers:
        _check_uniform_family(model)
    names = resolve_targets(model, config.target_modules, config.exclude_modules)
    if config.modules_to_save is None:
        config.modules_to_save = default_modules_to_save(model)
    for name in names:
        base = model.get_submodule(name)
        model.set_submodule(name, GatedLinear(base, config).train(base.training))
    if config.structure == "runtime":
        model.add_module(TIES_ATTR, tie_runtime_gates(model, config))
    _defer_activations(model)
    model.add_module(CONTROLLER_ATTR, SparsityController().to(next(model.parameters()).device))
    model.finegates_config = config
    # The multipliers live outside forward() and get the same gradient on every rank (the gates are
    # in sync), so DistributedDataParallel must not manage them.
    ignored = getattr(model, "_ddp_params_and_buffers_to_ignore", [])
    model._ddp_params_and_buffers_to_ignore = [
        *ignored,
        *(f"{CONTROLLER_ATTR}.{n}" for n in CONTROLLER_STATE),
    ]
    _set_trainable(model, config)
    logger.info("Gated %d linear layers of %s", len(names), type(model).__name__)
    return model


def _defer_activations(model: nn.Module) -> None:
    """Move each block's FFN activation into its down projection where a gate there is multiplied in
    (the architecture table names the activation; GLU FFNs have none to move)."""
    arch = architecture_for(getattr(getattr(model, "config", None), "model_type", None))
    if arch is None or arch.activation is None:
        return
    for block in find_blocks(model):
        down = block.modules.get("down", (None, None))[1]
        col = down.gates().get("col") if isinstance(down, GatedLinear) else None
        if col is not None and getattr(col, "applied", True):
            defer_activation(model.get_submodule(block.name), arch.activation, down)


def _check_runtime_head(model: nn.Module) -> None:
    """The runtime structure's residual mask reaches the heads the architecture table lists (an LM head, a
    pooler, a classifier); a masked-LM head reads the stream through its own dense layer and norm."""
    kind = type(model).__name__
    if kind.endswith(("ForMaskedLM", "ForPreTraining")):
        raise ValueError(
            f"structure='runtime' does not cover {kind}'s masked-LM head (its own dense layer and norm read "
            "the residual stream the shared mask narrows). Use structure='fine', or a task head "
            "(AutoModelForSequenceClassification)."
        )


def _check_uniform_family(model: nn.Module) -> None:
    """uniform_layers promises a stock-class export as narrow as the budget counts: whole heads and the
    residual stream narrow in a stock config only for RMSNorm RoPE decoders without per-head q/k norms."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = architecture_for(model_type)
    if arch is not None and (not arch.rope or arch.layer_norm or arch.qk_norm):
        reason = (
            "its stock config derives the head size from the hidden size"
            if not arch.rope
            else "its per-head q/k norms read the one config epsilon a narrower stream rescales"
        )
        raise ValueError(
            f"uniform_layers cannot give {model_type} a stock shape as narrow as its budget: {reason}, so a "
            "stock export keeps every head and residual dim. Train without uniform_layers: the compacted "
            "model (`compress`) narrows them exactly; `compress(model, uniform=True)` still exports a stock "
            "class with equal FFN widths. (uniform_layers: LLaMA, Mistral, Qwen2.)"
        )


def is_gated(model: nn.Module) -> bool:
    return any(isinstance(m, GatedLinear) for m in model.modules())


def gated_layers(model: nn.Module) -> dict[str, GatedLinear]:
    return remembered(
        model,
        "gated_layers",
        lambda: {name: m for name, m in model.named_modules() if isinstance(m, GatedLinear)},
    )


def all_gates(model: nn.Module) -> list[Gate]:
    """Every gate vector of the model, once: the layers' own row and column gates, and the shared vectors
    that `TiedGate` views point to (structure="runtime")."""

    def find() -> list[Gate]:
        found: dict[int, Gate] = {}
        for layer in gated_layers(model).values():
            for gate in layer.gates().values():
                source = gate.source if isinstance(gate, TiedGate) else gate
                found.setdefault(id(source), source)
        return list(found.values())

    return remembered(model, "all_gates", find)


def set_gates_enabled(model: nn.Module, enabled: bool) -> None:
    """Run every gated layer (and the runtime structure's stream mask) with its gates, or bypassed."""
    for layer in gated_layers(model).values():
        layer.enabled = enabled
    set_head_counts(model, enabled)
    ties = runtime_gates(model)
    if ties is not None:
        ties.enabled = enabled


def set_head_counts(model: nn.Module, gated: bool) -> None:
    """Attention modules that progressive compaction narrowed count heads as their gated (narrower) or
    bypassed (full) projections need."""
    for module in model.modules():
        for attr, value in module.__dict__.get(HEAD_ATTRS, {}).get(gated, {}).items():
            setattr(module, attr, value)


def gate_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for gate in all_gates(model) for p in gate.parameters()}


def gates_config(model: nn.Module) -> GatesConfig:
    config = getattr(model, "finegates_config", None)
    if config is None:
        raise ValueError("This model has no gates: call finegates.get_gated_model(model, config) first.")
    return config


def controller(model: nn.Module) -> SparsityController:
    gates_config(model)
    return getattr(model, CONTROLLER_ATTR)


def _set_trainable(model: nn.Module, config: GatesConfig) -> None:
    for param in model.parameters():
        param.requires_grad_(False)
    for gate in all_gates(model):
        gate.requires_grad_(True)
    for layer in gated_layers(model).values():
        if config.bias == "gated" and layer.bias is not None:
            layer.bias.requires_grad_(True)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)
    for name in config.modules_to_save or []:
        try:
            model.get_submodule(name).requires_grad_(True)
        except AttributeError as err:
            raise ValueError(f"modules_to_save entry {name!r} is not a module of this model.") from err
    getattr(model, CONTROLLER_ATTR).requires_grad_(True)


def trainable_state_dict(model: nn.Module) -> dict:
    """Everything the gate adapter holds: gates (and which of them progressive compaction removed),
    trained biases, modules_to_save, the controller."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # only the gates progressive compaction has cut units of (plain runs save what they always saved)
    removed = {
        f"{name}.{REMOVED}" for name, m in model.named_modules() if isinstance(m, Gate) and m.removed.any()
    }
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if name in trainable or name in removed or name.startswith(CONTROLLER_ATTR + ".")
    }


def optional_state(name: str) -> bool:
    """Adapter entries that adapters saved before they existed may lack."""
    return name in OPTIONAL_STATE or name.endswith(f".{REMOVED}")


def parameter_count(model: nn.Module, trainable: bool = False) -> int:
    """Parameters of a model, each tensor once (tied weights are one tensor); `trainable`: only those
    that train."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, not counting the controller's two multipliers."""
    params = [(n, p) for n, p in model.named_parameters() if not n.startswith(CONTROLLER_ATTR)]
    return sum(p.numel() for _, p in params if p.requires_grad), sum(p.numel() for _, p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print "trainable params: X || all params: Y || trainable%: Z", as PEFT does."""
    trainable, total = count_parameters(model)
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: "
        f"{100 * trainable / total:.4f}"
    )
