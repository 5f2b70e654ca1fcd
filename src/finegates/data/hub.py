"""Any data set the `datasets` library reads: a local csv/tsv/json/jsonl/parquet file or folder, or a hub
id."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from finegates.data.packaged import MissingPackageError, missing_message
from finegates.data.types import ClassificationData, ClassificationSplit, LabelEncoder

logger = logging.getLogger(__name__)

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class Columns:
    """Which columns hold the text, the optional second text of a pair, and the label."""

    text: str = "text"
    label: str = "label"
    text_pair: str | None = None


def _datasets():
    try:
        import datasets
    except ImportError as err:
        raise MissingPackageError(missing_message("datasets")) from err
    return datasets


def _builder_for(path: Path) -> tuple[str, dict]:
    if path.suffix not in BUILDERS:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(BUILDERS)}.")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty.")
    if path.suffix != ".parquet":
        _check_utf8(path)
    return BUILDERS[path.suffix], ({"delimiter": "\t"} if path.suffix == ".tsv" else {})


def _check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Text tables must be UTF-8: say so, with the offset, rather than the parser's generation error."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path} is not UTF-8 text (byte {offset + err.start}: {err.reason}); save it as UTF-8."
                ) from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (it ends inside a character: {err.reason}).") from None


def _load(source: str, test_file: str | None):
    """A DatasetDict from a local file (plus an optional test file), a local folder or a hub id."""
    datasets = _datasets()
    path = Path(source)
    if path.is_file():
        builder, kwargs = _builder_for(path)
        files = {"train": str(path)}
        if test_file:
            # the datasets library parses every file of a call with one builder: a test file in another
            # format would be read as the train file's (a tsv as one comma-separated column, ...)
            if _builder_for(Path(test_file)) != (builder, kwargs):
                raise ValueError(
                    f"--test-file {test_file} is a {Path(test_file).suffix} file but the train file "
                    f"{source} is {path.suffix}: give both in the same format."
                )
            files["test"] = str(test_file)
        try:
            return datasets.load_dataset(builder, data_files=files, **kwargs)
        except Exception as err:  # parse errors come from pandas / pyarrow under many types
            raise ValueError(
                f"Could not read {source} as {builder} ({type(err).__name__}: {err}); does it hold a header "
                "and at least one row?"
            ) from err
    if test_file:
        raise ValueError(
            "--test-file is only for a local train file; a folder or hub data set has its own splits."
        )
    try:
        return datasets.load_dataset(source)
    except Exception as err:  # the library raises many types; say what was tried
        raise ValueError(
            f"Could not load data set {source!r} with the datasets library ({type(err).__name__}: {err}). "
            "Give a built-in task name, a local csv/tsv/json/jsonl/parquet file or folder, or a hub id "
            "(hub ids need network access)."
        ) from err


def is_path_or_hub_id(source: str) -> bool:
    """An existing local path, or a string shaped like a hub id (owner/name)."""
    return Path(source).exists() or ("/" in source and not source.startswith((".", "/")))


def load_table(source: str, split: str = "train"):
    """One split of a local csv/tsv/json/jsonl/parquet file or folder, or of a hub data set."""
    if not is_path_or_hub_id(source):
        raise ValueError(
            f"{source} does not exist: give an embedded name, a local file or folder, or a hub data set id "
            "(owner/name)."
        )
    splits = _load(source, None)
    if split not in splits:
        raise ValueError(f"{source}: no {split!r} split; splits are {list(splits)}.")
    return splits[split]


def _split_rows(
    table, columns: Columns, where: str, class_names: list[str] | None
) -> tuple[list[str], list[str] | None, list[object]]:
    """(texts, pairs, raw labels) of a split. Rows without a label (or ClassLabel -1) are dropped; an empty
    text (which csv files cannot tell from a missing one) is kept as the empty string."""
    names = list(table.column_names)
    for role, name in (("text", columns.text), ("label", columns.label), ("text pair", columns.text_pair)):
        if name is not None and name not in names:
            raise ValueError(
                f"{where}: no {role} column {name!r}; columns are {names}. Use "
                f"--{role.replace(' ', '-')}-column."
            )
    texts, labels = table[columns.text], table[columns.label]
    if class_names is not None:  # a ClassLabel column holds indices; -1 marks an unlabelled row
        labels = [class_names[v] if v is not None and v >= 0 else None for v in labels]
    pairs = table[columns.text_pair] if columns.text_pair else None
    keep = [i for i in range(len(texts)) if labels[i] is not None]
    if len(keep) < len(texts):
        logger.warning("%s: dropped %d rows without a label", where, len(texts) - len(keep))
    empty = sum(texts[i] is None or texts[i] == "" for i in keep)
    if empty:
        logger.warning("%s: %d rows have an empty text (kept as empty strings)", where, empty)

    def text(value) -> str:
        return "" if value is None else str(value)

    return (
        [text(texts[i]) for i in keep],
        [text(pairs[i]) for i in keep] if pairs else None,
        [labels[i] for i in keep],
    )


def _label_names(table, column: str) -> list[str] | None:
    feature = table.features.get(column)
    return list(feature.names) if hasattr(feature, "names") else None


# The held-out part of a train split is drawn with this seed, never the run's: every run on the data, and
# `evaluate` after it, sees the same test rows whatever its --seed.
SPLIT_SEED = 0


def load_with_datasets(
    source: str, columns: Columns, test_file: str | None = None, test_fraction: float = 0.2
) -> ClassificationData:
    """A classification task from anything `datasets.load_dataset` reads.

    Uses the 'test' split, else 'validation' (the first with labels: hub sets often hide their test
    labels), else holds out `test_fraction` of 'train' (the same rows for every run: `SPLIT_SEED`).

    >>> data = load_with_datasets("train.csv", Columns(text="sentence", label="label"))  # doctest: +SKIP
    """
    train_table, test_table, test_name = _train_test_tables(source, test_file, test_fraction, columns.label)
    names = _label_names(train_table, columns.label) if columns.label in train_table.column_names else None
    train = _split_rows(train_table, columns, f"{source} (train)", names)
    test = _split_rows(test_table, columns, f"{source} ({test_name or 'held-out part of train'})", names)
    encoder = LabelEncoder(names) if names else LabelEncoder.fit(train[2])
    return _encode(source, train, test, encoder)


def _labelled(table, column: str) -> bool:
    """Whether any row of `table` has a label in `column` (a ClassLabel's -1 is none)."""
    if column not in table.column_names:
        return False
    names = _label_names(table, column)
    return any(v is not None and (names is None or v >= 0) for v in table[column])


def _train_test_tables(source: str, test_file: str | None, test_fraction: float, label: str):
    """(train table, test table, name of the test split or None when held out from train)."""
    splits = _load(source, test_file)
    if "train" not in splits:
        raise ValueError(f"{source}: no 'train' split; splits are {list(splits)}.")
    if splits["train"].num_rows < 2:
        raise ValueError(
            f"{source}: the train split has {splits['train'].num_rows} rows; it needs at least 2."
        )
    for name in ("test", "validation"):
        if name in splits and _labelled(splits[name], label):
            return splits["train"], splits[name], name
        if name in splits:
            logger.warning("%s: the %s split has no labels in %r; not the test set", source, name, label)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    parts = splits["train"].train_test_split(test_size=test_fraction, seed=SPLIT_SEED)
    return parts["train"], parts["test"], None


def _encode(source: str, train, test, encoder: LabelEncoder) -> ClassificationData:
    test_ids = encoder.encode(test[2])
    unseen = sum(label is None for label in test_ids)
    if unseen:
        logger.warning("%s: dropped %d test rows whose label never occurs in train", source, unseen)
    keep = [i for i, label in enumerate(test_ids) if label is not None]
    test_split = ClassificationSplit(
        test[0], [label if label is not None else -1 for label in test_ids], test[1]
    )
    return ClassificationData(
        name=Path(source).stem if Path(source).exists() else source,
        train=ClassificationSplit(train[0], [int(x) for x in encoder.encode(train[2])], train[1]),
        test=test_split.select(keep),
        label_names=encoder.names,
        source=source,
    )
