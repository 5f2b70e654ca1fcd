"""`evaluate` for causal LMs: held-out perplexity and zero-shot multiple-choice accuracy of any checkpoint,
measured as `posttrain` measures them.

CLI:  finegates evaluate --model runs/posttrain/compressed                     # the run's held-out text
      finegates evaluate --model runs/posttrain/gates --zero-shot-items 1500   # the gated model
      finegates evaluate --model smollm2-135m --text brown --zero-shot none     # a dense model

Perplexity is taken on the held-out documents of a post-training run (`posttrain`'s split of its `--text`,
`--heldout-fraction` and `--seq-len`, read from the run's run_config.json next to the folder), so a saved
model is never scored on the text it trained on; options given on the command line take precedence.
Unlike `posttrain`, whose figures are quick checks (32 blocks, a few hundred items by default), `evaluate`
scores every held-out block and every zero-shot item unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from finegates.adapter import WEIGHTS_NAME, load_gates
from finegates.workflows.run_config import RUN_CONFIG_NAME, base_model_of

logger = logging.getLogger(__name__)

# `posttrain` options that decide which text is held out and how it is scored; read from the run
SPLIT_OPTIONS = ("text", "text_column", "heldout_fraction", "seq_len")
CHOICE_OPTIONS = ("zero_shot", "zero_shot_question_field", "zero_shot_choices_field")
CHOICE_OPTIONS += ("zero_shot_answer_field",)


def is_causal_lm(model: str, base_model: str | None = None) -> bool:
    """Whether `evaluate` should score `model` as a language model: a folder or hub id whose config names
    a causal-LM architecture, or a gate adapter of a post-training run or of such a base model."""
    from finegates.workflows.causal_lm import SMOLLM2, is_causal_architecture
    from finegates.workflows.models import locate_model

    path = Path(model)
    if (path / WEIGHTS_NAME).is_file():
        sections = _run_sections(path)
        if "posttrain" in sections:
            return True
        if "finetune" in sections or _holds_a_task_head(path):
            return False  # a classifier's adapter, even on a causal-LM base (e.g. finetune on SmolLM2)
        try:
            base = base_model_of(path, base_model)
        except ValueError:
            return False  # `evaluate`'s classification path gives the error about the missing base
        return is_causal_lm(base)
    if model == SMOLLM2:  # a GGUF file, which AutoConfig reads only when named
        return True
    from transformers import AutoConfig

    import finegates.compress  # noqa: F401  (registers the compacted configs with AutoConfig)

    try:  # a saved folder, a hub id (online) or an embedded name
        architectures = AutoConfig.from_pretrained(locate_model(model)).architectures or []
    except (OSError, ValueError, ImportError):
        return False  # `evaluate`'s classification path gives the error about what cannot be loaded
    return is_causal_architecture(architectures)


def _holds_a_task_head(adapter: Path) -> bool:
    """Whether a gate adapter holds a sequence-classification head (read from the file's header)."""
    from finegates.workflows.export import adapter_num_labels

    try:
        return adapter_num_labels(adapter) is not None
    except ValueError:
        return False  # loading it says what is wrong


def _run_sections(folder: Path) -> dict[str, Any]:
    """The sections of the run_config.json next to a run's `gates` or `compressed` folder ({} if none)."""
    run_config = folder.parent / RUN_CONFIG_NAME
    try:
        sections = json.loads(run_config.read_text())
    except (OSError, ValueError):
        return {}
    return sections if isinstance(sections, dict) else {}


def lm_settings(cfg) -> tuple[Any, str]:
    """`posttrain`'s evaluation options for `cfg` (an `EvaluateConfig`): the command line's, else the run's
    (its held-out split and zero-shot task), else `posttrain`'s defaults. Also returns where the held-out
    text came from, for the output."""
    from finegates.workflows.posttrain import PosttrainConfig

    run = _run_sections(Path(cfg.model)).get("posttrain") or {}
    # the run's split first (its held-out fraction and block length hold for any text it is given)
    options: dict[str, Any] = {key: run[key] for key in SPLIT_OPTIONS if key in run}
    source = f"the run's {RUN_CONFIG_NAME}" if run else "posttrain's default"
    if cfg.text is not None and cfg.text != run.get("text"):
        options.update(text=cfg.text, text_column=cfg.text_column)
        source = "the command line"
        if run:
            logger.warning(
                "Scoring %s, not the run's text (%s): its held-out part is not the run's held-out text.",
                cfg.text,
                run.get("text"),
            )
    elif not run:
        options.update(text=PosttrainConfig.text, text_column=cfg.text_column)
    if cfg.zero_shot == "run":
        options.update({key: run[key] for key in CHOICE_OPTIONS if key in run})
    else:
        options["zero_shot"] = cfg.zero_shot
    for key in ("heldout_fraction", "seq_len", *CHOICE_OPTIONS[1:]):
        if getattr(cfg, key) is not None:
            options[key] = getattr(cfg, key)
    settings = PosttrainConfig(
        model=cfg.model,
        **options,
        eval_blocks=cfg.eval_blocks or 0,
        zero_shot_items=cfg.zero_shot_items or 0,
        quiet=cfg.quiet,
    )
    return settings, source


def load_lm(cfg):
    """(model, tokenizer) in float32, eval mode: a gate adapter on its base model, a saved (dense or
    compacted) folder, or `smollm2-135m` / a hub id."""
    import finegates.compress  # noqa: F401  (registers the compacted classes with the Auto classes)
    from finegates.workflows.causal_lm import load_causal_lm

    path = Path(cfg.model)
    if (path / WEIGHTS_NAME).is_file():
        model, tokenizer = load_causal_lm(base_model_of(path, cfg.base_model))
        return load_gates(model, path).eval(), tokenizer
    if not path.is_dir():
        model, tokenizer = load_causal_lm(cfg.model)
        return model.eval(), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finegates.compress.io import load_checked

    model = load_checked(AutoModelForCausalLM, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path} holds no tokenizer ({err}): save the tokenizer beside the model (`posttrain` does)."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def evaluate_lm(cfg) -> dict[str, Any]:
    """Held-out perplexity and zero-shot accuracy of the causal LM `cfg.model` (an `EvaluateConfig`)."""
    from finegates.workflows import posttrain
    from finegates.workflows.causal_lm import perplexity, zero_shot_correct

    settings, text_from = lm_settings(cfg)
    data = posttrain.read_data(settings)  # the user's files are read and checked before the model loads
    model, tokenizer = load_lm(cfg)
    if cfg.quantize == "int8":
        from finegates.compress.quantize import quantize_linears

        model = quantize_linears(model)
    _, heldout = posttrain.split_text(settings, tokenizer, data.docs)
    metrics: dict[str, Any] = {"perplexity": perplexity(model, heldout, quiet=cfg.quiet)}
    if data.items:
        correct = zero_shot_correct(model, tokenizer, data.items, quiet=cfg.quiet)
        accuracy = sum(correct) / len(correct)
        name = data.zero_shot_name
        metrics[f"{name}_accuracy"] = accuracy
        # the binomial standard error, and each item's outcome in item order, for paired comparisons of models
        metrics[f"{name}_accuracy_stderr"] = math.sqrt(accuracy * (1 - accuracy) / len(correct))
        metrics[f"{name}_correct"] = [int(c) for c in correct]
    metrics.update(
        model=cfg.model,
        text=settings.text,
        heldout_blocks=len(heldout),
        seq_len=settings.seq_len,
        zero_shot=data.zero_shot_name,
        zero_shot_items=len(data.items),
        quantize=cfg.quantize,
        text_from=text_from,
    )
    return metrics
