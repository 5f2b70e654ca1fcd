"""Distillation: SquareHead's loss (logit KL plus per-layer normalized L2 of hidden states), and
self-distillation of a gated model from its own frozen weights with the gates bypassed.

    L = KL(p_teacher || p_student) + sum_l ||h_s^l - h_t^l||^2 / ||h_t^l||^2

with both terms over non-padding tokens (classification logits: over examples). Normalizing each
layer by the teacher's energy keeps layers of different scale equally weighted, which is what lets
SquareHead recover accuracy at high sparsity. Shared by `squarehead`, `finegates+kd` and `--distill`.

The gated model's teacher (`DistillConfig`, used by FineGatesTrainer, and by MethodTrainer for the
recovered one-shot baselines) needs no second copy of the model: the same frozen weights, with every
GatedLinear bypassed (and LoRA adapters off), run once more under no_grad.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from finegates.blockwise import BlockwiseKL
from finegates.layer import GatedLinear
from finegates.model import set_head_counts
from finegates.ties import RuntimeGates


def token_mask(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(batch, seq) float mask of real tokens; all ones when there is no attention mask."""
    if attention_mask is None:
        return like.new_ones(like.shape[:2])
    return attention_mask.to(like.dtype)


def logit_kl(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) per token (3-d logits) or per example (2-d), averaged over real tokens
    (x T^2). The teacher's logits get no gradient."""
    flat_s, flat_t = student.flatten(0, -2), teacher.detach().flatten(0, -2)
    if student.dim() == 2 or mask is None:
        weights = torch.full((len(flat_s),), 1 / max(len(flat_s), 1), device=student.device)
    else:
        weights = mask.reshape(-1).float()
        weights = weights / weights.sum().clamp_min(1.0)
    return BlockwiseKL.apply(flat_s, flat_t, weights, float(temperature))


def feature_loss(
    student: tuple[torch.Tensor, ...],
    teacher: tuple[torch.Tensor, ...],
    mask: torch.Tensor,
    stream_kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over layer outputs (the embedding output excluded) of ||h_s - h_t||^2 / ||h_t||^2 on real
    tokens. `stream_kept`: the dims a narrowed student stream carries (progressive compaction of the
    runtime structure); its states are compared at the full width, zeros at the other dims."""
    if len(student) != len(teacher):
        raise ValueError(
            f"Student has {len(student)} hidden states, teacher {len(teacher)}: same depth needed."
        )
    weights = mask[..., None].float()
    terms = []
    for h_s, h_t in zip(student[1:], teacher[1:]):
        if stream_kept is not None and h_s.shape[-1] != h_t.shape[-1]:
            h_s = h_s.new_zeros(h_t.shape).index_copy(-1, stream_kept, h_s)
        diff = ((h_s.float() - h_t.float()) ** 2 * weights).sum()
        terms.append(diff / ((h_t.float() ** 2) * weights).sum().clamp_min(1e-12))
    return torch.stack(terms).sum()


def squarehead_loss(
    student_outputs: Any,
    teacher_outputs: Any,
    attention_mask: torch.Tensor | None = None,
    kl_weight: float = 1.0,
    feature_weight: float = 1.0,
    temperature: float = 1.0,
    stream_kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distillation terms added to the task loss; with `feature_weight` > 0 both outputs need
    `output_hidden_states=True` (`stream_kept`: see `feature_loss`).

    >>> extra = squarehead_loss(student(**batch, output_hidden_states=True),  # doctest: +SKIP
    ...                         teacher(**batch, output_hidden_states=True), batch["attention_mask"])
    """
    logits = student_outputs.logits
    mask = token_mask(attention_mask, logits) if logits.dim() == 3 else None
    loss = kl_weight * logit_kl(logits, teacher_outputs.logits.detach(), mask, temperature)
    if feature_weight == 0:  # logits only: the outputs need no hidden states
        return loss
    states = student_outputs.hidden_states
    hidden_mask = mask if mask is not None else token_mask(attention_mask, states[-1])
    teacher_states = tuple(h.detach() for h in teacher_outputs.hidden_states)
    return loss + feature_weight * feature_loss(states, teacher_states, hidden_mask, stream_kept)


@dataclass
class DistillConfig:
    """Distillation of a gated model from its own frozen weights with the gates bypassed."""

    distill: bool = field(
        default=False,
        metadata={
            "help": "Add distillation from the same frozen weights with the gates bypassed (no second "
            "model copy): logit KL, and optionally SquareHead's hidden-state L2."
        },
    )
    distill_temperature: float = field(default=2.0, metadata={"help": "Temperature of the logit KL (x T^2)."})
    distill_logit_weight: float = field(default=1.0, metadata={"help": "Weight of the logit KL term."})
    distill_hidden_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of SquareHead's per-layer ||h_s - h_t||^2 / ||h_t||^2 term (0: logits only)."
        },
    )

    def __post_init__(self) -> None:
        for name in ("distill_temperature", "distill_logit_weight", "distill_hidden_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "distill_temperature" and value == 0):
                raise ValueError(f"{name} must be a finite number >= 0 (temperature > 0), got {value}.")
        if self.distill and self.distill_logit_weight == 0 and self.distill_hidden_weight == 0:
            raise ValueError(
                "--distill with both distill weights 0 adds nothing; give one of them a weight > 0."
            )


@contextmanager
def gates_bypassed(model: nn.Module) -> Iterator[nn.Module]:
    """Every GatedLinear of `model` (and the runtime structure's stream mask) runs without its gates inside
    the block: the dense model."""
    switches = [m for m in model.modules() if isinstance(m, (GatedLinear, RuntimeGates))]
    if not any(isinstance(m, GatedLinear) for m in switches):
        raise ValueError(
            "Distillation from the bypassed gates needs a gated model: call get_gated_model first."
        )
    states = [switch.enabled for switch in switches]
    try:
        for switch in switches:
            switch.enabled = False
        set_head_counts(model, gated=False)
        yield model
    finally:
        for switch, state in zip(switches, states):
            switch.enabled = state
        set_head_counts(model, gated=all(s for m, s in zip(switches, states) if isinstance(m, GatedLinear)))


def teacher_outputs(model: nn.Module, inputs: dict[str, Any], cfg: DistillConfig) -> Any:
    """The dense model's outputs on `inputs`: the same weights, gates bypassed and a peft model's
    adapters off (the recovered baselines' LoRA inside frozen gates), in eval mode (no dropout), no graph
    kept."""
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    training = model.training
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    try:
        with torch.no_grad(), gates_bypassed(model), adapters_off:
            return model.eval()(**inputs, output_hidden_states=cfg.distill_hidden_weight > 0)
    finally:
        model.train(training)


def teacher_and_student_inputs(
    model: nn.Module, inputs: dict[str, Any], cfg: DistillConfig
) -> tuple[Any, dict[str, Any]]:
    """One training batch's teacher outputs (`teacher_outputs`) and the inputs the student then runs on:
    asking for its hidden states where the loss compares them."""
    teacher = teacher_outputs(model, inputs, cfg)
    if cfg.distill_hidden_weight > 0:
        inputs = {**inputs, "output_hidden_states": True}
    return teacher, inputs


def distill_loss(
    student: Any,
    teacher: Any,
    attention_mask: torch.Tensor | None,
    cfg: DistillConfig,
    stream_kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted logit KL (and hidden-state L2) of the student's outputs against the teacher's
    (`stream_kept`: see `feature_loss`)."""
    return squarehead_loss(
        student,
        teacher,
        attention_mask,
        cfg.distill_logit_weight,
        cfg.distill_hidden_weight,
        cfg.distill_temperature,
        stream_kept,
    )
