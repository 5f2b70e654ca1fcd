"""A GGUF file through llama.cpp itself (the `llama-cpp-python` binding; `make llama-cpp` builds it): logits,
greedy generation and llama.cpp's own quantizations, to check an export and time it.

Token ids go in and come out directly, so a file without a vocabulary runs too and a check compares the
model, not two tokenizers.

>>> llm = load("small/model.f32.gguf")  # doctest: +SKIP
>>> greedy(llm, [1, 2, 3], 8)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

import numpy as np

QUANTIZATIONS = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
INSTALL = "llama.cpp's Python binding is not installed: `make llama-cpp` builds it into the venv (~6 min)"


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _binding():
    try:
        import llama_cpp
    except ImportError:
        raise RuntimeError(INSTALL) from None
    return llama_cpp


def load(
    path: str | Path, n_ctx: int = 512, threads: int = 2, all_logits: bool = False, flash_attn: bool = False
):
    """A llama.cpp model and context for `path` (`all_logits`: keep every position's logits; `flash_attn`:
    llama.cpp's fused attention, which also keeps each layer's KV cache at its own width)."""
    binding = _binding()
    return binding.Llama(
        flash_attn=flash_attn,
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=all_logits,
        verbose=False,
    )


def token_logits(llm, ids: list[int]) -> np.ndarray:
    """Logits at every position of `ids` (len x vocab) from an empty cache; `llm`: load(all_logits=True)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def last_logits(llm) -> np.ndarray:
    """The logits of the last position evaluated, read from llama.cpp's context (llama-cpp-python keeps a
    copy only with `all_logits`)."""
    pointer = _binding().llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()


def greedy(llm, ids: list[int], new_tokens: int) -> list[int]:
    """`new_tokens` greedy tokens after `ids`, from an empty cache."""
    llm.reset()
    llm.eval(list(ids))
    out = []
    for _ in range(new_tokens):
        token = int(np.argmax(last_logits(llm)))
        out.append(token)
        llm.eval([token])
    return out


def quantize(src: str | Path, dst: str | Path, kind: str, threads: int = 2) -> Path:
    """llama.cpp's own quantization of `src` ("q8_0" or "q4_k_m"), written to a temporary file and renamed.
    Tensors whose width a block type does not divide get llama.cpp's fallback type."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"Quantization {kind!r} is not one of {sorted(QUANTIZATIONS)}.")
    binding = _binding()
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        params = binding.llama_model_quantize_default_params()
        params.ftype = getattr(binding, QUANTIZATIONS[kind])
        params.nthread = threads
        status = binding.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params))
        if status != 0:
            raise RuntimeError(f"llama.cpp could not quantize {src} to {kind} (status {status}).")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst
