"""The speed figures of finetune, posttrain and compare time the dense model on the compacted model's GEMM
routes (as `bench` does): the ratio is the pruning's own speedup, not the routes' gain on top of it."""

from __future__ import annotations

import copy
import importlib
import types

import torch
from torch import nn

from conftest import tiny_model
from finegates.config import GatesConfig
from finegates.workflows import evaluation
from test_posttrain import _tiny_config, _tiny_workflow

# the modules (the package exports the workflow functions under the same names)
compare_workflow = importlib.import_module("finegates.workflows.compare")
finetune_workflow = importlib.import_module("finegates.workflows.finetune")
posttrain_workflow = importlib.import_module("finegates.workflows.posttrain")


def _plain_linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def _linears(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def test_posttrain_times_the_dense_model_on_the_compacted_routes(tmp_path, monkeypatch):
    _tiny_workflow(monkeypatch)
    seen = {}
    prefill = posttrain_workflow._prefill_latency

    def capture(models, cfg):
        seen.update(models)
        return prefill(models, cfg)

    monkeypatch.setattr(posttrain_workflow, "_prefill_latency", capture)
    gates = GatesConfig(target_sparsity=0.3, bias="none", modules_to_save=[], warmup_steps=2)
    posttrain_workflow.posttrain(_tiny_config(tmp_path, max_steps=4, distill=False), gates)
    assert _linears(seen["dense"]) > 0 and _plain_linears(seen["dense"]) == []
    assert _plain_linears(seen["compacted"]) == []


def test_finetune_times_the_dense_model_on_the_compacted_routes(monkeypatch):
    seen = {}

    def capture(models, batch, repeats):
        seen.update(models)
        return {}

    monkeypatch.setattr(finetune_workflow, "measure_latency", capture)
    monkeypatch.setattr(finetune_workflow, "load_classifier", lambda *a: (tiny_model("bert"), None))
    cfg = finetune_workflow.FinetuneConfig(model="tiny", max_length=8, bench_batch_size=2, bench_repeats=1)
    data = types.SimpleNamespace(num_labels=2, label_names=None)
    finetune_workflow._benchmark(cfg, data, small=tiny_model("bert"))
    for name in ("dense", "compacted"):
        assert _linears(seen[name]) > 0 and _plain_linears(seen[name]) == [], name


def test_compare_times_both_models_on_the_same_routes_without_changing_the_methods_model(monkeypatch):
    seen = []

    def capture(model, reference, batch, repeats=10):
        seen.append((model, reference))
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
        return 1.0, 1.0, 1.0

    monkeypatch.setattr(evaluation, "paired_speedup", capture)
    method_model = tiny_model("bert").eval()  # a method that removes nothing: full finetuning
    reference = copy.deepcopy(method_model)
    cfg = types.SimpleNamespace(max_length=8)
    row = compare_workflow._latencies(method_model, reference, cfg, method_model.config.vocab_size)
    assert row["speedup_b1"] == row["speedup_b32"] == 1.0 and len(seen) == 2
    for model, ref in seen:
        assert _linears(model) > 0 and _plain_linears(model) == [] and _plain_linears(ref) == []
    assert len(_plain_linears(method_model)) == _linears(method_model)  # timed on a copy
