"""Pretraining comparison on a tiny byte-level LLaMA: both runs train, the gated one reaches its target."""

from __future__ import annotations

import pytest

from finegates.config import GatesConfig
from finegates.workflows import pretrain as workflow


def test_byte_blocks():
    blocks = workflow.byte_blocks(["ab", "c"], length=2)
    assert blocks.tolist() == [[97, 98], [256, 99]]
    with pytest.raises(ValueError, match="fewer than one block"):
        workflow.byte_blocks(["a"], length=8)


def test_gate_start_must_fall_inside_the_run():
    with pytest.raises(ValueError, match="gate_start_step"):
        workflow.PretrainConfig(max_steps=10, gate_start_step=10)


def test_progressive_compaction_is_refused_before_the_run(tmp_path):
    cfg = workflow.PretrainConfig(max_steps=10, gate_start_step=2, output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="pretraining trains them"):
        workflow.pretrain(cfg, GatesConfig(compact_every=5))
    assert not (tmp_path / "run").exists()


def test_pretrain_compares_dense_and_gated(tmp_path, monkeypatch):
    text = "pack my box with five dozen liquor jugs. "
    monkeypatch.setattr(workflow, "load_text_corpus", lambda name: [text * 6] * 12)
    cfg = workflow.PretrainConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        seq_len=32,
        batch_size=8,
        max_steps=40,
        gate_start_step=10,
        learning_rate=3e-3,
        output_dir=str(tmp_path),
        quiet=True,
    )
    gates = GatesConfig(target_sparsity=0.3, bias="none", modules_to_save=[], gate_lr=0.05, warmup_steps=10)
    metrics = workflow.pretrain(cfg, gates)
    first = {k: metrics[k]["log_history"][0]["loss"] for k in ("dense", "gated")}
    assert first["dense"] == pytest.approx(first["gated"], rel=1e-4)  # gates bypassed at first: same run
    # both learned which bytes occur: below a uniform guess over the text's bytes and EOS (29), from 257
    symbols = len(set(text)) + 1
    assert metrics["dense"]["perplexity"] < symbols and metrics["gated"]["perplexity"] < symbols
    assert metrics["gated"]["perplexity"] < 1.1 * metrics["dense"]["perplexity"]
    assert 0.3 <= metrics["sparsity"]["removed_fraction"] <= 0.31
    assert (tmp_path / "report.md").is_file()
    # the compacted model: the gated model's perplexity, fewer parameters, timed beside the dense one
    compacted = metrics["compacted"]
    assert compacted["perplexity"] == pytest.approx(metrics["gated"]["perplexity"], rel=1e-4)
    assert compacted["params"] < compacted["dense_params"] and compacted["speedup"] > 0
    assert "Compacted:" in (tmp_path / "report.md").read_text()
