"""Progressive compaction: units whose gates closed leave the frozen weights in training, exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import ARCHITECTURES, is_causal, logits, tiny_inputs, tiny_model
from finegates import GatesConfig, get_gated_model
from finegates.adapter import load_gates, save_gates
from finegates.budget import project_budget
from finegates.compress import compress
from finegates.coupling import find_blocks
from finegates.distill import gates_bypassed
from finegates.gates import TiedGate, force_gates
from finegates.model import all_gates, gated_layers, set_gates_enabled
from finegates.optim import finalize_gates
from finegates.progressive import ProgressiveCompaction, apply_removed, compact_closed, removed_weights
from finegates.report import base_parameter_count, sparsity_report
from finegates.ties import StreamReader, runtime_gates

pytestmark = pytest.mark.usefixtures("one_thread")
STRUCTURES = ["fine", "runtime"]


def _close(layer, axis: str, indices: list[int]) -> None:
    """Close the gates of rows / columns `indices` of a gated layer (the shared units of a tied view)."""
    gate = layer.gates()[axis]
    source, repeat = (gate.source, gate.repeat) if isinstance(gate, TiedGate) else (gate, 1)
    close = torch.zeros_like(source.removed)
    close[sorted({i // repeat for i in indices})] = True
    force_gates(source, close, torch.zeros_like(close))


def _random_closures(model, seed: int = 0, share: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    for gate in all_gates(model):
        close = torch.rand(gate.param.shape, generator=gen) < share
        force_gates(gate, close, torch.zeros_like(close))


def _head_rows(block, heads: list[int]) -> list[int]:
    d = block.shape.head_dim
    return [h * d + i for h in heads for i in range(d)]


def _every_head_of_block_0(model) -> None:
    block = find_blocks(model)[0]
    _close(block.modules["o"][1], "col", _head_rows(block, list(range(block.shape.num_heads))))


def _kv_group_0_and_one_head(model) -> None:
    """Every query head of KV group 0 closed, and one head of another group (uneven groups)."""
    block = find_blocks(model)[0]
    group = block.shape.group_size
    _close(block.modules["o"][1], "col", _head_rows(block, [*range(group), block.shape.num_heads - 1]))


def _gated(name: str, structure: str, **cfg) -> nn.Module:
    return get_gated_model(tiny_model(name), GatesConfig(structure=structure, **cfg)).eval()


PATTERNS = {
    "random": _random_closures,
    "every_head": _every_head_of_block_0,
    "kv_group": _kv_group_0_and_one_head,
}


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_outputs_are_identical_before_and_after_compaction(arch, structure, pattern):
    model = _gated(arch, structure)
    PATTERNS[pattern](model)
    ids = tiny_inputs()
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding
    before, report = logits(model, ids), sparsity_report(model)
    with torch.no_grad():
        before_masked = model(input_ids=ids, attention_mask=mask).logits
    small_before = logits(compress(model), ids)
    cut = compact_closed(model)
    assert cut.weights > 0 and removed_weights(model) == cut.weights
    if pattern != "random":
        assert cut.heads > 0
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits, before_masked, atol=1e-5, rtol=0
        )
    # the plan, the report and compress see the same model (the freed weights counted at full size)
    assert sparsity_report(model).gated_removed == report.gated_removed
    assert base_parameter_count(model) == report.model_params
    torch.testing.assert_close(logits(compress(model), ids), small_before, atol=1e-5, rtol=0)
    # a second compaction of the same gates cuts nothing more
    assert compact_closed(model).weights == 0


@pytest.mark.parametrize("structure", STRUCTURES)
def test_uneven_query_heads_are_padded_until_every_group_can_shrink(structure):
    model = _gated("llama", structure)  # 4 query heads in 2 KV groups
    block = find_blocks(model)[0]
    attention = model.model.layers[0].self_attn
    _close(block.modules["o"][1], "col", _head_rows(block, [0]))
    compact_closed(model)
    assert attention.q_proj.kept_weight is None and attention.num_key_value_groups == 2  # head 0 pads group 0
    ids = tiny_inputs()
    _close(block.modules["o"][1], "col", _head_rows(block, [2]))
    before = logits(model, ids)
    cut = compact_closed(model)
    assert (cut.heads, cut.kv_heads) == (2, 0) and attention.num_key_value_groups == 1
    assert attention.q_proj.kept_weight.shape[0] == 2 * block.shape.head_dim
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)


def _no_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _training_loss_and_grads(model: nn.Module, name: str):
    """A training forward and backward pass with a fixed gate-noise seed: (loss, {name: grad})."""
    ids = tiny_inputs()
    kwargs = {"labels": ids} if is_causal(name) else {"labels": torch.tensor([0, 1, 2])}
    model.train()
    model.zero_grad()
    torch.manual_seed(0)
    loss = model(input_ids=ids, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_training(before, after) -> None:
    (loss, grads), (loss_after, grads_after) = before, after
    torch.testing.assert_close(loss_after, loss, atol=1e-6, rtol=0)
    assert grads.keys() == grads_after.keys()
    for n in grads:
        torch.testing.assert_close(grads_after[n], grads[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_training_forward_and_gate_gradients_are_unchanged(name):
    """In training mode (sampled gates, folded gated function) the compacted layers compute the same
    loss and the same gradients for the gates and biases that remain."""
    model = _gated(name, "fine", noise_std=1e-6)
    _no_dropout(model)
    _random_closures(model, share=0.3)
    first, last = find_blocks(model)[0], find_blocks(model)[-1]
    _close(first.modules["o"][1], "col", list(range(16)))
    down = last.modules["down"][1]
    _close(down, "col", list(range(down.in_features)))  # a layer left with no FFN channel at all
    before = _training_loss_and_grads(model, name)
    assert compact_closed(model).weights > 0
    _assert_same_training(before, _training_loss_and_grads(model, name))


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_the_narrowed_stream_trains_as_the_full_one(name):
    """The runtime structure with residual dims closed: after compaction the stream carries only the kept
    dims (embeddings, norms, every reader and writer), and training computes the same loss and the same
    gradients for every gate and trained parameter, the task head's included."""
    model = _gated(name, "runtime", noise_std=1e-6)
    _no_dropout(model)
    _random_closures(model, share=0.3)
    before = _training_loss_and_grads(model, name)
    cut = compact_closed(model)
    ties = runtime_gates(model)
    kept = int((~ties.residual.removed).sum())
    assert cut.residual == len(ties.residual.removed) - kept > 0
    assert torch.equal(ties.stream_kept, (~ties.residual.removed).nonzero().flatten())
    q = find_blocks(model)[0].modules["qkv" if name == "gpt2" else "q"][1]
    assert q.kept_weight.shape[1] == kept  # readers read only the kept dims
    with torch.no_grad():  # and the stream between the blocks is that narrow
        states = model.eval()(input_ids=tiny_inputs(), output_hidden_states=True).hidden_states
    assert {h.shape[-1] for h in states} == {kept}
    # a frozen LM head multiplies the kept dims by its kept columns (a trained task head reads them
    # scattered back to the full width: the BERT case)
    assert isinstance(getattr(model, "lm_head", None), StreamReader) == is_causal(name)
    _assert_same_training(before, _training_loss_and_grads(model, name))


def test_the_stream_narrows_again_as_more_residual_dims_close():
    """A second narrowing cuts the readers, writers and the LM head's kept columns further, exactly."""
    model = _gated("llama", "runtime")
    ties, ids = runtime_gates(model), tiny_inputs()
    for dims in ([0, 3, 5], [0, 3, 5, 9, 12, 20]):
        close = torch.zeros_like(ties.residual.removed)
        close[dims] = True
        force_gates(ties.residual, close, torch.zeros_like(close))
        before = logits(model, ids)
        compact_closed(model)
        width = ties.residual.param.numel() - len(dims)
        assert len(ties.stream_kept) == width and model.lm_head.narrow_weight.shape[1] == width
        torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)


def test_hidden_state_distillation_reads_the_narrowed_stream_at_the_full_width():
    """SquareHead's hidden-state term against the bypassed teacher is the same before and after the stream
    narrows (the student's states are compared at the full width, zeros at the removed dims)."""
    from finegates.distill import DistillConfig, distill_loss, teacher_outputs

    model = _gated("llama", "runtime", noise_std=1e-6)
    _random_closures(model, share=0.3)
    ids = tiny_inputs()
    cfg = DistillConfig(distill=True, distill_hidden_weight=1.0)

    def loss() -> torch.Tensor:
        torch.manual_seed(0)
        teacher = teacher_outputs(model, {"input_ids": ids}, cfg)
        student = model.train()(input_ids=ids, output_hidden_states=True)
        return distill_loss(student, teacher, None, cfg, runtime_gates(model).stream_kept)

    before = loss()
    compact_closed(model, keep_dense=True)
    assert runtime_gates(model).stream_kept is not None
    torch.testing.assert_close(loss(), before, atol=1e-5, rtol=1e-5)


def test_a_norm_the_narrowed_stream_cannot_take_is_refused_by_name():
    """An RMSNorm of another form (Gemma's 1 + w) fails the check on its own output and is named."""
    model = _gated("llama", "runtime")
    norm = model.model.norm

    class OnePlusRMSNorm(type(norm)):
        def forward(self, x):
            return super().forward(x) / self.weight * (1 + self.weight)

    norm.__class__ = OnePlusRMSNorm
    with pytest.raises(TypeError, match=r"model\.norm \(OnePlusRMSNorm\)"):
        ProgressiveCompaction(model, every=10)  # when training is set up
    _random_closures(model)
    expected = logits(model, tiny_inputs())
    with pytest.raises(TypeError, match=r"model\.norm \(OnePlusRMSNorm\)"):
        compact_closed(model)
    assert removed_weights(model) == 0  # refused before anything was cut
    torch.testing.assert_close(logits(model, tiny_inputs()), expected, atol=0, rtol=0)


@pytest.mark.parametrize("structure", ["fine", "runtime"])
def test_a_model_class_compress_cannot_take_is_refused_before_training(structure):
    """A token-classification head reads the stream directly: narrowing it mid-run crashed the run."""
    from transformers import BertConfig, BertForTokenClassification

    from conftest import _ENCODER

    base = BertForTokenClassification(BertConfig(**_ENCODER))
    model = get_gated_model(base, GatesConfig(structure=structure))
    with pytest.raises(ValueError, match=r"compact_every: compress does not support BertForToken"):
        ProgressiveCompaction(model, every=10)


def test_a_bfloat16_model_passes_the_norms_check():
    """LLaMA's RMSNorm in bfloat16 is accepted as LLaMA's form. A guard: the narrowed and stock forms sum in
    different orders, so their bfloat16 outputs may round a step apart (not seen on this model); the check
    allows a step of the dtype."""
    model = _gated("llama", "runtime").to(torch.bfloat16)
    for norm in [m for m in model.modules() if hasattr(m, "variance_epsilon")]:
        nn.init.normal_(norm.weight)  # not all ones: a product that rounds
    ProgressiveCompaction(model, every=10)


def test_setting_up_compaction_leaves_the_random_stream_alone():
    """The norms' check runs on an input of its own: turning compaction on must not change the run's data
    order or gate noise."""
    model = _gated("llama", "runtime")
    torch.manual_seed(0)
    expected = torch.randn(3)
    torch.manual_seed(0)
    ProgressiveCompaction(model, every=10)
    torch.testing.assert_close(torch.randn(3), expected, atol=0, rtol=0)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_removed_gates_are_closed_for_good(structure):
    model = _gated("llama", structure, param_bound=2.0)
    _random_closures(model)
    compact_closed(model)
    removed = {id(g): g.removed.clone() for g in all_gates(model)}
    assert any(m.any() for m in removed.values())
    with torch.no_grad():  # an optimizer step that pushes every gate wide open
        for gate in all_gates(model):
            gate.param.fill_(10.0)
            gate.clamp_(2.0)
    project_budget(model, 0.0, 0.0)  # and a projection that wants everything reopened
    for gate in all_gates(model):
        assert gate.closed()[removed[id(gate)]].all()
    finalize_gates(model, target=0.0)
    for gate in all_gates(model):
        assert gate.closed()[removed[id(gate)]].all()


@pytest.mark.parametrize("structure", STRUCTURES)
def test_saved_gates_load_on_the_original_base_model(tmp_path, arch, structure):
    model = _gated(arch, structure)
    _random_closures(model)
    compact_closed(model)
    ids = tiny_inputs()
    expected = logits(model, ids)
    save_gates(model, tmp_path)
    reloaded = load_gates(tiny_model(arch), tmp_path).eval()
    assert removed_weights(reloaded) == 0  # the full model, with the removed gates closed
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=0)
    assert apply_removed(reloaded) == removed_weights(model)  # and the same cut from the saved marks
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=0)


def test_the_dense_weights_stay_for_a_teacher_or_go():
    ids = tiny_inputs()
    dense = logits(tiny_model("llama"), ids)
    for keep_dense in (True, False):
        model = _gated("llama", "runtime")
        _random_closures(model)
        compact_closed(model, keep_dense=keep_dense)
        gated = logits(model, ids)
        if keep_dense:  # the distillation teacher: the same weights with every gate bypassed
            with gates_bypassed(model):
                torch.testing.assert_close(logits(model, ids), dense, atol=1e-6, rtol=0)
            torch.testing.assert_close(logits(model, ids), gated, atol=0, rtol=0)
        set_gates_enabled(model, False)
        if keep_dense:
            torch.testing.assert_close(logits(model, ids), dense, atol=1e-6, rtol=0)
        else:
            assert all(
                layer.base_layer.weight.numel() == 0
                for layer in gated_layers(model).values()
                if layer.kept_weight is not None
            )
            with pytest.raises(RuntimeError, match="cannot be bypassed"):
                logits(model, ids)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="compact_every must be >= 1"):
        GatesConfig(compact_every=0)
    with pytest.raises(ValueError, match="compact_margin"):
        GatesConfig(compact_margin=-1.0)
    with pytest.raises(ValueError, match="uniform_layers cannot be combined"):
        GatesConfig(structure="runtime", uniform_layers=True, compact_every=10)
    with pytest.raises(ValueError, match="would remove nothing"):  # gates held short of the margin
        GatesConfig(compact_every=10, param_bound=1.0)
    model = tiny_model("llama")
    model = get_gated_model(model, GatesConfig())
    layer = next(iter(gated_layers(model).values()))
    layer.base_layer.weight.requires_grad_(True)  # pretraining trains the weights: nothing frozen to cut
    with pytest.raises(ValueError, match="frozen"):
        layer.keep_(torch.arange(2), torch.arange(2))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_gated_layer_keeps_its_full_shape_for_the_plan(name):
    model = _gated(name, "fine")
    _random_closures(model)
    compact_closed(model)
    for layer in gated_layers(model).values():
        rows, cols = layer.kept_axes()
        assert layer.full_weight().shape == (layer.out_features, layer.in_features)
        if layer.kept_weight is not None:
            assert layer.kept_weight.shape == (len(rows), len(cols))
