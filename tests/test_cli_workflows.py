"""posttrain / pretrain / compare subcommands: options reach the configs, workflow defaults apply."""

from __future__ import annotations

import os

import pytest

from finegates import cli
from finegates.workflows import compare, posttrain, pretrain


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake(name, result):
        def run(*configs):
            seen[name] = configs
            return result

        return run

    lm = {
        "dense": {"perplexity": 2.0},
        "compacted": {"perplexity": 2.5},
        "gated": {"perplexity": 2.5},
        "sparsity": {"removed_fraction": 0.3},
        "prefill_speedup": 1.2,
    }
    monkeypatch.setattr(posttrain, "posttrain", fake("posttrain", lm))
    monkeypatch.setattr(pretrain, "pretrain", fake("pretrain", lm))
    monkeypatch.setattr(compare, "compare", fake("compare", []))
    return seen


def test_posttrain_uses_its_gate_defaults_and_flags_override(captured, capsys):
    assert cli.main(["posttrain", "--max-steps", "7", "--target-sparsity", "0.2"]) == 0
    # the summary points to the full evaluation of the saved model
    assert "finegates evaluate --model runs/posttrain/compressed" in capsys.readouterr().out
    run, gates = captured["posttrain"]
    assert run.max_steps == 7 and gates.target_sparsity == 0.2
    # warm-up and gate lr follow the run's length (set by the trainer), unless a flag names them
    assert (
        gates.bias == "none"
        and gates.modules_to_save == []
        and gates.gate_lr is None
        and gates.warmup_steps is None
    )
    assert gates.warmup_fraction == 0.7  # post-training ramps the target over 70% of the run
    assert run.distill is True  # distillation is on for the gates by default, off for one-shot baselines
    assert cli.main(["posttrain", "--method", "magnitude"]) == 0 and captured["posttrain"][0].distill is False
    assert cli.main(["posttrain", "--no-distill"]) == 0 and captured["posttrain"][0].distill is False
    assert cli.main(["posttrain", "--method", "magnitude", "--distill"]) == 2  # no gates to bypass
    assert cli.main(["posttrain", "--warmup-fraction", "0.5"]) == 0
    assert captured["posttrain"][1].warmup_fraction == 0.5
    assert cli.main(["posttrain", "--gate-lr", "0.05", "--warmup-steps", "3"]) == 0
    assert (captured["posttrain"][1].gate_lr, captured["posttrain"][1].warmup_steps) == (0.05, 3)


def test_pretrain_options(captured):
    assert cli.main(["pretrain", "--max-steps", "50", "--gate-start-step", "10"]) == 0
    run, gates = captured["pretrain"]
    assert (run.max_steps, run.gate_start_step, gates.target_sparsity) == (50, 10, 0.4)


def test_compare_takes_comma_lists(captured):
    argv = ["compare", "--methods", "full,lora,finegates", "--sparsity", "0.2,0.4", "--task", "reuters8"]
    assert cli.main(argv) == 0
    (cfg,) = captured["compare"]
    assert cfg.methods == ["full", "lora", "finegates"] and cfg.sparsity == [0.2, 0.4]


def test_compare_rejects_an_unknown_method(capsys):
    assert cli.main(["compare", "--methods", "full,adapters"]) == 2
    assert "Unknown methods ['adapters']" in capsys.readouterr().err


def test_compress_command_compacts_a_saved_adapter(tmp_path, capsys):
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, BertTokenizerFast

    import finegates
    from conftest import tiny_inputs, tiny_model

    base_dir = tmp_path / "base"
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nb")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(base_dir)
    tiny_model("bert").save_pretrained(base_dir)
    gated = finegates.get_gated_model(AutoModelForSequenceClassification.from_pretrained(base_dir))
    with torch.no_grad():
        gated.bert.encoder.layer[0].intermediate.dense.row_gate.theta[:20] = -3.0
        gated.classifier.weight.add_(0.5)
    run = tmp_path / "run"
    finegates.save_gates(gated.eval(), run / "gates")
    (run / "run_config.json").write_text(json.dumps({"finetune": {"model": str(base_dir)}}))
    assert cli.main(["compress", "--gates", str(run / "gates"), "--output-dir", str(tmp_path / "small")]) == 0
    small = AutoModelForSequenceClassification.from_pretrained(tmp_path / "small").eval()
    ids = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            small(input_ids=ids).logits, gated(input_ids=ids).logits, atol=1e-5, rtol=0
        )
    assert sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for p in tiny_model("bert").parameters()
    )
    assert cli.main(["compress", "--gates", str(tmp_path), "--output-dir", str(tmp_path / "x")]) == 2
    # a folder that holds something is replaced only when asked, and then whole
    before = sorted(p.name for p in (tmp_path / "small").iterdir())
    again = ["compress", "--gates", str(run / "gates"), "--output-dir", str(tmp_path / "small")]
    assert cli.main(again) == 2 and "exists and is not empty" in capsys.readouterr().err
    assert cli.main([*again, "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".small")]  # no staging left
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "small").stat().st_mode & 0o777 == 0o777 & ~umask  # as a new folder, not owner-only


def test_compress_a_run_whose_head_differs_from_the_base(tmp_path, capsys):
    """A run on 3 labels from a 2-label base compacts with its own head; a truncated adapter is one line."""
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, BertTokenizerFast

    import finegates
    from conftest import tiny_inputs, tiny_model
    from finegates.adapter import WEIGHTS_NAME

    base_dir = tmp_path / "base"
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nb")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(base_dir)
    tiny_model("bert").save_pretrained(base_dir)  # 2 labels
    three = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=3, ignore_mismatched_sizes=True
    )
    gated = finegates.get_gated_model(three)
    run = tmp_path / "run"
    finegates.save_gates(gated.eval(), run / "gates")
    (run / "run_config.json").write_text(json.dumps({"finetune": {"model": str(base_dir)}}))
    assert cli.main(["compress", "--gates", str(run / "gates"), "--output-dir", str(tmp_path / "small")]) == 0
    small = AutoModelForSequenceClassification.from_pretrained(tmp_path / "small").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            small(input_ids=tiny_inputs()).logits, gated(input_ids=tiny_inputs()).logits, atol=1e-5, rtol=0
        )
    (run / "run_config.json").write_text('{"finetune": {"mod')  # cut short
    assert cli.main(["compress", "--gates", str(run / "gates"), "--output-dir", str(tmp_path / "x")]) == 2
    assert "run_config.json cannot be read" in capsys.readouterr().err
    (run / "run_config.json").write_text(json.dumps({"finetune": {"model": str(base_dir)}}))
    adapter = run / "gates" / WEIGHTS_NAME
    adapter.write_bytes(adapter.read_bytes()[:200])
    assert cli.main(["compress", "--gates", str(run / "gates"), "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "is damaged or not a safetensors file" in err and "Traceback" not in err


def test_bench_times_a_checkpoint_against_its_base(tmp_path, capsys):
    from conftest import tiny_model

    tiny_model("bert").save_pretrained(tmp_path / "a")
    tiny_model("bert", seed=1).save_pretrained(tmp_path / "b")
    argv = [
        "bench",
        "--model",
        str(tmp_path / "b"),
        "--base-model",
        str(tmp_path / "a"),
        "--batch-size",
        "2",
        "--length",
        "8",
        "--repeats",
        "2",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "dense" in out and "checkpoint" in out
    # the pruning's ratio (both models on the compacted model's GEMM routes) and the stock model's beside it
    assert "over the dense model on the same GEMM routes" in out and "over the stock dense model" in out
    assert cli.main(["bench", "--model", str(tmp_path / "b")]) == 2


def test_bench_decodes_causal_lms_with_the_kv_cache(tmp_path, capsys):
    """A causal LM is benchmarked as a causal LM (not given a classification head), decode included."""
    import finegates
    from conftest import tiny_model

    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    gated = finegates.get_gated_model(tiny_model("llama"), finegates.GatesConfig(target_sparsity=0.3))
    finegates.finalize_gates(gated)
    small = finegates.compress(gated.eval())
    small.config.use_cache = False  # as a Trainer-trained config may say: decode still uses the cache
    small.save_pretrained(tmp_path / "small")
    argv = [
        "bench",
        "--model",
        str(tmp_path / "small"),
        "--base-model",
        str(tmp_path / "dense"),
        "--batch-size",
        "1",
        "--length",
        "8",
        "--repeats",
        "1",
        "--decode-tokens",
        "4",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "decode 4 tokens (KV cache, auto weight layout)" in out
    assert cli.main([*argv, "--decode-layout", "diagonal"]) == 2  # a clear error, before any loading
    assert "--decode-layout must be one of auto, columns, rows, not 'diagonal'" in capsys.readouterr().err
    from finegates.workflows.bench import _load
    from finegates.workflows.evaluation import measure_decode

    assert type(_load(str(tmp_path / "small"))).__name__ == "CompactLlamaForCausalLM"
    steps = []  # tokens each forward pass embeds: 1 per decoding step when the KV cache is used
    small.model.embed_tokens.register_forward_pre_hook(lambda module, args: steps.append(args[0].shape[-1]))
    measure_decode({"small": small}, tokens=4, repeats=1)
    # 4 generates (warm-up and one round, of 1 and 5 new tokens): each embeds the 16-token prompt once, then
    # one token per decoding step; without the cache the later steps would embed 17, 18, ... tokens
    assert steps.count(16) == 4 and steps.count(1) == 2 * 4 and set(steps) == {1, 16}
    tiny_model("bert").save_pretrained(tmp_path / "bert")
    assert (
        cli.main(
            [
                "bench",
                "--model",
                str(tmp_path / "bert"),
                "--base-model",
                str(tmp_path / "bert"),
                "--decode-tokens",
                "4",
            ]
        )
        == 2
    )  # an encoder cannot generate: a clear error


@pytest.mark.parametrize("command", ["posttrain", "pretrain"])
def test_the_lm_workflows_set_up_logging_as_quiet_says(captured, command):
    """INFO logs (e.g. a resumed run's "--resume: continuing from ...") unless --quiet."""
    import logging

    assert cli.main([command, "--max-steps", "700"]) == 0
    assert logging.getLogger("finegates").level == logging.INFO
    assert cli.main([command, "--max-steps", "700", "--quiet"]) == 0
    assert logging.getLogger("finegates").level == logging.WARNING
