"""Per model family: which modules are gated by default and which modules share which dimension.

Adding an architecture means adding one `Architecture` entry here; the budget objective, the report
and compaction all read this table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Architecture:
    """Where the transformer blocks are and the role of each linear layer inside a block.

    Roles: q, k, v (attention projections, rows = head dims), o (attention output, cols = head dims),
    up / gate (FFN expansion, rows = channels), down (FFN projection, cols = channels), and qkv for a
    fused q|k|v projection (GPT-2). Every role reads or writes the residual stream on its other axis.
    """

    block_pattern: str  # regex matched against the full name of each block module
    roles: dict[str, str]  # role -> module path relative to the block
    default_targets: tuple[str, ...]
    rope: bool = False  # rotary embeddings: head dims i and i + head_dim/2 rotate together
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3): a q/k dim counts in its own head's norm
    head_modules: tuple[str, ...] = field(default=("classifier", "score"))
    # The residual stream, for the shared mask of structure="runtime" (module-name suffixes):
    embeddings: tuple[str, ...] = ()  # embeddings whose outputs enter the stream
    norms: tuple[str, ...] = ()  # norms over the stream's width
    layer_norm: bool = False  # norms are LayerNorms (statistics over the full width) rather than RMSNorms
    stream_readers: tuple[str, ...] = ()  # linears outside the blocks that read the stream
    final_norm: str | None = None  # the norm between the last block and the head (suffix), if any
    # Attributes of the stock attention module that count heads, reset when progressive compaction drops
    # heads in training: attribute -> "group_size" (query heads per KV head) or "q_width" (query rows).
    # The modules read the head count itself off the projections' widths.
    head_attrs: dict[str, str] = field(default_factory=dict)
    # The elementwise activation between the FFN's up and down projections (path relative to the block),
    # where it is a module of its own and the down projection reads its output alone (not in GLU FFNs):
    # training moves it into the gated down projection (`layer.defer_activation`).
    activation: str | None = None


_LLAMA = Architecture(
    block_pattern=r"(^|\.)layers\.\d+$",
    roles={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
    default_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    rope=True,
    head_modules=("score", "lm_head"),
    embeddings=("embed_tokens",),
    norms=("input_layernorm", "post_attention_layernorm", "norm"),
    stream_readers=("lm_head", "score"),
    final_norm="norm",
    head_attrs={"num_key_value_groups": "group_size"},
)

_BERT = Architecture(
    block_pattern=r"(^|\.)encoder\.layer\.\d+$",
    roles={
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "up": "intermediate.dense",
        "down": "output.dense",
    },
    default_targets=(
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ),
    head_modules=("classifier", "pooler"),
    embeddings=("word_embeddings", "position_embeddings", "token_type_embeddings"),
    norms=("LayerNorm",),
    layer_norm=True,
    stream_readers=("pooler.dense", "classifier.dense"),
    activation="intermediate.intermediate_act_fn",
)

_GPT2 = Architecture(
    block_pattern=r"(^|\.)h\.\d+$",
    roles={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    default_targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    head_modules=("score", "lm_head"),
    embeddings=("wte", "wpe"),
    norms=("ln_1", "ln_2", "ln_f"),
    layer_norm=True,
    stream_readers=("lm_head", "score"),
    final_norm="ln_f",
    head_attrs={"split_size": "q_width"},
    activation="mlp.act",
)

# Qwen3 normalises every q and k head over all its dims before RoPE, so a q/k dim leaves only when it
# is closed in k and in every live query head of its group (see `coupling.BlockGates.qk_units`).
_QWEN3 = dataclasses.replace(_LLAMA, qk_norm=True)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _QWEN3,
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "gpt2": _GPT2,
}


def architecture_for(model_type: str | None) -> Architecture | None:
    return ARCHITECTURES.get(model_type or "")


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def attention_shape(config) -> AttentionShape:
    """Head counts and head size of a transformers config (BERT, LLaMA-family and GPT-2 naming)."""
    num_heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    num_kv = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    return AttentionShape(num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim)
