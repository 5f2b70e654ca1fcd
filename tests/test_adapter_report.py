"""Gate adapters round-trip exactly; the report counts removable parameters as by hand."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import finegates
from conftest import logits, tiny_inputs, tiny_model
from finegates import GatesConfig, get_gated_model, load_gates, save_gates, sparsity_report
from finegates.adapter import WEIGHTS_NAME


def _randomize(model: torch.nn.Module, seed: int = 0, closed: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for layer in finegates.gated_layers(model).values():
        for gate in layer.gates().values():
            u = torch.rand(gate.theta.shape, generator=gen)
            with torch.no_grad():
                gate.theta.copy_(torch.where(u < closed, -2.0, torch.where(u < 0.5, 0.2, 2.0)))


def test_save_and_load_round_trip(arch, tmp_path):
    model = get_gated_model(tiny_model(arch), GatesConfig(target_sparsity=0.4))
    _randomize(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() > 0:
                p.add_(0.01)  # trained heads and biases differ from the fresh model's
    save_gates(model, tmp_path)
    umask = os.umask(0)
    os.umask(umask)  # written through a temporary file, with the permissions of a plain new file
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in tmp_path.iterdir())
    fresh = load_gates(tiny_model(arch), tmp_path)
    ids = tiny_inputs()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=0, rtol=0)
    assert fresh.finegates_config == model.finegates_config


def test_adapter_holds_only_what_was_trained(tmp_path):
    from safetensors.torch import load_file

    model = get_gated_model(tiny_model("llama"))
    save_gates(model, tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    gates = {f"{name}.{axis}_gate.theta" for name in finegates.gated_layers(model) for axis in ("row", "col")}
    controller = {
        f"finegates_controller.{n}"
        for n in ("lambda1", "lambda2", "step", "projected_closed", "projected_reopened")
    }
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert set(saved) == gates | controller | biases  # no frozen weight, nothing else
    assert all(saved[n].shape == model.state_dict()[n].shape for n in saved)


def test_an_adapter_with_nan_gates_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_gates(get_gated_model(tiny_model("bert")), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    name = next(n for n in tensors if n.endswith("theta"))
    tensors[name][0] = float("nan")
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=f"{name} holds NaN or infinite values"):
        load_gates(tiny_model("bert"), tmp_path)


def test_damaged_adapters_fail_clearly(tmp_path):
    model = get_gated_model(tiny_model("bert"))
    save_gates(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gates(tiny_model("bert"), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is not a module of this model"):
        load_gates(tiny_model("roberta"), tmp_path)  # its head lives elsewhere
    wider = BertForSequenceClassification(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=40,
            vocab_size=99,
            num_labels=3,
        )
    )
    with pytest.raises(ValueError, match="has shape"):
        load_gates(wider, tmp_path)
    config = tmp_path / "finegates_config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])  # cut short
    with pytest.raises(ValueError, match="finegates_config.json cannot be read as a gate config"):
        load_gates(tiny_model("bert"), tmp_path)
    config.write_text(text)
    (tmp_path / WEIGHTS_NAME).write_bytes((tmp_path / WEIGHTS_NAME).read_bytes()[:100])
    with pytest.raises(ValueError, match="damaged"):
        load_gates(tiny_model("bert"), tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_gates(tiny_model("bert"), tmp_path)


def _close(gate, idx) -> None:
    with torch.no_grad():
        gate.theta[idx] = -2.0


def test_report_counts_a_closed_ffn_channel_in_all_three_llama_matrices():
    model = get_gated_model(tiny_model("llama"))
    _close(model.model.layers[0].mlp.down_proj.col_gate, [3])  # channel 3 leaves gate, up and down
    report = sparsity_report(model)
    hidden = 32
    assert report.gated_removed == 3 * hidden
    assert report.blocks[0].ffn_channels == 36


def test_report_counts_qk_rope_pairs_and_gqa_groups():
    model = get_gated_model(tiny_model("llama"))  # 4 heads, 2 KV heads, head_dim 8: pairs (i, i + 4)
    attn = model.model.layers[0].self_attn
    _close(attn.k_proj.row_gate, [1, 5])  # pair 1 of KV head 0, closed in k: leaves k and q heads 0, 1
    _close(attn.k_proj.row_gate, [8 + 2])  # half of a pair in KV head 1: nothing removable
    report = sparsity_report(model)
    row = report.blocks[0]
    # KV head 1 keeps all 8 dims, so KV head 0 is padded back to 8: nothing removed yet.
    assert (row.qk_dims, report.gated_removed) == (8, 0)
    _close(attn.k_proj.row_gate, [8 + 1, 8 + 5])  # the same pair in KV head 1: now every head drops it
    report = sparsity_report(model)
    assert report.blocks[0].qk_dims == 6
    assert report.gated_removed == 2 * 32 * (4 + 2)  # two rows of q in 4 heads and of k in 2 KV heads


def test_report_counts_residual_dims_and_whole_heads_in_bert():
    model = get_gated_model(tiny_model("bert"))  # 4 heads of 8, hidden 32, FFN 37, all with biases
    layer = model.bert.encoder.layer[0]
    _close(layer.attention.self.query.col_gate, [0, 1])  # residual dims read by q: 2 columns of q
    _close(layer.output.dense.row_gate, [4])  # residual dim written by the FFN: a row (and bias) of down
    _close(layer.attention.output.dense.col_gate, list(range(8, 16)))  # head 1's output: the head leaves
    report = sparsity_report(model)
    assert report.blocks[0].heads == 3
    full = 32 * 32 + 32
    q = full - (24 * 30 + 24)  # 3 heads of 8 rows remain, reading 30 residual dims
    k = v = full - (24 * 32 + 24)
    o = 8 * 32  # the head's 8 columns
    down = 37 + 1  # one row and its bias
    assert report.gated_removed == q + k + v + o + down
    assert report.removed_fraction == report.gated_removed / report.gated_params
    assert 0 < report.model_removed_fraction < report.removed_fraction
    assert "heads 3" in str(report)


def test_an_adapter_saved_before_the_projection_counters_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    model = get_gated_model(tiny_model("bert"), GatesConfig(target_sparsity=0.3)).eval()
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.row_gate.theta[:4] = -2.0
    save_gates(model, tmp_path)
    path = tmp_path / WEIGHTS_NAME
    tensors = load_file(str(path))
    old = {k: v for k, v in tensors.items() if "projected_" not in k}
    assert len(old) == len(tensors) - 2
    save_file(old, str(path))
    loaded = load_gates(tiny_model("bert"), tmp_path).eval()
    ids = tiny_inputs()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)
    assert int(loaded.finegates_controller.projected_closed) == 0
