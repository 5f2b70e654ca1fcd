"""The shapes data takes inside finegates: labelled text splits, corpora, multiple-choice items."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class ClassificationSplit:
    """Texts (and optional second texts of a pair) with integer labels."""

    texts: list[str]
    labels: list[int]
    pairs: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels) or (
            self.pairs is not None and len(self.pairs) != len(self.texts)
        ):
            raise ValueError("texts, pairs and labels must have the same length.")

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Sequence[int]) -> ClassificationSplit:
        pairs = [self.pairs[i] for i in indices] if self.pairs is not None else None
        return ClassificationSplit([self.texts[i] for i in indices], [self.labels[i] for i in indices], pairs)

    def sample(self, n: int | None, seed: int) -> tuple[ClassificationSplit, ClassificationSplit]:
        """A seeded random subset of `n` rows and the rest (all rows and nothing when `n` is None)."""
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        n = len(order) if n is None else min(n, len(order))
        return self.select(order[:n]), self.select(order[n:])


@dataclass
class ClassificationData:
    """A text classification task: a train and a test split sharing one label vocabulary.

    >>> split = ClassificationSplit(["a", "b"], [0, 1])
    >>> ClassificationData("toy", split, split, ["neg", "pos"]).num_labels
    2
    """

    name: str
    train: ClassificationSplit
    test: ClassificationSplit
    label_names: list[str]
    source: str = ""

    def __post_init__(self) -> None:
        for split_name in ("train", "test"):
            if len(getattr(self, split_name)) == 0:
                raise ValueError(f"Task {self.name!r}: the {split_name} split has no rows.")
        classes = Counter(self.train.labels)
        if len(classes) < 2:
            only = self.label_names[next(iter(classes))] if classes else None
            raise ValueError(
                f"Task {self.name!r}: every training row has the label {only!r}; classification needs at "
                "least two classes. Check --label-column."
            )

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return self.train.pairs is not None

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "source": self.source,
            "train_rows": len(self.train),
            "test_rows": len(self.test),
            "num_labels": self.num_labels,
            "sentence_pair": self.is_pair,
        }


@dataclass
class MultipleChoiceItem:
    """A question with candidate answers; `label` is the index of the right one."""

    question: str
    choices: list[str]
    label: int


@dataclass
class LabelEncoder:
    """Maps raw label values (strings, ints, bools) to 0..N-1 in a stable order."""

    names: list[str] = field(default_factory=list)

    @classmethod
    def fit(cls, values: Sequence[object]) -> LabelEncoder:
        distinct = sorted({str(v) for v in values}, key=_natural_key)
        return cls(distinct)

    def encode(self, values: Sequence[object]) -> list[int | None]:
        """Integer ids; None for values the encoder never saw."""
        index = {name: i for i, name in enumerate(self.names)}
        return [index.get(str(v)) for v in values]


def _natural_key(name: str) -> tuple[int, float | str]:
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)
