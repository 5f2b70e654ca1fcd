"""structure="runtime": whole heads, KV groups, FFN channels and one residual mask for the whole model.

Compaction is exact on every architecture of the fixture (padding masks included), the stream narrows
everywhere without a gather or scatter, RMSNorm models keep stock norms, the report predicts the compacted
size to the parameter, and the tied gates train, save, reload and bypass like the fine ones.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import finegates
from conftest import is_causal, tiny_inputs, tiny_model
from finegates import GatesConfig, compress, get_gated_model, load_gates, save_gates, sparsity_report
from finegates.compress.linear import ResidualLinear
from finegates.compress.stream import CompactLayerNorm
from finegates.distill import gates_bypassed
from finegates.model import all_gates, gates_config
from finegates.ties import RuntimeGates, runtime_gates
from test_compress import CLOSED, OPEN, outputs, padded_batch, randomize

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def runtime_model(arch: str, seed: int = 0, **options) -> nn.Module:
    return get_gated_model(tiny_model(arch, seed), GatesConfig(structure="runtime", **options)).eval()


# -- patterns over the shared gates ----------------------------------------------------------------
def nothing_closed(ties: RuntimeGates) -> None:
    pass


def fractional(ties: RuntimeGates) -> None:
    gen = torch.Generator().manual_seed(0)
    for gate in ties.modules():
        if hasattr(gate, "theta"):
            gate.theta.data.uniform_(-0.5, 0.6, generator=gen)  # eval values strictly inside (0, 1)


def every_head_of_a_layer_closed(ties: RuntimeGates) -> None:
    ties.blocks[0]["heads"].theta.data.fill_(CLOSED)


def a_kv_group_closed(ties: RuntimeGates) -> None:
    block = ties.blocks[1]
    if "kv_heads" in block:
        block["kv_heads"].theta.data[0] = CLOSED
    else:  # multi-head attention: a group is one head
        block["heads"].theta.data[0] = CLOSED


def one_residual_dim_left(ties: RuntimeGates) -> None:
    ties.residual.theta.data.fill_(CLOSED)
    ties.residual.theta.data[5] = OPEN


def every_residual_dim_closed(ties: RuntimeGates) -> None:
    ties.residual.theta.data.fill_(CLOSED)


def ffn_closed(ties: RuntimeGates) -> None:
    ties.blocks[0]["channels"].theta.data.fill_(CLOSED)


def random_pattern(seed: int, p_closed: float = 0.3, p_fractional: float = 0.2) -> Callable:
    def apply(ties: RuntimeGates) -> None:
        randomize((m for m in ties.modules() if hasattr(m, "theta")), seed, p_closed, p_fractional)

    return apply


def binary_random(ties: RuntimeGates) -> None:
    """Closed or fully open only (no fractional residual gate, so a tied LM head stays tied)."""
    random_pattern(3, p_closed=0.3, p_fractional=0.0)(ties)


PATTERNS = {
    "nothing_closed": nothing_closed,
    "fractional": fractional,
    "every_head_of_a_layer_closed": every_head_of_a_layer_closed,
    "a_kv_group_closed": a_kv_group_closed,
    "one_residual_dim_left": one_residual_dim_left,
    "every_residual_dim_closed": every_residual_dim_closed,
    "ffn_closed": ffn_closed,
    "random": random_pattern(0),
    "binary_random": binary_random,
}


def patterned(arch: str, pattern: Callable, seed: int = 0) -> nn.Module:
    model = runtime_model(arch, seed)
    with torch.no_grad():
        pattern(runtime_gates(model))
    return model


def kept_dims(model) -> torch.Tensor:
    return finegates.compaction_plan(model).residual


# -- exactness -------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaled", [True, False])
def test_gpt2_attention_scale_survives_a_narrower_stream(scaled):
    """GPT-2's scale is 1 (over the layer index) when `scale_attn_weights` is off, whatever the head size:
    a stock module built for the narrower stream must not rescale it by the head sizes' ratio."""
    base = tiny_model("gpt2")
    base.config.scale_attn_weights = scaled
    base.config.scale_attn_by_inverse_layer_idx = True
    torch.manual_seed(0)
    base = type(base)(base.config).eval()
    model = get_gated_model(base, GatesConfig(structure="runtime")).eval()
    with torch.no_grad():
        binary_random(runtime_gates(model))
    assert len(kept_dims(model)) < model.config.hidden_size
    ids, mask = padded_batch()
    small = compress(model)
    torch.testing.assert_close(outputs(small, ids, mask)[0], outputs(model, ids, mask)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_runtime_compaction_is_exact_and_narrows_the_stream(arch, pattern):
    model = patterned(arch, PATTERNS[pattern])
    small = compress(model)
    ids, mask = padded_batch()
    logits, hidden = outputs(model, ids, mask)
    small_logits, small_hidden = outputs(small, ids, mask)
    torch.testing.assert_close(small_logits, logits, atol=ATOL, rtol=0)
    kept = kept_dims(model)
    closed = torch.ones(hidden[0].shape[-1], dtype=torch.bool)
    closed[kept] = False
    assert len(small_hidden) == len(hidden)
    # a tied head keeps its tie: the final norm's output is then the gated model's over the gate values
    r = runtime_gates(model).residual.deterministic()[kept]
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    for i, (full, narrow) in enumerate(zip(hidden, small_hidden)):
        assert narrow.shape[-1] == len(kept)  # the whole stream is narrower ...
        narrow = narrow * r if tied and i == len(hidden) - 1 else narrow
        torch.testing.assert_close(narrow, full[..., kept], atol=ATOL, rtol=0)
        # ... being zero there (with every dim closed, one closed dim stands in for the width)
        if pattern != "every_residual_dim_closed" and closed.any():
            assert full[..., closed].abs().max().item() == 0
    assert small.config.hidden_size == len(kept)
    assert not any(isinstance(m, ResidualLinear) for m in small.modules())  # no gathers, no scatters
    report = sparsity_report(model)
    assert sum(p.numel() for p in small.parameters()) == report.model_params - report.model_removed


def test_whole_units_leave(arch):
    """Closed heads, KV groups and channels leave whole; every kept head keeps its full head size."""
    model = patterned(arch, random_pattern(1, p_closed=0.4, p_fractional=0.0))
    ties = runtime_gates(model)
    report = sparsity_report(model)
    shape = finegates.architectures.attention_shape(model.config)
    for block, row in zip(ties.blocks, report.blocks):
        assert row.qk_dims == row.vo_dims == shape.head_dim
        heads_open = ~block["heads"].closed()
        if "kv_heads" in block:  # a query head of a closed group has nothing to read
            heads_open &= ~block["kv_heads"].closed().repeat_interleave(shape.group_size)
        assert row.heads == max(int(heads_open.sum()), 1)
        assert row.ffn_channels == int((~block["channels"].closed()).sum())


@pytest.mark.parametrize("arch_name", ["llama", "qwen3"])
def test_rms_norm_models_keep_stock_norms(arch_name):
    """The shared mask needs no compact norm: a stock RMSNorm over the kept dims with eps' = eps H / K and
    weight' = weight sqrt(H / K) is exact (Qwen3's per-head q/k norms keep their own eps)."""
    model = patterned(arch_name, random_pattern(2))
    small = compress(model)
    kept, full = len(kept_dims(model)), model.config.hidden_size
    norms = [m for n, m in small.named_modules() if n.endswith(("layernorm", "norm")) and "attn" not in n]
    assert norms and all(type(m).__name__.endswith("RMSNorm") for m in norms)
    assert small.config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps * full / kept)
    if arch_name == "qwen3":
        heads = [m for n, m in small.named_modules() if n.endswith("q_norm")]
        assert heads and all(m.eps == model.config.rms_norm_eps for m in heads)


@pytest.mark.parametrize("arch_name", ["bert", "gpt2"])
def test_layer_norm_models_use_the_compact_layer_norm(arch_name):
    small = compress(patterned(arch_name, random_pattern(2)))
    norms = [m for m in small.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(isinstance(m, CompactLayerNorm) for m in norms)
    assert all(m.full_width == 32 and m.normalized_shape[0] < 32 for m in norms)


def test_compact_layer_norm_matches_the_full_width_statistics():
    torch.manual_seed(0)
    full = nn.LayerNorm(16, eps=1e-5)
    nn.init.normal_(full.weight)
    nn.init.normal_(full.bias)
    kept = torch.tensor([0, 2, 3, 7, 8, 15])
    x = torch.zeros(4, 16)
    x[:, kept] = torch.randn(4, len(kept)) * 3 + 1
    narrow = CompactLayerNorm(nn.LayerNorm(len(kept), eps=1e-5), full_width=16)
    narrow.weight = nn.Parameter(full.weight[kept].detach().clone())
    narrow.bias = nn.Parameter(full.bias[kept].detach().clone())
    torch.testing.assert_close(narrow(x[:, kept]), full(x)[:, kept], atol=1e-6, rtol=0)
    stock = nn.LayerNorm(len(kept), eps=1e-5)
    stock.load_state_dict(narrow.state_dict())
    assert (stock(x[:, kept]) - full(x)[:, kept]).abs().max() > 1e-2  # a stock LayerNorm is not exact


def test_compact_layer_norm_keeps_float32_statistics_in_bfloat16():
    """As the stock kernel does: a bfloat16 stream gets the stock bfloat16 LayerNorm's output exactly."""
    torch.manual_seed(0)
    width, kept = 384, torch.arange(0, 384, 3)
    full = nn.LayerNorm(width, eps=1e-12)
    nn.init.normal_(full.weight)
    nn.init.normal_(full.bias)
    full = full.bfloat16()
    x = torch.zeros(64, width)
    x[:, kept] = torch.randn(64, len(kept)) * 3 + 1
    x = x.bfloat16()
    narrow = CompactLayerNorm(nn.LayerNorm(len(kept), eps=1e-12), full_width=width).bfloat16()
    narrow.weight = nn.Parameter(full.weight[kept].detach().clone())
    narrow.bias = nn.Parameter(full.bias[kept].detach().clone())
    out = narrow(x[:, kept])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, full(x)[:, kept], atol=0, rtol=0)


@pytest.mark.parametrize("arch_name", ["gpt2", "llama"])
def test_a_tied_head_stays_tied_with_fractional_residual_gates(arch_name):
    """The embeddings carry the residual gate's values and the final norm divides them out, so the tied
    head (which takes them too) stays tied and exact: the compacted model is no larger than predicted."""
    dense = tiny_model(arch_name)
    dense.config.tie_word_embeddings = True
    dense.tie_weights()
    model = get_gated_model(dense, GatesConfig(structure="runtime")).eval()
    with torch.no_grad():
        random_pattern(0)(runtime_gates(model))  # fractional residual gates among the kept dims
    values = runtime_gates(model).residual.deterministic()[kept_dims(model)]
    assert ((values > 0) & (values < 1)).any()
    small = compress(model)
    assert small.get_output_embeddings().weight is small.get_input_embeddings().weight
    ids, mask = padded_batch()
    torch.testing.assert_close(outputs(small, ids, mask)[0], outputs(model, ids, mask)[0], atol=ATOL, rtol=0)
    report = sparsity_report(model)
    assert sum(p.numel() for p in small.parameters()) == report.model_params - report.model_removed


def test_greedy_generation_and_reload(tmp_path):
    model = patterned("llama", random_pattern(5))
    small = compress(model)
    ids = tiny_inputs(seed=3, batch=2, length=5)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(small.generate(ids, **kwargs), model.generate(ids, **kwargs))
    small.save_pretrained(tmp_path / "small")
    again = finegates.load_compressed(tmp_path / "small")
    torch.testing.assert_close(outputs(again, *padded_batch())[0], outputs(small, *padded_batch())[0])


# -- training, adapters, options -------------------------------------------------------------------
def train(model: nn.Module, steps: int, after_step: Callable[[int], None]) -> None:
    """`steps` LM steps on one tiny batch through the budget objective and projection."""
    finegates.set_training_steps(model, steps)
    optimizer = torch.optim.Adam(finegates.optimizer_param_groups(model))
    ids = tiny_inputs(batch=4, length=12)
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss + finegates.sparsity_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        finegates.budget_step(model)
        after_step(step)


def test_shared_gates_are_the_trainable_units_and_learn(arch):
    model = runtime_model(arch, warmup_steps=0, init_mean=0.2).train()  # inside (0, 1): gradients flow
    gates = all_gates(model)
    ties = runtime_gates(model)
    assert {id(g) for g in gates} == {id(m) for m in ties.modules() if hasattr(m, "theta")}
    shape = finegates.architectures.attention_shape(model.config)
    sizes = sorted(len(g.theta) for g in gates)
    assert model.config.hidden_size in sizes and shape.num_heads in sizes
    ids = tiny_inputs()
    labels = ids if is_causal(arch) else torch.tensor([0, 1, 2])
    loss = model(input_ids=ids, labels=labels).loss + finegates.sparsity_loss(model)
    loss.backward()
    for gate in gates:
        assert gate.theta.grad is not None and gate.theta.grad.abs().sum() > 0
    gate_names = [n for n, p in model.named_parameters() if p.requires_grad and "finegates_gates" in n]
    assert len(gate_names) == len(gates)  # one name per shared vector


def test_one_residual_draw_per_forward_pass(arch, monkeypatch):
    """In training the residual mask is one sample per forward pass, shared by every embedding, norm and
    layer that applies it (not a fresh draw at each use), and a new one for the next pass."""
    model = runtime_model(arch, init_mean=0.0).train()
    residual = runtime_gates(model).residual
    draws = []
    sample = residual.forward
    monkeypatch.setattr(residual, "forward", lambda: draws.append(sample()) or draws[-1])
    ids = tiny_inputs()
    model(input_ids=ids).logits.sum().backward()
    model(input_ids=ids)
    assert len(draws) == 2 and not torch.equal(draws[0], draws[1])
    model.eval()
    model(input_ids=ids)
    assert len(draws) == 2  # eval values are deterministic


@pytest.mark.parametrize("arch_name", ["bert", "gpt2"])
def test_layer_norms_take_the_residual_gate_into_their_affine_map(arch_name):
    """LN(x) * r computed as x_hat * (w * r) + b * r: the output and the gradients of the product, with
    only the norm's input kept for the backward pass (not its output as well)."""
    from finegates.ties import StreamLayerNorm

    model = runtime_model(arch_name, init_mean=0.0).train()
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(type(m) is StreamLayerNorm for m in norms)
    residual, norm = runtime_gates(model).residual, norms[1]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-1, 1)
    norm.requires_grad_(True)
    x = torch.randn(40, 5, norm.weight.numel(), requires_grad=True)
    residual.new_sample()
    folded = norm(x)
    r = residual.value()  # the same draw
    plain = nn.functional.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps) * r
    torch.testing.assert_close(folded, plain)
    inputs, dy = [x, norm.weight, norm.bias, *residual.parameters()], torch.randn_like(x)
    got = torch.autograd.grad(folded, inputs, dy, retain_graph=True)
    for g, w in zip(got, torch.autograd.grad(plain, inputs, dy, retain_graph=True)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    residual.new_sample()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        norm(x)
    assert [n for n in kept if n > 1000] == [x.numel()]


def test_bypassed_gates_give_the_dense_model():
    dense = tiny_model("bert")
    model = patterned("bert", random_pattern(0))
    ids, mask = padded_batch()
    with gates_bypassed(model):
        bypassed = outputs(model, ids, mask)[0]
    torch.testing.assert_close(bypassed, outputs(dense, ids, mask)[0], atol=1e-6, rtol=0)
    assert (outputs(model, ids, mask)[0] - bypassed).abs().max() > 1e-3


def test_adapter_round_trip(tmp_path):
    model = patterned("qwen2", random_pattern(7))
    save_gates(model, tmp_path / "adapter")
    again = load_gates(tiny_model("qwen2"), tmp_path / "adapter").eval()
    assert gates_config(again).structure == "runtime"
    torch.testing.assert_close(outputs(again, *padded_batch())[0], outputs(model, *padded_batch())[0])


def test_budget_training_tracks_the_target():
    """The budget objective and projection serve the tied gates through the same path."""
    torch.manual_seed(0)
    model = runtime_model("llama", target_sparsity=0.3, warmup_steps=10, gate_lr=0.05).train()
    removed = []
    train(model, 30, lambda step: removed.append(sparsity_report(model).removed_fraction))
    assert max(removed[:5]) < 0.2  # ramped, not cut at once
    assert all(abs(r - 0.3) <= 0.08 for r in removed[10:])  # one residual dim is ~5% of these tiny layers
    assert finegates.compaction_plan(model).residual is not None


def test_options_the_runtime_structure_cannot_take():
    with pytest.raises(ValueError, match="objective='paper'"):
        GatesConfig(structure="runtime", objective="paper")
    with pytest.raises(ValueError, match="structure"):
        GatesConfig(structure="coarse")
    with pytest.raises(ValueError, match="not gated"):
        get_gated_model(tiny_model("llama"), GatesConfig(structure="runtime", target_modules=["q_proj"]))


# -- stock export ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["random", "binary_random", "a_kv_group_closed", "one_residual_dim_left"])
def test_stock_export_is_exact_with_a_narrower_stream(arch, pattern):
    model = patterned(arch, PATTERNS[pattern])
    stock = finegates.compress(model, uniform=True)
    assert type(stock) is type(model) and not finegates.is_gated(stock)
    ids, mask = padded_batch()
    torch.testing.assert_close(outputs(stock, ids, mask)[0], outputs(model, ids, mask)[0], atol=ATOL, rtol=0)
    config = stock.config
    if arch in ("bert", "roberta", "gpt2", "qwen3"):  # LayerNorm, per-head q/k norm: the stream keeps its
        # width (closed dims zero)
        assert config.hidden_size == model.config.hidden_size
    else:  # a multiple of the head count, at least the kept dims
        kept = len(kept_dims(model))
        assert kept <= config.hidden_size < kept + config.num_attention_heads
        assert config.hidden_size % config.num_attention_heads == 0
    stock_params = sum(p.numel() for p in stock.parameters())
    assert sum(p.numel() for p in compress(model).parameters()) <= stock_params
    assert stock_params <= sparsity_report(model).model_params


def test_stock_export_loads_without_finegates(tmp_path):
    import json
    import subprocess
    import sys

    from test_compress import _STOCK_RELOAD

    model = patterned("llama", binary_random)
    stock = finegates.compress(model, uniform=True)
    assert stock.config.hidden_size <= model.config.hidden_size  # narrower where training closed dims
    stock.save_pretrained(tmp_path)
    ids = tiny_inputs()
    job = json.dumps([str(tmp_path), "causal", ids.tolist()])
    run = subprocess.run(
        [sys.executable, "-c", _STOCK_RELOAD, job], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    name, logits = json.loads(run.stdout.strip().splitlines()[-1])
    assert name == "LlamaForCausalLM"
    torch.testing.assert_close(torch.tensor(logits), outputs(model, ids, None)[0], atol=ATOL, rtol=0)


# -- uniform layers --------------------------------------------------------------------------------
def layer_counts(model) -> set[tuple[int, int, int]]:
    return {(row.kv_heads, row.heads, row.ffn_channels) for row in sparsity_report(model).blocks}


@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])
def test_uniform_layers_train_to_one_stock_shape(arch_name):
    """Every layer keeps the same counts at every step; after finalize the stock export pads nothing (its
    size is the compact model's), is exact, and its hidden size is a multiple of its head count."""
    torch.manual_seed(0)
    options = {"target_sparsity": 0.4, "warmup_steps": 10, "gate_lr": 0.05, "uniform_layers": True}
    model = runtime_model(arch_name, **options).train()

    def uniform(step: int) -> None:
        assert len(layer_counts(model)) == 1, f"step {step}: {layer_counts(model)}"

    train(model, 30, uniform)
    removed = finegates.finalize_gates(model.eval())
    assert removed >= 0.4
    assert len(layer_counts(model)) == 1
    stock = finegates.compress(model, uniform=True)
    assert type(stock) is type(model)
    assert sum(p.numel() for p in stock.parameters()) == sum(p.numel() for p in compress(model).parameters())
    assert stock.config.hidden_size % stock.config.num_attention_heads == 0
    assert stock.config.hidden_size <= model.config.hidden_size  # narrower where training closed dims
    ids, mask = padded_batch()
    torch.testing.assert_close(outputs(stock, ids, mask)[0], outputs(model, ids, mask)[0], atol=ATOL, rtol=0)


def test_uniform_finalize_rounds_kv_groups_to_the_nearest_and_channels_take_the_rest():
    """Two of three layers keep both KV groups, one keeps one: finalize keeps two in every layer (the
    nearest to the mean) and lands on the target through FFN channels, instead of taking a whole KV group
    out of every layer (rounding down: about half of the attention weights at once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finegates.gates import force_gates

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37, vocab_size=99,
    )  # fmt: skip
    model = get_gated_model(
        LlamaForCausalLM(config), GatesConfig(structure="runtime", uniform_layers=True, target_sparsity=0.1)
    ).eval()
    kv = runtime_gates(model).blocks[2]["kv_heads"]
    force_gates(kv, torch.tensor([False, True]), torch.tensor([False, False]))
    removed = finegates.finalize_gates(model)
    (shape,) = layer_counts(model)  # one shape for every layer
    assert shape[:2] == (2, 4)  # both KV groups, all four query heads
    # above the target by less than a KV group would take (about 23% of these layers' weights); the rest
    # comes from whole residual dims (a multiple of the head count) and FFN channels
    assert 0.1 <= removed < 0.2


def test_uniform_layers_need_the_runtime_structure():
    with pytest.raises(ValueError, match="structure='runtime'"):
        GatesConfig(uniform_layers=True)


@pytest.mark.parametrize("arch_name", ["bert", "gpt2", "qwen3"])
def test_uniform_layers_are_refused_where_a_stock_shape_cannot_narrow(arch_name):
    """BERT and GPT-2 derive the head size from the hidden size and Qwen3's q/k norms read the one config
    epsilon: a stock export keeps every head and residual dim, so a budget counting them would not hold."""
    with pytest.raises(ValueError, match=f"uniform_layers cannot give {arch_name}.*Train without"):
        runtime_model(arch_name, uniform_layers=True)


def test_a_stream_width_no_head_count_divides_saves_and_reloads(arch, tmp_path):
    """29 of 32 dims under 4 heads: the stock config's divisibility rule does not bind a compacted model."""
    model = patterned(arch, lambda ties: ties.residual.theta.data.__setitem__(slice(0, 3), CLOSED))
    small = compress(model)
    assert small.config.hidden_size == 29
    small.save_pretrained(tmp_path / "small")
    again = finegates.load_compressed(tmp_path / "small")
    ids, mask = padded_batch()
    torch.testing.assert_close(outputs(again, ids, mask)[0], outputs(model, ids, mask)[0], atol=ATOL, rtol=0)


def test_uniform_layers_name_the_nearest_shape_when_the_target_is_out_of_reach():
    """A target no equal-layer shape can meet (each layer keeps a KV group, a head and a channel) is a
    clear error at finalize naming the smallest shape reached and what it removes."""
    model = runtime_model("llama", target_sparsity=0.3, uniform_layers=True).eval()
    with pytest.raises(
        ValueError,
        match=r"cannot remove 99\.99%: .*1 KV groups, 1 query heads, 1 FFN channels, 1 residual dims",
    ):
        finegates.finalize_gates(model, 0.9999)


def test_a_masked_lm_head_is_refused_by_the_runtime_structure_before_anything_changes():
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99
    )
    model = BertForMaskedLM(config)
    with pytest.raises(ValueError, match="does not cover BertForMaskedLM's masked-LM head"):
        get_gated_model(model, GatesConfig(structure="runtime"))
    assert not finegates.is_gated(model)  # refused before any gate went in
    get_gated_model(model, GatesConfig(structure="fine"))  # the fine structure takes it
