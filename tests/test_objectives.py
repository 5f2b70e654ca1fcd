"""Sparsity objectives: the paper loss by hand, and the budget objective landing on its target."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import finegates
from conftest import is_causal, tiny_model
from finegates import GatesConfig, get_gated_model, optimizer_param_groups, sparsity_loss, sparsity_report


def test_paper_objective_matches_a_hand_computation():
    cfg = GatesConfig(objective="paper", target_sparsity=0.4, lambda_sparsity=50.0)
    model = get_gated_model(tiny_model("bert"), cfg)
    normal = torch.distributions.Normal(0.0, 1.0)
    terms = []
    for layer in finegates.gated_layers(model).values():
        p_rows = normal.cdf((torch.tanh(layer.row_gate.theta) + 0.5) / 0.5)
        p_cols = normal.cdf((torch.tanh(layer.col_gate.theta) + 0.5) / 0.5)
        terms.append(((p_rows.mean() - 0.6).abs() + (p_cols.mean() - 0.6).abs()) / 2)
    expected = 50.0 * sum(terms) / len(terms)
    torch.testing.assert_close(sparsity_loss(model), expected)


def test_paper_loss_of_one_layer_by_numbers():
    model = get_gated_model(
        tiny_model("bert"),
        GatesConfig(objective="paper", target_sparsity=0.5, target_modules=["layer.0.attention.self.query"]),
    )
    layer = model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.row_gate.theta.fill_(0.0)  # P = Phi(1) for every row
        layer.col_gate.theta.fill_(math.atanh(-0.5))  # P = Phi(0) = 0.5 for every column
    phi1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert sparsity_loss(model).item() == pytest.approx(50.0 * (abs(phi1 - 0.5) + 0.0) / 2, rel=1e-5)


def _small_model(name: str) -> torch.nn.Module:
    """Twice the fixture's width: at hidden size 32 a single gate can carry 5% of the parameters (a whole
    head's last dim), coarser than the 0.02 band the step response is held to."""
    torch.manual_seed(0)
    sizes = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 99,
    }
    if name == "bert":
        return BertForSequenceClassification(BertConfig(**sizes, num_labels=3))
    return LlamaForCausalLM(LlamaConfig(**sizes, num_key_value_heads=2))


def _step_response(
    name: str, target: float, steps: int, **gates
) -> tuple[list[tuple[float, float]], int, torch.nn.Module]:
    """Train a tiny model to `target` with the budget attached to the optimizer, as FineGatesTrainer
    does; returns (warmed-up target, exact removed fraction) after every step, the warm-up and the model."""
    model = get_gated_model(_small_model(name), GatesConfig(target_sparsity=target, **gates))
    finegates.set_training_steps(model, steps)
    model.train()
    optimizer = torch.optim.AdamW(optimizer_param_groups(model))
    finegates.attach_budget(optimizer, model)
    ctrl, gen, trace = model.finegates_controller, torch.Generator().manual_seed(1), []
    for _ in range(steps):
        ids = torch.randint(2, 99, (16, 12), generator=gen)
        labels = ids if is_causal(name) else (ids == 5).any(1).long()
        loss = model(input_ids=ids, labels=labels).loss + sparsity_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trace.append(
            (
                ctrl.target(target, model.finegates_config.warmup_steps),
                sparsity_report(model).removed_fraction,
            )
        )
    return trace, model.finegates_config.warmup_steps, model


@pytest.mark.parametrize("steps", [100, 400])
@pytest.mark.parametrize("target", [0.2, 0.5])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_removed_fraction_tracks_the_target_while_training(name, target, steps):
    """Step response of the controller: never more than 0.02 above the warmed-up target at any step,
    within 0.02 of the target from the end of the warm-up on. (Without the budget projection, the
    Lagrangian alone winds up while the gates travel and overshoots: see the next test.)"""
    trace, warmup, _ = _step_response(name, target, steps)
    overshoot = max(removed - warm for warm, removed in trace)
    settled = max(abs(removed - target) for warm, removed in trace[warmup:])
    assert overshoot <= 0.02 and settled <= 0.02, (overshoot, settled)


def test_the_warmup_fraction_sets_the_warmup():
    model = get_gated_model(tiny_model("bert"), GatesConfig(warmup_fraction=0.7))
    finegates.set_training_steps(model, 100)
    assert model.finegates_config.warmup_steps == 70
    with pytest.raises(ValueError, match="warmup_fraction must be in"):
        GatesConfig(warmup_fraction=0.0)


def test_the_lagrangian_alone_winds_up_where_the_projection_holds():
    """The failure the projection exists for, kept visible: on gates without task signal, the multipliers
    integrate the gap while the gates travel and the fraction overshoots far past the target."""
    trace, _, _ = _step_response("llama", 0.2, 100, budget_tolerance=None)
    assert max(removed for _, removed in trace) > 0.3


def test_finalize_moves_a_tracked_run_by_at_most_one_point():
    _, _, model = _step_response("bert", 0.4, 60)
    trained = sparsity_report(model.eval()).removed_fraction
    assert abs(finegates.finalize_gates(model) - trained) <= 0.01


def test_gates_stay_in_their_bounded_range():
    model = get_gated_model(tiny_model("bert"), GatesConfig(warmup_steps=4))
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.row_gate.theta.fill_(7.0)
    finegates.budget_step(model)
    bound = model.finegates_config.param_bound * math.atanh(0.5)
    assert max(
        float(g.theta.detach().abs().max()) for g in finegates.model.all_gates(model)
    ) == pytest.approx(bound)


def test_the_reference_gates_train_with_the_paper_loss():
    """GatesConfig.reference(): theta ~ N(1, 0.1), unbounded, the soft loss; budget_step neither bounds
    nor projects, and training moves the gates' open probabilities towards keep."""
    cfg = GatesConfig.reference(target_sparsity=0.5)
    model = get_gated_model(tiny_model("bert"), cfg)
    thetas = torch.cat([g.theta.detach() for g in finegates.model.all_gates(model)])
    assert abs(float(thetas.mean()) - 1.0) < 0.02 and abs(float(thetas.std()) - 0.1) < 0.02
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, gate_lr=0.05))
    model.train()
    first = float(sparsity_loss(model))
    for _ in range(20):
        optimizer.zero_grad()
        sparsity_loss(model).backward()
        optimizer.step()
        assert finegates.budget_step(model) is None
    assert float(sparsity_loss(model)) < first


def test_short_runs_get_a_faster_gate_lr_than_long_ones():
    short, long = (get_gated_model(tiny_model("bert"), GatesConfig()) for _ in range(2))
    finegates.set_training_steps(short, 60)
    finegates.set_training_steps(long, 6000)
    assert (short.finegates_config.warmup_steps, long.finegates_config.warmup_steps) == (18, 1800)
    # a gate pushed every step travels from its start to its closing point within the warm-up (>= 10 steps)
    travel = (2.0 + 1) * math.atanh(0.5)
    assert short.finegates_config.gate_lr == pytest.approx(travel / 18)
    assert long.finegates_config.gate_lr == pytest.approx(travel / 1800)


def test_a_warmup_longer_than_the_run_is_refused():
    model = get_gated_model(tiny_model("bert"), GatesConfig(warmup_steps=500))
    with pytest.raises(ValueError, match="longer than the run"):
        finegates.set_training_steps(model, 100)


def test_multipliers_rise_while_the_budget_is_missed():
    model = get_gated_model(
        tiny_model("bert"), GatesConfig(target_sparsity=0.5, warmup_steps=0, budget_tolerance=None)
    )
    optimizer = torch.optim.SGD(optimizer_param_groups(model, gate_lr=0.1), lr=0.1)
    sparsity_loss(model).backward()
    optimizer.step()
    # Sparsity 0 < target 0.5: ascent drives lambda1 negative (pushing sparsity up) and lambda2 up.
    ctrl = model.finegates_controller
    assert ctrl.lambda1.item() < 0 and ctrl.lambda2.item() > 0


def test_the_multipliers_hold_inside_the_dead_band():
    """Adam steps a parameter whose gradient is 0 on its moments; inside the dead band the multipliers'
    zero gradients are dropped, so they stay where they are."""
    from finegates.controller import SparsityController

    def run(hold: bool) -> list[float]:
        ctrl = SparsityController()
        optimizer = torch.optim.AdamW(ctrl.parameters(), lr=0.1, weight_decay=0.0)
        values = []
        for sparsity in [0.0] * 5 + [0.305] * 5:  # missed for 5 steps, then inside the band
            optimizer.zero_grad()
            ctrl.penalty(torch.tensor(sparsity), 0.3, deadband=0.01).backward()
            if hold:
                ctrl.hold_in_band()
            optimizer.step()
            values.append(ctrl.lambda1.item())
        return values

    held, coasting = run(True), run(False)
    assert held[0] < 0 and held[5:] == [held[4]] * 5
    assert coasting[-1] < coasting[4]  # without the hold, the moments carry it on


def test_a_multiplier_reset_also_resets_its_momentum():
    model = get_gated_model(tiny_model("bert"), GatesConfig(target_sparsity=0.3, warmup_steps=0))
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, gate_lr=0.1))
    sparsity_loss(model, step=1).backward()
    optimizer.step()
    ctrl = model.finegates_controller
    with torch.no_grad():
        ctrl.lambda1.fill_(1.0)  # pushing gates open while the budget is missed
    assert optimizer.state[ctrl.lambda1]["exp_avg"].abs().item() > 0
    projection = finegates.budget_step(model, 1, optimizer)
    assert projection.closed > 0 and ctrl.lambda1.item() == 0.0
    assert optimizer.state[ctrl.lambda1]["exp_avg"].item() == 0.0


def test_target_warms_up_linearly():
    model = get_gated_model(tiny_model("bert"), GatesConfig(target_sparsity=0.4, warmup_steps=10))
    ctrl = model.finegates_controller
    assert [ctrl.target(0.4, 10, s) for s in (0, 5, 10, 20)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    model.train()
    sparsity_loss(model)
    sparsity_loss(model)
    assert int(ctrl.step) == 2


@pytest.mark.parametrize("target", [0.25, 0.5])
def test_finalize_gates_reaches_the_target_from_either_side(target):
    model = get_gated_model(tiny_model("llama"), GatesConfig(target_sparsity=target))
    gen = torch.Generator().manual_seed(3)
    for layer in finegates.gated_layers(model).values():
        for gate in layer.gates().values():
            with torch.no_grad():
                gate.theta.copy_(torch.randn(gate.theta.shape, generator=gen) * 1.5)
    before = sparsity_report(model).removed_fraction
    achieved = finegates.finalize_gates(model)
    assert achieved == sparsity_report(model).removed_fraction
    assert target <= achieved <= target + 0.01, (before, achieved)


def test_expected_sparsity_equals_the_exact_fraction_for_binary_gates():
    model = get_gated_model(tiny_model("bert"), GatesConfig(budget_estimator="ste"))
    gen = torch.Generator().manual_seed(0)
    for layer in finegates.gated_layers(model).values():
        for gate in layer.gates().values():
            with torch.no_grad():
                closed = torch.rand(gate.theta.shape, generator=gen) < 0.2
                gate.theta.copy_(torch.where(closed, -0.8, 0.8))  # inside the bounded range
    value = finegates.expected_sparsity(model)
    assert value.item() == pytest.approx(sparsity_report(model).removed_fraction)
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_gating_and_the_run_schedule_leave_the_callers_config_alone():
    """One config for two models and two run lengths: each model gets its own copy to fill in."""
    cfg = GatesConfig()
    bert = get_gated_model(tiny_model("bert"), cfg)
    roberta = get_gated_model(tiny_model("roberta"), cfg)  # BERT's modules_to_save would not fit RoBERTa
    finegates.set_training_steps(bert, 60)
    finegates.set_training_steps(roberta, 6000)
    assert (cfg.modules_to_save, cfg.warmup_steps, cfg.gate_lr) == (None, None, None)
    assert (bert.finegates_config.warmup_steps, roberta.finegates_config.warmup_steps) == (18, 1800)


@pytest.mark.parametrize("structure", ["fine", "runtime"])
def test_the_plan_is_built_once_per_set_of_closed_gates(structure, monkeypatch):
    """One plan serves the objective, the projection and the log while the same gates are closed: an
    optimizer step that closes nothing reuses it; any change of which gates are closed (a step, a
    projection, a loaded state, an edit through .data) builds anew."""
    from finegates import plan as plan_module
    from finegates.budget import budget_step
    from finegates.gates import force_gates
    from finegates.model import all_gates
    from finegates.trainer import budget_logs

    built = []
    build = plan_module._build_plan
    monkeypatch.setattr(plan_module, "_build_plan", lambda model: built.append(1) or build(model))
    cfg = GatesConfig(target_sparsity=0.3, warmup_steps=2, gate_lr=0.5, structure=structure)
    model = get_gated_model(tiny_model("llama"), cfg).train()
    first = plan_module.compaction_plan(model)
    sparsity_loss(model, step=0).backward()
    budget_logs(model, 0)
    assert sparsity_report(model) is not None and len(built) == 1
    assert plan_module.compaction_plan(model) is first

    gates = all_gates(model)
    optimizer = torch.optim.SGD([p for g in gates for p in g.parameters()], lr=1e-3)
    optimizer.step()  # every gate moves, none closes
    assert not any(bool(g.closed().any()) for g in gates)
    assert plan_module.compaction_plan(model) is first and len(built) == 1
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        gates[0].param.data[:2] = -10.0  # .data does not bump the version counter: compared by value
    closed = plan_module.compaction_plan(model)
    assert len(built) == 2 and closed is not first
    fresh = build(model)  # what the cached plan must say
    assert all(torch.equal(closed.modules[n].rows, m.rows) for n, m in fresh.modules.items())
    assert all(torch.equal(closed.modules[n].cols, m.cols) for n, m in fresh.modules.items())
    model.load_state_dict(saved)
    assert plan_module.compaction_plan(model) is not closed and len(built) == 3
    force_gates(
        gates[-1],
        torch.ones_like(gates[-1].param, dtype=torch.bool),
        torch.zeros_like(gates[-1].param, dtype=torch.bool),
    )
    assert finegates.latency.budget_fraction(model) > 0 and len(built) == 4
    budget_step(model, 3)  # projects back into the band: new gates, new plans
    assert len(built) > 4


def test_an_explicit_gate_lr_is_the_one_the_budget_lands_gates_with():
    """The projection lands closed gates two gate steps past the closing point: two steps of the rate the
    optimizer runs them at, not of the config's."""
    from finegates.budget import _landing
    from finegates.gates import GATE_CLASSES
    from finegates.model import gates_config

    model = get_gated_model(tiny_model("llama"), GatesConfig(gate_lr=0.01, projection_margin=0.0))
    optimizer_param_groups(model, gate_lr=0.2)
    assert gates_config(model).gate_lr == 0.2
    edge = GATE_CLASSES[gates_config(model).gate_family].edge
    assert _landing(gates_config(model)) == pytest.approx(2 * 0.2 / edge)
