"""Tiny random models built from configs in-process: no download, seconds to run."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

VOCAB = 99
_DECODER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 37,
    "vocab_size": VOCAB,
}
_ENCODER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "vocab_size": VOCAB,
    "num_labels": 3,
}


def _make(name: str) -> torch.nn.Module:
    builders = {
        "bert": lambda: BertForSequenceClassification(BertConfig(**_ENCODER)),
        "roberta": lambda: RobertaForSequenceClassification(
            RobertaConfig(**_ENCODER, max_position_embeddings=40, pad_token_id=1)
        ),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**_DECODER)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**_DECODER)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_DECODER)),
        "qwen3": lambda: _with_qk_norm_weights(Qwen3ForCausalLM(Qwen3Config(**_DECODER, head_dim=8))),
        "gpt2": lambda: GPT2LMHeadModel(
            GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
        ),
    }
    return builders[name]()


def _with_qk_norm_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Random per-dim q/k norm weights (initialised to ones), so that compaction must keep them aligned."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


ARCHITECTURES = ["bert", "roberta", "llama", "mistral", "qwen2", "qwen3", "gpt2"]


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _make(name).eval()


def tiny_inputs(seed: int = 1, batch: int = 3, length: int = 9) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=gen)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def is_causal(name: str) -> bool:
    return name in ("llama", "mistral", "qwen2", "qwen3", "gpt2")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: threads only add contention on a shared 2-core machine (modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


WORDS = ["alpha", "beta", "gamma", "delta", "stock", "oil", "grain", "trade", "money", "ship"]


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    """A tiny random BERT with a word-level tokenizer, and a csv whose label is the last word."""
    root = tmp_path_factory.mktemp("tiny")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    model_dir = root / "model"
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(model_dir)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=len(WORDS) + 5,
        max_position_embeddings=32,
    )
    BertForSequenceClassification(config).save_pretrained(model_dir)
    rng = random.Random(0)
    rows = [(rng.choice(["oil", "stock"]), rng.choices(WORDS, k=5)) for _ in range(80)]
    (root / "train.csv").write_text(
        "sentence,topic\n" + "".join(f"{' '.join(ws)} {y},{y}\n" for y, ws in rows)
    )
    return model_dir, root / "train.csv"
