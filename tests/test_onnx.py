"""ONNX export: ONNX Runtime computes what torch computes (every architecture of the fixture, fine and
runtime gate patterns), and a decoder generates with its cache on ONNX Runtime alone."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import test_compress as fine
import test_runtime_structure as runtime
from conftest import is_causal, tiny_inputs
from finegates import compress
from finegates.compress.onnx import export_onnx, generate_greedy, takes_segments

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def ort_logits(folder, ids: torch.Tensor, mask: torch.Tensor, segments=None) -> np.ndarray:
    session = ort.InferenceSession(str(folder / "model.onnx"))
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    for item in session.get_inputs():  # decoders: an empty cache
        if item.name.startswith("past."):
            feed[item.name] = np.zeros((ids.shape[0], item.shape[1], 0, item.shape[3]), np.float32)
    if any(item.name == "token_type_ids" for item in session.get_inputs()):
        feed["token_type_ids"] = (segments if segments is not None else torch.zeros_like(ids)).numpy()
    return session.run(["logits"], feed)[0]


def torch_logits(model, ids, mask, segments=None) -> np.ndarray:
    extra = {} if segments is None else {"token_type_ids": segments}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **extra).logits.numpy()


def test_onnx_runtime_matches_torch_on_every_architecture(arch, tmp_path):
    small = compress(fine.patterned(arch, fine.PATTERNS["random"]))
    assert takes_segments(small) == (arch in ("bert", "roberta"))  # the fixture's type_vocab_size is 2
    folder = export_onnx(small, tmp_path / "onnx")
    for batch, length in ((3, 9), (1, 17)):  # other sizes than traced: the axes are dynamic
        ids = tiny_inputs(seed=batch, batch=batch, length=length)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0 if not is_causal(arch) else 1
        # BERT reads segment ids (text pairs), a graph input; the second segment from position 4 on
        segments = (torch.arange(length) >= 4).long().expand_as(ids) if takes_segments(small) else None
        expected = torch_logits(small, ids, mask, segments)
        np.testing.assert_allclose(ort_logits(folder, ids, mask, segments), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch_name", ["bert", "qwen2"])
def test_runtime_structure_exports(arch_name, tmp_path):
    small = compress(runtime.patterned(arch_name, runtime.random_pattern(1)))
    folder = export_onnx(small, tmp_path / "onnx")
    ids, mask = fine.padded_batch()
    np.testing.assert_allclose(
        ort_logits(folder, ids, mask), torch_logits(small, ids, mask), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
def test_decoder_generates_with_its_cache_on_onnx_runtime_alone(arch_name, tmp_path):
    small = compress(fine.patterned(arch_name, fine.PATTERNS["irregular_groups"]))
    folder = export_onnx(small, tmp_path / "onnx")
    prompt = tiny_inputs(seed=3, batch=2, length=5)
    expected = small.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(generate_greedy(folder, prompt.numpy(), 8), expected.numpy())


def test_export_refuses_a_folder_in_use(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    small = compress(fine.patterned("bert", fine.PATTERNS["random"]))
    with pytest.raises(FileExistsError, match="not empty"):
        export_onnx(small, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_export_command_writes_the_graph_and_the_tokenizer(tmp_path, capsys):
    from finegates.cli import main

    small = compress(fine.patterned("gpt2", fine.PATTERNS["random"]))
    small.save_pretrained(tmp_path / "small")
    (tmp_path / "small" / "tokenizer_config.json").write_text("{}")
    command = ["export", str(tmp_path / "small"), "--format", "onnx", "--output-dir"]
    assert main([*command, str(tmp_path / "x")]) == 0
    assert {"model.onnx", "finegates_onnx.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "x").iterdir()
    }
    prompt = tiny_inputs(seed=5, batch=1, length=4)
    expected = small.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(generate_greedy(tmp_path / "x", prompt.numpy(), 4), expected.numpy())
    missing = ["export", str(tmp_path / "nothing"), "--format", "onnx", "--output-dir", str(tmp_path / "y")]
    assert main(missing) == 2
    assert "holds no config.json" in capsys.readouterr().err
    assert main([*command, str(tmp_path / "x")]) == 2  # an existing export is not overwritten
    assert "not empty" in capsys.readouterr().err
