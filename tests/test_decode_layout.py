"""`decode_layout`: column-major weights for decoding's GEMVs, same outputs, ties kept, undone for saving."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import test_compress as fine
import test_runtime_structure as runtime
from conftest import logits as logits_of
from conftest import tiny_inputs, tiny_model
from finegates import compress, decode_layout
from finegates.compress import layout as layout_module
from finegates.compress.layout import is_column_major
from finegates.workflows.evaluation import measure_decode

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {
        name: module.weight for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
    }


def generated(model) -> torch.Tensor:
    ids = tiny_inputs(seed=3, batch=2, length=5)
    return model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)


def test_columns_stores_tall_weights_column_major_and_keeps_outputs_and_ties():
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    ids = tiny_inputs()
    logits, tokens = logits_of(model, ids), generated(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    chosen = decode_layout(model, "columns")

    weights = linear_weights(model)
    tall = {name for name, w in weights.items() if w.shape[0] >= w.shape[1]}
    assert tall and tall != set(weights)  # the fixture has both kinds (o/q 32x32, up 37x32; k/v 16x32)
    assert {name for name, w in weights.items() if is_column_major(w)} == tall
    assert all(weights[name].is_contiguous() for name in set(weights) - tall)
    assert chosen.columns == len(tall)  # the tied head counted once, as one tensor
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits_of(model, ids), logits, atol=1e-5, rtol=0)
    assert torch.equal(generated(model), tokens)

    chosen.restore()
    assert all(w.is_contiguous() for w in linear_weights(model).values())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_the_stock_layout_comes_back_for_saving(tmp_path):
    """transformers cannot save a column-major tied head: a `with` block, or layout "rows", restores it."""
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    with decode_layout(model, "columns") as chosen:
        assert chosen.columns > 0
        with pytest.raises(RuntimeError, match="view size is not compatible"):
            model.save_pretrained(tmp_path / "refused")
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(logits_of(reloaded, tiny_inputs()), logits_of(model, tiny_inputs()))

    decode_layout(model, "columns")
    tall = {name for name, w in linear_weights(model).items() if is_column_major(w)}
    with decode_layout(model, "rows") as chosen:  # "rows" stores row-major what another call changed
        assert chosen.columns == 0 and len(chosen.changed) == len(tall)
        assert all(w.is_contiguous() for w in linear_weights(model).values())
    assert {name for name, w in linear_weights(model).items() if is_column_major(w)} == tall  # and back


@pytest.mark.parametrize("structure", ["fine", "runtime", "fine, a block emptied"])
def test_compacted_models_decode_the_same_in_either_layout(structure):
    """Compact linears (the fine structure's gathers and scatters too) take column-major weights as is;
    the empty weights of a block compaction emptied are left alone."""
    if structure == "fine":
        gated = fine.patterned("llama", fine.PATTERNS["random"])
    elif structure == "runtime":
        gated = runtime.patterned("llama", runtime.PATTERNS["random"])
    else:
        gated = fine.patterned("llama", fine.PATTERNS["everything_in_a_block_closed"])
    small = compress(gated)
    tokens, logits = generated(small), logits_of(small, tiny_inputs(length=40))  # 40 rows: the GEMM routes
    with decode_layout(small, "columns") as chosen:
        assert chosen.columns > 0
        assert torch.equal(generated(small), tokens)
        torch.testing.assert_close(logits_of(small, tiny_inputs(length=40)), logits, atol=1e-5, rtol=0)


def test_auto_keeps_columns_where_they_are_timed_faster(monkeypatch):
    """ "auto" times both layouts per shape over (a slice of) the model's own weights and keeps the faster."""
    model = tiny_model("llama")
    probed = []

    def fake_seconds(weights, repeats=3):  # column-major copies "run" in half the time of row-major ones
        probed.append([tuple(w.shape) for w in weights])
        return 1.0 if weights[0].is_contiguous() else 0.5

    monkeypatch.setattr(layout_module, "_gemv_seconds", fake_seconds)
    assert decode_layout(model, "auto").columns == len(linear_weights(model))
    assert all(is_column_major(w) for w in linear_weights(model).values())

    # now the other way round: every weight goes back to rows
    slower = {True: 1.0, False: 2.0}  # keyed by "the probe is row-major"
    monkeypatch.setattr(layout_module, "_gemv_seconds", lambda w, repeats=3: slower[w[0].is_contiguous()])
    chosen = decode_layout(model, "auto")
    assert chosen.columns == 0 and chosen.classes == {"tall": "rows", "wide": "rows"}
    assert all(w.is_contiguous() for w in linear_weights(model).values())

    # the probe stops at PROBE_BYTES: a larger matrix is probed on its first rows only
    monkeypatch.setattr(layout_module, "PROBE_BYTES", 10 * 32 * 4)
    probed.clear()
    monkeypatch.setattr(layout_module, "_gemv_seconds", fake_seconds)
    decode_layout(model, "auto")
    # each class's first weight (q_proj 32 x 32, k_proj 16 x 32) fills the budget with its first 10 rows
    assert probed and all(shapes == [(10, 32)] for shapes in probed)


def test_auto_on_the_real_kernels_keeps_outputs():
    model = tiny_model("gpt2")  # Conv1D modules are not nn.Linear: only the LM head is considered
    ids = tiny_inputs()
    logits = logits_of(model, ids)
    chosen = decode_layout(model)
    assert set(chosen.classes) == {"tall"}  # 99 x 32
    torch.testing.assert_close(logits_of(model, ids), logits, atol=1e-5, rtol=0)
    chosen.restore()


def test_measure_decode_restores_the_layout():
    model = tiny_model("llama")
    rates = measure_decode({"m": model}, tokens=2, repeats=1, layout="columns")
    assert rates["m"] > 0
    assert all(w.is_contiguous() for w in linear_weights(model).values())


def test_an_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout must be one of auto, columns, rows, not 'diagonal'"):
        decode_layout(tiny_model("llama"), "diagonal")
