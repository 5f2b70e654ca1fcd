"""GGUF export for llama.cpp: a compacted (or stock) LLaMA or Mistral model -> one .gguf file.

llama.cpp reads one embedding width for the whole model and, per layer, a number of query heads, of KV
heads and of FFN channels (`head_count`, `head_count_kv`, `feed_forward_length` arrays); every head keeps
the stock head size and query heads map to KV heads in equal groups. That is the runtime structure
(`GatesConfig(structure="runtime")`) compacted: a model whose layers all keep the same counts is written as
architecture "llama" (scalar counts, every llama.cpp build and front end reads it); one with per-layer
counts as "deci", llama.cpp's LLaMA with per-layer head and FFN counts (a layer with no heads left skips
its attention there). Two shapes llama.cpp cannot express are written as equivalent ones, exactly:

- a layer whose KV groups kept different numbers of query heads gets closed heads (zero rows in q, zero
  columns in o) until every group has as many as the largest, so the grouping is regular;
- a layer with heads but no FFN channel left gets one zero channel (llama.cpp's FFN-free layer also drops
  the attention output), and a first layer without heads one closed head (llama.cpp takes the head size
  from the first layer);
- the residual and FFN widths are padded with zero dims to multiples of 64 (`align`): llama.cpp's block
  quantizations (Q8_0, Q4_K_M and their fallbacks) need multiples of 32 to apply to every matrix, and its
  f16 dot products run 64 elements per step on AVX-512 (SmolLM2 decode at 20% removed: 86 tok/s at a
  width of 544, 110 at 576, dense 97-102); the RMSNorm epsilon and weights absorb the padding
  (`pad_widths`).

The fine structure (per-layer residual dims, heads with some dims closed) has no GGUF form: it is refused
with the option that trains the runtime structure. q and k rows are reordered per head from the
half-split RoPE layout of transformers to the interleaved pairs llama.cpp rotates. The tokenizer comes
from the folder's tokenizer.json (byte-level BPE); without one the file holds no vocabulary and runs on
token ids.

>>> export_gguf(load_compressed("small/"), "small/model.f16.gguf", tokenizer_dir="small/")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finegates.io_utils import atomic_write

GGUF_DTYPES = ("f16", "f32")
_FAMILIES = ("llama", "mistral")
TRAIN_RUNTIME = 'train with --structure runtime (GatesConfig(structure="runtime")) and compress again'


@dataclass
class GGUFLayer:
    """One decoder layer as llama.cpp reads it: tensors by GGUF name (numpy, (out, in)) and the counts."""

    heads: int
    kv_heads: int
    ffn: int
    tensors: dict[str, np.ndarray]


def _check_family(config) -> None:
    """Refuse families and RoPE variants the export does not write."""
    if config.model_type.removeprefix("finegates_") not in _FAMILIES:
        raise ValueError(
            f"GGUF export supports LLaMA and Mistral models, not {config.model_type!r}; "
            "export it with --format onnx instead."
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"GGUF export writes plain RoPE only, not rope_type={rope['rope_type']!r}.")


def context_length(config) -> int:
    """The longest context the file declares: a sliding attention window (Mistral) is not written, so the
    file declares at most the window, within which full attention computes the same."""
    window = getattr(config, "sliding_window", None)
    return min(config.max_position_embeddings, window or config.max_position_embeddings)


def check_runtime_structure(config) -> None:
    """Refuse (ValueError, one line) a compacted model that llama.cpp cannot express."""
    spec = getattr(config, "finegates_compact", None)
    if not spec:
        return
    if any(s.get("gather_from") or s.get("scatter_to") for s in spec.get("linears", {}).values()):
        _refuse("layers read and write their own residual dims")


def _refuse(reason: str):
    raise ValueError(
        f"GGUF export: this model was compacted from the fine structure ({reason}); llama.cpp runs whole "
        f"heads, FFN channels and one residual width: {TRAIN_RUNTIME}."
    )


def _array(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().float().cpu().numpy()


def _interleave_rope(rows: np.ndarray, heads: int) -> np.ndarray:
    """Per head, transformers' RoPE pairs dim i with i + d/2; llama.cpp pairs 2i with 2i + 1."""
    shape = rows.shape
    d = shape[0] // max(heads, 1)
    return rows.reshape(heads, 2, d // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _kv_index(attn: nn.Module, heads: int, kv_heads: int) -> list[int]:
    index = getattr(attn, "kv_index", None)
    if index is not None:
        return index.tolist()
    return [h // (heads // kv_heads) for h in range(heads)]


def _regular_groups(q, q_bias, o, kv_of, kv_heads: int, d: int):
    """Query heads ordered by KV group, each group padded with closed heads to the largest group's size.
    Returns (q rows, q bias, o columns, heads)."""
    groups = [[h for h, j in enumerate(kv_of) if j == g] for g in range(kv_heads)]
    size = max((len(g) for g in groups), default=0)
    q_rows, q_bias_rows, o_cols = [], [], []
    for group in groups:
        for slot in range(size):
            if slot < len(group):
                h = group[slot]
                q_rows.append(q[h * d : (h + 1) * d])
                q_bias_rows.append(None if q_bias is None else q_bias[h * d : (h + 1) * d])
                o_cols.append(o[:, h * d : (h + 1) * d])
            else:  # a closed head: scores of zero, and its output is not read
                q_rows.append(np.zeros((d, q.shape[1]), q.dtype))
                q_bias_rows.append(None if q_bias is None else np.zeros(d, q.dtype))
                o_cols.append(np.zeros((o.shape[0], d), o.dtype))
    width = o.shape[0]
    q_out = np.concatenate(q_rows) if q_rows else np.zeros((0, q.shape[1]), q.dtype)
    bias_out = None if q_bias is None or not q_rows else np.concatenate(q_bias_rows)
    o_out = np.concatenate(o_cols, axis=1) if o_cols else np.zeros((width, 0), o.dtype)
    return q_out, bias_out, o_out, size * kv_heads


def _layer(block: nn.Module, d: int) -> GGUFLayer:
    attn, mlp = block.self_attn, block.mlp
    q, k, v, o = (_array(getattr(attn, f"{n}_proj").weight) for n in "qkvo")
    q_bias, k_bias, v_bias, o_bias = (_array(getattr(attn, f"{n}_proj").bias) for n in "qkvo")
    spec = getattr(attn, "spec", None)
    silent = not o.any() or (not v.any() and v_bias is None)  # the layer's attention adds nothing
    if silent and o_bias is None:  # every head closed (compaction keeps a placeholder head)
        heads = kv_heads = 0
    elif spec is not None and not spec.qk_dim == spec.v_dim == d:
        _refuse("heads kept only some of their dims")
    else:
        heads, kv_heads = q.shape[0] // d, k.shape[0] // d
    tensors = {}  # llama.cpp counts the tensors: a layer without attention or FFN has no norm for it
    if heads:
        tensors["attn_norm.weight"] = _array(block.input_layernorm.weight)
        q, q_bias, o, heads = _regular_groups(q, q_bias, o, _kv_index(attn, heads, kv_heads), kv_heads, d)
        attention = {
            "attn_q": (q, q_bias),
            "attn_k": (k, k_bias),
            "attn_v": (v, v_bias),
            "attn_output": (o, o_bias),
        }
        for name, count in (("attn_q", heads), ("attn_k", kv_heads)):
            weight, bias = attention[name]
            attention[name] = (
                _interleave_rope(weight, count),
                None if bias is None else _interleave_rope(bias, count),
            )
        for name, (weight, bias) in attention.items():
            tensors[f"{name}.weight"] = weight
            if bias is not None:
                tensors[f"{name}.bias"] = bias
    gate, up, down = (_array(getattr(mlp, f"{n}_proj").weight) for n in ("gate", "up", "down"))
    ffn = gate.shape[0]
    if ffn == 0 and heads:  # llama.cpp's FFN-free layer skips the residual add of its attention
        gate, up, down = (
            np.zeros((1, gate.shape[1]), gate.dtype),
            np.zeros((1, up.shape[1]), up.dtype),
            np.zeros((down.shape[0], 1), down.dtype),
        )
        ffn = 1
    if ffn:
        tensors["ffn_norm.weight"] = _array(block.post_attention_layernorm.weight)
        for name, weight, module in (
            ("ffn_gate", gate, mlp.gate_proj),
            ("ffn_up", up, mlp.up_proj),
            ("ffn_down", down, mlp.down_proj),
        ):
            tensors[f"{name}.weight"] = weight
            if module.bias is not None and weight.shape == tuple(module.weight.shape):
                tensors[f"{name}.bias"] = _array(module.bias)
    return GGUFLayer(heads, kv_heads, ffn, tensors)


def gguf_layers(model: nn.Module) -> list[GGUFLayer]:
    """The decoder layers of a LLaMA-family model (compacted or stock) in llama.cpp's form."""
    config = model.config
    _check_family(config)
    check_runtime_structure(config)
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = [_layer(block, d) for block in model.model.layers]
    if layers and not layers[0].heads:  # llama.cpp reads the head size only where layer 0 has heads
        width = model.config.hidden_size
        block = model.model.layers[0]
        layers[0].tensors = {
            "attn_norm.weight": _array(block.input_layernorm.weight),
            **{f"attn_{n}.weight": np.zeros((d, width), np.float32) for n in "qkv"},
            "attn_output.weight": np.zeros((width, d), np.float32),  # a closed head: its output is zero
            **layers[0].tensors,
        }
        layers[0].heads = layers[0].kv_heads = 1
    return layers


def _byte_level(tokenizer: dict) -> bool:
    """Whether tokenizer.json's BPE is byte-level: a ByteLevel pre-tokenizer step or decoder, and no
    SentencePiece byte fallback."""
    if tokenizer["model"].get("byte_fallback"):
        return False

    def kinds(part: dict | None) -> list[str]:
        part = part or {}
        inner = part.get("pretokenizers") or part.get("decoders") or [part]
        return [step.get("type") for step in inner]

    return "ByteLevel" in kinds(tokenizer.get("pre_tokenizer")) + kinds(tokenizer.get("decoder"))


def _pre_tokenizer(tokenizer: dict) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenization, where tokenizer.json says it plainly."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("use_regex", s.get("individual_digits"))) for s in steps]
    if kinds == [("ByteLevel", True)]:
        return "gpt-2"
    if kinds == [("Digits", True), ("ByteLevel", True)]:
        return "smollm"
    return None


def _read_tokenizer(folder: Path | None, pre: str | None) -> tuple[dict, str] | None:
    """tokenizer.json of `folder` and its llama.cpp pre-tokenizer, checked before anything is written
    (None: no tokenizer file)."""
    path = folder / "tokenizer.json" if folder else None
    if path is None or not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data["model"].get("type") != "BPE":
        raise ValueError(
            f"GGUF export writes byte-level BPE tokenizers; {path} holds {data['model'].get('type')}."
        )
    if not _byte_level(data):
        raise ValueError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2's bytes-to-characters vocabulary, as in "
            f"LLaMA 3, Qwen2, SmolLM2); {path} is a SentencePiece-style BPE (byte fallback or a metaspace "
            "'\u2581' vocabulary, as in LLaMA 2 and Mistral 7B), which llama.cpp reads as another tokenizer "
            "model: written as byte-level BPE it would tokenize every text wrongly. Convert a stock-shaped "
            "export of it (`finegates compress --uniform`) with llama.cpp's own convert_hf_to_gguf.py."
        )
    pre = pre or _pre_tokenizer(data)
    if pre is None:
        raise ValueError(
            f"GGUF export: which llama.cpp pre-tokenizer matches {path} is not plain from the file; pass "
            "--tokenizer-pre NAME (e.g. llama-bpe, qwen2, gpt-2)."
        )
    return data, pre


def _add_tokenizer(writer, folder: Path | None, vocab_size: int, tokenizer: tuple[dict, str] | None) -> None:
    if tokenizer is None:
        writer.add_tokenizer_model("none")
        return
    import gguf

    data, pre = tokenizer
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in data["model"]["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config_path = folder / "tokenizer_config.json"
    settings = json.loads(config_path.read_text()) if config_path.is_file() else {}
    by_content = {t: i for i, t in enumerate(tokens)}
    for role, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        token = settings.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token in by_content:
            add(by_content[token])
    writer.add_add_bos_token(bool(settings.get("add_bos_token", False)))
    template = folder / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text())


_READERS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight", "ffn_up.weight")
_WRITERS = ("attn_output.weight", "attn_output.bias", "ffn_down.weight", "ffn_down.bias")
_NORMS = ("attn_norm.weight", "ffn_norm.weight", "output_norm.weight")


def _pad(t: np.ndarray, axis: int, size: int) -> np.ndarray:
    widths = [(0, 0)] * t.ndim
    widths[axis] = (0, size - t.shape[axis])
    return np.pad(t, widths)


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def pad_widths(outer: dict[str, np.ndarray], layers: list[GGUFLayer], align: int) -> float:
    """Pad the residual width and every layer's FFN width up to multiples of `align` with zero dims and
    channels, in place, exactly: a zero stream dim stays zero (zero reader columns, writer rows and
    embedding columns), and RMSNorm over P >= K dims equals the one over K once eps' = eps K / P and
    weight' = weight sqrt(K / P). Returns the factor K / P for the file's epsilon. llama.cpp's block
    quantizations need row widths that their block size (32) divides; other tensors fall back to f16."""
    width = outer["token_embd.weight"].shape[1]
    padded = _round_up(width, align)
    scale = width / padded
    for name, t in outer.items():
        outer[name] = _pad(t, 0 if name in _NORMS else 1, padded) * (
            math.sqrt(scale) if name in _NORMS else 1
        )
    for layer in layers:
        for name, t in layer.tensors.items():
            if name in _NORMS:
                layer.tensors[name] = _pad(t, 0, padded) * math.sqrt(scale)
            elif name in _READERS or name in _WRITERS:
                layer.tensors[name] = _pad(t, 1 if name in _READERS else 0, padded)
        channels = _round_up(layer.ffn, align)
        if layer.ffn and channels != layer.ffn:
            for name in (
                "ffn_gate.weight",
                "ffn_up.weight",
                "ffn_gate.bias",
                "ffn_up.bias",
                "ffn_down.weight",
            ):
                if name in layer.tensors:
                    layer.tensors[name] = _pad(
                        layer.tensors[name], 1 if name == "ffn_down.weight" else 0, channels
                    )
            layer.ffn = channels
    return scale


def export_gguf(
    model: nn.Module,
    path: str | Path,
    dtype: str = "f16",
    tokenizer_dir: str | Path | None = None,
    tokenizer_pre: str | None = None,
    align: int = 64,
) -> Path:
    """Write `model` (a LLaMA-family ForCausalLM, compacted from the runtime structure or stock) as one GGUF
    file: 2-D weights in `dtype` ("f16" or "f32"), norms in f32; the residual and FFN widths padded with zero
    dims to multiples of `align` (see `pad_widths`; 1: as they are). Written to a temporary file and renamed,
    so an existing file is replaced only by a complete one."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r} is not one of {GGUF_DTYPES}.")
    if align < 1:
        raise ValueError(f"GGUF align={align} is not a positive width.")
    config = model.config
    layers = gguf_layers(model)
    embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    outer = {"token_embd.weight": _array(embeddings), "output_norm.weight": _array(model.model.norm.weight)}
    if head.data_ptr() != embeddings.data_ptr():
        outer["output.weight"] = _array(head)
    eps_scale = pad_widths(outer, layers, align)
    tokenizer = _read_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tokenizer_pre)
    counts = {(layer.heads, layer.kv_heads, layer.ffn) for layer in layers}
    arch = "llama" if len(counts) == 1 and all(layer.heads for layer in layers) else "deci"
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(str(getattr(config, "_name_or_path", "") or config.model_type))
        writer.add_block_count(len(layers))
        writer.add_context_length(context_length(config))
        writer.add_embedding_length(outer["token_embd.weight"].shape[1])
        pick = (lambda values: values[0]) if arch == "llama" else list
        writer.add_feed_forward_length(pick([layer.ffn for layer in layers]))
        writer.add_head_count(pick([layer.heads for layer in layers]))
        writer.add_head_count_kv(pick([layer.kv_heads for layer in layers]))
        writer.add_key_length(d)
        writer.add_value_length(d)
        writer.add_rope_dimension_count(d)
        writer.add_rope_freq_base(float((config.rope_parameters or {}).get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps) * eps_scale)
        writer.add_vocab_size(config.vocab_size)
        f16 = dtype == "f16"
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
        _add_tokenizer(writer, Path(tokenizer_dir) if tokenizer_dir else None, config.vocab_size, tokenizer)

        def add(name: str, tensor: np.ndarray) -> None:
            matrix = tensor.ndim == 2 and f16
            writer.add_tensor(name, np.ascontiguousarray(tensor, np.float16 if matrix else np.float32))

        add("token_embd.weight", outer.pop("token_embd.weight"))
        for i, layer in enumerate(layers):
            for name, tensor in layer.tensors.items():
                add(f"blk.{i}.{name}", tensor)
        for name, tensor in outer.items():
            add(name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)
