"""`frozen_structure`: the budget's look-ups walk the module tree once per run, not every time."""

from __future__ import annotations

from unittest import mock

import torch

from conftest import tiny_model
from finegates import GatesConfig, get_gated_model
from finegates.coupling import find_blocks
from finegates.model import all_gates, gated_layers
from finegates.plan import compaction_plan
from finegates.structure import frozen_structure


def test_look_ups_inside_a_frozen_structure_walk_the_tree_once():
    model = get_gated_model(tiny_model("llama"), GatesConfig(structure="runtime"))
    outside = (gated_layers(model), find_blocks(model), all_gates(model))
    with mock.patch.object(type(model), "named_modules", wraps=model.named_modules) as walks:
        with frozen_structure(model):
            first = (gated_layers(model), find_blocks(model), all_gates(model))
            compaction_plan(model)
            with frozen_structure(model):  # re-entrant: the inner block keeps the outer one's look-ups
                again = (gated_layers(model), find_blocks(model), all_gates(model))
            assert all(a is b for a, b in zip(first, again))
            walked = walks.call_count
        assert walked == 2  # gated_layers and find_blocks, once each
        gated_layers(model)  # outside: walked again, nothing remembered
        assert walks.call_count == walked + 1
    assert first[0] == outside[0] and first[2] == outside[2]
    assert [b.name for b in first[1]] == [b.name for b in outside[1]]
    assert "_finegates_frozen_structure" not in model.__dict__


def test_the_trainer_holds_the_structure_frozen_for_its_run(tmp_path):
    from transformers import TrainerCallback

    from test_trainer import _trainer

    trainer = _trainer(tmp_path, max_steps=5)
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append("_finegates_frozen_structure" in trainer.model.__dict__)

    trainer.add_callback(Watch())
    trainer.train()
    assert seen == [True] * 5
    assert "_finegates_frozen_structure" not in trainer.model.__dict__  # let go once the run ends


def test_the_masks_of_ungated_layers_live_on_the_gated_ones_device():
    """A block with an ungated role (target_modules q and v only) mixes its ones with the gated masks: they
    must share a device (here `meta`, standing in for an accelerator)."""
    from conftest import tiny_model
    from finegates import GatesConfig, get_gated_model
    from finegates.plan import open_mask

    model = get_gated_model(tiny_model("llama"), GatesConfig(target_modules=["q_proj", "v_proj"])).to("meta")
    attention = model.model.layers[0].self_attn
    assert open_mask(attention.k_proj, "row").device == open_mask(attention.q_proj, "row").device


def test_the_expected_widths_of_binary_gates_are_the_plans(arch):
    """With 0/1 gates of the runtime structure the budget's differentiable count (`expected_widths`) keeps
    what compaction keeps: heads closed whole (a whole KV group where groups are pairs), channels and
    residual dims. (In the fine structure the plan pads partial heads to equal sizes, which the count
    leaves out.)"""
    structure = "runtime"
    from finegates.coupling import expected_widths, open_where
    from finegates.gates import force_gates
    from finegates.ties import runtime_gates

    torch.manual_seed(0)
    model = get_gated_model(tiny_model(arch), GatesConfig(structure=structure)).eval()
    ties = runtime_gates(model)
    # (a layer with every head closed keeps one zero head in the plan, a shape the count leaves out)
    head_gates = {id(b[k]) for b in ties.blocks for k in ("heads", "kv_heads") if k in b}
    gen = torch.Generator().manual_seed(3)
    for gate in all_gates(model):
        if getattr(gate, "source", None) is None and id(gate) not in head_gates:
            close = torch.rand(gate.param.shape, generator=gen) < 0.15
            force_gates(gate, close, torch.zeros_like(close))
    for block in ties.blocks:
        if "heads" in block:  # the first two heads of every layer: a whole KV group where groups are pairs
            close = torch.zeros_like(block["heads"].removed)
            close[:2] = True
            force_gates(block["heads"], close, torch.zeros_like(close))
    plan = compaction_plan(model)
    open_fn = open_where(lambda gate: gate.closed())
    for block in find_blocks(model):
        for role, widths in expected_widths(block, open_fn).items():
            name = block.modules[role][0]
            kept = plan.modules[name].shape if name in plan.modules else None
            assert kept is not None and tuple(int(w) for w in widths) == kept, (name, widths, kept)
