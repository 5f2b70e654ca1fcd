"""`magnitude` and `importance`: one-shot structured pruning at the FineGates budget, with or without
LoRA recovery.

Rows and columns are scored by weight norm, or, given calibration batches, by activation-weighted norm
(as in Wanda), or by mean activation magnitude (`importance`, Minitron-style: a column by the mean
|input| of its feature, so residual channels by the normalised hidden state and FFN channels by the
activation that down reads; a row by the mean |output|, so heads' dims by what they write). The scores
become the gates' distances from closing, and `finalize_gates` closes
the lowest-scored gates until the exact removable fraction (coupling included) reaches the target.
The result is an ordinary gated model, so reporting and compaction are those of FineGates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from finegates.baselines.base import BaseMethod, Batch, MethodConfig
from finegates.baselines.lora import apply_lora, merge_lora_layers
from finegates.baselines.structured import compact, structured_removed, unwrap
from finegates.config import GatesConfig
from finegates.gates import Gate, gate_margin
from finegates.layer import GatedLinear, weight_out_in
from finegates.model import CONTROLLER_ATTR, gated_layers, get_gated_model, is_gated
from finegates.optim import finalize_gates
from finegates.report import SparsityReport, sparsity_report

logger = logging.getLogger(__name__)

# Margins far from the closing point keep kept gates at exactly 1 and closed gates at exactly 0.
_OPEN_MARGIN, _FROZEN_MARGIN = 5.0, 20.0


SCORES = ("weight", "activation", "mean_activation")


@dataclass
class MagnitudeConfig(MethodConfig):
    target_sparsity: float = field(
        default=0.3, metadata={"help": "Fraction of gated-layer parameters removed."}
    )
    score: str = field(
        default="weight",
        metadata={
            "help": "'weight' (row/column L2 norms), 'activation' (activation-weighted norms) or "
            "'mean_activation' (Minitron-style mean |activation|); the last two need calibration."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Layers to prune; None: FineGates' defaults for the model type."}
    )
    bias: str = field(
        default="gated", metadata={"help": "Biases that train, as GatesConfig.bias ('none', 'gated', 'all')."}
    )
    recovery: bool = field(default=False, metadata={"help": "Train a LoRA adapter after pruning."})
    lora_r: int = field(default=8, metadata={"help": "Rank of the recovery LoRA."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Alpha of the recovery LoRA."})
    compact: bool = field(default=True, metadata={"help": "Physically compact the model in `finalize`."})

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {list(SCORES)}, got {self.score!r}.")


def _calibrate(model: nn.Module, calibration: Iterable[Batch], record) -> None:
    """Run the calibration batches with `record(name, inputs, outputs)` hooked on every gated layer, each a
    (tokens, features) float matrix of the batch's real tokens (padding left out)."""
    real: dict[str, torch.Tensor | None] = {"mask": None}

    def tokens(t: torch.Tensor) -> torch.Tensor:
        flat = t.detach().reshape(-1, t.shape[-1]).float()
        mask = real["mask"]
        return flat[mask] if mask is not None and len(mask) == len(flat) else flat

    def hook(name: str):  # a moved FFN activation runs inside the layer: its output is the layer's input
        return lambda layer, args, output: record(name, tokens(layer.layer_input(args[0])), tokens(output))

    handles = [layer.register_forward_hook(hook(n)) for n, layer in gated_layers(model).items()]
    try:
        with torch.no_grad():
            for batch in calibration:
                mask = batch.get("attention_mask")
                real["mask"] = None if mask is None else mask.reshape(-1).bool()
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()


def input_norms(model: nn.Module, calibration: Iterable[Batch]) -> dict[str, torch.Tensor]:
    """Per gated layer, the L2 norm over calibration tokens of each input feature."""
    sums: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor, _: torch.Tensor) -> None:
        sums[name] = sums.get(name, 0) + (x**2).sum(0)

    _calibrate(model, calibration, record)
    return {name: total.sqrt() for name, total in sums.items()}


def mean_activations(
    model: nn.Module, calibration: Iterable[Batch]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per gated layer, (mean |output| per row, mean |input| per column) over the calibration tokens."""
    sums: dict[str, list] = {}

    def record(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        total = sums.setdefault(name, [0, 0, 0])
        total[0], total[1], total[2] = total[0] + y.abs().sum(0), total[1] + x.abs().sum(0), total[2] + len(x)

    _calibrate(model, calibration, record)
    return {name: (rows / count, cols / count) for name, (rows, cols, count) in sums.items()}


def row_col_scores(layer: GatedLinear, act: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row score ||W_i * a||, column score ||W_:j|| a_j (a = 1 without calibration), each / its layer mean.

    Dividing by the layer mean makes scores comparable across layers of different scale.
    """
    weight = weight_out_in(layer.base_layer).detach().float()
    act = torch.ones(weight.shape[1], device=weight.device) if act is None else act.to(weight.device)
    rows = (weight * act[None, :]).norm(dim=1)
    cols = weight.norm(dim=0) * act
    return rows / rows.mean().clamp_min(1e-12), cols / cols.mean().clamp_min(1e-12)


def set_margin(gate: Gate, margin: torch.Tensor) -> None:
    """Move a gate's parameter so its distance from closing is `margin` (works for every gate family)."""
    with torch.no_grad():
        for param in gate.parameters():
            param.add_(margin.to(param.dtype) - gate_margin(gate))


def prune_to_budget(
    model: nn.Module,
    target: float,
    act: dict[str, torch.Tensor] | None = None,
    means: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> float:
    """Close the lowest-scored rows/columns of a gated model until `target` is removed; returns the fraction.

    Scores: `means` (mean activations per row and column) when given, else weight norms weighted by `act`.
    """
    for name, layer in gated_layers(model).items():
        if means is not None:
            rows, cols = (m / m.mean().clamp_min(1e-12) for m in means[name])
        else:
            rows, cols = row_col_scores(layer, None if act is None else act.get(name))
        set_margin(layer.row_gate, _OPEN_MARGIN + rows)
        set_margin(layer.col_gate, _OPEN_MARGIN + cols)
    return finalize_gates(model, target)


def freeze_gates(model: nn.Module) -> None:
    """Gates stop training and stop sampling: closed ones stay exactly 0, open ones exactly 1."""
    for layer in gated_layers(model).values():
        for gate in layer.gates().values():
            closed = gate.closed()
            set_margin(gate, torch.where(closed, -_FROZEN_MARGIN, _FROZEN_MARGIN))
            gate.requires_grad_(False)
            if hasattr(gate, "noise_std"):
                gate.noise_std = 0.0


class MagnitudePruning(BaseMethod):
    """One-shot structured pruning; trains only the head and gated biases (plus LoRA with `recovery`)."""

    name = "magnitude"
    kind_of_sparsity = "structured"
    default_lr = 1e-3
    config_class = MagnitudeConfig

    def __init__(self) -> None:
        super().__init__()
        self.removed = 0
        self.report: SparsityReport | None = None  # of the pruned model, before any LoRA

    def _prepare(self, model: nn.Module, calibration: Iterable[Batch] | None) -> nn.Module:
        cfg: MagnitudeConfig = self.config
        budget, modules = cfg.target_sparsity, cfg.target_modules
        get_gated_model(model, GatesConfig(target_sparsity=budget, target_modules=modules, bias=cfg.bias))
        was_training = model.training
        model.eval()  # calibration sees deterministic, fully open gates
        act = means = None
        if cfg.score != "weight" and calibration is None:
            raise ValueError(f"score={cfg.score!r} needs calibration batches.")
        if cfg.score == "activation":
            act = input_norms(model, calibration)
        elif cfg.score == "mean_activation":
            means = mean_activations(model, calibration)
        achieved = prune_to_budget(model, cfg.target_sparsity, act, means)
        logger.info(
            "magnitude pruning (%s scores): removed %.4f (target %.4f)",
            cfg.score,
            achieved,
            cfg.target_sparsity,
        )
        freeze_gates(model)
        getattr(model, CONTROLLER_ATTR).requires_grad_(False)  # no sparsity loss: the budget is already met
        model.train(was_training)
        self.report = sparsity_report(model)  # frozen gates: the structure no longer changes
        self.removed = self.report.model_removed
        if cfg.recovery:
            model = self._add_lora(model)
        return model

    def _add_lora(self, model: nn.Module) -> nn.Module:
        """LoRA inside the gates (on each gated layer's base), so closed rows/columns stay removable."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        names = [f"{n}.base_layer" for n in gated_layers(model)]
        model = apply_lora(model, names, self.config.lora_r, self.config.lora_alpha)
        for param in trainable:  # peft froze them; head and gated biases train as without recovery
            param.requires_grad_(True)
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        if self.config.recovery:
            model = merge_lora_layers(model)
        return compact(model) if self.config.compact else model

    def removed_parameters(self, model: nn.Module) -> int:
        return self.removed if is_gated(unwrap(model)) else structured_removed(model, self.dense_params)


@dataclass
class MagnitudeLoRAConfig(MagnitudeConfig):
    recovery: bool = field(default=True, metadata={"help": "Train a LoRA adapter after pruning."})


class MagnitudeLoRA(MagnitudePruning):
    """`magnitude+lora`: the same pruning followed by a short LoRA recovery, merged before compaction."""

    name = "magnitude+lora"
    default_lr = 5e-4
    config_class = MagnitudeLoRAConfig


@dataclass
class ImportanceConfig(MagnitudeConfig):
    score: str = field(
        default="mean_activation", metadata={"help": "Scores: 'mean_activation' (Minitron-style)."}
    )


@dataclass
class ImportanceLoRAConfig(ImportanceConfig):
    recovery: bool = field(default=True, metadata={"help": "Train a LoRA adapter after pruning."})


class ActivationImportance(MagnitudePruning):
    """`importance`: rows and columns ranked by mean activation magnitude on calibration batches
    (Minitron-style), cut to the budget with FineGates' coupling and compaction."""

    name = "importance"
    config_class = ImportanceConfig


class ActivationImportanceLoRA(MagnitudeLoRA):
    """`importance+lora`: the same cut followed by a LoRA recovery, merged before compaction."""

    name = "importance+lora"
    config_class = ImportanceLoRAConfig
