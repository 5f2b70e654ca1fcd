"""Self-distillation: the teacher is the gated model's own frozen weights with the gates bypassed."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_inputs, tiny_model
from finegates import GatesConfig, get_gated_model
from finegates.distill import DistillConfig, distill_loss, gates_bypassed, teacher_outputs


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_the_teacher_is_the_dense_model(name):
    dense = tiny_model(name)
    ids = tiny_inputs()
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
    model = get_gated_model(tiny_model(name), GatesConfig()).train()
    with torch.no_grad():
        for gate in (g for m in model.modules() if hasattr(m, "row_gate") for g in (m.row_gate, m.col_gate)):
            gate.theta.uniform_(-1.0, 1.0)  # a gated model far from the dense one
    teacher = teacher_outputs(model, {"input_ids": ids, "labels": ids}, DistillConfig(distill=True))
    torch.testing.assert_close(teacher.logits, expected, atol=0, rtol=0)
    assert not teacher.logits.requires_grad
    assert all(layer.enabled for layer in model.modules() if hasattr(layer, "enabled"))  # gates back on


def test_the_loss_is_zero_at_the_teacher_and_positive_away_from_it():
    model = get_gated_model(tiny_model("llama"), GatesConfig()).eval()
    ids = tiny_inputs()
    cfg = DistillConfig(distill=True, distill_hidden_weight=1.0)
    teacher = teacher_outputs(model, {"input_ids": ids}, cfg)
    student = model(input_ids=ids, output_hidden_states=True)  # all gates open: the dense model
    assert float(distill_loss(student, teacher, None, cfg).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.row_gate.theta[:10] = 0.0  # eval value 0.5: differentiable
    student = model(input_ids=ids, output_hidden_states=True)
    loss = distill_loss(student, teacher, None, cfg)
    assert float(loss) > 1e-4
    loss.backward()
    assert model.model.layers[0].mlp.up_proj.row_gate.theta.grad.abs().sum() > 0


def test_bypassing_an_ungated_model_is_refused():
    with pytest.raises(ValueError, match="needs a gated model"), gates_bypassed(tiny_model("bert")):
        pass


def test_distill_options_are_checked():
    with pytest.raises(ValueError, match="distill_temperature"):
        DistillConfig(distill=True, distill_temperature=0.0)
    with pytest.raises(ValueError, match="adds nothing"):
        DistillConfig(distill=True, distill_logit_weight=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 70_001), (4, 9), (2, 6, 11)])
@pytest.mark.parametrize("masked", [False, True])
def test_the_blockwise_logit_kl_is_the_plain_formula(dtype, shape, masked, monkeypatch):
    """Value and gradient of the row-block KL equal the plain autograd formula, for token logits (several
    row blocks: the 70,001-wide vocabulary gives blocks of 7 of the 15 rows) and example logits, with and
    without padding, in float32 and in bfloat16 (whose gradient leaves in bfloat16)."""
    from finegates.blockwise import reference_logit_kl
    from finegates.distill import logit_kl

    torch.manual_seed(0)
    student = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(shape) * 3).to(dtype)
    mask = None
    if masked and len(shape) == 3:
        mask = torch.ones(shape[:2])
        mask[0, -2:] = 0  # padding
    expected = reference_logit_kl(student, teacher, mask, 2.0)
    (expected_grad,) = torch.autograd.grad(expected, student)
    loss = logit_kl(student, teacher, mask, 2.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.dtype == dtype
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2 * float(expected_grad.abs().max())
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=1e-3, atol=tol)
    if mask is not None:
        assert float(grad[0, -2:].abs().max()) == 0.0  # padded tokens get no gradient
