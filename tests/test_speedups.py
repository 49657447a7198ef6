"""Speed switches (issue [perf]): int8 post-training quantization (PT2E), `ctxagg train --compile` /
--channels-last with exact resume, compiled-checkpoint loading, and the training / deploy benchmarks' bookkeeping.

Speed itself is measured by `ctxagg bench deploy|train`, never here. Tests that compile with inductor take minutes
on a 2-core CPU and are marked slow; their fast counterparts compile with the ``aot_eager`` backend (dynamo + AOT
autograd, no code generation), which exercises the same capture, RNG and checkpoint paths."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import ctxagg  # noqa: F401
from timm.layers import ConvMlp
from ctxagg.errors import ConfigError
from ctxagg.train import TrainConfig, train
from ctxagg.train.checkpoint import eager_keys, load_model_weights

pytest.importorskip("torchao")
from ctxagg.export import optimize, quantize_int8, top1_agreement  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY_CONTAINER, _tiny  # noqa: E402

Q = torch.ops.quantized_decomposed


# --- checkpoints of compiled models ----------------------------------------------------------------------------

def test_compiled_wrapper_weights_load_into_the_eager_model(tmp_path):
    assert eager_keys({"model._orig_mod.head.fc.weight": 1, "stem.proj.bias": 2}) == {
        "model.head.fc.weight": 1, "stem.proj.bias": 2}
    torch.manual_seed(0)
    source = timm.create_model("container_light", num_classes=10, **TINY_CONTAINER)
    compiled = torch.compile(source)  # the wrapper's keys carry _orig_mod.; nothing is compiled until called
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    torch.save(compiled.state_dict(), tmp_path / "compiled.pt")
    target = timm.create_model("container_light", num_classes=10, **TINY_CONTAINER)
    load_model_weights(target, tmp_path / "compiled.pt")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0, msg=key)


# --- int8 -------------------------------------------------------------------------------------------------------

def _linear_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()


def _graph_input_qparams(graph_module: nn.Module) -> tuple[float, int]:
    """(scale, zero point) of the one activation quantize node of a converted graph."""
    nodes = [n for n in graph_module.graph.nodes if n.target in (Q.quantize_per_tensor.default,)]
    assert len(nodes) == 1, [n.target for n in nodes]
    _, scale, zero_point, qmin, qmax, dtype = nodes[0].args
    assert (qmin, qmax, dtype) == (0, 255, torch.uint8)
    return float(scale), int(zero_point)


def test_static_int8_linear_is_the_hand_computed_int8_arithmetic():
    """Known answer: u8 per-tensor activations (scale/zero point from calibration) times s8 weights quantized
    symmetrically per output channel (scale = max|W_c| / 127.5), computed here in float64 from the equations."""
    net = _linear_net()
    calibration = [torch.randn(16, 3, 2, 2) * 2 for _ in range(3)]
    quantized = quantize_int8(net, calibration, channels_last=False)
    scale, zero_point = _graph_input_qparams(quantized)
    assert scale == pytest.approx(float(torch.cat([c.flatten() for c in calibration]).aminmax()[1]
                                         - torch.cat([c.flatten() for c in calibration]).aminmax()[0]) / 255, rel=0.35)
    x = torch.randn(7, 3, 2, 2)
    w, b = net[1].weight.detach(), net[1].bias.double()
    # rounding as PyTorch's quantize ops do it: input * (1 / scale) in float32 (float64 flips ties of a few weights)
    w_scale = w.abs().amax(1) / 127.5
    w_q = torch.clamp(torch.round(w * (1.0 / w_scale[:, None])), -128, 127).double()
    x_q = torch.clamp(torch.round(x.flatten(1) * (1.0 / scale)) + zero_point, 0, 255).double()
    expected = ((x_q - zero_point) * scale) @ (w_q * w_scale.double()[:, None]).T + b
    w = w.double()
    torch.testing.assert_close(quantized(x).double(), expected, rtol=1e-5, atol=1e-5)
    # and it is not the fp32 answer: the test would pass vacuously if nothing were quantized
    assert (quantized(x).double() - (x.flatten(1).double() @ w.T + b)).abs().max() > 1e-3


def _digits_batch(n: int = 64, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    from ctxagg.train.data import load_digits_arrays

    arrays = load_digits_arrays()
    images = torch.tensor(arrays.images[:n]).permute(0, 3, 1, 2).float() / 255
    images = nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return (images - 0.3) / 0.35, torch.tensor(arrays.labels[:n])


def _trained_tiny(steps: int = 60) -> nn.Module:
    """A tiny Container-Light trained on the digits until its logits have margins (top-1 is then meaningful)."""
    from ctxagg.train.config import input_size_overrides

    torch.manual_seed(0)
    model = timm.create_model("container_light", num_classes=10,
                              **{**input_size_overrides("container_light", 16), **TINY_CONTAINER})
    images, labels = _digits_batch(256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        index = torch.arange(64) + 64 * (step % 4)
        loss = nn.functional.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained_tiny() -> nn.Module:
    return _trained_tiny()


def test_static_int8_agrees_with_fp32_on_a_fixed_batch(trained_tiny):
    images, labels = _digits_batch(256)
    calibration, held_out = images[:128].split(32), images[128:]
    quantized = quantize_int8(trained_tiny, calibration, observer="minmax")  # the histogram's search takes minutes
    with torch.no_grad():
        accuracy = (trained_tiny(held_out).argmax(1) == labels[128:]).float().mean()
    assert accuracy > 0.6  # the model has learned something, so agreement is not agreement on noise
    report = top1_agreement(trained_tiny, quantized, [held_out])
    assert report["images"] == 128
    assert report["agreement"] >= 0.97
    assert 0 < report["max_rel_logit_error"] < 0.15
    # the graph holds int8 weights only (convert_pt2e's leftover fp32 copies are dropped): well under fp32's bytes
    def size(module):
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())
    assert size(quantized) < 0.6 * size(trained_tiny)
    # calibrating on images 50× too small clips every real activation: the scales come from the data given
    badly = quantize_int8(trained_tiny, [c * 0.02 for c in calibration], observer="minmax")
    worse = top1_agreement(trained_tiny, badly, [held_out])
    assert worse["max_rel_logit_error"] > 2 * report["max_rel_logit_error"]


def test_static_int8_quantizes_every_conv_including_the_depthwise_ones():
    """Every conv's activation and weight arrive through dequantize nodes, the depth-wise ones too (torchao's own
    search for convs outside fusion patterns keys on metadata non-strict export does not record, which left all
    36 depth-wise convs of Container-Light in fp32)."""
    from ctxagg.export import reparameterize

    torch.manual_seed(0)
    model = reparameterize(timm.create_model("container_light", num_classes=10, img_size=32, **TINY_CONTAINER))
    quantized = quantize_int8(model, [torch.randn(2, 3, 32, 32)], observer="minmax")
    convs = [n for n in quantized.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    linears = [n for n in quantized.graph.nodes if n.target == torch.ops.aten.linear.default]
    depthwise = [n for n in convs if len(n.args) > 6 and n.args[6] > 1]
    mlp_convs = 2 * sum(isinstance(m, ConvMlp) for m in model.modules())  # quantized as linears (LinearMlp)
    assert mlp_convs == 8
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) - mlp_convs + 4  # + dw5 affinities
    assert len(linears) == mlp_convs + 1  # + the classifier
    assert len(depthwise) == 8  # per block: the folded positional conv and the dw5 affinity
    dequantize = (Q.dequantize_per_tensor.default, Q.dequantize_per_channel.default)
    for node in convs + linears:
        assert node.args[0].target in dequantize and node.args[1].target in dequantize, node.name


def test_batch_norms_left_in_the_graph_become_the_same_affine_map():
    """The exported graph's eval-mode BatchNorms (with and without γ/β) are replaced by x·a + b that computes
    exactly what nn.BatchNorm2d computes (the module itself is the reference), and no BN node is left."""
    from ctxagg.export.quantize import _batch_norms_as_affine, _exported

    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(3, eps=1e-2), nn.ReLU(), nn.BatchNorm2d(3, affine=False, eps=1e-3))
    for bn in (net[0], net[2]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    nn.init.uniform_(net[0].weight, 0.5, 2)
    nn.init.uniform_(net[0].bias, -1, 1)
    net = net.double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    graph = _batch_norms_as_affine(_exported(net, x))
    assert not [n for n in graph.graph.nodes if "batch_norm" in str(n.target)]
    torch.testing.assert_close(graph(x), net(x), rtol=1e-12, atol=1e-12)


def test_linear_mlp_is_the_conv_mlp():
    """The int8 path's LinearMlp computes timm's ConvMlp exactly (float64), in either memory format, and keeps
    the NCHW shape and the channels_last layout."""
    from ctxagg.export.quantize import LinearMlp, conv_mlps_as_linears

    torch.manual_seed(0)
    mlp = ConvMlp(6, 10, act_layer=nn.GELU).double().eval()
    x = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    linear = LinearMlp(mlp)
    for fmt in (torch.contiguous_format, torch.channels_last):
        out = linear(x.contiguous(memory_format=fmt))
        torch.testing.assert_close(out, mlp(x), rtol=1e-12, atol=1e-12)
    assert linear(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    # by hand: W2 · GELU(W1 · x + b1) + b2 at one pixel
    pixel = x[1, :, 4, 2]
    hidden = nn.functional.gelu(mlp.fc1.weight[:, :, 0, 0] @ pixel + mlp.fc1.bias)
    torch.testing.assert_close(linear(x)[1, :, 4, 2], mlp.fc2.weight[:, :, 0, 0] @ hidden + mlp.fc2.bias)
    net = nn.Sequential(nn.Conv2d(3, 6, 1), ConvMlp(6, 10, norm_layer=nn.BatchNorm2d), ConvMlp(6, 4))
    conv_mlps_as_linears(net)
    assert [type(m).__name__ for m in net] == ["Conv2d", "ConvMlp", "LinearMlp"]  # a hidden norm stays a conv


def test_dynamic_int8_quantizes_only_linears_and_needs_one_batch():
    torch.manual_seed(0)
    model = timm.create_model("deit_s", num_classes=10, img_size=32, patch_size=8, depth=2).eval()
    quantized = quantize_int8(model, [torch.randn(2, 3, 32, 32)], mode="dynamic")
    assert quantized.calibration_batches == 1
    targets = {n.target for n in quantized.graph.nodes}
    assert Q.choose_qparams.tensor in targets  # activation ranges measured per batch at run time
    assert Q.quantize_per_tensor.tensor in targets and Q.quantize_per_tensor.default not in targets
    weights = [n for n in quantized.graph.nodes if n.target == Q.dequantize_per_channel.default]
    assert len(weights) == sum(isinstance(m, nn.Linear) for m in model.modules())  # every linear, no conv
    x = torch.randn(4, 3, 32, 32)
    assert top1_agreement(model, quantized, [x])["max_rel_logit_error"] < 0.1


def test_int8_refuses_what_it_cannot_do():
    net = _linear_net()
    with pytest.raises(ConfigError, match="unknown int8 mode 'int4'"):
        quantize_int8(net, [torch.randn(2, 3, 2, 2)], mode="int4")
    with pytest.raises(ConfigError, match="at least one batch"):
        quantize_int8(net, [])
    with pytest.raises(ConfigError, match="calibration batches"):
        optimize(net, int8="static")
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="runs on the CPU"):
            optimize(net, int8="static", calibration=[torch.randn(2, 3, 2, 2)], device="cuda")


@pytest.mark.slow
def test_compiled_int8_keeps_top1_of_a_trained_model(trained_tiny):
    """The int8 kernels inductor substitutes (oneDNN, requantisation in int32) agree as the q/dq graph does."""
    images, _ = _digits_batch(256)
    deployed = optimize(trained_tiny, int8="static", calibration=images[:128].split(32), int8_observer="minmax")
    report = top1_agreement(trained_tiny, deployed, [images[128:]])
    assert report["agreement"] >= 0.97 and report["max_rel_logit_error"] < 0.15


def test_cli_int8_export_refuses_bad_requests(tmp_path, capsys):
    from ctxagg.cli import main

    out = str(tmp_path / "q.pt2")
    assert main(["export", "--model", "container_light", "--int8", "--output", out]) == 2
    assert "--int8 needs --calib DATA" in capsys.readouterr().err
    assert main(["export", "--model", "container_light", "--int8", "--calib", "digits", "--format", "onnx",
                 "--output", out]) == 2
    assert "cannot hold it" in capsys.readouterr().err
    assert main(["export", "--model", "container_light", "--int8", "--calib", "digits",
                 "--output", str(tmp_path / "q.onnx")]) == 2
    assert "(.pt2)" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_int8_export_of_a_trained_checkpoint(tmp_path, capsys):
    from ctxagg.cli import main
    from ctxagg.export.int8 import load_int8_program

    run = train(_tiny(tmp_path, "run", recipe="light", epochs=2, fraction=1.0, ema_decay=0.0), progress=False)
    out = tmp_path / "q.pt2"
    assert main(["export", "--checkpoint", str(run.output), "--int8", "--calib", "digits", "--calib-images", "128",
                 "--val-images", "200", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "on 200 validation images" in printed and "top-1 agreement" in printed
    program = load_int8_program(str(out))
    assert any(n.target == Q.quantize_per_tensor.default for n in program.graph.nodes)


# --- compiled training ------------------------------------------------------------------------------------------

def _deterministic(tmp_path: Path, name: str, **kw) -> TrainConfig:
    base = dict(recipe="light", epochs=2, fraction=0.25, ema_decay=0.0, augment=False, drop_path=0.0)
    base.update(kw)
    return _tiny(tmp_path, name, **base)


@pytest.fixture(params=["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def compile_backend(request, monkeypatch):
    from ctxagg.train import engine

    if request.param != "inductor":
        monkeypatch.setattr(engine, "COMPILE_OPTIONS", dict(backend=request.param))
    return request.param


def test_compiled_training_gives_the_eager_losses(tmp_path, compile_backend):
    eager = train(_deterministic(tmp_path, "eager"), progress=False)
    compiled = train(_deterministic(tmp_path, "compiled", compile=True, channels_last=True), progress=False)
    for key in ("train_loss", "val_loss"):
        assert [h[key] for h in compiled.history] == pytest.approx([h[key] for h in eager.history], rel=1e-4), key
    # the checkpoint of a compiled run has the eager model's keys and loads into it
    from ctxagg.train.model import build_model

    fresh = build_model(_deterministic(tmp_path, "eager").resolved(), 10)
    load_model_weights(fresh, tmp_path / "compiled" / "model.safetensors")


def test_resume_with_compile_is_loss_for_loss(tmp_path, compile_backend):
    # drop path on: compiled graphs draw their masks from the restored generator too
    full = train(_deterministic(tmp_path, "full", compile=True, drop_path=0.1), progress=False)
    steps = full.history[0]["steps"]
    train(_deterministic(tmp_path, "part", compile=True, drop_path=0.1, max_steps=steps), progress=False)
    resumed = train(_deterministic(tmp_path, "part", drop_path=0.1), resume=str(tmp_path / "part"), progress=False)
    for key in ("train_loss", "val_loss", "lr"):
        assert [h[key] for h in resumed.history] == [h[key] for h in full.history], key


# --- benchmarks' bookkeeping ------------------------------------------------------------------------------------

def test_training_bench_rows_and_its_memory_count_agree_with_the_tensor_count():
    from ctxagg.bench.throughput import peak_tensor_bytes
    from ctxagg.bench.train_speed import TRAIN_VARIANTS, measure_training, step_peak_bytes, training_step

    rows = measure_training("container_light", 4, 32, ("eager", "eager_bf16"), warmup=1, repeats=2, num_classes=10,
                            model_kwargs=TINY_CONTAINER)
    assert [r["variant"] for r in rows] == ["eager", "eager_bf16"]
    assert rows[0]["speedup"] == 1.0
    assert rows[1]["speedup"] == pytest.approx(rows[1]["throughput"] / rows[0]["throughput"])
    assert all(len(r["times_ms"]) == 2 and r["peak_mb"] > 0 and r["first_step_s"] > 0 for r in rows)
    # the allocator's view (what compiled graphs need) equals the per-op tensor count on an eager step
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    step = training_step(model, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), TRAIN_VARIANTS["eager"])
    step()
    assert step_peak_bytes(step, torch.device("cpu")) == pytest.approx(peak_tensor_bytes(step), rel=0.02)
    with pytest.raises(ConfigError, match="unknown training variants"):
        measure_training("container_light", variants=("fast",))


def test_training_bench_breakdown_ceiling_and_fraction_of_peak():
    from ctxagg.bench.complexity import count_gmacs
    from ctxagg.bench.throughput import build_bench_model
    from ctxagg.bench.train_speed import format_training, measure_training

    peaks = dict(fp32=2.0, bf16=8.0)
    rows = measure_training("resnet18", 2, 32, ("eager", "eager_bf16"), warmup=1, repeats=1, num_classes=10,
                            memory=False, peaks=peaks)
    gmacs = count_gmacs(build_bench_model("resnet18", 32, num_classes=10), (3, 32, 32))
    for row, peak in zip(rows, (2.0, 8.0)):
        assert row["train_gmacs_per_img"] == pytest.approx(3 * gmacs)
        assert row["peak_frac"] == pytest.approx(3 * gmacs * row["throughput"] / peak)
        assert 0 < row["kernel_ms"] < row["step_ms"]  # resnet18's convs and the rest (optimiser, BN, ReLU)
        assert row["kernel_ms"] + row["other_ms"] == pytest.approx(row["step_ms"])
        assert row["ceiling"] == pytest.approx(rows[0]["step_ms"] / row["kernel_ms"])
    table = format_training(rows)
    assert table.count("\n") == 3 and f"{rows[1]['ceiling']:.2f}×" in table
    assert "—" in format_training(measure_training("resnet18", 2, 32, ("eager",), warmup=1, repeats=1,
                                                   num_classes=10, memory=False, breakdown=False))


def test_deploy_compare_has_params_latency_and_marks_peers():
    from ctxagg.bench.deploy_compare import (PEER_MODELS, compare_eager, format_breakdown, format_compare,
                                             format_latency)

    assert {"resnet50", "convnext_tiny", "deit_small_patch16_224", "swin_tiny_patch4_window7_224"} <= set(PEER_MODELS)
    result = compare_eager(["container_dw3", "resnet18"], batch_size=2, img_size=64, warmup=0, repeats=1,
                           compile=False, latency_batch=1, echo=None)
    ours, peer = result["rows"]
    assert (ours["source"], peer["source"]) == ("ctxagg", "timm")
    assert peer["params_m"] == pytest.approx(sum(p.numel() for p in timm.create_model("resnet18").parameters()) / 1e6)
    assert "opt_int8_img_s" not in ours  # int8 needs compile
    assert all(ours[f"{v}_latency_ms"] > 0 for v in ("eager_fp32", "opt_fp32", "opt_bf16"))
    assert "| resnet18 | timm |" in format_compare(result["rows"], result["peak_gmacs"])
    assert format_latency(result["rows"]).count("\n") == 3
    for row in result["rows"]:  # the breakdown: one profiled pass of each variant, its ceiling over opt bf16
        for v in ("eager_fp32", "opt_fp32", "opt_bf16"):
            assert 0 < row[f"{v}_kernel_ms"] < row[f"{v}_pass_ms"]
            assert row[f"{v}_kernel_ms"] + row[f"{v}_other_ms"] == pytest.approx(row[f"{v}_pass_ms"])
            assert row[f"{v}_ceiling_over_bf16"] == pytest.approx(row["opt_bf16_pass_ms"] / row[f"{v}_kernel_ms"])
    assert format_breakdown(result["rows"]).count("\n") == 1 + 2 * 3


def test_kernel_split_separates_mac_kernels_from_the_rest():
    from ctxagg.bench.kernel_split import ceiling, is_mac_kernel, kernel_split

    for name in ("aten::mkldnn_convolution", "aten::convolution_backward", "onednn::qconv_pointwise",
                 "onednn::qlinear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise",
                 "aten::_scaled_dot_product_flash_attention_for_cpu"):
        assert is_mac_kernel(name), name
    for name in ("aten::gelu", "aten::addcmul_", "aten::add_", "## Call CompiledFxGraph abc ##", "aten::copy_",
                 "aten::native_batch_norm", "aten::lerp_"):
        assert not is_mac_kernel(name), name
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    split = kernel_split(lambda: (a @ b).exp().add_(1), torch.device("cpu"))
    assert split["kernel_ms"] > 0 and split["other_ms"] > 0
    assert split["kernel_ms"] + split["other_ms"] == pytest.approx(split["total_ms"])
    assert kernel_split(lambda: a.exp().add_(1), torch.device("cpu"))["kernel_ms"] == 0
    assert ceiling(10.0, 4.0) == 2.5 and ceiling(10.0, 0.0) == float("inf")
