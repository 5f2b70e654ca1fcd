"""Dynamic int8 quantization of a compacted model's linear layers (torch's own tooling, CPU only).

Sparsity and quantization compose: compaction shrinks the matrices, int8 shrinks each weight and
uses int8 GEMMs. Activations are quantized on the fly per batch ("dynamic"), so no calibration is needed.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from finegates.compress.linear import CompactLinear

QUANTIZE_CHOICES = (None, "int8")


def quantize_linears(model: nn.Module) -> nn.Module:
    """Replace every non-empty nn.Linear of `model` (in place) by a dynamically quantized int8 one."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 dynamic quantization runs on CPU: move the model to CPU first.")
    for module in model.modules():
        if isinstance(module, CompactLinear):
            module.__class__ = nn.Linear  # the quantizer matches exact types; the state is the same
    qconfig = torch.ao.quantization.default_dynamic_qconfig
    spec = {
        name: qconfig for name, m in model.named_modules() if type(m) is nn.Linear and m.weight.numel() > 0
    }
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; it is still the in-tree dynamic quantizer.
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*")
        model = torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    model.finegates_quantized = "int8"
    return model
