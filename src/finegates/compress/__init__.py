"""Compaction: a gated model becomes a physically smaller, exact transformers model.

- `slicing`: pure functions keeping rows / columns of a linear layer (gates folded in first);
- `linear`, `attention`: the compact modules (GEMM routes for arbitrary widths, residual gather/scatter,
  kept heads and head dims);
- `spec`: the per-layer shapes recorded in config.json; `models`: compact classes + Auto registration;
- `build`: `compress`; `assemble`: loading a state dict into a meta-device model; `io`: `load_compressed`;
  `quantize`: int8 dynamic quantization; `layout`: `decode_layout`, column-major weights where
  decoding's GEMVs stream them faster;
- `uniform`: the uniform-width export that stock classes load without finegates (`compress(uniform=True)`).

>>> from finegates import compress, load_compressed
"""

from finegates.compress.build import compress
from finegates.compress.io import CompressedCheckpointError, load_compressed
from finegates.compress.layout import DecodeLayout, decode_layout
from finegates.compress.models import register_compact_models

register_compact_models()

__all__ = [
    "CompressedCheckpointError",
    "DecodeLayout",
    "compress",
    "decode_layout",
    "load_compressed",
    "register_compact_models",
]
