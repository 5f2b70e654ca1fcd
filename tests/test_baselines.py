"""The compared methods: the right tensors train, masks hold, formats round-trip, merges are exact."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import VOCAB, tiny_model
from finegates import GatesConfig, finalize_gates, get_gated_model, sparsity_report
from finegates.baselines import (
    KINDS_OF_SPARSITY,
    METHODS,
    Method,
    bitmap,
    make_method,
    squarehead_loss,
    train_method,
)
from finegates.baselines.finegates_kd import FineGatesMethodConfig
from finegates.baselines.loop import fit_method
from finegates.baselines.magnitude import MagnitudeConfig
from finegates.baselines.maskllm import MaskLLMLinear, semi_structured
from finegates.baselines.salr import SALRConfig, SALRLinear, salr_storage_bytes, svd_factors
from finegates.baselines.sparse_inference import measure_cpu_inference, to_csr
from finegates.baselines.squarehead import SquareHeadConfig
from finegates.layer import GatedLinear
from finegates.model import gated_layers


def batches(arch: str, n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (3, 8), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # padding the losses must ignore
        labels = ids.masked_fill(mask == 0, -100) if arch == "llama" else torch.tensor([0, 1, 2])
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def run_steps(method: Method, model: torch.nn.Module, data: list[dict], teacher=None, lr: float = 1e-2):
    """`compare`'s training loop (fit_method) at a constant lr, without finalization, so the trained model
    can be inspected."""
    fit_method(method, model, data, teacher=teacher, lr=lr, scheduler="constant")
    return model.eval()


HEAD = ("classifier", "pooler")
TRAINABLE = {  # method -> predicate on the names of the parameters that must train (and only those)
    "full": lambda n: True,
    "squarehead": lambda n: True,
    "lora": lambda n: "lora_" in n or "modules_to_save" in n,
    "magnitude+lora": lambda n: "lora_" in n or any(h in n for h in HEAD) or n.endswith("bias"),
    "magnitude": lambda n: any(h in n for h in HEAD) or n.endswith("bias"),
    "importance+lora": lambda n: "lora_" in n or any(h in n for h in HEAD) or n.endswith("bias"),
    "importance": lambda n: any(h in n for h in HEAD) or n.endswith("bias"),
    "salr": lambda n: any(k in n for k in ("svd_", "lora_", *HEAD)),
    "maskllm": lambda n: n.endswith("logits") or any(h in n for h in HEAD),
    "finegates": lambda n: any(k in n for k in ("theta", "controller", *HEAD)) or n.endswith("bias"),
    "finegates+kd": lambda n: any(k in n for k in ("theta", "controller", *HEAD)) or n.endswith("bias"),
}


def test_registry_covers_the_issue_and_the_interface():
    assert set(METHODS) == set(TRAINABLE)
    for name in METHODS:
        method = make_method(name)
        assert isinstance(method, Method) and method.kind_of_sparsity in KINDS_OF_SPARSITY
    with pytest.raises(ValueError, match="Unknown method"):
        make_method("nope")


@pytest.mark.parametrize("name", sorted(TRAINABLE))
def test_the_right_parameters_train(name):
    model = tiny_model("bert")
    teacher = copy.deepcopy(model)
    method = make_method(name)
    model = method.prepare(model, None, batches("bert"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(TRAINABLE[name](n) for n in names), sorted(
        n for n in names if not TRAINABLE[name](n)
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_steps(method, model, batches("bert"), teacher)
    for n, p in model.named_parameters():
        if n not in names:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in names)
    assert method.trainable_parameters(model) == sum(
        p.numel() for n, p in model.named_parameters() if n in names and "controller" not in n
    )


@pytest.mark.parametrize("name", sorted(TRAINABLE))
def test_train_method_end_to_end(name):
    model = tiny_model("bert")
    teacher = copy.deepcopy(model)
    data = batches("bert")
    evaluate = lambda m: {"loss": float(m(**data[0]).loss.detach())}
    result = train_method(name, model, data, evaluate, teacher=teacher)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.metrics["loss"]))
    # (net of what a method adds: SALR's adapters outweigh its pruning on a model this small)
    assert (result.removed_parameters != 0) == (result.kind_of_sparsity != "none")


@pytest.mark.parametrize("pruning", ["oneshot", "gradual"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_squarehead_masks_stay_exact_after_steps(arch, pruning):
    model = tiny_model(arch)
    teacher = copy.deepcopy(model)
    method = make_method("squarehead")
    cfg = SquareHeadConfig(target_sparsity=0.6, pruning=pruning, prune_every=1)
    model = run_steps(method, method.prepare(model, cfg), batches(arch, 3), teacher)
    for name, mask in method.masks.items():
        weight = model.get_submodule(name).weight
        assert int((weight == 0).sum()) == round(0.6 * weight.numel()) == int((~mask).sum())
    assert method.removed_parameters(model) == sum(round(0.6 * m.numel()) for m in method.masks.values())


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_squarehead_loss_is_zero_for_identical_models(arch):
    model = tiny_model(arch)
    batch = batches(arch)[0]
    out = model(**batch, output_hidden_states=True)
    same = model(**batch, output_hidden_states=True)
    assert squarehead_loss(out, same, batch["attention_mask"]) == 0
    other = tiny_model(arch, seed=1)(**batch, output_hidden_states=True)
    assert squarehead_loss(out, other, batch["attention_mask"]) > 0


def test_csr_inference_matches_dense_and_is_timed():
    model = tiny_model("bert")
    method = make_method("squarehead")
    model = method.prepare(model, SquareHeadConfig(target_sparsity=0.75))
    ids = batches("bert")[0]["input_ids"]
    torch.testing.assert_close(
        to_csr(model, list(method.masks))(input_ids=ids).logits, model(input_ids=ids).logits
    )
    import time

    model.register_forward_pre_hook(lambda module, args: time.sleep(0.005))  # a forward of at least 5 ms
    timing = measure_cpu_inference(model, list(method.masks), {"input_ids": ids}, min_run_time=0.05)
    assert (
        5 <= timing.dense_ms < 100 and 5 <= timing.sparse_ms < 100
    )  # milliseconds of one forward, both models
    assert timing.sparsity == pytest.approx(0.75, abs=1e-3)


@pytest.mark.parametrize("shape", [(5, 7), (32, 37), (1, 1)])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_bitmap_round_trip_is_exact(shape, density):
    weight = torch.randn(shape)
    mask = torch.rand(shape) < density
    packed, values = bitmap.encode(weight, mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-weight.numel() // 8)
    assert torch.equal(bitmap.unpack_bits(packed, weight.numel()).view(shape), mask)
    assert torch.equal(bitmap.decode(packed, values, shape), weight * mask)


def _salr_layer(rank: int = 4) -> tuple[torch.nn.Linear, SALRLinear]:
    torch.manual_seed(0)
    base = torch.nn.Linear(37, 32)
    layer = SALRLinear(base, SALRConfig(svd_rank=rank, lora_r=3))
    with torch.no_grad():
        layer.lora_b.normal_()  # B = 0 at init would make the LoRA half of the check vacuous
    return base, layer


@pytest.mark.parametrize("rows", [5, 200])  # 200: inference takes the compacted models' GEMM route
def test_salr_fused_gemm_equals_unfused(rows):
    _, layer = _salr_layer()
    x = torch.randn(2, rows, 37)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.unfused_forward(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), layer.unfused_forward(x), atol=1e-5, rtol=1e-5)


def test_salr_svd_init_reduces_residual_error():
    base, layer = _salr_layer(rank=8)
    sparse = layer.base_weight()
    assert int((sparse == 0).sum()) == round(0.5 * sparse.numel())
    residual = base.weight - sparse
    b, a = svd_factors(residual, 8)
    # Eckart-Young: the best rank-8 approximation leaves exactly the singular values beyond the 8th
    u, sigma, vh = torch.linalg.svd(residual, full_matrices=False)
    torch.testing.assert_close(torch.linalg.norm(residual - b @ a), sigma[8:].pow(2).sum().sqrt())
    torch.testing.assert_close(
        layer.svd_b @ layer.svd_a, u[:, :8] @ torch.diag(sigma[:8]) @ vh[:8], atol=1e-5, rtol=1e-4
    )


def test_salr_sparsity_exact_after_steps_and_storage_smaller():
    model = tiny_model("llama")
    dense_bytes = salr_storage_bytes(model)
    method = make_method("salr")
    model = method.prepare(model, SALRConfig(svd_rank=2, lora_r=2))
    stored = {n: m.values.clone() for n, m in model.named_modules() if isinstance(m, SALRLinear)}
    run_steps(method, model, batches("llama"))
    for n, m in model.named_modules():
        if isinstance(m, SALRLinear):
            assert torch.equal(m.values, stored[n])
            assert int((m.base_weight() == 0).sum()) == round(0.5 * m.in_features * m.out_features)
    assert salr_storage_bytes(model) < dense_bytes
    # the count is net: the adapters stay in the deployed model beside the pruned base
    layers = [m for m in model.modules() if isinstance(m, SALRLinear)]
    pruned = sum(round(0.5 * m.in_features * m.out_features) for m in layers)
    adapters = sum((m.in_features + m.out_features) * (2 + 2) for m in layers)
    assert method.removed_parameters(model) == pruned - adapters


def _assert_two_of_four(weight: torch.Tensor) -> None:
    kept = (weight != 0).reshape(-1, 4).sum(1)
    assert torch.equal(kept, torch.full_like(kept, 2))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_maskllm_masks_are_valid_two_of_four(arch):
    model = tiny_model(arch)
    method = make_method("maskllm")
    model = run_steps(method, method.prepare(model), batches(arch, 3))
    layers = [m for m in model.modules() if isinstance(m, MaskLLMLinear)]
    assert layers and all(m.base_layer.in_features % 4 == 0 for m in layers)  # 37-wide inputs are skipped
    for layer in layers:
        _assert_two_of_four(layer.mask())
        assert layer.temperature == pytest.approx(0.05) and layer.scale == pytest.approx(500.0)
    removed = method.removed_parameters(model)
    model = method.finalize(model)
    for name in method.names:
        _assert_two_of_four(model.get_submodule(name).weight)
    assert method.removed_parameters(model) == removed > 0


def test_a_learning_rate_sweep_scales_maskllms_mask_logits_too():
    method = make_method("maskllm")
    model = method.prepare(tiny_model("llama"))
    logits_lr = [method.param_groups(model, lr)[0]["lr"] for lr in (method.default_lr, 3 * method.default_lr)]
    assert logits_lr == pytest.approx([method.config.mask_lr, 3 * method.config.mask_lr])


def _two_of_four_linear(rows: int, cols: int, **kwargs) -> torch.nn.Linear:
    layer = torch.nn.Linear(cols, rows, bias=False, **kwargs)
    with torch.no_grad():
        keep = torch.zeros(rows * cols // 4, 4, dtype=torch.bool, device=layer.weight.device)
        keep[:, :2] = True  # the first two of every group of four
        layer.weight.mul_(keep.reshape(rows, cols))
    return layer


def test_maskllm_keeps_its_two_of_four_weights_dense_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = torch.nn.Sequential(_two_of_four_linear(8, 8))
    before = model[0].weight.detach().clone()
    assert semi_structured(model, ["0"]) == 0
    assert type(model[0].weight.data) is torch.Tensor and torch.equal(model[0].weight, before)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the 2:4 kernel (torch.sparse.to_sparse_semi_structured) needs CUDA"
)
def test_maskllm_two_of_four_layers_run_on_the_cuda_kernel():
    from torch.sparse import SparseSemiStructuredTensor

    model = torch.nn.Sequential(_two_of_four_linear(128, 128, device="cuda", dtype=torch.float16))
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = model(x)
        assert semi_structured(model, ["0"]) == 1
        assert isinstance(model[0].weight, SparseSemiStructuredTensor)
        torch.testing.assert_close(model(x), expected, atol=1e-2, rtol=1e-2)


def test_lora_merge_equals_unmerged_outputs():
    model = tiny_model("bert")
    method = make_method("lora")
    model = method.prepare(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ids = batches("bert")[0]["input_ids"]
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged_model = method.finalize(model)
        assert not any("lora" in n for n, _ in merged_model.named_parameters())
        torch.testing.assert_close(merged_model(input_ids=ids).logits, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("score", ["weight", "activation"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("target", [0.2, 0.4])
def test_magnitude_pruning_hits_its_target(arch, score, target):
    model = tiny_model(arch)
    method = make_method("magnitude")
    model = method.prepare(model, MagnitudeConfig(target_sparsity=target, score=score), batches(arch))
    report = sparsity_report(model)
    assert target <= report.removed_fraction <= target + 0.01
    for layer in gated_layers(model).values():
        for gate in layer.gates().values():
            assert set(gate.deterministic().unique().tolist()) <= {0.0, 1.0}
    model.train()  # frozen gates do not sample: training-mode values are the 0/1 eval values
    for layer in gated_layers(model).values():
        for gate in layer.gates().values():
            assert torch.equal(gate.value(), gate.deterministic()) and not gate.theta.requires_grad


def test_magnitude_with_lora_recovery_keeps_the_budget():
    model = tiny_model("llama")
    method = make_method("magnitude+lora")
    model = method.prepare(model, MagnitudeConfig(target_sparsity=0.3, recovery=True, compact=False))
    run_steps(method, model, batches("llama"))
    removed = method.removed_parameters(model)
    merged = method.finalize(model)
    assert isinstance(next(iter(gated_layers(merged).values())), GatedLinear)
    assert 0.3 <= sparsity_report(merged).removed_fraction <= 0.31
    assert method.removed_parameters(merged) == removed


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_finegates_compaction_removes_what_the_report_counts(arch):
    model = tiny_model(arch)
    teacher = copy.deepcopy(model)
    method = make_method("finegates+kd")
    model = run_steps(
        method,
        method.prepare(model, FineGatesMethodConfig(gates={"target_sparsity": 0.3})),
        batches(arch),
        teacher,
    )
    finalize_gates(model)
    counted = method.removed_parameters(model)
    batch = batches(arch)[0]
    with torch.no_grad():
        gated = model(**batch).logits
        small = method.finalize(model)
        torch.testing.assert_close(small(**batch).logits, gated, atol=1e-5, rtol=1e-5)
    assert not gated_layers(small) and method.removed_parameters(small) == counted > 0


def test_configs_round_trip_and_reject_unknown_keys():
    cfg = SquareHeadConfig(target_sparsity=0.7, pruning="gradual")
    assert SquareHeadConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"SquareHeadConfig: unknown keys \['sparsty'\]"):
        SquareHeadConfig.from_dict({"sparsty": 0.5})


def test_mean_activation_scores_are_the_mean_absolute_inputs_and_outputs():
    from conftest import tiny_inputs
    from finegates.baselines.magnitude import mean_activations

    model = get_gated_model(tiny_model("llama"), GatesConfig()).eval()
    ids = tiny_inputs()
    seen = {}
    layer = model.model.layers[0].mlp.down_proj
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    means = mean_activations(model, [{"input_ids": ids, "labels": ids}])
    handle.remove()
    rows, cols = means["model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(cols, seen["x"].abs().reshape(-1, 37).mean(0))
    torch.testing.assert_close(rows, seen["y"].abs().reshape(-1, 32).mean(0))


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_calibration_leaves_padding_out(name):
    """The same real tokens, alone or right-padded beside a longer row: the same scores."""
    from finegates.baselines.magnitude import input_norms, mean_activations

    model = get_gated_model(tiny_model(name), GatesConfig()).eval()
    short, long = torch.arange(5, 11).unsqueeze(0), torch.arange(20, 32).unsqueeze(0)
    alone = [{"input_ids": short, "attention_mask": torch.ones_like(short)}, {"input_ids": long}]
    padded_ids = torch.cat([torch.cat([short, torch.zeros(1, 6, dtype=torch.long)], 1), long])
    mask = torch.ones_like(padded_ids)
    mask[0, 6:] = 0
    padded = [{"input_ids": padded_ids, "attention_mask": mask}]
    for score in (mean_activations, input_norms):
        expected, got = score(model, alone), score(model, padded)
        for layer in expected:
            torch.testing.assert_close(got[layer], expected[layer], atol=1e-4, rtol=1e-4, msg=layer)


def test_the_importance_baseline_closes_the_least_active_channels():
    from conftest import tiny_inputs

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[:5] = 0.0  # five FFN channels that never fire
    method = make_method("importance")
    ids = tiny_inputs()
    model = method.prepare(
        model, method.config_class(target_sparsity=0.05), [{"input_ids": ids, "labels": ids}]
    )
    ffn = {b.name: b.ffn_channels for b in method.report.blocks}
    assert ffn["model.layers.1"] <= 37 - 5
    closed = (
        model.model.layers[1].mlp.down_proj.col_gate.closed()
        | model.model.layers[1].mlp.up_proj.row_gate.closed()
    )
    assert closed[:5].all()
