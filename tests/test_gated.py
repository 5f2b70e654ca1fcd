"""Gated layers and injection: exact at init, only the right tensors train, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import finegates
from conftest import is_causal, logits, tiny_inputs, tiny_model
from finegates import GatedLinear, GatesConfig, get_gated_model, sparsity_loss


@pytest.mark.parametrize("family", ["gaussian", "hard_concrete"])
def test_open_gates_reproduce_the_model_exactly(arch, family):
    model = tiny_model(arch)
    ids = tiny_inputs()
    reference = logits(model, ids)
    get_gated_model(model, GatesConfig(gate_family=family))
    torch.testing.assert_close(logits(model, ids), reference, atol=0, rtol=0)


@pytest.mark.parametrize("base", [nn.Linear(5, 4), nn.Linear(5, 4, bias=False), Conv1D(4, 5)])
def test_gated_linear_formula(base):
    layer = GatedLinear(base, GatesConfig()).eval()
    with torch.no_grad():
        layer.row_gate.theta.copy_(torch.tensor([2.0, -2.0, 0.0, 2.0]))
        layer.col_gate.theta.copy_(torch.tensor([2.0, 2.0, -2.0, 0.1, 2.0]))
    x = torch.randn(3, 5)
    g_row, g_col = layer.row_gate.deterministic(), layer.col_gate.deterministic()
    weight, bias = layer.folded_weight()
    expected = x @ weight.t() + (bias if bias is not None else 0)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x), base(x * g_col) * g_row)
    assert g_row[1] == 0 and g_col[2] == 0 and 0 < g_row[2] < 1


def test_bias_free_layers_stay_bias_free():
    model = get_gated_model(tiny_model("llama"))
    for layer in finegates.gated_layers(model).values():
        assert layer.bias is None
        assert not any(n.endswith("bias") for n, _ in layer.named_parameters())


def test_gates_sample_in_training_and_are_deterministic_in_eval():
    layer = GatedLinear(nn.Linear(64, 64), GatesConfig(init_mean=0.0))
    layer.train()
    assert not torch.equal(layer.row_gate.value(), layer.row_gate.value())
    layer.eval()
    assert torch.equal(layer.row_gate.value(), layer.row_gate.value())


def _train_one_step(name: str, cfg: GatesConfig):
    model = tiny_model(name)
    get_gated_model(model, cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    ids = tiny_inputs()
    labels = ids if is_causal(name) else torch.tensor([0, 1, 2])
    loss = model(input_ids=ids, labels=labels).loss + sparsity_loss(model)
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    return model, frozen


def test_only_gates_head_and_biases_receive_gradients(arch):
    # init_mean=0 puts the gates inside the clamp, where the task loss reaches every one of them.
    model, frozen = _train_one_step(arch, GatesConfig(warmup_steps=0, init_mean=0.0))
    for name, param in model.named_parameters():
        is_gate = "_gate." in name
        is_gated_bias = ".base_layer.bias" in name
        is_head = name.startswith(("classifier", "score", "bert.pooler", "roberta.pooler"))
        is_controller = name.startswith("finegates_controller")
        assert param.requires_grad == (is_gate or is_gated_bias or is_head or is_controller), name
        if param.requires_grad and is_gate:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"frozen weight {name} changed"


@pytest.mark.parametrize("bias", ["none", "all"])
def test_bias_policies(bias):
    model = get_gated_model(tiny_model("bert"), GatesConfig(bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layer_norm_bias = "bert.encoder.layer.0.attention.output.LayerNorm.bias"
    gated_bias = "bert.encoder.layer.0.attention.self.query.base_layer.bias"
    assert (gated_bias in trainable) == (bias == "all")
    assert (layer_norm_bias in trainable) == (bias == "all")


def test_print_trainable_parameters(capsys):
    model = get_gated_model(tiny_model("llama"))
    finegates.print_trainable_parameters(model)
    out = capsys.readouterr().out
    gates = sum(layer.in_features + layer.out_features for layer in finegates.gated_layers(model).values())
    assert out.startswith(f"trainable params: {gates:,d} || all params: ")
    assert "trainable%: " in out


@pytest.mark.parametrize(
    "targets, expected",
    [
        (None, 7 * 2),
        ("all-linear", 7 * 2),
        (["q_proj", "v_proj"], 2 * 2),
        (r".*layers\.0\.mlp\..*_proj", 3),
    ],
)
def test_target_selection(targets, expected):
    model = get_gated_model(tiny_model("llama"), GatesConfig(target_modules=targets))
    assert len(finegates.gated_layers(model)) == expected
    assert "lm_head" not in finegates.gated_layers(model)


def test_exclude_modules_and_default_head():
    model = get_gated_model(tiny_model("bert"), GatesConfig(exclude_modules=["key"]))
    names = finegates.gated_layers(model)
    assert not any(n.endswith("key") for n in names) and len(names) == 5 * 2
    assert model.finegates_config.modules_to_save == ["classifier", "bert.pooler"]
    assert not any("classifier" in n or "pooler" in n for n in names)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"target_sparsity": 1.0}, ValueError, "target_sparsity"),
        ({"target_sparsity": -0.1}, ValueError, "target_sparsity"),
        ({"gate_family": "beta"}, ValueError, "gate_family"),
        ({"objective": "l1"}, ValueError, "objective"),
        ({"bias": "some"}, ValueError, "bias"),
    ],
)
def test_invalid_config_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        GatesConfig(**kwargs)


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="GatesConfig: unknown keys \\['lamda'\\]"):
        GatesConfig.from_dict({"lamda": 3})


def test_config_json_round_trip():
    cfg = GatesConfig(target_sparsity=0.4, target_modules=["q_proj"], gate_family="hard_concrete")
    assert GatesConfig.from_json(cfg.to_json()) == cfg


def test_bad_targets_fail_clearly():
    with pytest.raises(ValueError, match=r"entries \['nonexistent'\] match no module"):
        get_gated_model(tiny_model("llama"), GatesConfig(target_modules=["nonexistent"]))
    # a misspelt entry beside good ones is named, not dropped; likewise an exclusion that excludes nothing
    with pytest.raises(ValueError, match=r"target_modules entries \['v_prj'\]"):
        get_gated_model(tiny_model("llama"), GatesConfig(target_modules=["q_proj", "v_prj"]))
    with pytest.raises(ValueError, match=r"exclude_modules entries \['o_prj'\]"):
        get_gated_model(tiny_model("llama"), GatesConfig(exclude_modules=["o_prj"]))
    with pytest.raises(ValueError, match="a single string is a regex"):
        get_gated_model(tiny_model("llama"), GatesConfig(exclude_modules="o_proj"))
    with pytest.raises(ValueError, match="exclude_modules left nothing"):
        get_gated_model(tiny_model("llama"), GatesConfig(exclude_modules=".*proj"))
    with pytest.raises(TypeError, match="not a linear layer"):
        get_gated_model(tiny_model("llama"), GatesConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="No default target modules"):
        get_gated_model(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="modules_to_save"):
        get_gated_model(tiny_model("bert"), GatesConfig(modules_to_save=["nope"]))


def test_gating_twice_fails():
    model = get_gated_model(tiny_model("bert"))
    with pytest.raises(ValueError, match="gating it twice"):
        get_gated_model(model)


def test_functions_need_a_gated_model():
    with pytest.raises(ValueError, match="get_gated_model"):
        sparsity_loss(tiny_model("bert"))


class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.outer = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.relu(self.inner(x)))


def test_any_linear_stack_with_explicit_targets():
    model = _TwoLayer().eval()
    x = torch.randn(4, 6)
    reference = model(x)
    get_gated_model(model, GatesConfig(target_modules=["inner", "outer"]))
    torch.testing.assert_close(model(x), reference, atol=0, rtol=0)
    report = finegates.sparsity_report(model)
    assert report.removed_fraction == 0.0 and report.gated_params == 6 * 8 + 8 + 8 * 2 + 2


@pytest.mark.parametrize("base", [nn.Linear(6, 5), nn.Linear(6, 5, bias=False), Conv1D(5, 6)])
def test_training_gradients_match_plain_autograd(base):
    """The memory-saving autograd function gives the gradients autograd gives for the plain formula."""
    base.requires_grad_(True)
    layer = GatedLinear(base, GatesConfig(init_mean=0.0)).train()
    with torch.no_grad():
        layer.row_gate.theta[0] = -3.0  # a closed row: its gate's gradient is zero either way
    x = torch.randn(2, 3, 6, requires_grad=True)
    torch.manual_seed(0)
    fused = layer(x)
    grads = torch.autograd.grad(fused.square().sum(), [x, *layer.parameters()])
    torch.manual_seed(0)
    g_col, g_row = layer.col_gate.value(), layer.row_gate.value()
    plain = base(x * g_col) * g_row
    expected = torch.autograd.grad(plain.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(fused, plain)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_folded_gates_give_autograd_gradients_at_tiny_and_closed_gates(bias):
    """Gates folded into the weight: outputs and gradients of the plain formula to float precision, also
    for gates of 1e-7 (recovered through the division) and closed ones (whose gradient is 0 by the clamp)."""
    from finegates.gated_fn import GatedLinearFunction

    torch.manual_seed(0)
    weight, b = torch.randn(7, 9, requires_grad=True), (torch.randn(7, requires_grad=True) if bias else None)
    x = torch.randn(3, 5, 9, requires_grad=True)
    g_col = torch.rand(9).clamp(min=0.2)
    g_row = torch.rand(7).clamp(min=0.2)
    g_col[:2], g_col[2], g_row[0], g_row[1] = 0.0, 1e-7, 0.0, 1e-7
    g_col.requires_grad_(), g_row.requires_grad_()
    dy = torch.randn(3, 5, 7)
    inputs = [x, g_col, g_row, weight] + ([b] if bias else [])
    folded = GatedLinearFunction.apply(x, g_col, g_row, weight, b)
    got = torch.autograd.grad(folded, inputs, dy)
    plain = nn.functional.linear(x * g_col, weight, b) * g_row
    want = torch.autograd.grad(plain, inputs, dy)
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-6)
    closed = {1: g_col == 0, 2: g_row == 0}
    for i, (g, w) in enumerate(zip(got, want)):
        if i in closed:
            assert torch.all(g[closed[i]] == 0)
            g, w = g[~closed[i]], w[~closed[i]]
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _saved_activations(fn) -> list[int]:
    """Sizes of the tensors over 1,000 elements (activations here) autograd keeps while `fn()` runs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fn()
    return sorted(n for n in saved if n > 1000)


def test_a_layer_keeps_only_what_its_trained_gates_need():
    """No applied gate (q/k in the runtime structure): plain F.linear, no activation kept. A frozen column
    gate: the input is not kept. Both gates training: input and output."""
    base = nn.Linear(16, 8)
    base.requires_grad_(False)
    x = torch.randn(4, 64, 16, requires_grad=True)
    layer = GatedLinear(base, GatesConfig()).train()
    assert _saved_activations(lambda: layer(x)) == [4 * 64 * 8, x.numel()]
    layer.col_gate.requires_grad_(False)
    assert _saved_activations(lambda: layer(x)) == [4 * 64 * 8]
    layer.set_gates(None, None)
    assert _saved_activations(lambda: layer(x)) == []


@pytest.mark.parametrize(
    "act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()], ids=["gelu", "gelu-tanh", "silu"]
)
@pytest.mark.parametrize("weight_trains", [False, True])
def test_an_activation_moved_into_the_layer_gives_autograd_gradients(act, weight_trains):
    """y = act(x) W'^T + b', act(x) recomputed in the backward pass: the plain formula's gradients."""
    from finegates.gated_fn import GatedLinearFunction

    torch.manual_seed(0)
    weight, b = torch.randn(7, 9, requires_grad=weight_trains), torch.randn(7, requires_grad=True)
    x = torch.randn(3, 5, 9, requires_grad=True)
    g_col = torch.rand(9).clamp(min=0.2).requires_grad_()
    g_row = torch.rand(7).clamp(min=0.2).requires_grad_()
    dy = torch.randn(3, 5, 7)
    inputs = [x, g_col, g_row, b] + ([weight] if weight_trains else [])
    fused = GatedLinearFunction.apply(x, g_col, g_row, weight, b, act)
    plain = nn.functional.linear(act(x) * g_col, weight, b) * g_row
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(fused, inputs, dy), torch.autograd.grad(plain, inputs, dy)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # only the activation's input is kept, not its output as well
    big = torch.randn(40, 5, 9, requires_grad=True)
    kept = _saved_activations(lambda: GatedLinearFunction.apply(big, g_col, None, weight, b, act))
    assert kept == [big.numel()]


def _ffn_wide_tensors_kept(model: nn.Module, ids: torch.Tensor, width: int) -> int:
    """How many distinct tensors of the FFN's width autograd keeps in one training forward pass."""
    storages = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() and t.shape[-1] == width and t.numel() == ids.numel() * width:
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return len(storages)


@pytest.mark.parametrize(
    "arch_name, structure, per_layer",
    # one FFN activation's input; LLaMA's GLU: the activation's input and the product's two factors (the
    # channel gate sits on the up projection's rows, whose output the product keeps anyway)
    [("bert", "fine", 1), ("bert", "runtime", 1), ("gpt2", "fine", 1), ("gpt2", "runtime", 1)]
    + [("llama", "runtime", 3)],
)
def test_training_keeps_one_tensor_per_ffn_activation(arch_name, structure, per_layer):
    """Before, the activation kept its input and the gated down projection its output (for the channel
    gates' gradient): two FFN-wide tensors per layer, four in LLaMA's GLU."""
    model = get_gated_model(tiny_model(arch_name), GatesConfig(structure=structure)).train()
    width = model.config.intermediate_size if arch_name != "gpt2" else 4 * model.config.n_embd
    kept = _ffn_wide_tensors_kept(model, tiny_inputs(), width)
    assert kept == per_layer * model.config.num_hidden_layers
    from finegates.layer import DeferredActivation

    deferred = [m for m in model.modules() if isinstance(m, DeferredActivation)]
    assert len(deferred) == (0 if arch_name == "llama" else model.config.num_hidden_layers)


@pytest.mark.parametrize("arch_name", ["bert", "gpt2"])
def test_a_moved_activation_still_runs_in_every_mode(arch_name):
    """All gates open: the base model's outputs in eval, in training mode without dropout, and with the
    gates bypassed; calibration hooks see the activation's output as the down projection's input."""
    from finegates.baselines.magnitude import input_norms
    from finegates.model import set_gates_enabled

    base, ids = tiny_model(arch_name), tiny_inputs()
    for m in base.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model = get_gated_model(tiny_model(arch_name), GatesConfig(init_mean=20.0))  # gates at 1
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    reference = logits(base, ids)
    torch.testing.assert_close(logits(model, ids), reference)
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=1e-4, atol=1e-5)
    set_gates_enabled(model, False)
    torch.testing.assert_close(logits(model.eval(), ids), reference)
    set_gates_enabled(model, True)
    down = "bert.encoder.layer.0.output.dense" if arch_name == "bert" else "transformer.h.0.mlp.c_proj"
    up = "bert.encoder.layer.0.intermediate" if arch_name == "bert" else "transformer.h.0.mlp.act"
    seen = []
    handle = base.get_submodule(up).register_forward_hook(lambda m, a, out: seen.append(out))
    logits(base, ids)
    handle.remove()
    expected = seen[0].reshape(-1, seen[0].shape[-1]).norm(dim=0)
    torch.testing.assert_close(input_norms(model, [{"input_ids": ids}])[down], expected)


def test_a_one_dimensional_input_trains_as_one_row():
    torch.manual_seed(0)
    layer = GatedLinear(nn.Linear(4, 3), GatesConfig(noise_std=1e-9)).train()
    layer.base_layer.weight.requires_grad_(False)
    x = torch.randn(4, requires_grad=True)
    row = x.detach().unsqueeze(0).requires_grad_()
    grads = []
    for inputs in (x, row):
        layer.zero_grad()
        torch.manual_seed(1)
        layer(inputs).sum().backward()
        trained = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
        grads.append([inputs.grad.reshape(-1), *trained])
    for one, batched in zip(*grads, strict=True):
        torch.testing.assert_close(one, batched)
