"""Block-wise losses over large logits: the same values and gradients as the plain formulas."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from conftest import tiny_model
from finegates.blockwise import blockwise_causal_lm_loss, causal_lm_loss, use_blockwise_lm_loss


def _grad_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    return 1e-7 if dtype == torch.float32 else 1e-2 * float(reference.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("count", ["mean", "num_items", "shift_labels"])
def test_causal_lm_loss_is_transformers_loss(dtype, count):
    """Value and gradient equal `ForCausalLMLoss` over several row blocks (a 70,001-wide vocabulary: blocks
    of 7 rows), with ignored labels, for the mean, the Trainer's num_items_in_batch and given shift_labels;
    `causal_lm_loss`, what a model trains with, takes it for low-precision logits."""
    torch.manual_seed(0)
    vocab = 70_001
    logits = (torch.randn(3, 6, vocab) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (3, 6))
    labels[0, :2] = -100  # padding
    kwargs = {}
    if count == "num_items":
        kwargs["num_items_in_batch"] = torch.tensor(11)
    if count == "shift_labels":
        kwargs["shift_labels"] = torch.roll(labels, -1, dims=1)
    reference = ForCausalLMLoss(logits, labels, vocab, **kwargs)
    (reference_grad,) = torch.autograd.grad(reference, logits)
    loss = blockwise_causal_lm_loss(logits, labels, vocab, **kwargs)
    (grad,) = torch.autograd.grad(loss, logits)
    if dtype != torch.float32:
        assert torch.equal(causal_lm_loss(logits, labels, vocab, **kwargs), loss)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert grad.dtype == dtype
    tol = _grad_tolerance(dtype, reference_grad)
    torch.testing.assert_close(grad.float(), reference_grad.float(), rtol=1e-3, atol=tol)


def test_a_causal_lm_trains_the_same_with_the_blockwise_loss():
    """A tiny LLaMA under bf16 autocast (bfloat16 logits, the block-wise path): same loss and gradients."""
    torch.manual_seed(0)
    plain = tiny_model("llama").train()
    blockwise = use_blockwise_lm_loss(tiny_model("llama").train())
    assert blockwise.loss_function is causal_lm_loss
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    losses = []
    for model in (plain, blockwise):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(input_ids=ids, labels=ids)
        assert outputs.logits.dtype == torch.bfloat16
        outputs.loss.backward()
        losses.append(outputs.loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), blockwise.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-2, atol=1e-4, msg=name)


def test_other_models_keep_their_loss():
    model = tiny_model("bert")
    before = model.loss_function
    assert use_blockwise_lm_loss(model).loss_function is before
