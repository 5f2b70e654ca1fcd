"""bfloat16 autocast training (`--bf16`): the gated layer's GEMMs run in bfloat16, everything that trains
stays float32, and the workflows pass the option to the Trainer."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from conftest import tiny_inputs, tiny_model
from finegates.config import GatesConfig
from finegates.gated_fn import GatedLinearFunction
from finegates.model import get_gated_model

BF16 = torch.bfloat16


def _autocast():
    return torch.autocast("cpu", dtype=BF16)


@pytest.mark.parametrize("act", [None, nn.GELU()], ids=["plain", "activation"])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_the_fused_function_computes_in_the_autocast_dtype_and_returns_float32_gradients(act, weight_trains):
    torch.manual_seed(0)
    weight = torch.randn(24, 40, requires_grad=weight_trains)
    b = torch.randn(24, requires_grad=True)
    x = torch.randn(8, 16, 40, requires_grad=True)
    g_col = torch.rand(40).clamp(min=0.2)
    g_row = torch.rand(24).clamp(min=0.2)
    g_col[:3], g_row[:2] = 0.0, 0.0
    g_col.requires_grad_(), g_row.requires_grad_()
    dy = torch.randn(8, 16, 24)
    inputs = [x, g_col, g_row, b] + ([weight] if weight_trains else [])
    with _autocast():
        fused = GatedLinearFunction.apply(x, g_col, g_row, weight, b, act)
    assert fused.dtype == BF16
    got = torch.autograd.grad(fused, inputs, dy.to(BF16))
    # the float32 formula: bfloat16 keeps 8 significant bits, so agreement to about 1%
    plain = nn.functional.linear(x if act is None else act(x), weight * g_col, b) * g_row
    want = torch.autograd.grad(plain, inputs, dy)
    torch.testing.assert_close(fused.float(), plain, rtol=0.02, atol=0.05 * plain.abs().mean().item())
    # closed gates get no gradient, as in float32 (the clamp's convention; autograd's formula gives one)
    assert torch.all(got[1][:3] == 0) and torch.all(got[2][:2] == 0)
    open_only = {1: slice(3, None), 2: slice(2, None)}
    for i, (g, w, t) in enumerate(zip(got, want, inputs)):
        assert g.dtype == t.dtype == torch.float32
        g, w = g[open_only.get(i, slice(None))], w[open_only.get(i, slice(None))]
        torch.testing.assert_close(g, w, rtol=0.03, atol=0.03 * w.abs().mean().item())


@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("structure", ["fine", "runtime"])
def test_a_gated_training_step_under_autocast_gives_the_float32_gradients(name, structure):
    """One training step of a tiny gated model in bfloat16 autocast: its gated GEMMs run in bfloat16, its
    gates' gradients are float32 and point where the float32 step's do."""
    torch.manual_seed(0)
    model = get_gated_model(tiny_model(name), GatesConfig(target_sparsity=0.3, structure=structure)).train()
    ids = tiny_inputs(batch=4, length=12)
    gates = [p for n, p in model.named_parameters() if p.requires_grad and "gate" in n]
    assert gates
    with torch.no_grad():  # mid-way gates (they start fully open, where the clamp has no gradient)
        for p in gates:
            p.uniform_(-0.3, 0.3)

    def step(autocast: bool) -> torch.Tensor:
        torch.manual_seed(1)  # the same gate noise in both steps
        model.zero_grad()
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            out = model(input_ids=ids)
        out.logits.float().square().mean().backward()
        return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in gates])

    dtypes = set()
    hooks = [
        m.register_forward_hook(lambda m, a, y: dtypes.add(y.dtype))
        for m in model.modules()
        if type(m).__name__ == "GatedLinear"
    ]
    low = step(True)
    for h in hooks:
        h.remove()
    full = step(False)
    assert dtypes == {BF16}
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in gates)
    assert torch.isfinite(low).all()
    assert nn.functional.cosine_similarity(low, full, dim=0) > 0.98


@pytest.mark.parametrize(
    "structure", [{}, {"structure": "runtime", "compact_every": 2}], ids=["fine", "runtime-progressive"]
)
def test_posttrain_with_bf16_trains_in_bfloat16_and_evaluates_in_float32(tmp_path, monkeypatch, structure):
    from finegates.workflows import posttrain as workflow
    from test_posttrain import _tiny_workflow

    _tiny_workflow(monkeypatch)
    seen: dict[str, set] = {"trainer": set(), "outside": set()}
    phase = ["outside"]
    load, train = workflow.load_causal_lm, workflow.train_model

    def load_and_watch(name):
        model, tokenizer = load(name)
        model.lm_head.register_forward_hook(lambda m, a, y: seen[phase[0]].add(y.dtype))
        return model, tokenizer

    def train_and_watch(*args):
        phase[0] = "trainer"
        try:
            return train(*args)
        finally:
            phase[0] = "outside"

    monkeypatch.setattr(workflow, "load_causal_lm", load_and_watch)
    monkeypatch.setattr(workflow, "train_model", train_and_watch)
    cfg = workflow.PosttrainConfig(
        model="tiny", seq_len=16, batch_size=4, max_steps=8, eval_blocks=4, output_dir=str(tmp_path),
        quiet=True, zero_shot_items=3, bf16=True, distill=True,
    )  # fmt: skip
    gates = GatesConfig(target_sparsity=0.3, bias="none", modules_to_save=[], warmup_steps=4, **structure)
    metrics = workflow.posttrain(cfg, gates)
    assert seen["trainer"] == {BF16}  # the Trainer's autocast: student and teacher
    # perplexity, zero-shot scores and compaction checks, before and after training
    assert seen["outside"] == {torch.float32}
    # at least the target (whole units of a tiny model: one residual dim is ~3% of the runtime structure's)
    assert 0.29 <= metrics["sparsity"]["removed_fraction"] <= 0.34
    if structure:
        assert metrics["budget"]["weights_cut"] > 0  # compaction cut weights under autocast
    assert metrics["compacted"]["perplexity"] == pytest.approx(metrics["gated"]["perplexity"], rel=1e-4)


def test_finetune_with_bf16_from_the_command_line(tiny_run_inputs, tmp_path, monkeypatch):
    """`finetune --bf16`: the Trainer gets bf16=True, the gated and compacted models agree (float32
    afterwards), the run lands on its target."""
    import contextlib
    import io
    import json

    from finegates.cli import main
    from test_cli import _tiny_argv

    workflow = sys.modules["finegates.workflows.finetune"]  # the package exports the function by that name
    made = []
    arguments = workflow.training_arguments
    monkeypatch.setattr(
        workflow, "training_arguments", lambda *a, **k: made.append(arguments(*a, **k)) or made[-1]
    )
    out = tmp_path / "run"
    options = "--epochs 1 --validation-size 8 --bench-batch-size 2 --bench-repeats 1 --target-sparsity 0.3 "
    options += "--warmup-steps 4 --bf16"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*_tiny_argv(*tiny_run_inputs), "--output-dir", str(out), *options.split()]) == 0
    assert [a.bf16 for a in made] == [True, False]  # training; the compacted model's float32 evaluation
    assert json.loads((out / "run_config.json").read_text())["finetune"]["bf16"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sparsity"]["removed_fraction"] >= 0.3
    assert metrics["accuracy"]["compacted"] == pytest.approx(metrics["accuracy"]["gated"])


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2"])
def test_a_bfloat16_model_compacts_to_bfloat16(name):
    """The runtime structure folds its float32 residual gate into the embeddings, norms and head: in a
    bfloat16 model the products stay bfloat16, so the compacted model runs and saves as one dtype."""
    from finegates import compress
    from finegates.gates import force_gates
    from finegates.model import all_gates

    model = get_gated_model(tiny_model(name).to(BF16), GatesConfig(structure="runtime")).eval()
    gen = torch.Generator().manual_seed(0)
    for gate in all_gates(model):
        close = torch.rand(gate.param.shape, generator=gen) < 0.3
        force_gates(gate, close, torch.zeros_like(close))
    with torch.no_grad():
        expected = model(input_ids=tiny_inputs()).logits.float()
        small = compress(model)
        assert {p.dtype for p in small.parameters()} == {BF16}
        got = small(input_ids=tiny_inputs()).logits.float()
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)


def test_float16_gate_gradients_survive_a_loss_scale_and_a_nearly_closed_gate():
    """float16's range: a loss-scaled dy times y overflows, and a nearly closed gate's y is subnormal, where
    the products are not formed in float32."""
    torch.manual_seed(0)
    weight, x = torch.randn(6, 8), torch.randn(4, 5, 8)
    g_row = torch.full((6,), 0.9)
    g_row[0] = 1e-3  # nearly closed: its outputs ~1e-3 and below
    g_row.requires_grad_()
    dy = torch.randn(4, 5, 6) * 2.0**13  # a GradScaler-sized loss scale
    with torch.autocast("cpu", dtype=torch.float16):
        y = GatedLinearFunction.apply(x, None, g_row, weight, None)
    (got,) = torch.autograd.grad(y, [g_row], dy.to(torch.float16))
    plain = nn.functional.linear(x.double(), weight.double()) * g_row.double()
    (want,) = torch.autograd.grad(plain, [g_row], dy.double())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0.01, atol=0.0)
