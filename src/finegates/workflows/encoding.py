"""Tokenized splits as torch datasets the Trainer reads, padded per batch by its collator."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from finegates.data.types import ClassificationSplit


class EncodedSplit(Dataset):
    """Token ids, attention masks (and token types) plus `labels`, one dict per row."""

    def __init__(self, split: ClassificationSplit, tokenizer, max_length: int) -> None:
        args = (split.texts,) if split.pairs is None else (split.texts, split.pairs)
        self.encodings = tokenizer(*args, truncation=True, max_length=max_length)
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        item = {key: values[index] for key, values in self.encodings.items()}
        item["labels"] = self.labels[index]
        return item


def benchmark_batch(batch_size: int, length: int, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed-shape batch of random token ids for latency measurements (cost does not depend on the ids)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
