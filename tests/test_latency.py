"""target_speedup: a budget in predicted time, from per-unit costs measured by `bench --calibrate`."""

from __future__ import annotations

import json

import pytest
import torch

import finegates
from conftest import tiny_model
from finegates import GatesConfig, get_gated_model
from finegates.latency import (
    FEATURES,
    LatencyCosts,
    budget_fraction,
    dense_features,
    exact_features,
    machine,
    model_shape,
    predicted_speedup,
    soft_features,
)
from finegates.report import sparsity_report
from finegates.ties import runtime_gates
from finegates.workflows.bench import BenchConfig, calibrate
from test_runtime_structure import random_pattern, train

pytestmark = pytest.mark.usefixtures("one_thread")


def costs_file(tmp_path, arch: str = "llama", **coefficients) -> str:
    values = {"fixed": 5e-5, "gemm": 1e-8, "heads": 5e-6, "stream": 1e-6} | coefficients
    costs = LatencyCosts(model_shape(tiny_model(arch).config), machine(), 1, 16, 1, values)
    return str(costs.save(tmp_path / "costs.json"))


def timed_model(arch: str, path: str, **options):
    cfg = GatesConfig(structure="runtime", target_speedup=1.6, latency_costs=path, **options)
    return get_gated_model(tiny_model(arch), cfg)


def test_costs_of_another_model_shape_are_refused(tmp_path):
    model = timed_model("llama", costs_file(tmp_path, arch="bert"))
    with pytest.raises(ValueError, match="latency costs of another model shape"):
        predicted_speedup(model)


def test_options_are_checked():
    with pytest.raises(ValueError, match="> 1"):
        GatesConfig(target_speedup=0.9)
    with pytest.raises(ValueError, match="objective='budget'"):
        GatesConfig(target_speedup=1.5, objective="paper")


def test_features_count_what_compaction_keeps(tmp_path):
    model = timed_model("llama", costs_file(tmp_path)).eval()
    assert exact_features(model) == dense_features(model)  # every gate open
    soft = soft_features(model)
    for key in FEATURES:
        assert float(soft[key].detach()) == pytest.approx(dense_features(model)[key], rel=1e-2)
    with torch.no_grad():
        random_pattern(2, p_fractional=0.0)(runtime_gates(model))
    exact, dense = exact_features(model), dense_features(model)
    assert all(exact[k] < dense[k] for k in ("gemm", "stream"))
    plan = finegates.compaction_plan(model)
    assert exact["stream"] == len(plan.residual) * 2  # the kept width in each of the 2 layers
    assert exact["heads"] == sum(len(a.heads) for a in plan.attention.values())


def test_predicted_speedup_follows_the_costs(tmp_path):
    model = timed_model("llama", costs_file(tmp_path, gemm=0.0, stream=0.0, heads=1e-3, fixed=0.0)).eval()
    with torch.no_grad():
        runtime_gates(model).blocks[0]["heads"].theta.data.fill_(-2.0)  # one layer's 4 heads of 8
    assert predicted_speedup(model) == pytest.approx(2.0)
    assert budget_fraction(model) == pytest.approx(0.5)
    report = sparsity_report(model)
    assert report.removed_fraction < 0.5  # parameters are another measure
    # the report states the budget it ran under, not target_sparsity's unused default
    assert report.target is None and report.target_speedup == 1.6
    assert str(report).startswith("target speedup 1.60x (predicted time) | removed")
    assert report.to_dict()["target"] is None


def test_training_holds_the_predicted_speedup(tmp_path):
    model = timed_model("llama", costs_file(tmp_path)).train()
    trace = []
    train(model, 80, lambda step: trace.append(budget_fraction(model)))
    target = 1 - 1 / 1.6
    warmup = model.finegates_config.warmup_steps
    assert all(abs(f - target) <= 0.02 + 1e-9 for f in trace[warmup:])
    assert max(trace) <= target + 0.02 + 1e-9
    finegates.finalize_gates(model)
    assert predicted_speedup(model.eval()) == pytest.approx(1.6, abs=0.05)


def test_a_missing_or_damaged_costs_file_says_to_calibrate(tmp_path):
    model = timed_model("llama", str(tmp_path / "none.json")).eval()
    with pytest.raises(FileNotFoundError, match="bench --calibrate"):
        budget_fraction(model)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "coefficients": {"gemm": 1.0}}))
    with pytest.raises(ValueError, match="calibrate again"):
        LatencyCosts.load(bad)


def test_calibration_fits_non_negative_costs_and_caches_them(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    cfg = BenchConfig(
        model=str(tmp_path / "dense"),
        calibrate=True,
        batch_size=2,
        length=16,
        repeats=2,
        costs_file=str(tmp_path / "costs.json"),
    )
    costs, path = calibrate(cfg)
    assert path == tmp_path / "costs.json"
    again = LatencyCosts.load(path)
    assert again == costs and len(again.points) >= len(FEATURES)
    assert all(c >= 0 for c in again.coefficients.values())
    assert again.points[0]["gemm"] > again.points[-1]["gemm"]  # the last pattern cuts every unit


def test_reports_say_the_budget_is_in_predicted_time():
    from finegates.workflows.results import PosttrainResult
    from finegates.workflows.run_report import budget_section

    budget = {
        "target": 1 / 3,
        "removed_by_training": 0.33,
        "removed_after_finalize": 1 / 3,
        "closed_gates": 9,
        "projected_closed": 4,
        "projected_reopened": 0,
        "predicted_speedup": 1.5,
    }
    text = budget_section(PosttrainResult(dense={}, budget=budget))
    assert "share of predicted time" in text and "predicted speedup 1.50x" in text
    assert "predicted" not in budget_section(
        PosttrainResult(dense={}, budget={**budget, "predicted_speedup": None})
    )
