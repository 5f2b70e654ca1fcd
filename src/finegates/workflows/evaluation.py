"""Accuracy (scikit-learn) of classification models; latency and decoding speed (`finegates.timing`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn

from finegates.compress.layout import decode_layout
from finegates.timing import time_in_turns, time_rounds

logger = logging.getLogger(__name__)


def classification_metrics(eval_pred) -> dict[str, float]:
    """`compute_metrics` for the Trainer: accuracy and macro F1 of the argmax predictions."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    predictions = np.argmax(logits, axis=-1)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro")),
    }


@dataclass
class Latency:
    """Median seconds per forward pass of one batch, and how it was measured."""

    median_s: float
    iqr_s: float
    runs: int
    batch_size: int
    length: int
    threads: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def measure_latency(
    models: dict[str, nn.Module], batch: dict[str, torch.Tensor], repeats: int = 3
) -> dict[str, Latency]:
    """Forward-pass latency of each model (eval mode) on `batch`.

    One warm-up call each, then `repeats` rounds that time every model once in turn, so a change in
    the machine's load during the measurement affects all models alike.
    """
    runs = time_rounds({name: partial(model.eval(), **batch) for name, model in models.items()}, repeats)
    size, length = batch["input_ids"].shape
    return {name: _summarise(times, size, length) for name, times in runs.items()}


def paired_speedup(
    model: nn.Module, reference: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 7
) -> tuple[float, float, float]:
    """(median seconds of `model`, of `reference`, median over rounds of reference / model time).

    Both run once per round, back to back, so each round's ratio sees nearly the same machine load; the
    median of those ratios is steadier on a shared machine than the ratio of the two medians.
    """
    runs = time_rounds(
        {"model": partial(model.eval(), **batch), "reference": partial(reference.eval(), **batch)}, repeats
    )
    ratios = [r / m for m, r in zip(runs["model"], runs["reference"])]
    return float(np.median(runs["model"])), float(np.median(runs["reference"])), float(np.median(ratios))


def measure_decode(
    models: dict[str, nn.Module],
    tokens: int = 32,
    prompt_length: int = 16,
    repeats: int = 3,
    layout: str = "auto",
) -> dict[str, float]:
    """Greedy decoding speed of each causal LM with its KV cache, in tokens per second.

    Each model generates `tokens` + 1 and 1 new tokens from the same random prompt (timed in turns);
    the difference is the time of `tokens` decoding steps, without the prompt's prefill. Every model
    decodes with its weights in `finegates.decode_layout(model, layout)` (by default the faster GEMV
    layout for tall and for wide weights, timed; "rows": torch's own), restored afterwards.
    """
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_length), generator=torch.Generator().manual_seed(0))

    def generate(model: nn.Module, n: int) -> Callable[[], object]:
        return lambda: model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            use_cache=True,
        )

    calls = {(name, n): generate(model.eval(), n) for name, model in models.items() for n in (1, tokens + 1)}
    layouts = [decode_layout(model, layout) for model in models.values()]
    try:
        seconds = time_in_turns(calls, repeats)
    finally:
        for chosen in layouts:
            chosen.restore()
    return {name: tokens / max(seconds[name, tokens + 1] - seconds[name, 1], 1e-9) for name in models}


def _summarise(times: list[float], batch_size: int, length: int) -> Latency:
    array = np.array(times)
    iqr = float(np.percentile(array, 75) - np.percentile(array, 25))
    return Latency(float(np.median(array)), iqr, len(times), batch_size, length, torch.get_num_threads())
