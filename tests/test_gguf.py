"""GGUF export: the file computes what the compacted model computes.

Without llama.cpp, a NumPy forward pass that reads the file as llama.cpp does (interleaved RoPE pairs,
equal query groups per KV head, per-layer counts, a layer without heads skipping its attention) checks the
tensors and metadata; with llama.cpp installed (`make llama-cpp`), llama.cpp itself runs the file: logits,
32 greedy tokens with its cache, and its own quantizations.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader

import test_compress as fine
import test_runtime_structure as runtime
from conftest import tiny_inputs, tiny_model
from finegates import compress
from finegates.compress import llama_cpp
from finegates.compress.gguf import export_gguf, gguf_layers
from finegates.workflows.export import export_model

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["llama", "mistral"]
needs_llama_cpp = pytest.mark.skipif(not llama_cpp.available(), reason=llama_cpp.INSTALL)


def one_query_head_closed(ties) -> None:
    """Layer 1's KV groups keep different numbers of query heads: the export pads the smaller group."""
    ties.blocks[1]["heads"].theta.data[0] = fine.CLOSED


PATTERNS = {name: runtime.PATTERNS[name] for name in ("nothing_closed", "random", "binary_random")}
PATTERNS |= {name: runtime.PATTERNS[name] for name in ("every_head_of_a_layer_closed", "ffn_closed")}
PATTERNS["one_query_head_closed"] = one_query_head_closed


def every_kv_group_of_a_layer_closed(ties) -> None:
    """Layer 1's values are all closed (its output columns stay open): its attention adds nothing."""
    ties.blocks[1]["kv_heads"].theta.data.fill_(fine.CLOSED)


PATTERNS["every_kv_group_of_a_layer_closed"] = every_kv_group_of_a_layer_closed


def compacted(family: str, pattern: str):
    return compress(runtime.patterned(family, PATTERNS[pattern]))


def torch_logits(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


# -- a NumPy reading of the file, as llama.cpp reads it --------------------------------------------
def _rms(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def _rope(x, theta):
    """Interleaved pairs (2i, 2i + 1) rotated by position * theta^(-2i/d); x: (seq, heads, d)."""
    seq, _, d = x.shape
    angle = np.arange(seq)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
    return out


def gguf_forward(path, ids: list[int]) -> np.ndarray:
    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    meta = {k.removeprefix(f"{arch}."): reader.fields[k].contents() for k in reader.fields}
    w = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    n = meta["block_count"]
    per_layer = {
        key: meta[key] if isinstance(meta[key], list) else [meta[key]] * n
        for key in ("attention.head_count", "attention.head_count_kv", "feed_forward_length")
    }
    eps, theta, d = (
        meta["attention.layer_norm_rms_epsilon"],
        meta["rope.freq_base"],
        meta["attention.key_length"],
    )
    x = w["token_embd.weight"][ids]
    seq = len(ids)
    causal = np.triu(np.full((seq, seq), -np.inf), 1)
    for i in range(n):
        heads, kv, ffn = (per_layer[key][i] for key in per_layer)
        p = f"blk.{i}."
        if heads:
            h = _rms(x, w[p + "attn_norm.weight"], eps)
            q = _rope((h @ w[p + "attn_q.weight"].T).reshape(seq, heads, d), theta)
            k = _rope((h @ w[p + "attn_k.weight"].T).reshape(seq, kv, d), theta)
            v = (h @ w[p + "attn_v.weight"].T).reshape(seq, kv, d)
            k, v = (np.repeat(t, heads // kv, axis=1) for t in (k, v))
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + causal
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            x = x + np.einsum("hqk,khd->qhd", probs, v).reshape(seq, -1) @ w[p + "attn_output.weight"].T
        if ffn:
            h = _rms(x, w[p + "ffn_norm.weight"], eps)
            gate, up = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return _rms(x, w["output_norm.weight"], eps) @ head.T


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_the_file_computes_the_compacted_model(family, pattern, tmp_path):
    small = compacted(family, pattern)
    path = export_gguf(small, tmp_path / "model.gguf", dtype="f32")
    ids = tiny_inputs(batch=1, length=11)
    np.testing.assert_allclose(gguf_forward(path, ids[0].tolist()), torch_logits(small, ids)[0], atol=1e-4)


@pytest.mark.parametrize("align", [1, 32, 64])
def test_widths_padded_for_block_quantization_stay_exact(align, tmp_path):
    small = compacted("llama", "random")
    path = export_gguf(small, tmp_path / "model.gguf", dtype="f32", align=align)
    reader = GGUFReader(str(path))
    width = reader.fields["deci.embedding_length"].contents()
    ffn = reader.fields["deci.feed_forward_length"].contents()
    unpadded = [layer.ffn for layer in gguf_layers(small)]
    assert max(unpadded) < 32 and small.config.hidden_size < 32
    if align == 1:
        assert (width, ffn) == (small.config.hidden_size, unpadded)
    else:
        assert (width, ffn) == (align, [align, align])
    ids = tiny_inputs(batch=1, length=11)
    np.testing.assert_allclose(gguf_forward(path, ids[0].tolist()), torch_logits(small, ids)[0], atol=1e-4)


def test_per_layer_counts_are_written_as_deci_and_uniform_ones_as_llama(tmp_path):
    small = compacted("llama", "one_query_head_closed")
    layers = gguf_layers(small)
    assert [(layer.heads, layer.kv_heads) for layer in layers] == [(4, 2), (4, 2)]  # padded: 3 -> 4 heads
    ragged = compacted("llama", "random")
    reader = GGUFReader(str(export_gguf(ragged, tmp_path / "ragged.gguf", align=1)))
    assert reader.fields["general.architecture"].contents() == "deci"
    assert reader.fields["deci.feed_forward_length"].contents() == [
        layer.ffn for layer in gguf_layers(ragged)
    ]
    assert reader.fields["deci.embedding_length"].contents() == ragged.config.hidden_size
    stock = tiny_model("llama")
    reader = GGUFReader(str(export_gguf(stock, tmp_path / "stock.gguf")))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count"].contents() == 4
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {"F16"}
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 1} == {"F32"}


def test_a_layer_whose_attention_adds_nothing_has_no_heads_and_layer_0_keeps_one():
    layers = gguf_layers(compacted("llama", "every_kv_group_of_a_layer_closed"))
    assert (layers[1].heads, layers[1].kv_heads) == (0, 0) and "attn_norm.weight" not in layers[1].tensors
    layers = gguf_layers(compacted("llama", "every_head_of_a_layer_closed"))
    assert (layers[0].heads, layers[0].kv_heads) == (1, 1)  # a closed head: llama.cpp reads its size
    assert not layers[0].tensors["attn_output.weight"].any()


def test_a_layer_with_heads_but_no_ffn_channel_keeps_one_zero_channel():
    layers = gguf_layers(compacted("llama", "ffn_closed"))
    assert layers[0].ffn == 1 and not layers[0].tensors["ffn_down.weight"].any()


def test_a_fine_structure_model_is_refused_with_the_option_that_trains_the_runtime_one(tmp_path):
    small = compress(fine.patterned("llama", fine.PATTERNS["random"]))
    with pytest.raises(ValueError, match="--structure runtime") as err:
        export_gguf(small, tmp_path / "model.gguf")
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_other_families_are_refused_naming_onnx(arch, tmp_path):
    with pytest.raises(ValueError, match="--format onnx"):
        export_gguf(tiny_model(arch), tmp_path / "model.gguf")


def test_export_command_writes_the_file_with_the_folders_tokenizer(tmp_path):
    small = compacted("llama", "binary_random")
    small.save_pretrained(tmp_path / "small")
    tokenizer = {
        "model": {"type": "BPE", "vocab": {f"t{i}": i for i in range(97)}, "merges": [["t", "1"]]},
        "pre_tokenizer": {"type": "ByteLevel", "use_regex": True},
        "added_tokens": [
            {"id": 97, "content": "<s>", "special": True},
            {"id": 98, "content": "</s>", "special": True},
        ],
    }
    (tmp_path / "small" / "tokenizer.json").write_text(json.dumps(tokenizer))
    (tmp_path / "small" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )
    path = export_model(tmp_path / "small", "gguf", tmp_path / "out", dtype="f32")
    assert path == tmp_path / "out" / "model.f32.gguf"
    reader = GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert reader.fields["tokenizer.ggml.tokens"].contents()[97:] == ["<s>", "</s>"]
    assert reader.fields["tokenizer.ggml.merges"].contents() == ["t 1"]
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == 97
    ids = tiny_inputs(batch=1, length=7)
    np.testing.assert_allclose(gguf_forward(path, ids[0].tolist()), torch_logits(small, ids)[0], atol=1e-4)


@pytest.mark.parametrize(
    "spm_style",
    [
        {"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}},  # Mistral 7B
        {"pre_tokenizer": None, "byte_fallback": True},  # LLaMA 2: no pre-tokenizer, byte fallback
    ],
)
def test_a_sentencepiece_style_bpe_tokenizer_is_refused(tmp_path, spm_style):
    """Written as byte-level BPE, a metaspace vocabulary would make llama.cpp tokenize every text wrongly."""
    small = compacted("llama", "binary_random")
    small.save_pretrained(tmp_path / "small")
    model = {"type": "BPE", "vocab": {f"\u2581t{i}": i for i in range(97)}, "merges": []}
    model["byte_fallback"] = spm_style.get("byte_fallback", False)
    tokenizer = {"model": model, "pre_tokenizer": spm_style["pre_tokenizer"], "decoder": None}
    (tmp_path / "small" / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match="SentencePiece-style BPE"):
        export_model(tmp_path / "small", "gguf", tmp_path / "out", dtype="f32", tokenizer_pre="llama-bpe")
    assert not (tmp_path / "out").exists()


# -- llama.cpp itself ------------------------------------------------------------------------------
@needs_llama_cpp
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "pattern",
    ["random", "one_query_head_closed", "every_head_of_a_layer_closed", "every_kv_group_of_a_layer_closed"],
)
def test_llama_cpp_computes_the_compacted_model(family, pattern, tmp_path):
    small = compacted(family, pattern)
    path = export_gguf(small, tmp_path / "model.gguf", dtype="f32")
    ids = tiny_inputs(batch=1, length=11)
    fused = llama_cpp.load(path, all_logits=True, flash_attn=True)
    np.testing.assert_allclose(
        llama_cpp.token_logits(fused, ids[0].tolist()), torch_logits(small, ids)[0], atol=1e-4
    )
    llm = llama_cpp.load(path, all_logits=True)
    np.testing.assert_allclose(
        llama_cpp.token_logits(llm, ids[0].tolist()), torch_logits(small, ids)[0], atol=1e-4
    )


@needs_llama_cpp
def test_llama_cpp_generates_what_torch_generates(tmp_path):
    small = compacted("llama", "random")
    llm = llama_cpp.load(export_gguf(small, tmp_path / "model.gguf", dtype="f32"))
    ids = tiny_inputs(batch=1, length=5)
    with torch.no_grad():  # greedy with the cache and no stopping rule, as llama.cpp's loop
        out, expected = small(input_ids=ids, use_cache=True), []
        for _ in range(32):
            expected.append(int(out.logits[0, -1].argmax()))
            out = small(input_ids=torch.tensor([expected[-1:]]), past_key_values=out.past_key_values)
    assert llama_cpp.greedy(llm, ids[0].tolist(), 32) == expected


@needs_llama_cpp
@pytest.mark.parametrize("kind", sorted(llama_cpp.QUANTIZATIONS))
def test_llama_cpp_quantizes_the_export(kind, tmp_path):
    small = compacted("llama", "binary_random")
    path = export_gguf(small, tmp_path / "model.gguf", dtype="f32")
    quantized = llama_cpp.quantize(path, tmp_path / f"model.{kind}.gguf", kind)
    assert quantized.stat().st_size < path.stat().st_size
    llm = llama_cpp.load(quantized, all_logits=True)
    ids = tiny_inputs(batch=1, length=11)[0].tolist()
    assert np.isfinite(llama_cpp.token_logits(llm, ids)).all()
