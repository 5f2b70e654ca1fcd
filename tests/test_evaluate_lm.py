"""`finegates evaluate` on causal LMs: a post-training run's saved models scored again on its own held-out
text and zero-shot task, and the batched zero-shot scoring against one sequence at a time."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import tiny_model
from finegates.cli import main
from finegates.config import GatesConfig
from finegates.data.types import MultipleChoiceItem
from finegates.workflows import causal_lm
from finegates.workflows import posttrain as workflow
from finegates.workflows.evaluate import EvaluateConfig, evaluate
from finegates.workflows.evaluate_lm import is_causal_lm

WORDS = ["[UNK]", "</s>", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
WORDS += ["Question", "Answer", ":", "?", "q", "yes", "no", "maybe"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A real (saveable, reloadable) word-level tokenizer over the test corpus's words."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"unk_token": "[UNK]", "eos_token": "</s>", "pad_token": "</s>"}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A finished 12-step post-training run of a tiny LLaMA with a real tokenizer: (folder, metrics)."""
    patch = pytest.MonkeyPatch()

    def load(name):
        return tiny_model("llama"), word_tokenizer()

    patch.setattr(workflow, "load_causal_lm", load)
    patch.setattr(causal_lm, "load_causal_lm", load)  # where `evaluate` loads an adapter's base model
    docs = [f"the quick brown fox jumps over the lazy dog {'yes no ' * (i % 3)}" * 4 for i in range(30)]
    patch.setattr(workflow, "load_text_corpus", lambda name, column="text": docs)
    items = [MultipleChoiceItem("q ?", ["yes", "no", "maybe dog"], i % 3) for i in range(5)]
    patch.setattr(workflow, "load_multiple_choice", lambda name, fields=None: items)
    out = tmp_path_factory.mktemp("lm-run") / "run"
    cfg = workflow.PosttrainConfig(
        model="tiny", seq_len=16, batch_size=4, max_steps=12, eval_blocks=4, output_dir=str(out), quiet=True
    )
    gates = GatesConfig(target_sparsity=0.3, bias="none", modules_to_save=[], gate_lr=0.05, warmup_steps=4)
    metrics = workflow.posttrain(cfg, gates)
    yield out, metrics
    patch.undo()


@pytest.mark.parametrize(("folder", "model"), [("compressed", "compacted"), ("gates", "gated")])
def test_evaluate_scores_a_post_trained_model_as_its_run_did(lm_run, folder, model):
    """The saved compacted model and the gate adapter, scored on the run's held-out split (read from its
    run_config.json), give the run's own perplexity and zero-shot accuracy."""
    out, metrics = lm_run
    assert is_causal_lm(str(out / folder))
    scored = evaluate(EvaluateConfig(model=str(out / folder), eval_blocks=4, quiet=True))
    assert scored["perplexity"] == pytest.approx(metrics[model]["perplexity"], rel=1e-5)
    assert scored["piqa_accuracy"] == metrics[model]["piqa_accuracy"]
    assert scored["heldout_blocks"] == 4 and scored["zero_shot_items"] == 5 and scored["seq_len"] == 16
    correct, accuracy = scored["piqa_correct"], scored["piqa_accuracy"]  # per item, for paired comparisons
    assert len(correct) == 5 and sum(correct) / 5 == accuracy
    assert scored["piqa_accuracy_stderr"] == pytest.approx((accuracy * (1 - accuracy) / 5) ** 0.5)
    assert scored["text_from"] == "the run's run_config.json"


def test_evaluate_cli_on_a_causal_lm_takes_its_own_options(lm_run, tmp_path, capsys):
    """Every held-out block by default; --eval-blocks, --seq-len and --zero-shot none change what is scored;
    the figures go to stdout and --output-file."""
    out, metrics = lm_run
    every = tmp_path / "every.json"
    assert main(["evaluate", "--model", str(out / "compressed"), "--quiet", "--output-file", str(every)]) == 0
    scored = json.loads(every.read_text())
    assert scored["heldout_blocks"] > 4 and "piqa_accuracy" in scored
    assert "held-out perplexity" in capsys.readouterr().out
    short = tmp_path / "short.json"
    argv = ["evaluate", "--model", str(out / "compressed"), "--quiet", "--output-file", str(short)]
    assert main([*argv, "--zero-shot", "none", "--eval-blocks", "2", "--seq-len", "8"]) == 0
    scored = json.loads(short.read_text())
    assert scored["heldout_blocks"] == 2 and scored["seq_len"] == 8
    assert scored["zero_shot"] is None and "piqa_accuracy" not in scored
    assert scored["perplexity"] != pytest.approx(metrics["compacted"]["perplexity"], rel=1e-3)
    assert main([*argv, "--eval-blocks", "0"]) == 2
    assert "eval_blocks must be >= 1" in capsys.readouterr().err


def test_naming_a_text_keeps_the_runs_split(lm_run, caplog):
    """--text with the run's own text scores the run's held-out part (its fraction and block length);
    another text keeps the block length and says that it is not the run's held-out text."""
    from finegates.workflows.evaluate_lm import lm_settings

    out, _ = lm_run
    model = str(out / "compressed")
    run_text = workflow.PosttrainConfig().text
    settings, source = lm_settings(EvaluateConfig(model=model, text=run_text))
    assert (settings.seq_len, source) == (16, "the run's run_config.json")
    with caplog.at_level("WARNING"):
        settings, source = lm_settings(EvaluateConfig(model=model, text="brown"))
    assert (settings.text, settings.seq_len, source) == ("brown", 16, "the command line")
    assert "not the run's held-out text" in caplog.text


def test_a_model_folder_without_a_tokenizer_is_refused(lm_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = lm_run
    import finegates.compress  # noqa: F401

    AutoModelForCausalLM.from_pretrained(out / "compressed").save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        evaluate(EvaluateConfig(model=str(tmp_path / "bare"), quiet=True))


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_choice_scores_equal_one_sequence_at_a_time(batch_size):
    """Sequences of different lengths, right-padded in one batch, score as they do alone."""
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    pairs = [("Question : q ?", "yes"), ("the quick brown fox", "jumps over the lazy dog"), ("dog", "no")]
    pairs += [("Question : the lazy dog ? Answer :", "maybe the quick fox")]
    alone = []
    for context, choice in pairs:
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context_ids + tokenizer(" " + choice, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        picked = logprobs[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(context_ids) - 1 :]
        alone.append(float(picked.mean()))
    batched = causal_lm.choice_logprobs(model, tokenizer, pairs, batch_size=batch_size)
    assert batched == pytest.approx(alone, abs=1e-5)


def test_evaluate_int8_quantized_causal_lm(lm_run):
    """--quantize int8 scores torch's dynamically quantized copy of the compacted LM: close, not identical."""
    out, _ = lm_run
    options = {"model": str(out / "compressed"), "eval_blocks": 4, "zero_shot": None, "quiet": True}
    plain = evaluate(EvaluateConfig(**options))
    int8 = evaluate(EvaluateConfig(**options, quantize="int8"))
    assert int8["quantize"] == "int8" and plain["quantize"] is None and "piqa_accuracy" not in int8
    assert int8["perplexity"] != plain["perplexity"]
    assert int8["perplexity"] == pytest.approx(plain["perplexity"], rel=0.05)
