"""`compress`: from a gated model to a physically smaller transformers model computing the same function."""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from finegates.architectures import Architecture, architecture_for
from finegates.compress.assemble import attention_path, family, load_into
from finegates.compress.models import compact_class_for
from finegates.compress.quantize import QUANTIZE_CHOICES, quantize_linears
from finegates.compress.slicing import folded_linear, keep_cols, keep_rows
from finegates.compress.spec import AttentionSpec, CompactSpec, LinearSpec
from finegates.compress.stream import narrow_config, stream_state
from finegates.compress.uniform import uniform_model
from finegates.coupling import has_bias
from finegates.model import CONTROLLER_ATTR, gates_config, parameter_count
from finegates.plan import AttentionPlan, CompactionPlan, ModulePlan, compaction_plan
from finegates.ties import TIES_ATTR

logger = logging.getLogger(__name__)


def compress(model: PreTrainedModel, quantize: str | None = None, uniform: bool = False) -> PreTrainedModel:
    """A new model without the rows, columns, channels and heads that the eval-mode gates close.

    The gate values are folded into the kept weights, so the result computes what the gated model
    computes in eval mode; `model` is not changed. `quantize="int8"` then applies torch's dynamic int8
    quantization to every linear layer (CPU inference; save the float model, quantize after loading).
    `uniform=True` returns a stock-class model instead, every layer cut to the same widths (see
    `finegates.compress.uniform`): loadable without finegates, exact, but it removes less.

    >>> small = compress(gated_model)  # doctest: +SKIP
    >>> small.save_pretrained("small/")  # doctest: +SKIP
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}.")
    gates_config(model)
    if uniform:
        small = uniform_model(model)
        return quantize_linears(small) if quantize else small
    compact_class = compact_class_for(model)
    arch = architecture_for(model.config.model_type)
    if getattr(model.config, "is_decoder", False) and arch.roles.get("q", "").startswith("attention."):
        raise NotImplementedError("compress supports BERT/RoBERTa encoders only (config.is_decoder is True).")
    plan = compaction_plan(model)
    spec = build_spec(model, plan, arch)
    state = compact_state_dict(model, plan)
    overrides = None
    if plan.residual is not None:
        stream, norms, linears = stream_state(model, plan, arch)
        state.update(stream)
        for name, linear in linears.items():
            relative, in_base = _relative(model, name)
            (spec.linears if in_base else spec.head_linears)[relative] = linear
        spec.norms = {_relative(model, name)[0]: norm for name, norm in norms.items()}
        spec.residual_from = plan.hidden_size
        if arch.qk_norm and "rms_norm_eps" in model.config.to_dict():
            spec.head_norm_eps = model.config.rms_norm_eps
        overrides = functools.partial(narrow_config, plan=plan, arch=arch)
    config = compact_config(model.config, spec, compact_class.config_class, overrides)
    with torch.device("meta"):
        small = compact_class(config)
    load_into(small, state, model)
    small.eval()
    logger.info(
        "Compressed %s: %d -> %d parameters",
        type(model).__name__,
        parameter_count(model),
        parameter_count(small),
    )
    return quantize_linears(small) if quantize else small


def _relative(model: PreTrainedModel, name: str) -> tuple[str, bool]:
    """(name relative to the base model, True) or (name relative to the root, False) for heads."""
    if model.base_model is model:
        return name, True
    prefix = model.base_model_prefix + "."
    return (name[len(prefix) :], True) if name.startswith(prefix) else (name, False)


def _linear_spec(module: nn.Module, mp: ModulePlan) -> LinearSpec:
    out_features, in_features = mp.shape
    return LinearSpec(
        out_features,
        in_features,
        has_bias(module),
        scatter_to=mp.out_features if mp.scatter_rows else None,
        gather_from=mp.in_features if mp.gather_cols else None,
    )


def _attention_spec(a: AttentionPlan, arch: Architecture) -> AttentionSpec:
    counts = torch.bincount(a.kv_index, minlength=len(a.kv_heads))
    regular = bool((counts == counts[0]).all())
    return AttentionSpec(
        num_heads=len(a.heads),
        num_kv_heads=len(a.kv_heads),
        qk_dim=a.qk_dims.shape[1],
        v_dim=a.vo_dims.shape[1],
        head_dim=a.head_dim,
        group_size=int(counts[0]) if regular else 0,
        rope=arch.rope,
        qk_norm=arch.qk_norm,
    )


def build_spec(model: PreTrainedModel, plan: CompactionPlan, arch: Architecture) -> CompactSpec:
    """The per-layer shapes the compact model is built from (stored in config.json)."""
    spec = CompactSpec(family=family(arch))
    for name, mp in plan.modules.items():
        relative, in_base = _relative(model, name)
        (spec.linears if in_base else spec.head_linears)[relative] = _linear_spec(
            model.get_submodule(name), mp
        )
    for block, a in plan.attention.items():
        relative, _ = _relative(model, f"{block}.{attention_path(arch)}")
        spec.attention[relative] = _attention_spec(a, arch)
    return spec


def compact_state_dict(model: nn.Module, plan: CompactionPlan) -> dict[str, torch.Tensor]:
    """The untouched tensors of `model`, plus the sliced (gate-folded) weights and kept indices."""
    replaced = tuple(f"{name}." for name in plan.modules) + (f"{CONTROLLER_ATTR}.", f"{TIES_ATTR}.")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(replaced)}
    arch = architecture_for(model.config.model_type)
    for name, mp in plan.modules.items():
        linear = keep_cols(keep_rows(folded_linear(model.get_submodule(name)), mp.rows), mp.cols)
        prefix = f"{name}.linear." if mp.scatter_rows or mp.gather_cols else f"{name}."
        state.update({prefix + k: v for k, v in linear.state_dict().items()})
        if mp.gather_cols:
            state[f"{name}.cols"] = mp.cols.clone()
        if mp.scatter_rows:
            state[f"{name}.rows"] = mp.rows.clone()
    for block, a in plan.attention.items():
        path = f"{block}.{attention_path(arch)}"
        state[f"{path}.kv_index"] = a.kv_index.clone()
        if arch.rope:
            state[f"{path}.rope_dims"] = a.qk_dims.clone()
    return state


def compact_config(
    config: PretrainedConfig, spec: CompactSpec, config_class: type, overrides=None
) -> PretrainedConfig:
    """The stock config with the compact model_type and the per-layer shapes; `overrides` maps the config
    dict to changed values (a narrower residual stream)."""
    data = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    data = overrides(data) if overrides is not None else data
    return config_class.from_dict({**data, "finegates_compact": spec.to_dict()})
