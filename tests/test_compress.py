"""Compaction is exact: the compacted model computes what the gated model computes in eval mode.

One table of gate patterns (edge cases) runs through the same assertions on every architecture,
plus property-based random patterns, the report's parameter prediction, reloading in a fresh
process, and clear errors for damaged folders.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import finegates
from conftest import ARCHITECTURES, is_causal, tiny_inputs, tiny_model
from finegates import GatesConfig, compress, get_gated_model, load_compressed, sparsity_report
from finegates.architectures import architecture_for
from finegates.compress import CompressedCheckpointError
from finegates.compress.attention import _pad_head_dims, kernel_head_size
from finegates.compress.linear import ONEDNN_MIN_ROWS
from finegates.coupling import READERS, WRITERS, Block, find_blocks

CLOSED, OPEN = -2.0, 2.0
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


# -- gate patterns ---------------------------------------------------------------------------------
def gated(arch: str, seed: int = 0) -> torch.nn.Module:
    return get_gated_model(tiny_model(arch, seed), GatesConfig()).eval()


def theta(block: Block, role: str, axis: str) -> torch.Tensor:
    """The gate parameter of a role's rows or columns; q/k/v rows of a fused qkv are views into it."""
    if role in ("q", "k", "v") and block.has("qkv"):
        rows = block.modules["qkv"][1].row_gate.theta.data
        size = block.shape.num_heads * block.shape.head_dim
        return rows[{"q": 0, "k": 1, "v": 2}[role] * size :][:size]
    return getattr(block.modules[role][1], f"{axis}_gate").theta.data


def head_dims(block: Block, heads: list[int], dims: list[int] | None = None) -> list[int]:
    d = block.shape.head_dim
    return [h * d + i for h in heads for i in (dims if dims is not None else range(d))]


def nothing_closed(model):
    pass


def fractional(model):
    gen = torch.Generator().manual_seed(0)
    for layer in finegates.gated_layers(model).values():
        for gate in layer.gates().values():
            gate.theta.data.uniform_(-0.5, 0.6, generator=gen)  # eval values strictly inside (0, 1)


def ffn_closed(model):
    theta(find_blocks(model)[0], "up", "row").fill_(CLOSED)


def whole_heads_closed(model):
    first, second = find_blocks(model)
    theta(first, "o", "col")[head_dims(first, [1])] = CLOSED  # head 1 writes nothing: it leaves
    theta(second, "q", "row")[head_dims(second, [2])] = CLOSED  # head 2 scores all zero: it stays
    theta(second, "v", "row")[head_dims(second, [0], [0, 3])] = CLOSED


def kv_group_closed(model):
    block = find_blocks(model)[0]
    theta(block, "o", "col")[head_dims(block, list(range(block.shape.group_size)))] = CLOSED


def irregular_groups(model):
    block = find_blocks(model)[1]
    theta(block, "o", "col")[head_dims(block, [0])] = CLOSED  # KV head 0 keeps 1 query head, the others more


def residual_dim_closed(model):
    for block in find_blocks(model):
        for role in block.modules:
            if role in READERS:
                theta(block, role, "col")[[3, 17]] = CLOSED
            if role in WRITERS:
                theta(block, role, "row")[[3, 17]] = CLOSED


def rope_pairs_half_closed(model):
    for block in find_blocks(model):
        half = block.shape.head_dim // 2
        theta(block, "q", "row")[head_dims(block, [0, 1, 3], [0, 1, half + 2])] = CLOSED
        theta(block, "k", "row")[head_dims(block, [0], [half, half + 1, 3, half + 3])] = CLOSED


def everything_in_a_block_closed(model):
    for layer in find_blocks(model)[0].modules.values():
        for gate in layer[1].gates().values():
            gate.theta.data.fill_(CLOSED)


def randomize(gates, seed: int, p_closed: float, p_fractional: float) -> None:
    """Each gate closed with probability p_closed, fractional with p_fractional, else fully open."""
    gen = torch.Generator().manual_seed(seed)
    for gate in gates:
        u = torch.rand(gate.theta.shape, generator=gen)
        frac = torch.empty_like(u).uniform_(-0.5, 0.6, generator=gen)
        gate.theta.data.copy_(
            torch.where(u < p_closed, CLOSED, torch.where(u < p_closed + p_fractional, frac, OPEN))
        )


def random_pattern(seed: int, p_closed: float = 0.3, p_fractional: float = 0.2) -> Callable:
    def apply(model):
        gates = [g for layer in finegates.gated_layers(model).values() for g in layer.gates().values()]
        randomize(gates, seed, p_closed, p_fractional)

    return apply


PATTERNS = {
    "nothing_closed": nothing_closed,
    "fractional": fractional,
    "ffn_closed": ffn_closed,
    "whole_heads_closed": whole_heads_closed,
    "kv_group_closed": kv_group_closed,
    "irregular_groups": irregular_groups,
    "residual_dim_closed": residual_dim_closed,
    "rope_pairs_half_closed": rope_pairs_half_closed,
    "everything_in_a_block_closed": everything_in_a_block_closed,
    "random": random_pattern(0),
}


def patterned(arch: str, pattern: Callable, seed: int = 0) -> torch.nn.Module:
    model = gated(arch, seed)
    with torch.no_grad():
        pattern(model)
    return model


# -- assertions ------------------------------------------------------------------------------------
def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tiny_inputs(seed)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one right-padded row exercises the attention mask
    return ids, mask


def outputs(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.logits, out.hidden_states


def assert_exact(reference, small, ids=None, mask=None):
    ids, mask = (ids, mask) if ids is not None else padded_batch()
    logits, hidden = outputs(reference, ids, mask)
    small_logits, small_hidden = outputs(small, ids, mask)
    torch.testing.assert_close(small_logits, logits, atol=ATOL, rtol=0)
    assert len(small_hidden) == len(hidden)
    for a, b in zip(small_hidden, hidden):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def assert_same_generation(reference, small):
    ids = tiny_inputs(seed=3, batch=2, length=5)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(small.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- exactness -------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_compacted_model_equals_gated_model(arch, pattern):
    model = patterned(arch, PATTERNS[pattern])
    small = compress(model)
    assert_exact(model, small)
    assert not finegates.is_gated(small)
    report = sparsity_report(model)
    assert n_params(small) == report.model_params - report.model_removed


def test_batches_of_many_rows_compact_exactly(arch):
    """Enough tokens per batch (5 x 32 rows) that every linear takes the large-GEMM route (oneDNN on x86)."""
    model = patterned(arch, PATTERNS["random"])
    ids = tiny_inputs(seed=4, batch=5, length=32)
    assert ids.numel() >= ONEDNN_MIN_ROWS
    assert_exact(model, compress(model), ids, torch.ones_like(ids))


def qk_pair_closed_per_group(model):
    """KV group 0 closes RoPE pair 0 in k and in both of its query heads, group 1 pair 1; the heads
    also close one more dim each on one side only (kept as zero rows under a per-head q/k norm)."""
    for block in find_blocks(model):
        half = block.shape.head_dim // 2
        group = block.shape.group_size
        for kv, pair in ((0, 0), (1, 1)):
            queries = list(range(kv * group, (kv + 1) * group))
            theta(block, "k", "row")[head_dims(block, [kv], [pair, pair + half])] = CLOSED
            theta(block, "q", "row")[head_dims(block, queries, [pair, pair + half])] = CLOSED
            theta(block, "q", "row")[head_dims(block, queries[:1], [2 + kv])] = CLOSED
            theta(block, "k", "row")[head_dims(block, [kv], [3 - kv])] = CLOSED


@pytest.mark.parametrize("arch_name", ["llama", "qwen3"])
def test_qk_dims_closed_in_whole_groups_leave(arch_name):
    """Pairs closed in k and in every query head of the group leave (also under Qwen3's per-head q/k
    norm, whose mean keeps dividing by the full head size); the model stays exact."""
    model = patterned(arch_name, qk_pair_closed_per_group)
    small = compress(model)
    assert_exact(model, small)
    assert_same_generation(model, small)
    report = sparsity_report(model)
    assert n_params(small) == report.model_params - report.model_removed
    for block in report.blocks:
        assert block.qk_dims == 6  # 8 - one pair, in every KV group


@pytest.mark.parametrize(
    ("size", "kernel"),
    [
        (8, 8),
        (9, 9),
        (10, 10),
        (11, 16),
        (15, 16),
        (33, 33),
        (34, 34),
        (35, 40),
        (42, 42),
        (52, 56),
        (57, 57),
        (61, 64),
        (64, 64),
    ],
)
def test_fused_kernels_get_head_sizes_rounded_to_multiples_of_8(size, kernel):
    assert kernel_head_size(size) == kernel


def test_heads_padded_for_the_fused_kernel_attend_exactly():
    """q/k keep 6 dims, v 5: both are zero-padded to 8 for SDPA, and the output is sliced back to 5."""
    q, k, v = torch.randn(2, 4, 7, 6), torch.randn(2, 4, 7, 6), torch.randn(2, 4, 7, 5)
    padded = _pad_head_dims(q, k, v, kernel_head_size(6))
    assert [t.shape[-1] for t in padded] == [8, 8, 8]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = torch.nn.functional.scaled_dot_product_attention(*padded, is_causal=True, scale=6**-0.5)
    torch.testing.assert_close(out[..., :5], expected, atol=ATOL, rtol=0)
    assert out[..., 5:].abs().max() == 0


def test_rope_table_columns_follow_the_index_buffers():
    """The RoPE table columns are cached per layer; changing the kept dims in place (as load_state_dict
    does) must not leave the model rotating at the old ones."""
    from finegates.compress.attention import CompactAttention

    def one_pair_per_kv_head(model):  # KV head 0 loses pair 0, KV head 1 pair 1: both keep 3 of 4 pairs
        for block in find_blocks(model):
            half = block.shape.head_dim // 2
            theta(block, "k", "row")[
                head_dims(block, [0], [0, half]) + head_dims(block, [1], [1, half + 1])
            ] = CLOSED

    model = patterned("llama", one_pair_per_kv_head)
    small = compress(model)
    assert_exact(model, small)
    ids, mask = padded_batch()
    before, _ = outputs(small, ids, mask)  # fills the caches
    attention = next(m for m in small.modules() if isinstance(m, CompactAttention))
    assert attention.spec.qk_dim < attention.spec.head_dim  # the gathered-table path
    dims = attention.rope_dims.clone()
    assert not torch.equal(dims[0], dims[1])
    with torch.no_grad():
        attention.rope_dims.copy_(dims.flip(0))  # KV heads swap their kept dims
    fresh = copy.deepcopy(small)  # new tensors: computes its columns from scratch
    after, _ = outputs(small, ids, mask)
    torch.testing.assert_close(after, outputs(fresh, ids, mask)[0], atol=0, rtol=0)
    assert not torch.allclose(after, before, atol=1e-4)


def test_output_attentions_are_those_of_the_kept_heads(arch):
    """With eager attention, `output_attentions=True` returns the compact weights: the gated model's, minus
    the heads that left (head 1 of the first layer; the second layer keeps all four), also when a stock
    model of the same class is built after the compaction."""
    model = patterned(arch, whole_heads_closed)
    small = compress(model)
    tiny_model(arch)
    for m in (model, small):
        m.set_attn_implementation("eager")
    ids, mask = padded_batch()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        compact = small(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(compact) == len(reference) == 2
    torch.testing.assert_close(compact[0], reference[0][:, [0, 2, 3]], atol=ATOL, rtol=0)
    torch.testing.assert_close(compact[1], reference[1], atol=ATOL, rtol=0)


def test_compact_classes_are_attributes_of_their_module():
    """What pickle and `__module__` look up: `finegates.compress.models.CompactLlamaForCausalLM` is the class
    `compress` makes, and its config class round-trips through pickle."""
    import pickle

    from finegates.compress import models

    small = compress(patterned("llama", whole_heads_closed))
    assert models.CompactLlamaForCausalLM is type(small)
    assert pickle.loads(pickle.dumps(small.config)).to_dict() == small.config.to_dict()
    with pytest.raises(AttributeError, match="CompactNothing"):
        getattr(models, "CompactNothing")  # noqa: B009


@pytest.mark.parametrize(
    "pattern", ["random", "irregular_groups", "kv_group_closed", "rope_pairs_half_closed"]
)
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if is_causal(a)])
def test_greedy_generation_is_identical(arch, pattern):
    model = patterned(arch, PATTERNS[pattern])
    assert_same_generation(model, compress(model))


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if is_causal(a)])
def test_kv_cache_is_taken_by_either_keyword(arch):
    """transformers passes the KV cache as `cache` in recent releases and as `past_key_values` in
    earlier 5.x ones: the compact attention fills it under either name."""
    from transformers import DynamicCache

    from finegates.compress.attention import CompactAttention

    small = compress(patterned(arch, PATTERNS["random"]))
    attention = next(m for m in small.modules() if isinstance(m, CompactAttention))
    hidden = torch.randn(1, 5, small.config.hidden_size)
    extra = {}
    if attention.spec.rope:
        extra["position_embeddings"] = small.model.rotary_emb(hidden, torch.arange(5)[None])
    filled = []
    for keyword in ("cache", "past_key_values"):
        kv = DynamicCache(config=small.config)
        with torch.no_grad():
            attention(hidden, **extra, **{keyword: kv})
        assert kv.get_seq_length(attention.layer_idx) == 5
        filled.append(kv.layers[attention.layer_idx].keys)
    torch.testing.assert_close(filled[0], filled[1], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compacted_model_traces_as_one_graph(arch):
    """torch.compile sees the whole compacted forward as one graph: no graph breaks (which would split it
    per layer and hit dynamo's recompile limit on per-layer shapes). 24 tokens reach the aligned-GEMM path."""
    rope = architecture_for(arch).rope  # whole RoPE pairs leave: the gathered-table path
    small = compress(patterned(arch, qk_pair_closed_per_group if rope else PATTERNS["random"]))
    ids = tiny_inputs(batch=1, length=24)
    torch._dynamo.reset()
    with torch.no_grad():
        small(input_ids=ids)  # an eager call first fills the per-layer caches (e.g. the kept RoPE dims)
        explained = torch._dynamo.explain(small)(input_ids=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@settings(max_examples=12, deadline=None)
@given(
    arch=st.sampled_from(ARCHITECTURES),
    seed=st.integers(0, 10_000),
    p_closed=st.floats(0.0, 0.9),
    p_fractional=st.floats(0.0, 0.1),
)
def test_random_gate_patterns_compact_exactly(arch, seed, p_closed, p_fractional):
    model = patterned(arch, random_pattern(seed, p_closed, p_fractional), seed=seed % 3)
    small = compress(model)
    assert_exact(model, small)
    report = sparsity_report(model)
    assert n_params(small) == report.model_params - report.model_removed


def test_compaction_removes_weights_and_leaves_the_gated_model_alone():
    model = patterned("llama", random_pattern(1, p_closed=0.4))
    before = outputs(model, *padded_batch())[0]
    small = compress(model)
    assert n_params(small) < n_params(model.base_model) * 0.9
    assert small.config.model_type == "finegates_llama"
    torch.testing.assert_close(outputs(model, *padded_batch())[0], before, atol=0, rtol=0)


def test_compress_needs_a_gated_model_and_a_known_quantization():
    with pytest.raises(ValueError, match="no gates"):
        compress(tiny_model("llama"))
    with pytest.raises(ValueError, match="quantize"):
        compress(gated("llama"), quantize="int4")


def test_int8_quantization_of_the_compacted_model():
    model = patterned("bert", random_pattern(2))
    small = compress(model, quantize="int8")
    kinds = {type(m) for m in small.modules()}
    assert torch.ao.nn.quantized.dynamic.Linear in kinds and torch.nn.Linear not in kinds
    ids, mask = padded_batch()
    (logits, hidden), (reference_logits, reference_hidden) = (
        outputs(small, ids, mask),
        outputs(model, ids, mask),
    )

    def relative_error(a, b):  # scale-free: a zero or random output scores ~1, int8 rounding ~1e-4 / ~2e-2
        return ((a - b).norm() / b.norm()).item()

    assert relative_error(hidden[-1], reference_hidden[-1]) < 2e-3
    assert relative_error(logits, reference_logits) < 0.1


# -- saving and loading ----------------------------------------------------------------------------
_RELOAD = textwrap.dedent("""
    import json, sys, torch
    import finegates  # registers the compact classes with the Auto classes
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    torch.set_num_threads(1)  # the same kernels as the parent process, so outputs are bitwise equal
    autos = {"causal": AutoModelForCausalLM, "seq": AutoModelForSequenceClassification}
    out = {}
    for folder, kind, ids in json.loads(sys.argv[1]):
        model = autos[kind].from_pretrained(folder).eval()
        base = AutoModel.from_pretrained(folder).eval()
        with torch.no_grad():
            out[folder] = [type(model).__name__, model(input_ids=torch.tensor(ids)).logits.tolist(),
                           base(input_ids=torch.tensor(ids)).last_hidden_state.tolist()]
    print(json.dumps(out))
""")


def test_saved_model_reloads_in_a_fresh_process(tmp_path):
    ids = tiny_inputs()
    jobs, expected = [], {}
    for arch in ARCHITECTURES:
        small = compress(patterned(arch, random_pattern(4)))
        folder = str(tmp_path / arch)
        small.save_pretrained(folder)
        jobs.append((folder, "causal" if is_causal(arch) else "seq", ids.tolist()))
        with torch.no_grad():
            out = small(input_ids=ids, output_hidden_states=True)
        expected[folder] = (type(small).__name__, out.logits, out.hidden_states[-1])
        torch.testing.assert_close(outputs(load_compressed(folder), ids, None)[0], out.logits, atol=0, rtol=0)
    run = subprocess.run(
        [sys.executable, "-c", _RELOAD, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for folder, (name, logits, hidden) in expected.items():
        assert got[folder][0] == name
        torch.testing.assert_close(torch.tensor(got[folder][1]), logits, atol=0, rtol=0)
        torch.testing.assert_close(torch.tensor(got[folder][2]), hidden, atol=0, rtol=0)


def _edit_weights(folder: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _key(tensors: dict, part: str) -> str:
    return next(k for k in sorted(tensors) if part in k)


def _truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _edit_config(folder: Path, edit: Callable[[dict], None]) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _widen_first_linear(config: dict) -> None:
    next(iter(config["finegates_compact"]["linears"].values()))["out_features"] += 1


DAMAGE = {
    "missing tensor": (lambda f: _edit_weights(f, lambda t: t.pop(_key(t, "mlp.up_proj"))), "missing_keys"),
    "wrong shape": (
        lambda f: _edit_weights(
            f, lambda t: t.update({_key(t, "down_proj.linear.weight"): torch.zeros(2, 2)})
        ),
        "mismatched_keys",
    ),
    "truncated file": (_truncate, "cannot load"),
    "no weights file": (lambda f: (f / "model.safetensors").unlink(), "cannot load"),
    "config disagrees": (lambda f: _edit_config(f, _widen_first_linear), "mismatched_keys"),
    "config entry damaged": (
        lambda f: _edit_config(
            f, lambda c: c["finegates_compact"]["attention"].update({"layers.0.self_attn": {"num_heads": 2}})
        ),
        "finegates_compact is invalid",
    ),
    "index out of range": (
        lambda f: _edit_weights(f, lambda t: t.update({_key(t, "kv_index"): t[_key(t, "kv_index")] + 9})),
        "outside",
    ),
    "not a compacted model": (
        lambda f: _edit_config(f, lambda c: c.update(model_type="llama")),
        "not a FineGates",
    ),
    "finegates section removed": (
        lambda f: _edit_config(f, lambda c: c.pop("finegates_compact")),
        "finegates_compact",
    ),
    "qk_dim changed": (
        lambda f: _edit_config(
            f, lambda c: c["finegates_compact"]["attention"]["layers.0.self_attn"].update(qk_dim=2)
        ),
        "rope_dims",
    ),
    "scatter_to out of range": (
        lambda f: _edit_config(f, _widen_scatter),
        "scatter_to is 40, but the residual",
    ),
    "fewer layers": (
        lambda f: _edit_config(f, lambda c: c.update(num_hidden_layers=1)),
        "does not fit the model",
    ),
    "an extra layer": (
        lambda f: _edit_config(f, lambda c: c.update(num_hidden_layers=3)),
        "missing_keys",
    ),
    "NaN weight": (
        lambda f: _edit_weights(
            f,
            lambda t: next(v for k, v in sorted(t.items()) if "up_proj" in k and v.is_floating_point()).fill_(
                float("nan")
            ),
        ),
        "up_proj.* holds NaN or infinite",
    ),
}


def _widen_scatter(config: dict) -> None:
    spec = next(s for s in config["finegates_compact"]["linears"].values() if s["scatter_to"] is not None)
    spec["scatter_to"] = 40


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    compress(patterned("llama", residual_dim_closed)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_folder_fails_with_a_clear_error(saved_llama, tmp_path, damage):
    folder = tmp_path / "copy"
    folder.mkdir()
    for file in saved_llama.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    load_compressed(folder)  # the intact copy loads
    breaks, message = DAMAGE[damage]
    breaks(folder)
    with pytest.raises(CompressedCheckpointError, match=message):
        load_compressed(folder)
    # the Auto classes, `evaluate` and `bench` load through the same checks: nothing runs re-initialised
    from transformers import AutoModelForCausalLM

    from finegates.compress.io import load_checked

    with pytest.raises(CompressedCheckpointError):
        load_checked(AutoModelForCausalLM, folder)
    if damage != "not a compacted model":  # a stock class loading the compacted weights is transformers' own
        from safetensors import SafetensorError

        with pytest.raises((CompressedCheckpointError, OSError, SafetensorError)):  # a refusal, never a model
            AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("compacted", [False, True], ids=["stock", "compacted"])
def test_a_bfloat16_folder_loads_in_float32_for_evaluation(tmp_path, compacted):
    """`evaluate`, `bench` and `export` score a folder saved in bfloat16 as they score a hub id: in float32,
    where int8 dynamic quantization also runs."""
    from transformers import AutoModelForCausalLM

    from finegates.compress.io import load_checked
    from finegates.compress.quantize import quantize_linears

    model = tiny_model("llama")
    if compacted:
        model = compress(get_gated_model(model, GatesConfig(structure="runtime")).eval())
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = load_checked(AutoModelForCausalLM, tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    with torch.no_grad():
        quantize_linears(loaded)(input_ids=tiny_inputs())
    if compacted:
        assert load_compressed(tmp_path, quantize="int8") is not None


def test_a_changed_qk_dim_is_refused_where_no_buffer_depends_on_it(tmp_path):
    """BERT keeps no RoPE table: only the projection widths show that the recorded qk_dim was edited."""
    compress(patterned("bert", residual_dim_closed)).save_pretrained(tmp_path)
    load_compressed(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    attention = next(iter(config["finegates_compact"]["attention"].values()))
    attention["qk_dim"] -= 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressedCheckpointError, match="query has .* output features, the spec implies"):
        load_compressed(tmp_path)


# -- uniform-width export --------------------------------------------------------------------------
_STOCK_RELOAD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    torch.set_num_threads(1)
    folder, kind, ids = json.loads(sys.argv[1])
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    model = auto.from_pretrained(folder).eval()
    with torch.no_grad():
        print(json.dumps([type(model).__name__, model(input_ids=torch.tensor(ids)).logits.tolist()]))
""")


@pytest.mark.parametrize("pattern", ["random", "kv_group_closed", "irregular_groups", "ffn_closed"])
def test_uniform_export_is_exact_and_a_stock_model(arch, pattern):
    model = patterned(arch, PATTERNS[pattern])
    stock = compress(model, uniform=True)
    assert type(stock) is type(model) and not finegates.is_gated(stock)
    assert_exact(model, stock)
    assert n_params(compress(model)) <= n_params(stock) <= sparsity_report(model).model_params


def test_uniform_export_pads_heads_until_the_stock_config_accepts_them():
    """Five of six heads kept: no stock LlamaConfig has a hidden size of 36 over 5 heads, so a dead head
    pads them back to 6 (exact), where the export used to fail in the config's own check."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=36, num_attention_heads=6, num_key_value_heads=6, intermediate_size=20,
        num_hidden_layers=2, vocab_size=64,
    )  # fmt: skip
    model = get_gated_model(LlamaForCausalLM(config).eval(), GatesConfig()).eval()
    with torch.no_grad():
        for block in find_blocks(model):
            theta(block, "o", "col")[head_dims(block, [2])] = CLOSED
    assert compress(model).config.hidden_size == 36  # per-layer widths: the five heads
    stock = compress(model, uniform=True)
    assert (stock.config.num_attention_heads, stock.config.num_key_value_heads) == (6, 6)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    assert_exact(model, stock, ids, torch.ones_like(ids))


def test_uniform_export_loads_without_finegates(tmp_path):
    def one_head_per_group_closed(model):
        for block in find_blocks(model):
            theta(block, "o", "col")[head_dims(block, [0, 3])] = CLOSED
            theta(block, "up", "row")[:5] = CLOSED

    model = patterned("llama", one_head_per_group_closed)
    stock = compress(model, uniform=True)
    assert (stock.config.num_attention_heads, stock.config.num_key_value_heads) == (2, 2)
    assert stock.config.intermediate_size == 32
    stock.save_pretrained(tmp_path)
    ids = tiny_inputs()
    job = json.dumps([str(tmp_path), "causal", ids.tolist()])
    run = subprocess.run(
        [sys.executable, "-c", _STOCK_RELOAD, job], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    name, logits = json.loads(run.stdout.strip().splitlines()[-1])
    assert name == "LlamaForCausalLM"
    torch.testing.assert_close(torch.tensor(logits), outputs(model, ids, None)[0], atol=ATOL, rtol=0)
