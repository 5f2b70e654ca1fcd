"""ONNX export of a compacted (or stock) model, and a greedy generation loop on ONNX Runtime alone.

ONNX graphs have a static shape per node, so a compacted model with per-layer widths exports as it is.
Encoders take `input_ids` and `attention_mask` and return `logits`. Decoders also take the key/value cache
of every layer (`past.{i}.key`, `past.{i}.value`: batch x kv heads x past length x head size, the layer's
own kept sizes; length 0 for the first step) and return it grown (`present.{i}.key`, ...), so a generate
loop needs nothing but ONNX Runtime (`generate_greedy`). Batch, sequence and past lengths are dynamic.
The export traces the model with eager attention (two matmuls and a softmax, which every runtime has);
the model's own attention setting is restored afterwards.

>>> export_onnx(load_compressed("small/"), "small-onnx/")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from finegates.io_utils import check_new_folder, write_folder

logger = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
INFO_NAME = "finegates_onnx.json"
# Example sizes the graph is traced at: not 0 or 1, which torch.export would specialise to constants.
_BATCH, _SEQ, _PAST = 2, 3, 4


class _Encoder(nn.Module):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def takes_segments(model: PreTrainedModel) -> bool:
    """Whether the encoder reads segment ids (BERT's text pairs: `token_type_ids`), a graph input then."""
    return not is_decoder(model) and getattr(model.config, "type_vocab_size", 1) > 1


class _Decoder(nn.Module):
    """One decoding call, the cache as flat tensors: (ids, mask, [k0, v0, k1, ...]) -> (logits, k0, ...)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[torch.Tensor]):
        cache = DynamicCache(config=self.model.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True
        )
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def is_decoder(model: PreTrainedModel) -> bool:
    return bool(getattr(model, "can_generate", lambda: False)())


def _example_cache(model: PreTrainedModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Cache tensors of the model's own per-layer shapes, `_PAST` positions long."""
    with torch.no_grad():
        out = model(input_ids=ids[:, :1].repeat(1, _PAST), use_cache=True)
    return [t.clone() for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]


def _graph_signature(model: PreTrainedModel):
    """(wrapper module, example args, dynamic shapes, input names, output names) of the model's graph."""
    ids = torch.arange(_BATCH * _SEQ).view(_BATCH, _SEQ) % model.config.vocab_size
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    names = ["input_ids", "attention_mask"]
    if not is_decoder(model):
        mask = torch.ones(_BATCH, _SEQ, dtype=torch.long)
        dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        if not takes_segments(model):
            return _Encoder(model), (ids, mask), dynamic, names, ["logits"]
        segments = torch.zeros(_BATCH, _SEQ, dtype=torch.long)
        segments[:, -1] = 1  # a pair's second segment: traced, not folded to a constant
        dynamic["token_type_ids"] = {0: batch, 1: seq}
        return _Encoder(model), (ids, mask, segments), dynamic, [*names, "token_type_ids"], ["logits"]
    past = _example_cache(model, ids)
    mask = torch.ones(_BATCH, _PAST + _SEQ, dtype=torch.long)
    total, past_len = torch.export.Dim("total"), torch.export.Dim("past")
    cache_names = [f"past.{i}.{part}" for i in range(len(past) // 2) for part in ("key", "value")]
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "past": [{0: batch, 2: past_len} for _ in past],
    }
    outputs = ["logits", *(n.replace("past.", "present.") for n in cache_names)]
    return _Decoder(model), (ids, mask, past), dynamic, names + cache_names, outputs


def export_onnx(model: PreTrainedModel, output_dir: str | Path, also: Iterable[Path] = ()) -> Path:
    """Write `model.onnx` and `finegates_onnx.json` (what the graph takes and returns), and a copy of each
    file in `also` (e.g. the tokenizer's), into `output_dir`, written whole: into a temporary folder first,
    then renamed. Returns the folder."""
    output_dir = Path(output_dir)
    check_new_folder(output_dir)
    model = model.eval()
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")  # before the example cache: SDPA's holds padded K/V

    def fill(folder: Path) -> None:
        wrapper, args, dynamic, names, outputs = _graph_signature(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                args,
                str(folder / ONNX_NAME),
                dynamo=True,
                dynamic_shapes=dynamic,
                input_names=names,
                output_names=outputs,
                verbose=False,
            )
        info = {"kind": "decoder" if is_decoder(model) else "encoder", "inputs": names, "outputs": outputs}
        (folder / INFO_NAME).write_text(json.dumps(info, indent=2))
        for path in also:
            shutil.copy2(path, folder / Path(path).name)

    try:
        write_folder(output_dir, fill)
    finally:
        model.set_attn_implementation(implementation)
    logger.info("ONNX export written to %s", output_dir)
    return output_dir


def generate_greedy(folder: str | Path, input_ids, max_new_tokens: int, threads: int | None = None):
    """Greedy decoding of an exported decoder on ONNX Runtime alone (numpy in, numpy out): the prompt in
    one call with an empty cache, then one token per call with the cache the graph returned."""
    import numpy as np
    import onnxruntime as ort

    folder = Path(folder)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / ONNX_NAME), options)
    ids = np.asarray(input_ids, dtype=np.int64)
    batch = ids.shape[0]
    cache = {
        i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past.")
    }
    sequence, step = ids, ids
    for _ in range(max_new_tokens):
        mask = np.ones((batch, sequence.shape[1]), np.int64)
        logits, *present = session.run(None, {"input_ids": step, "attention_mask": mask, **cache})
        step = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        sequence = np.concatenate([sequence, step], axis=1)
        cache = dict(zip(cache, present))
    return sequence
