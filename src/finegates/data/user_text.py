"""The user's own data for post-training: documents from text files, tables or hub data sets, and
multiple-choice items from a local jsonl file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from finegates.data.hub import BUILDERS, load_table
from finegates.data.types import MultipleChoiceItem

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); convert it, e.g. with iconv -t "
            "utf-8."
        ) from None


def _text_file_documents(path: Path) -> list[str]:
    """A .txt file: its paragraphs (blocks separated by blank lines) are the documents."""
    return [block.strip() for block in _PARAGRAPH_BREAK.split(_read_utf8(path)) if block.strip()]


def load_documents(source: str, column: str = "text") -> list[str]:
    """Documents from a .txt file (paragraphs), a folder of .txt files (one document each), a
    csv/tsv/json/jsonl/parquet file or folder, or a hub data set id (`column` of its train split).

    >>> docs = load_documents("my_corpus/", column="text")  # doctest: +SKIP
    """
    path = Path(source)
    if path.is_file() and path.suffix == ".txt":
        docs = _text_file_documents(path)
    elif path.is_dir() and any(path.glob("*.txt")):
        docs = [text.strip() for f in sorted(path.glob("*.txt")) if (text := _read_utf8(f)).strip()]
    else:
        if path.is_file() and path.suffix not in BUILDERS:
            raise ValueError(
                f"{source}: unsupported file type {path.suffix!r}; use .txt or one of {sorted(BUILDERS)}."
            )
        table = load_table(source, "train")
        if column not in table.column_names:
            raise ValueError(
                f"{source}: no text column {column!r}; columns are {table.column_names}. Use --text-column."
            )
        docs = [str(text).strip() for text in table[column] if text is not None and str(text).strip()]
    if len(docs) < 2:
        raise ValueError(
            f"{source} holds {len(docs)} non-empty document(s); post-training needs at least 2 (some are "
            "held out for perplexity). In a .txt file, separate documents by blank lines."
        )
    return docs


@dataclass
class ChoiceFields:
    """Field names of a multiple-choice jsonl row: the question, the list of choices, the right answer
    (its index, or the text of one of the choices)."""

    question: str = "question"
    choices: str = "choices"
    answer: str = "answer"


def load_choice_file(source: str, fields: ChoiceFields | None = None) -> list[MultipleChoiceItem]:
    """Zero-shot items from a local jsonl file, one JSON object per line.

    >>> items = load_choice_file("quiz.jsonl")  # doctest: +SKIP
    """
    fields = fields or ChoiceFields()
    path = Path(source)
    if not path.is_file():
        raise ValueError(
            f"Zero-shot file {source} does not exist: give a jsonl file or an embedded task (piqa)."
        )
    items = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if line.strip():
            items.append(_choice_item(line, fields, f"{source}:{number}"))
    if not items:
        raise ValueError(f"{source} holds no items.")
    return items


def _choice_item(line: str, fields: ChoiceFields, where: str) -> MultipleChoiceItem:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}).") from None
    if not isinstance(row, dict):
        raise ValueError(  # noqa: TRY004 (a user's file: ValueError as every other line error)
            f"{where}: not a JSON object ({type(row).__name__}); each line holds one question as an object."
        )
    missing = [name for name in (fields.question, fields.choices, fields.answer) if name not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; name them with --zero-shot-*-field options.")
    choices = row[fields.choices]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: {fields.choices!r} must be a list of at least two strings.")
    answer = row[fields.answer]
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(
            f"{where}: answer {row[fields.answer]!r} is neither an index into the {len(choices)} choices nor "
            "one of them."
        )
    return MultipleChoiceItem(str(row[fields.question]), choices, answer)
