"""Bitmap + packed-values storage of a sparse matrix (SALR's format for its pruned base weights).

One bit per entry says whether it is kept; the kept values follow in row-major order. At 50%
sparsity in 16-bit this stores 9/16 of the dense bytes; the matrix is decoded before the matmul.
"""

from __future__ import annotations

import numpy as np
import torch


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Boolean tensor -> uint8 bytes, eight entries per byte, most significant bit first, zero padded
    (numpy.packbits; on the mask's device)."""
    packed = np.packbits(mask.detach().flatten().cpu().numpy())
    return torch.from_numpy(packed).to(mask.device)


def unpack_bits(bitmap: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bytes -> the first `numel` bits as a flat boolean tensor."""
    bits = np.unpackbits(bitmap.detach().cpu().numpy(), count=numel)
    return torch.from_numpy(bits).to(device=bitmap.device, dtype=torch.bool)


def encode(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bitmap, values): the kept entries of `weight` where `mask` is True.

    >>> w = torch.tensor([[1.0, 0.0, 2.0]]); bitmap, values = encode(w, w != 0)
    >>> torch.equal(decode(bitmap, values, w.shape), w)
    True
    """
    return pack_bits(mask), weight.detach().flatten()[mask.flatten()].clone()


def decode(bitmap: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The dense matrix: packed values scattered into the positions the bitmap marks."""
    numel = int(torch.Size(shape).numel())
    dense = values.new_zeros(numel)
    dense[unpack_bits(bitmap, numel)] = values
    return dense.view(shape)


def storage_bytes(bitmap: torch.Tensor, values: torch.Tensor) -> int:
    return bitmap.numel() * bitmap.element_size() + values.numel() * values.element_size()
