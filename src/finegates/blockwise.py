"""Losses over (tokens x vocabulary) logits, a few rows at a time, with closed-form gradients.

A causal LM's logits are large (SmolLM2 in `posttrain`: 1,024 x 49,152 per step, 200 MB in float32). As
plain tensor ops, a softmax loss upcasts them, makes several passes over tensors of that size in each
direction and keeps float32 log-softmaxes for the backward pass. These functions take a block of rows at
a time (~2 MB of float32 on CPU, so every pass stays in cache), sum the loss in float32, and form the
gradient in the same loop: autograd keeps one tensor the size of the logits, in their dtype.

- `BlockwiseKL`: T^2 * sum_rows w_row * KL(softmax(t / T) || softmax(s / T)); d/ds = T * w_row * (p_s - p_t).
- `BlockwiseCrossEntropy`: sum_rows w_row * -log softmax(z)[y]; d/dz = w_row * (softmax(z) - onehot(y)).
- `blockwise_causal_lm_loss`: transformers' `ForCausalLMLoss` (shifted labels, ignore_index, mean over the
  labelled tokens or sum / num_items_in_batch) on `BlockwiseCrossEntropy`; `causal_lm_loss` takes it for
  low-precision logits (bf16 autocast), and `use_blockwise_lm_loss(model)` sets that as a model's
  `loss_function`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

# Elements of float32 a block holds: about 2 MB on CPU; on GPUs, where each block is a kernel launch, more.
_BLOCK_ELEMENTS = {"cpu": 1 << 19}
_GPU_BLOCK_ELEMENTS = 1 << 26


def row_block(logits: torch.Tensor) -> int:
    """Rows of `logits` (rows, vocab) one block takes."""
    elements = _BLOCK_ELEMENTS.get(logits.device.type, _GPU_BLOCK_ELEMENTS)
    return max(1, elements // max(logits.shape[-1], 1))


class BlockwiseKL(torch.autograd.Function):
    """`apply(student, teacher, weights, temperature)`: (rows, vocab) logits, (rows,) float32 weights;
    returns T^2 * sum_rows weights * KL(teacher || student) as a float32 scalar. No gradient to the
    teacher."""

    @staticmethod
    def forward(ctx, student, teacher, weights, temperature):
        block = row_block(student)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, len(student), block):
            end = start + block
            log_s = torch.log_softmax(student[start:end].float() / temperature, dim=-1)
            log_t = torch.log_softmax(teacher[start:end].float() / temperature, dim=-1)
            p_t = log_t.exp()
            w = weights[start:end]
            total += ((p_t * (log_t - log_s)).sum(-1) * w).sum()
            if grad is not None:
                grad[start:end] = log_s.exp_().sub_(p_t).mul_((w * temperature)[:, None])
        ctx.save_for_backward(grad)
        return total * temperature**2

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


class BlockwiseCrossEntropy(torch.autograd.Function):
    """`apply(logits, targets, weights)`: (rows, vocab) logits, (rows,) class indices (any value where the
    weight is 0), (rows,) float32 weights; returns sum_rows weights * -log softmax(logits)[target] as a
    float32 scalar."""

    @staticmethod
    def forward(ctx, logits, targets, weights):
        block = row_block(logits)
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, len(logits), block):
            end = start + block
            log_p = torch.log_softmax(logits[start:end].float(), dim=-1)
            w = weights[start:end]
            picked = log_p.gather(-1, targets[start:end, None]).squeeze(-1)
            total -= (picked * w).sum()
            if grad is not None:
                rows = log_p.exp_().mul_(w[:, None])
                rows.scatter_add_(-1, targets[start:end, None], -w[:, None])
                grad[start:end] = rows
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def reference_logit_kl(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, temperature: float = 1.0
) -> torch.Tensor:
    """`finegates.distill.logit_kl` as plain autograd ops over the whole logits (float32 log-softmaxes, the
    elementwise KL): what the block-wise version is checked and timed against."""
    log_s = torch.log_softmax(student.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    rows = nn.functional.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1) * temperature**2
    if rows.dim() == 1 or mask is None:
        return rows.mean()
    return (rows * mask).sum() / mask.sum().clamp_min(1.0)


def blockwise_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss`, the same value and gradient, block by block, whatever the logits'
    dtype: token t predicts label t + 1 (or `shift_labels`), labels equal to `ignore_index` count for
    nothing, and the sum is divided by the labelled tokens or by `num_items_in_batch` where the Trainer
    passes it."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(logits.device)
    keep = targets != ignore_index
    weights = keep.float()
    if num_items_in_batch is None:
        weights = weights / keep.sum().float()  # the mean over labelled tokens (nan with none, as torch's)
    else:
        weights = weights / torch.as_tensor(num_items_in_batch, device=logits.device).float()
    rows = logits.reshape(-1, vocab_size)
    return BlockwiseCrossEntropy.apply(rows, torch.where(keep, targets, 0), weights)


def causal_lm_loss(logits: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The causal-LM loss a model trains with: `blockwise_causal_lm_loss` for low-precision logits (bf16
    autocast), whose plain loss upcasts them; float32 logits go to `ForCausalLMLoss` itself (block-wise is
    no faster there, BENCHMARKS.md). The arguments are `ForCausalLMLoss`'s."""
    if logits.dtype == torch.float32:
        return ForCausalLMLoss(logits, *args, **kwargs)
    return blockwise_causal_lm_loss(logits, *args, **kwargs)


def use_blockwise_lm_loss(model: nn.Module) -> nn.Module:
    """Set `causal_lm_loss` as the loss of a transformers causal LM (the same loss, computed block by block);
    other models are returned unchanged."""
    if getattr(model, "loss_type", None) == "ForCausalLM" or type(model).__name__.endswith("ForCausalLM"):
        model.loss_function = causal_lm_loss
    return model
