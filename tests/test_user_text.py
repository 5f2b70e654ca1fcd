"""Post-training on the user's own data: documents from files, folders and tables; zero-shot jsonl."""

from __future__ import annotations

import json

import pytest

from finegates.data.registry import load_multiple_choice, load_text_corpus
from finegates.data.user_text import ChoiceFields


def test_a_text_file_gives_one_document_per_paragraph(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First document,\nstill first.\n\n\nSecond one.\n   \nThird.\n", encoding="utf-8")
    assert load_text_corpus(str(path)) == ["First document,\nstill first.", "Second one.", "Third."]


def test_a_folder_of_text_files_gives_one_document_per_file(tmp_path):
    for name, text in (("b.txt", "beta\n\nstill beta"), ("a.txt", "alpha"), ("empty.txt", "  \n")):
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert load_text_corpus(str(tmp_path)) == ["alpha", "beta\n\nstill beta"]


def test_a_table_gives_its_text_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"body": "one", "id": 1}, {"body": "", "id": 2}, {"body": "three", "id": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert load_text_corpus(str(path), column="body") == ["one", "three"]
    with pytest.raises(ValueError, match=r"no text column 'text'; columns are \['body', 'id'\]"):
        load_text_corpus(str(path))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"only one paragraph", "holds 1 non-empty document"),
        (b"caf\xe9 au lait\n\nsecond", r"not UTF-8 text \(byte 3"),
    ],
)
def test_bad_text_files_are_named_in_the_error(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_text_corpus(str(path))


def test_a_missing_corpus_says_what_it_accepts(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_text_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="is a task, not a text corpus"):
        load_text_corpus("piqa")


def test_a_multiple_choice_jsonl_with_named_fields(tmp_path):
    path = tmp_path / "quiz.jsonl"
    rows = [
        {"q": "2 + 2?", "options": ["3", "4", "5"], "right": 1},
        {"q": "Sky?", "options": ["green", "blue"], "right": "blue"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    items = load_multiple_choice(str(path), ChoiceFields(question="q", choices="options", answer="right"))
    assert [(i.question, i.choices, i.label) for i in items] == [
        ("2 + 2?", ["3", "4", "5"], 1),
        ("Sky?", ["green", "blue"], 1),
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "q", "choices": ["a", "b"]}, r"quiz.jsonl:1: missing field\(s\) \['answer'\]"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "neither an index into the 2 choices"),
        ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "neither an index"),
        ({"question": "q", "choices": "a b", "answer": 0}, "must be a list of at least two strings"),
        (None, r"quiz.jsonl:1: not a JSON object \(NoneType\)"),
        (5, r"quiz.jsonl:1: not a JSON object \(int\)"),
    ],
)
def test_bad_multiple_choice_rows_name_the_line(tmp_path, row, message):
    path = tmp_path / "quiz.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_multiple_choice(str(path))


def test_an_unknown_zero_shot_task_says_what_it_accepts(tmp_path):
    with pytest.raises(ValueError, match="choose one of \\['piqa'\\] or a local .jsonl file"):
        load_multiple_choice("hellaswag")
    (tmp_path / "bad.jsonl").write_text("{not json}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        load_multiple_choice(str(tmp_path / "bad.jsonl"))
