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
