"""Compact model classes: stock transformers classes whose modules are replaced as the spec says.

`CompactLlamaForCausalLM` is `LlamaForCausalLM` with its own config class (model_type
"finegates_llama"); its constructor builds the stock model and then swaps in the compact linear and
attention modules that `config.finegates_compact` describes, so `from_pretrained` builds exactly the
saved shapes. The classes are registered with transformers' Auto classes when `finegates` is imported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, OutputRecorder

from finegates.compress.attention import ATTENTION_CLASSES, CompactAttention
from finegates.compress.checks import COMPACT, CompressedCheckpointError, check_loaded
from finegates.compress.linear import build_linear
from finegates.compress.spec import CompactSpec
from finegates.compress.stream import CompactLayerNorm

logger = logging.getLogger(__name__)

PREFIX = "finegates_"
_AUTO = {
    "AutoModel": AutoModel,
    "AutoModelForCausalLM": AutoModelForCausalLM,
    "AutoModelForSequenceClassification": AutoModelForSequenceClassification,
    "AutoModelForMaskedLM": AutoModelForMaskedLM,
}
# model_type -> (config class, {auto class: stock model class}); names looked up in transformers.
_STOCK: dict[str, tuple[str, dict[str, str]]] = {
    "llama": (
        "LlamaConfig",
        {
            "AutoModel": "LlamaModel",
            "AutoModelForCausalLM": "LlamaForCausalLM",
            "AutoModelForSequenceClassification": "LlamaForSequenceClassification",
        },
    ),
    "mistral": (
        "MistralConfig",
        {
            "AutoModel": "MistralModel",
            "AutoModelForCausalLM": "MistralForCausalLM",
            "AutoModelForSequenceClassification": "MistralForSequenceClassification",
        },
    ),
    "qwen2": (
        "Qwen2Config",
        {
            "AutoModel": "Qwen2Model",
            "AutoModelForCausalLM": "Qwen2ForCausalLM",
            "AutoModelForSequenceClassification": "Qwen2ForSequenceClassification",
        },
    ),
    "qwen3": (
        "Qwen3Config",
        {
            "AutoModel": "Qwen3Model",
            "AutoModelForCausalLM": "Qwen3ForCausalLM",
            "AutoModelForSequenceClassification": "Qwen3ForSequenceClassification",
        },
    ),
    "bert": (
        "BertConfig",
        {
            "AutoModel": "BertModel",
            "AutoModelForMaskedLM": "BertForMaskedLM",
            "AutoModelForSequenceClassification": "BertForSequenceClassification",
        },
    ),
    "roberta": (
        "RobertaConfig",
        {
            "AutoModel": "RobertaModel",
            "AutoModelForMaskedLM": "RobertaForMaskedLM",
            "AutoModelForSequenceClassification": "RobertaForSequenceClassification",
        },
    ),
    "gpt2": (
        "GPT2Config",
        {
            "AutoModel": "GPT2Model",
            "AutoModelForCausalLM": "GPT2LMHeadModel",
            "AutoModelForSequenceClassification": "GPT2ForSequenceClassification",
        },
    ),
}
COMPACT_CLASSES: dict[type[PreTrainedModel], type[PreTrainedModel]] = {}  # stock class -> compact class
COMPACT_BY_NAME: dict[str, type[PreTrainedModel]] = {}  # class name -> compact model class
_CONFIG_BY_NAME: dict[str, type] = {}  # class name -> compact config class


def __getattr__(name: str) -> type:
    """The compact classes are attributes of this module (`from finegates.compress.models import
    CompactLlamaForCausalLM`, and what pickle and `__module__` look up), made on first use."""
    if name.startswith(COMPACT):
        register_compact_models()
        found = COMPACT_BY_NAME.get(name) or _CONFIG_BY_NAME.get(name)
        if found is not None:
            return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _can_record(stock: type[PreTrainedModel]) -> dict:
    """`stock._can_record_outputs` plus the compact attention, whose weights `output_attentions=True`
    then returns (transformers records outputs with hooks on the classes a base model lists)."""
    can_record = dict(getattr(stock, "_can_record_outputs", None) or {})
    if "attentions" in can_record:
        entries = can_record["attentions"]
        entries = entries if isinstance(entries, list) else [entries]
        can_record["attentions"] = [*entries, OutputRecorder(CompactAttention, index=1)]
    return can_record


def _record_compact_attention(base: PreTrainedModel) -> None:
    """Give a stock base model built inside a compact task model the compact base class, which records the
    compact attention. transformers reads what a model records from a registry keyed by class name, which
    only `PreTrainedModel.__init__` fills: the one write to that private registry, under the compact class's
    own name, so constructing stock models afterwards leaves it alone."""
    compact = COMPACT_CLASSES.get(type(base))
    if compact is None:  # a compact base model (its own __init__ registered it) or a class not listed
        return
    base.__class__ = compact
    _CAN_RECORD_REGISTRY[base] = compact._can_record_outputs


def apply_spec(model: PreTrainedModel, spec: CompactSpec) -> None:
    """Replace the stock modules of `model` (in place) by empty compact ones of the spec's shapes."""
    base = model.base_model
    linears = {name: build_linear(s) for name, s in spec.linears.items()}
    for path, attention in spec.attention.items():
        mine = {n.rpartition(".")[2]: linears.pop(n) for n in list(linears) if n.rpartition(".")[0] == path}
        compact = ATTENTION_CLASSES[spec.family](base.get_submodule(path), attention, mine)
        base.set_submodule(path, compact)
    for name, module in linears.items():
        base.set_submodule(name, module)
    if model is not base:
        for name, s in spec.head_linears.items():
            model.set_submodule(name, build_linear(s))
    for name, norm in spec.norms.items():
        base.set_submodule(name, CompactLayerNorm(base.get_submodule(name), norm.full_width))
    if spec.head_norm_eps is not None:
        for module in base.modules():
            if isinstance(module, CompactAttention) and module.spec.qk_norm:
                module.q_norm.eps = module.k_norm.eps = spec.head_norm_eps
    if base is not model:
        _record_compact_attention(base)


@contextmanager
def _stock_construction(config, spec: CompactSpec) -> Iterator[None]:
    """A narrower residual stream need not be a multiple of the head count, which stock attention
    modules check at construction; they are replaced by compact ones, so they are built with one head."""
    if spec.residual_from is None:
        yield
        return
    heads = config.num_attention_heads
    config.num_attention_heads = 1
    try:
        yield
    finally:
        config.num_attention_heads = heads


def _compact_config_class(model_type: str, stock: type) -> type:
    def validate(self) -> None:
        """The stock config's checks, but its architecture rule (hidden size a multiple of the head count):
        a compacted model's head size and per-layer head counts are explicit (`finegates_compact`), and a
        narrower residual stream (the runtime structure) keeps any number of dims."""
        for validator in getattr(stock, "__class_validators__", []):
            if validator.__name__ != "validate_architecture":
                validator(self)

    attrs = {"model_type": PREFIX + model_type, "__module__": __name__, "validate": validate}
    return type(f"{COMPACT}{stock.__name__}", (stock,), attrs)


def _compact_model_class(stock: type[PreTrainedModel], config_class: type) -> type[PreTrainedModel]:
    def __init__(self, config, *args, **kwargs) -> None:
        raw = getattr(config, "finegates_compact", None)
        if raw is None:
            raise CompressedCheckpointError(
                f"model_type {config.model_type!r} needs the finegates_compact section of config.json, which "
                "is missing: the folder is damaged; compact the model again."
            )
        try:
            spec = CompactSpec.from_dict(raw)
            with _stock_construction(config, spec):
                stock.__init__(self, config, *args, **kwargs)
            apply_spec(self, spec)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise CompressedCheckpointError(
                f"config.json's finegates_compact does not fit the model it describes ({err}); the folder is "
                "damaged: compact the model again."
            ) from None

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        # A compacted folder is loaded whole or refused: a missing, unexpected or mis-shaped weight would
        # otherwise run re-initialised, and nothing says so but a log line.
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("ignore_mismatched_sizes", True)  # mismatches are reported by name below
        model, info = super(compact, cls).from_pretrained(path, *args, output_loading_info=True, **kwargs)
        check_loaded(path, model, info)
        return (model, info) if want_info else model

    doc = (
        f"`{stock.__name__}` with the per-layer shapes of `config.finegates_compact` "
        "(a FineGates compacted model)."
    )
    attrs = {
        "config_class": config_class,
        "_can_record_outputs": _can_record(stock),
        "__init__": __init__,
        "from_pretrained": from_pretrained,
        "__module__": __name__,
        "__doc__": doc,
    }
    compact = type(f"{COMPACT}{stock.__name__}", (stock,), attrs)
    return compact


def register_compact_models() -> None:
    """Define the compact classes and register them with AutoConfig and the AutoModel classes (idempotent)."""
    if COMPACT_CLASSES:
        return
    for model_type, (config_name, heads) in _STOCK.items():
        config_class = _compact_config_class(model_type, getattr(transformers, config_name))
        AutoConfig.register(PREFIX + model_type, config_class, exist_ok=True)
        _CONFIG_BY_NAME[config_class.__name__] = config_class
        for auto_name, stock_name in heads.items():
            stock = getattr(transformers, stock_name)
            compact = _compact_model_class(stock, config_class)
            _AUTO[auto_name].register(config_class, compact, exist_ok=True)
            COMPACT_CLASSES[stock] = compact
            COMPACT_BY_NAME[compact.__name__] = compact
    logger.debug("Registered %d compact model classes", len(COMPACT_CLASSES))


def compact_class_for(model: nn.Module) -> type[PreTrainedModel]:
    """The compact class of a stock model's class; a clear error for classes not supported."""
    register_compact_models()
    compact = COMPACT_CLASSES.get(type(model))
    if compact is None:
        supported = sorted(c.__name__ for c in COMPACT_CLASSES)
        raise NotImplementedError(
            f"compress does not support {type(model).__name__}; supported: {supported}."
        )
    return compact
