"""Compaction: a gated model becomes a physically smaller, exact transformers model.

- `slicing`: pure functions keeping rows / columns of a linear layer (gates folded in first);
- `linear`, `attention`: the compact modules (residual gather/scatter, kept heads and head dims);
- `spec`: the per-layer shapes recorded in config.json; `models`: compact classes + Auto registration;
- `build`: `compress`; `io`: `load_compressed`; `quantize`: int8 dynamic quantization.

>>> from finegates import compress, load_compressed
"""

from finegates.compress.build import compress
from finegates.compress.io import CompressedCheckpointError, load_compressed
from finegates.compress.models import register_compact_models

register_compact_models()

__all__ = ["CompressedCheckpointError", "compress", "load_compressed", "register_compact_models"]
