"""Post-training workflow end to end on a tiny random LLaMA and a tiny tokenizer-free corpus."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
import torch

from conftest import tiny_model
from finegates.compress import load_compressed
from finegates.config import GatesConfig
from finegates.data.types import MultipleChoiceItem
from finegates.workflows import posttrain as workflow
from finegates.workflows.causal_lm import choice_logprob, perplexity, text_blocks
from finegates.workflows.run_report import render_tradeoff


class _CharTokenizer:
    """One token per character: enough to exercise the workflow without a tokenizer file."""

    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [2 + ord(c) % 97 for c in text]}

    def save_pretrained(self, path) -> None:
        pass


def test_text_blocks_and_perplexity_of_a_uniform_model():
    blocks = text_blocks(_CharTokenizer(), ["hello world"] * 10, length=8)
    assert blocks.shape == (15, 8)

    class Uniform(torch.nn.Module):
        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 50)})()

    assert perplexity(Uniform(), blocks, quiet=True) == pytest.approx(50.0, rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one block"):
        text_blocks(_CharTokenizer(), ["hi"], length=8)


def test_choice_logprob_scores_only_the_choice_tokens():
    model = tiny_model("llama")
    tok = _CharTokenizer()
    full = torch.tensor([tok("ctx")["input_ids"] + tok(" ab")["input_ids"]])
    with torch.no_grad():
        logprobs = model(input_ids=full).logits[0, :-1].log_softmax(-1)
    expected = logprobs[torch.arange(2, 5), full[0, 3:]].mean()
    assert choice_logprob(model, tok, "ctx", "ab") == pytest.approx(float(expected), abs=1e-5)


def _tiny_workflow(monkeypatch) -> None:
    """posttrain on a tiny LLaMA, a repeated sentence and three two-choice questions."""
    monkeypatch.setattr(workflow, "load_causal_lm", lambda name: (tiny_model("llama"), _CharTokenizer()))
    monkeypatch.setattr(
        workflow, "load_text_corpus", lambda name, column="text": ["the quick brown fox jumps " * 8] * 20
    )
    items = [MultipleChoiceItem("q?", ["yes", "no"], 0)] * 3
    monkeypatch.setattr(workflow, "load_multiple_choice", lambda name, fields=None: items)


def _tiny_config(tmp_path, **options) -> workflow.PosttrainConfig:
    """The options of a run of `_tiny_workflow` into `tmp_path`, with `options` on top."""
    base = {"model": "tiny", "seq_len": 16, "batch_size": 4, "eval_blocks": 4, "quiet": True}
    return workflow.PosttrainConfig(**{**base, "zero_shot_items": 3, "output_dir": str(tmp_path), **options})


def test_posttrain_runs_end_to_end(tmp_path, monkeypatch, caplog):
    _tiny_workflow(monkeypatch)
    cfg = workflow.PosttrainConfig(
        model="tiny",
        seq_len=16,
        batch_size=4,
        max_steps=12,
        eval_blocks=4,
        output_dir=str(tmp_path),
        quiet=True,
        zero_shot_items=3,
    )
    gates = GatesConfig(target_sparsity=0.3, bias="none", modules_to_save=[], gate_lr=0.05, warmup_steps=4)
    metrics = workflow.posttrain(cfg, gates)
    assert metrics["trainable_params"] == sum(
        layer.in_features + layer.out_features
        for layer in workflow.get_gated_model(tiny_model("llama")).modules()
        if hasattr(layer, "row_gate")
    )
    assert 0.3 <= metrics["sparsity"]["removed_fraction"] <= 0.31
    # the compacted model computes what the gated model computes
    assert metrics["compacted"]["perplexity"] == pytest.approx(metrics["gated"]["perplexity"], rel=1e-4)
    assert metrics["compacted"]["piqa_accuracy"] == metrics["gated"]["piqa_accuracy"]
    for name in (
        "run_config.json",
        "metrics.json",
        "report.md",
        "gates/finegates_config.json",
        "compressed/config.json",
    ):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "run_config.json").read_text())["gates"]["target_sparsity"] == 0.3
    table = render_tradeoff([tmp_path], tmp_path / "tradeoff").read_text()
    assert "| finegates |" in table and "piqa_accuracy (compacted / dense)" in table
    assert f"{metrics['prefill_speedup']:.2f}x / {metrics['decode_speedup']:.2f}x" in table
    # the finished run is never overwritten by accident, is refused with other options, and --resume
    # continues it from its last complete checkpoint into a whole folder
    from finegates.workflows.run_folder import RunFolderError

    with pytest.raises(RunFolderError, match="holds a finished run"):
        workflow.posttrain(cfg, gates)
    with pytest.raises(RunFolderError, match=r"gates.target_sparsity differ"):
        workflow.posttrain(
            dataclasses.replace(cfg, resume=True), dataclasses.replace(gates, target_sparsity=0.4)
        )
    with caplog.at_level(logging.INFO, logger="finegates.workflows.run_folder"):
        workflow.posttrain(dataclasses.replace(cfg, resume=True), gates)
    assert "--resume: continuing from" in caplog.text and "checkpoint-12" in caplog.text
    assert (tmp_path / "metrics.json").is_file() and not (
        tmp_path.parent / f"{tmp_path.name}.partial"
    ).exists()


@pytest.mark.parametrize("method", ["magnitude", "magnitude+lora", "importance", "importance+lora"])
def test_posttrain_one_shot_baselines(method, tmp_path, monkeypatch):
    monkeypatch.setattr(workflow, "load_causal_lm", lambda name: (tiny_model("llama"), _CharTokenizer()))
    monkeypatch.setattr(
        workflow, "load_text_corpus", lambda name, column="text": ["the quick brown fox jumps " * 8] * 20
    )
    monkeypatch.setattr(
        workflow,
        "load_multiple_choice",
        lambda name, fields=None: [MultipleChoiceItem("q?", ["yes", "no"], 0)],
    )
    cfg = workflow.PosttrainConfig(
        model="tiny",
        method=method,
        seq_len=16,
        batch_size=4,
        max_steps=6,
        eval_blocks=4,
        output_dir=str(tmp_path),
        quiet=True,
    )
    metrics = workflow.posttrain(cfg, GatesConfig(target_sparsity=0.3))
    assert 0.3 <= metrics["sparsity"]["removed_fraction"] <= 0.31
    small = load_compressed(tmp_path / "compressed")
    assert (
        sum(p.numel() for p in small.parameters())
        == metrics["model_params"] - metrics["sparsity"]["model_removed"]
    )
    assert (metrics["trainable_params"] > 0) == method.endswith("+lora")  # only the recovery LoRA trains
    dense, small = metrics["dense"], metrics["compacted"]
    assert metrics["prefill_speedup"] == pytest.approx(dense["prefill_s"] / small["prefill_s"])
    assert metrics["decode_speedup"] == pytest.approx(
        small["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    )
    assert f"({method})" in (tmp_path / "report.md").read_text()


def test_lora_recovery_trains_in_the_trainer_and_resumes(tmp_path, monkeypatch, caplog):
    """magnitude+lora trains through the same Trainer arguments as FineGates: logged, checkpointed, and
    `--resume` continues it from its checkpoint."""
    _tiny_workflow(monkeypatch)
    cfg = _tiny_config(tmp_path, method="magnitude+lora", max_steps=8)
    first = workflow.posttrain(cfg, GatesConfig(target_sparsity=0.3))
    history = json.loads((tmp_path / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == list(range(1, 9))  # logging_steps = 8 // 20 -> 1
    with caplog.at_level(logging.INFO, logger="finegates.workflows.run_folder"):
        again = workflow.posttrain(dataclasses.replace(cfg, resume=True), GatesConfig(target_sparsity=0.3))
    assert "--resume: continuing from" in caplog.text and "checkpoint-8" in caplog.text
    # the trained LoRA comes back from the checkpoint (a fresh one would give the pruned model's perplexity)
    assert again["sparsity"] == first["sparsity"]
    assert again["compacted"]["perplexity"] == pytest.approx(first["compacted"]["perplexity"], rel=1e-9)


def test_posttrain_rejects_unknown_methods():
    with pytest.raises(ValueError, match="magnitude\\+lora"):
        workflow.PosttrainConfig(method="wanda")


def test_posttrain_on_the_users_own_files_with_distillation(tmp_path, monkeypatch):
    """A .txt corpus and a zero-shot jsonl of the user's, the default schedule and --distill: training
    itself removes the target (no warning), the log carries the distillation term, the report says both."""
    monkeypatch.setattr(workflow, "load_causal_lm", lambda name: (tiny_model("llama"), _CharTokenizer()))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(f"document {i}: the quick brown fox jumps over the lazy dog" * 3 for i in range(20))
    )
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text("\n".join(json.dumps({"q": f"q{i}", "opts": ["yes", "no"], "a": "no"}) for i in range(3)))
    cfg = workflow.PosttrainConfig(
        model="tiny",
        text=str(corpus),
        zero_shot=str(quiz),
        zero_shot_question_field="q",
        zero_shot_choices_field="opts",
        zero_shot_answer_field="a",
        seq_len=16,
        batch_size=4,
        max_steps=40,
        eval_blocks=4,
        output_dir=str(tmp_path / "run"),
        quiet=True,
        distill=True,
        distill_hidden_weight=1.0,
    )
    metrics = workflow.posttrain(cfg, GatesConfig(target_sparsity=0.3, bias="none", modules_to_save=[]))
    budget = metrics["budget"]
    assert abs(budget["removed_by_training"] - 0.3) <= 0.02 and budget["warning"] is None
    assert 0.3 <= budget["removed_after_finalize"] <= 0.31
    assert metrics["compacted"]["quiz_accuracy"] == metrics["gated"]["quiz_accuracy"]
    logged = json.loads((tmp_path / "run" / "log_history.json").read_text())
    assert any(row.get("distill_term", 0) > 0 for row in logged)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Budget" in report and "removed by training" in report


def test_bad_user_data_fails_before_the_run_folder_is_touched(tmp_path):
    cfg = workflow.PosttrainConfig(
        model="tiny", text=str(tmp_path / "missing.txt"), output_dir=str(tmp_path / "run")
    )
    with pytest.raises(ValueError, match="missing.txt does not exist"):
        workflow.posttrain(cfg)
    assert not (tmp_path / "run").exists()


def test_a_one_shot_baseline_refuses_gate_options_it_would_not_honour(tmp_path):
    """The baselines cut rows and columns by the parameter budget: a structure, excluded layers or a
    latency budget are refused by name before anything loads, not silently dropped."""
    cfg = _tiny_config(tmp_path / "run", method="importance+lora")
    defaults = workflow.default_posttrain_gates()
    runtime = dataclasses.replace(defaults, structure="runtime", exclude_modules=["o"])
    with pytest.raises(ValueError, match="does not take --structure, --exclude-modules"):
        workflow.posttrain(cfg, runtime)
    assert not (tmp_path / "run").exists()


def test_distill_needs_a_method_that_trains():
    with pytest.raises(ValueError, match="'magnitude' is a one-shot cut"):
        workflow.PosttrainConfig(method="magnitude", distill=True)
    assert workflow.PosttrainConfig(method="importance+lora", distill=True).distill
    assert not workflow.PosttrainConfig(method="magnitude+lora").distill  # off by default for baselines


def test_the_recovered_baselines_distil_from_the_dense_weights(tmp_path, monkeypatch):
    """magnitude+lora --distill: the teacher inside the trained model (gates bypassed, LoRA off) is the
    dense model to the last bit, its term is logged, and the run lands where the undistilled one does on
    the budget."""
    from finegates.baselines.magnitude import MagnitudeLoRA, MagnitudeLoRAConfig
    from finegates.distill import DistillConfig, teacher_outputs

    dense = tiny_model("llama").eval()
    ids = torch.randint(0, dense.config.vocab_size, (2, 8))
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
    method = MagnitudeLoRA()
    config = MagnitudeLoRAConfig(target_sparsity=0.3)
    model = method.prepare(copy.deepcopy(dense), config, [{"input_ids": ids}])
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: B moved off its zero start
            torch.nn.init.normal_(param)
    with torch.no_grad():
        student = model(input_ids=ids).logits
    teacher = teacher_outputs(model, {"input_ids": ids}, DistillConfig(distill=True)).logits
    assert torch.equal(teacher, expected) and not torch.allclose(student, expected, atol=1e-3)
    assert torch.equal(model(input_ids=ids).logits, student)  # the switches are back on

    _tiny_workflow(monkeypatch)
    cfg = _tiny_config(tmp_path, method="magnitude+lora", distill=True, max_steps=6)
    metrics = workflow.posttrain(cfg, GatesConfig(target_sparsity=0.3))
    assert 0.3 <= metrics["sparsity"]["removed_fraction"] <= 0.31
    logged = json.loads((tmp_path / "log_history.json").read_text())
    assert all(row["distill_term"] > 0 for row in logged if "loss" in row)


def test_save_steps_sets_the_checkpoint_period(tmp_path, monkeypatch):
    """--save-steps reaches the Trainer (default: a quarter of the run), may change on --resume, and a
    period below one step is refused."""
    _tiny_workflow(monkeypatch)
    periods = []

    class Stop(Exception):
        pass

    def capture(trainer, resume):
        periods.append(trainer.args.save_steps)
        raise Stop

    monkeypatch.setattr(workflow, "train_model", capture)
    cfg = workflow.PosttrainConfig(model="tiny", seq_len=16, max_steps=12, eval_blocks=4, quiet=True)
    for save_steps, expected in ((None, 3), (5, 5)):
        run = dataclasses.replace(cfg, save_steps=save_steps, output_dir=str(tmp_path / f"run-{save_steps}"))
        with pytest.raises(Stop):
            workflow.posttrain(run, GatesConfig(target_sparsity=0.3))
        assert periods[-1] == expected
    # a stopped run continues with another period
    with pytest.raises(Stop):
        workflow.posttrain(
            dataclasses.replace(run, save_steps=2, resume=True), GatesConfig(target_sparsity=0.3)
        )
    assert periods[-1] == 2
    with pytest.raises(ValueError, match="save_steps must be >= 1"):
        workflow.PosttrainConfig(save_steps=0)
    with pytest.raises(ValueError, match="max_steps must be >= 1, got -3"):
        workflow.PosttrainConfig(max_steps=-3)
    with pytest.raises(ValueError, match="seq_len must be >= 2, got 1"):
        workflow.PosttrainConfig(seq_len=1)


@pytest.mark.parametrize("structure", ["fine", "runtime"])
def test_posttrain_with_progressive_compaction(tmp_path, monkeypatch, structure):
    """--compact-every with the default distillation: units leave the weights during training (the teacher
    keeps the full weights), and the compacted model still computes what the gated one does."""
    _tiny_workflow(monkeypatch)
    cfg = workflow.PosttrainConfig(
        model="tiny", seq_len=16, batch_size=4, max_steps=30, eval_blocks=4, output_dir=str(tmp_path),
        quiet=True, zero_shot_items=3,
    )  # fmt: skip
    gates = GatesConfig(
        target_sparsity=0.4, bias="none", modules_to_save=[], structure=structure, compact_every=2
    )
    metrics = workflow.posttrain(cfg, gates)
    cut = [
        e["weights_cut"]
        for e in json.loads((tmp_path / "log_history.json").read_text())
        if "weights_cut" in e
    ]
    assert cut and cut[-1] > 0
    assert metrics["sparsity"]["removed_fraction"] >= 0.4
    assert metrics["compacted"]["perplexity"] == pytest.approx(metrics["gated"]["perplexity"], rel=1e-4)
    assert metrics["budget"]["weights_cut"] == pytest.approx(cut[-1], abs=0.05)
    assert "Progressive compaction cut" in (tmp_path / "report.md").read_text()


def test_posttrain_with_the_runtime_structure(tmp_path, monkeypatch):
    """--structure runtime through the whole workflow: tied gates train to the target with distillation,
    the compacted model (a narrower stream) computes what the gated one does, and reloads."""
    _tiny_workflow(monkeypatch)
    cfg = workflow.PosttrainConfig(
        model="tiny", seq_len=16, batch_size=4, max_steps=30, eval_blocks=4, output_dir=str(tmp_path),
        quiet=True, zero_shot_items=3,
    )  # fmt: skip
    gates = GatesConfig(target_sparsity=0.3, bias="none", modules_to_save=[], structure="runtime")
    metrics = workflow.posttrain(cfg, gates)
    # at least the target; one residual dim of this tiny model is ~3% of its gated weights (a whole unit)
    assert 0.3 <= metrics["sparsity"]["removed_fraction"] <= 0.34
    assert metrics["compacted"]["perplexity"] == pytest.approx(metrics["gated"]["perplexity"], rel=1e-4)
    small = load_compressed(tmp_path / "compressed")
    assert small.config.hidden_size < 32 and small.config.finegates_compact["residual_from"] == 32


def test_distilling_a_method_without_gates_is_refused(tmp_path):
    from transformers import TrainingArguments

    from finegates.baselines.registry import make_method
    from finegates.baselines.trainer import MethodTrainer
    from finegates.distill import DistillConfig

    method = make_method("lora")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="'lora' has no gates to bypass"):
        MethodTrainer(
            model=tiny_model("llama"), args=args, method=method, distill=DistillConfig(distill=True)
        )
