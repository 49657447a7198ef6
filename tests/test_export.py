"""Deployment: every re-parameterisation is exact; exports match PyTorch in their runtimes."""
import pytest
import timm
import torch

import ctxagg  # noqa: F401
from ctxagg.bench import count_params
from ctxagg.export import export_model, optimize, reparameterize


def _with_bn_statistics(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """Run a few training-mode batches so BatchNorm statistics are not the identity (a fold bug would show)."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("name,kwargs", [
    ("container_light", {}), ("container", {}), ("container_dw3", {}), ("container_mlp_lr", dict(img_size=64)),
    ("linglo_b0", {}),
    ("resnet50_lesa", {}), ("resnet50_aa", {}), ("deit_s_scale_rel", dict(img_size=64)),
])
def test_reparameterized_model_equals_original(name, kwargs):
    model = _with_bn_statistics(timm.create_model(name, num_classes=10, **kwargs), 64)
    deployed = reparameterize(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, out = model(x), deployed(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert count_params(deployed) <= count_params(model)
    if name.startswith(("container", "resnet", "linglo")):
        assert count_params(deployed) < count_params(model)  # something was really folded
    def batch_norms(m):
        return sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    if name.startswith("container"):
        assert batch_norms(deployed) == 1  # only the final BatchNorm before pooling stays
    elif name.startswith("resnet"):
        assert batch_norms(deployed) < batch_norms(model)  # conv→BN pairs folded (attention BNs stay)


def test_container_light_deploy_folds_exactly_what_it_should():
    model = _with_bn_statistics(timm.create_model("container_light"), 64)
    deployed = reparameterize(model)
    blocks = [b for s in deployed.stages for b in s.blocks]
    assert all(b.pos_embed.identity_folded and isinstance(b.norm1, torch.nn.Identity) for b in blocks)
    static = [b.affinity for b in blocks[:-3]]
    assert all(a.bias is None for a in static)
    # 17 blocks × 2 BatchNorms (weight+bias) + 14 static-affinity biases + 3 mixture static biases
    dims = [64] * 3 + [128] * 4 + [320] * 8 + [512] * 3
    assert count_params(model) - count_params(deployed) == sum(4 * d + d for d in dims)


def test_optimized_fp32_matches_and_bf16_agrees_on_top1():
    model = _with_bn_statistics(timm.create_model("container_light", num_classes=100), 64)
    x = torch.randn(64, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        fast = optimize(model)(x)
        bf16 = optimize(model, bf16=True)(x)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    agreement = (bf16.argmax(1) == ref.argmax(1)).float().mean().item()
    assert agreement >= 0.9, agreement  # stated tolerance: ≥ 90% top-1 agreement on this fixed batch
    assert (bf16 - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("name,fmt,dynamic", [
    ("container_light", "onnx", True), ("linglo_b0", "onnx", True), ("container_light", "torchscript", True),
    ("container_light", "exported-program", True), ("container_mlp_lr", "onnx", False),
])
def test_export_round_trips(tmp_path, name, fmt, dynamic):
    kwargs = dict(img_size=64) if name == "container_mlp_lr" else {}
    model = reparameterize(_with_bn_statistics(timm.create_model(name, num_classes=10, **kwargs), 64))
    suffix = {"onnx": "onnx", "torchscript": "ts", "exported-program": "pt2"}[fmt]
    report = export_model(model, str(tmp_path / f"m.{suffix}"), fmt, img_size=(64, 64))
    assert report["dynamic_batch"] and report["dynamic_spatial"] is dynamic
    assert len(report["max_abs_error"]) == (3 if dynamic else 2)  # batch 1 and 3 (+ another H×W if dynamic)
    assert max(report["max_abs_error"]) < 1e-4
    assert (tmp_path / f"m.{suffix}").stat().st_size > 100_000


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", [("resnet50_lesa", {}), ("swin_t", {}), ("deit_s", dict(dynamic_img_size=True))])
def test_export_other_families_to_onnx(tmp_path, name, kwargs):
    model = reparameterize(timm.create_model(name, num_classes=10, **kwargs))
    report = export_model(model, str(tmp_path / "m.onnx"), "onnx")
    assert max(report["max_abs_error"]) < 1e-4


def test_export_refuses_bad_requests(tmp_path):
    model = timm.create_model("container_light", num_classes=2)
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(model, str(tmp_path / "m.tflite"), "tflite")
    with pytest.raises(ValueError, match=r"saved as \.pt2 archives"):
        export_model(model, str(tmp_path / "m.ep"), "exported-program")


def test_cli_export_writes_a_verified_onnx(tmp_path, capsys):
    from ctxagg.cli import main

    out = tmp_path / "cl.onnx"
    assert main(["export", "--model", "container_light", "--output", str(out), "--img-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "dynamic H, W: True" in printed
    deployed = reparameterize(timm.create_model("container_light"))
    weights = (tmp_path / "cl.onnx.data").stat().st_size  # the exporter keeps large weights beside the graph
    assert weights == pytest.approx(4 * count_params(deployed), rel=0.01)
    assert main(["export", "--model", "container_lite", "--output", str(tmp_path / "other.onnx")]) == 2
    assert "Did you mean: container_light" in capsys.readouterr().err


def test_compare_eager_reports_ratios_and_peak_fractions():
    from ctxagg.bench.deploy_compare import compare_eager

    result = compare_eager(["container_dw3"], batch_size=2, img_size=64, warmup=0, repeats=1, compile=False)
    row = result["rows"][0]
    assert result["peak_gmacs"]["fp32"] > 0 and result["peak_gmacs"]["bf16"] > 0
    for key in ("eager_fp32", "opt_fp32", "opt_bf16"):
        assert row[f"{key}_img_s"] > 0 and 0 < row[f"{key}_peak_frac"]
    assert row["opt_fp32_speedup"] == pytest.approx(row["opt_fp32_img_s"] / row["eager_fp32_img_s"])
