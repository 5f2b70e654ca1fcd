"""`finegates compress`: a saved gate adapter on its base model -> a compacted model folder; `finegates
export`: a model folder -> a serving format (ONNX, GGUF)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from finegates.adapter import WEIGHTS_NAME, load_gates
from finegates.io_utils import check_new_folder, write_folder
from finegates.workflows.run_config import base_model_of

_TASK_HEADS = ("classifier.weight", "classifier.out_proj.weight", "score.weight")


@dataclass
class CompressConfig:
    """Which adapter to compact and where to write the compacted model."""

    gates: str = field(
        default="", metadata={"help": "A gate adapter folder (written by save_gates or a run)."}
    )
    output_dir: str = field(default="", metadata={"help": "Folder for the compacted model."})
    base_model: str | None = field(
        default=None, metadata={"help": "Base model (default: the run's run_config.json)."}
    )
    uniform: bool = field(
        default=False, metadata={"help": "Cut every layer to the same widths (stock classes load it)."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace a non-empty --output-dir (it is replaced whole)."}
    )

    def __post_init__(self) -> None:
        if not self.gates or not self.output_dir:
            raise ValueError("compress needs --gates (an adapter folder) and --output-dir.")


def adapter_num_labels(adapter: Path) -> int | None:
    """The number of labels of the task head a gate adapter holds (None: it holds none, e.g. an LM's)."""
    path = adapter / WEIGHTS_NAME
    try:
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.endswith(_TASK_HEADS):
                    return handle.get_slice(key).get_shape()[0]
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path} is damaged or not a safetensors file ({err}); save the adapter again."
        ) from None
    return None


def _load_base(name: str, num_labels: int | None):
    """The base model and tokenizer: a causal LM, or a classifier with the adapter's number of labels (the
    run's head may have another number than the base's: the adapter holds the trained one)."""
    from finegates.workflows.causal_lm import load_causal_lm
    from finegates.workflows.models import load_classifier

    return load_causal_lm(name) if num_labels is None else load_classifier(name, num_labels)


def export_compressed(cfg: CompressConfig) -> Path:
    """Load the adapter on its base model, compact it and save it with its tokenizer."""
    from finegates.compress import compress

    adapter = Path(cfg.gates)
    if not (adapter / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{adapter} holds no {WEIGHTS_NAME}: not a gate adapter folder.")
    out = Path(cfg.output_dir)
    check_new_folder(out, cfg.overwrite, hint=", or --overwrite to replace it")
    model, tokenizer = _load_base(base_model_of(adapter, cfg.base_model), adapter_num_labels(adapter))
    small = compress(load_gates(model, adapter).eval(), uniform=cfg.uniform)

    def fill(folder: Path) -> None:
        small.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder(out, fill, overwrite=cfg.overwrite)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
_TOKENIZER_FILES += ("vocab.json", "merges.txt", "chat_template.jinja")


EXPORT_FORMATS = ("onnx", "gguf")


def export_model(
    model_dir: str | Path,
    fmt: str,
    output_dir: str | Path,
    dtype: str = "f16",
    tokenizer_pre: str | None = None,
    align: int = 64,
) -> Path:
    """`finegates export`: a model folder (compacted or stock) -> `fmt` in `output_dir`. "onnx": the graph
    with the folder's tokenizer files beside it (returns the folder); "gguf" (LLaMA-family decoders of the
    runtime structure): one file `model.{dtype}.gguf` holding the tokenizer too (returns the file)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from finegates.compress.gguf import export_gguf
    from finegates.compress.io import load_checked
    from finegates.compress.onnx import export_onnx

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; available: {', '.join(EXPORT_FORMATS)}.")
    folder = Path(model_dir)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{folder} holds no config.json: give a model folder (e.g. a run's compressed/)."
        )
    try:
        architecture = (json.loads(config.read_text()).get("architectures") or [""])[0]
    except json.JSONDecodeError as err:
        raise ValueError(f"{config} is not valid JSON ({err}); the folder is damaged.") from None
    causal = architecture.endswith(("ForCausalLM", "LMHeadModel"))
    if fmt == "gguf" and not causal:
        raise ValueError(f"GGUF export writes decoders (ForCausalLM); {folder} holds a {architecture}.")
    model = load_checked(AutoModelForCausalLM if causal else AutoModelForSequenceClassification, folder)
    if fmt == "gguf":
        path = Path(output_dir) / f"model.{dtype}.gguf"
        return export_gguf(
            model, path, dtype=dtype, tokenizer_dir=folder, tokenizer_pre=tokenizer_pre, align=align
        )
    return export_onnx(
        model, output_dir, also=[folder / n for n in _TOKENIZER_FILES if (folder / n).is_file()]
    )
