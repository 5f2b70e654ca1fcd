"""SquareHead's distillation loss: logit KL plus per-layer normalized L2 of hidden states.

    L = KL(p_teacher || p_student) + sum_l ||h_s^l - h_t^l||^2 / ||h_t^l||^2

with both terms over non-padding tokens (classification logits: over examples). Normalizing each
layer by the teacher's energy keeps layers of different scale equally weighted, which is what lets
SquareHead recover accuracy at high sparsity. Shared by `squarehead` and `finegates+kd`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def token_mask(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(batch, seq) float mask of real tokens; all ones when there is no attention mask."""
    if attention_mask is None:
        return like.new_ones(like.shape[:2])
    return attention_mask.to(like.dtype)


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, temperature: float = 1.0
             ) -> torch.Tensor:
    """KL(teacher || student) per token (3-d logits) or per example (2-d), averaged over real tokens."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_item = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1) * temperature**2
    if per_item.dim() == 1 or mask is None:
        return per_item.mean()
    mask = mask.to(per_item.dtype)
    return (per_item * mask).sum() / mask.sum().clamp_min(1.0)


def feature_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor
                 ) -> torch.Tensor:
    """Sum over layer outputs (the embedding output excluded) of ||h_s - h_t||^2 / ||h_t||^2 on real tokens."""
    if len(student) != len(teacher):
        raise ValueError(f"Student has {len(student)} hidden states, teacher {len(teacher)}: same depth needed.")
    weights = mask[..., None].float()
    terms = []
    for h_s, h_t in zip(student[1:], teacher[1:]):
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
) -> torch.Tensor:
    """The distillation terms added to the task loss; both outputs need `output_hidden_states=True`.

    >>> extra = squarehead_loss(student(**batch, output_hidden_states=True),
    ...                         teacher(**batch, output_hidden_states=True), batch["attention_mask"])  # doctest: +SKIP
    """
    logits = student_outputs.logits
    mask = token_mask(attention_mask, logits if logits.dim() == 3 else student_outputs.hidden_states[-1])
    kl = logit_kl(logits, teacher_outputs.logits.detach(), mask if logits.dim() == 3 else None, temperature)
    teacher_states = tuple(h.detach() for h in teacher_outputs.hidden_states)
    return kl_weight * kl + feature_weight * feature_loss(student_outputs.hidden_states, teacher_states, mask)
