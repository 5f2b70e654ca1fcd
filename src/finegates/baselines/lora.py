"""`lora`: LoRA through the `peft` library, on the layers FineGates gates, merged for inference."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from finegates.baselines.base import BaseMethod, Batch, MethodConfig
from finegates.targets import default_modules_to_save, resolve_targets


@dataclass
class LoRAMethodConfig(MethodConfig):
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Layers to adapt; None: the layers FineGates gates by default for the model type."},
    )


def apply_lora(
    model: nn.Module,
    target_names: list[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    modules_to_save: list[str] | None = None,
) -> nn.Module:
    """Wrap `model` with peft LoRA adapters on exactly `target_names` (full module names)."""
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_names,
        modules_to_save=modules_to_save or None,
    )
    return get_peft_model(model, config)


def merge_lora_layers(model: nn.Module) -> nn.Module:
    """Merge every peft LoRA layer into its base layer and return the unwrapped model.

    peft's own `merge_and_unload` takes any module with a `base_layer` attribute for one of its
    layers, which a FineGates `GatedLinear` also has; this unwraps peft's layers only.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, module in list(base.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            base.set_submodule(name, module.get_base_layer())
    return base


class LoRAMethod(BaseMethod):
    """Base frozen, W + (alpha / r) B A trained (B starts at zero), the task head trained in full."""

    name = "lora"
    default_lr = 5e-4
    config_class = LoRAMethodConfig

    def _prepare(self, model: nn.Module, calibration: Iterable[Batch] | None) -> nn.Module:
        cfg: LoRAMethodConfig = self.config
        names = resolve_targets(model, cfg.target_modules)
        return apply_lora(model, names, cfg.r, cfg.alpha, cfg.dropout, default_modules_to_save(model))

    def finalize(self, model: nn.Module) -> nn.Module:
        """Fold B A into W (`merge_and_unload`): the deployed model is the dense original architecture."""
        return model.merge_and_unload()
