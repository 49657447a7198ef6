"""DINO self-supervised pre-training (ctxagg.ssl): loss, centring, teacher EMA, schedules, k-NN, multi-crop,
last-layer freezing, exact resume, every backbone family, fine-tuning hook."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import ctxagg  # noqa: F401  (registers the models)
from ctxagg.errors import ConfigError
from ctxagg.ssl.config import SSLConfig
from ctxagg.ssl.crops import MultiCropTransform, check_crop_size, default_local_size, min_crop_size
from ctxagg.ssl.dino import (DINOHead, DINOLoss, MultiCropWrapper, cancel_last_layer_gradients, cosine_schedule,
                             teacher_temperature, update_teacher)
from ctxagg.ssl.knn import knn_accuracy, knn_predict, train_linear_probe
from ctxagg.ssl.model import build_backbone, build_student_teacher, init_from_ssl, load_ssl_backbone
from ctxagg.train.checkpoint import CheckpointError, load_checkpoint
from ctxagg.train.config import input_size_overrides

# a tiny Container-Light: stride 8 (patch 1, 2, 2, 2) so 16² global and 8² local crops both fit
TINY_CONTAINER = dict(dims=(8, 8, 16, 16), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), head_dim=8,
                      patch_sizes=(1, 2, 2, 2))
TINY_HEAD = dict(out_dim=32, hidden_dim=16, bottleneck_dim=8)


# ----------------------------------------------------------------------------------------------- DINO loss
def _reference_dino_loss(student, teacher, center, t_temp, s_temp, n_crops):
    """Eq. 1-3 of Caron et al. 2021 with explicit loops in float64 (independent of DINOLoss)."""
    student, teacher, center = (np.asarray(a, dtype=np.float64) for a in (student, teacher, center))
    batch = teacher.shape[0] // 2
    total, pairs = 0.0, 0
    for iq in range(2):
        for v in range(n_crops):
            if v == iq:
                continue
            term = 0.0
            for b in range(batch):
                t = (teacher[iq * batch + b] - center) / t_temp
                q = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
                s = student[v * batch + b] / s_temp
                log_p = s - (s.max() + math.log(np.exp(s - s.max()).sum()))
                term += -sum(q[k] * log_p[k] for k in range(len(q)))
            total += term / batch
            pairs += 1
    return total / pairs


def test_dino_loss_known_answer():
    """2 global + 1 local crop, K = 3, B = 1: teacher crop 1 → class 0, crop 2 → class 2 (after centring and
    sharpening at τt = 0.05); the value (0.0659 + 6.0512 + 20.0000 + 0.0512) / 4 is worked by hand."""
    loss = DINOLoss(3, student_temp=0.1)
    loss.center.fill_(0.5)
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1], [0.0, 0.3, 0.6]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 1.5]])
    value = loss(student, teacher, teacher_temp=0.05, n_crops=3)
    assert value.item() == pytest.approx(6.541955204333578, rel=1e-5)
    assert loss.center.tolist() == [[0.5, 0.5, 0.5]]  # forward does not move the centre


def test_dino_loss_matches_explicit_loops_and_gives_student_gradients_only():
    gen = torch.Generator().manual_seed(0)
    batch, k, n_crops = 3, 7, 4
    student = torch.randn(n_crops * batch, k, generator=gen, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(2 * batch, k, generator=gen, dtype=torch.float64).requires_grad_()
    loss = DINOLoss(k, student_temp=0.1)
    loss.center.copy_(torch.randn(1, k, generator=gen))
    value = loss(student, teacher, 0.04, n_crops)
    expected = _reference_dino_loss(student.detach(), teacher.detach(), loss.center[0], 0.04, 0.1, n_crops)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None  # stop-gradient on the teacher
    with pytest.raises(ValueError, match="2 global crops"):
        loss(student, teacher[:batch], 0.04, n_crops)


def test_center_ema_update_known_answer():
    """Eq. 4: c ← 0.9 c + 0.1 · mean of the teacher outputs."""
    loss = DINOLoss(2, center_momentum=0.9)
    loss.center.copy_(torch.tensor([[1.0, -1.0]]))
    loss.update_center(torch.tensor([[3.0, 0.0], [1.0, 2.0]]))  # mean (2, 1)
    assert loss.center[0].tolist() == pytest.approx([0.9 * 1 + 0.1 * 2, 0.9 * -1 + 0.1 * 1])
    assert loss.center[0].tolist() == pytest.approx([1.1, -0.8])


def test_teacher_ema_update_known_answer():
    student, teacher = nn.Linear(2, 1), nn.Linear(2, 1)
    bn_s, bn_t = nn.BatchNorm1d(1), nn.BatchNorm1d(1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[2.0, 4.0]]))
        student.bias.fill_(10.0)
        teacher.weight.copy_(torch.tensor([[1.0, 0.0]]))
        teacher.bias.fill_(0.0)
        bn_s.running_mean.fill_(5.0)
    update_teacher(nn.Sequential(student, bn_s), nn.Sequential(teacher, bn_t), momentum=0.9)
    assert teacher.weight[0].tolist() == pytest.approx([0.9 * 1 + 0.1 * 2, 0.9 * 0 + 0.1 * 4])
    assert teacher.bias.item() == pytest.approx(1.0)
    assert student.weight[0].tolist() == [2.0, 4.0]  # the student is untouched
    assert bn_t.running_mean.item() == 0.0  # teacher buffers are its own
    update_teacher(student, teacher, momentum=1.0)
    assert teacher.bias.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="momentum"):
        update_teacher(student, teacher, momentum=1.5)


def test_schedules_known_values():
    # momentum 0.996 → 1 over 2 epochs × 2 steps: final + ½(base − final)(1 + cos(π k / 4))
    m = cosine_schedule(0.996, 1.0, epochs=2, steps_per_epoch=2)
    assert m.tolist() == pytest.approx([0.996, 1 - 0.002 * (1 + math.sqrt(0.5)), 0.998, 1 - 0.002 * (1 - math.sqrt(0.5))])
    lr = cosine_schedule(1.0, 0.0, epochs=3, steps_per_epoch=2, warmup_epochs=1)
    assert lr.tolist() == pytest.approx([0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 - math.sqrt(0.5))])
    assert teacher_temperature(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temperature(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert teacher_temperature(30, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(3, 0.04, 0.07, 0) == pytest.approx(0.07)


# ----------------------------------------------------------------------------------------------- head / k-NN
def test_dino_head_shapes_l2_norm_and_weight_norm():
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=6)
    out = head(torch.randn(5, 12))
    assert out.shape == (5, 20)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    # each output row is a unit vector · a unit (ℓ2-normalised) bottleneck: |logit| ≤ 1
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(20), atol=1e-6)
    assert out.abs().max() <= 1 + 1e-5
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]


def test_knn_weighted_vote_known_answer():
    """One query (1, 0); train: class 0 at cosine 1.0, class 1 at cosine 0.8 and 0.6 (features unnormalised)."""
    train = torch.tensor([[3.0, 0.0], [0.8, 0.6], [1.2, 1.6]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[2.0, 0.0]])
    scores = knn_predict(train, labels, query, num_classes=2, k=3, temperature=0.07)
    assert scores[0].tolist() == pytest.approx([math.exp(1 / 0.07), math.exp(0.8 / 0.07) + math.exp(0.6 / 0.07)],
                                               rel=1e-4)
    assert scores.argmax(1).item() == 0  # weighted vote beats the 2-to-1 count
    flat = knn_predict(train, labels, query, num_classes=2, k=3, temperature=10.0)
    assert flat.argmax(1).item() == 1  # nearly equal weights: the count wins
    only_nearest = knn_predict(train, labels, query, num_classes=2, k=1, temperature=0.07)
    assert only_nearest[0, 1].item() == 0.0
    acc = knn_accuracy(train, labels, torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]), 2, k=1)
    assert acc["top1"] == 100.0
    with pytest.raises(ValueError, match="k-NN"):
        knn_predict(train, labels, query, 2, k=0)


def test_linear_probe_separates_toy_features():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 8) * 3
    labels = torch.arange(4).repeat(30)
    feats = centres[labels] + 0.3 * torch.randn(len(labels), 8, generator=gen)
    _, history = train_linear_probe(feats[:80], labels[:80], feats[80:], labels[80:], 4, epochs=30, lr=0.05)
    assert history[-1]["val_top1"] == 100.0
    assert history[-1]["train_loss"] < history[0]["train_loss"]


# ----------------------------------------------------------------------------------------------- multi-crop
def test_multicrop_shapes_and_min_size_errors():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    views = MultiCropTransform(32, 16, 3, (0.5,) * 3, (0.25,) * 3)(image)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3

    light = build_backbone("container_light", 32, model_kwargs=dict(dims=(8, 8, 16, 16), depths=(1, 1, 1, 1),
                                                                    mlp_ratios=(2, 2, 2, 2), head_dim=8))
    assert min_crop_size(light) == (16, None)  # patches 2·2·2·2 at 32²
    assert default_local_size(light, 32) == 16  # 32 · 96/224 = 13.7 → next multiple of 16
    check_crop_size(light, 16)
    for bad in (8, 24):
        with pytest.raises(ConfigError, match="multiple of 16"):
            check_crop_size(light, bad)
    deit = build_backbone("deit_s", 32, model_kwargs=dict(embed_dim=16, depth=1, num_heads=2))
    assert min_crop_size(deit) == (4, None) and default_local_size(deit, 32) == 16
    fixed = timm.create_model("container_pam", num_classes=0, img_size=16, patch_size=4, embed_dim=16, depth=1,
                              num_heads=2)
    assert min_crop_size(fixed) == (4, 16)
    with pytest.raises(ConfigError, match="fixed-size"):
        check_crop_size(fixed, 8)
    with pytest.raises(ConfigError, match="local crops"):
        MultiCropTransform(32, 16, -1, (0.5,) * 3, (0.25,) * 3)


def test_multicrop_wrapper_one_pass_per_resolution():
    calls = []

    class Backbone(nn.Module):
        num_features = 3

        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean((2, 3))

    wrapper = MultiCropWrapper(Backbone(), nn.Identity())
    crops = [torch.full((2, 3, 8, 8), float(i)) for i in range(2)] + [torch.full((2, 3, 4, 4), 5.0)] * 3
    out = wrapper(crops)
    assert calls == [(4, 3, 8, 8), (6, 3, 4, 4)]
    assert out.shape == (10, 3) and out[:2].eq(0).all() and out[2:4].eq(1).all() and out[4:].eq(5).all()


def test_last_layer_gradients_are_cancelled_in_the_first_epoch():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    model = MultiCropWrapper(backbone, DINOHead(6, 10, 8, 4))
    out = model([torch.randn(4, 3, 2, 2)])
    out.pow(2).sum().backward()
    last_v = model.head.last_layer.parametrizations.weight.original1
    assert last_v.grad is not None and last_v.grad.abs().sum() > 0
    cancel_last_layer_gradients(model, epoch=1, freeze_epochs=1)
    assert last_v.grad is not None  # frozen only while epoch < freeze_epochs
    cancel_last_layer_gradients(model, epoch=0, freeze_epochs=1)
    assert last_v.grad is None
    assert backbone[1].weight.grad.abs().sum() > 0 and model.head.mlp[0].weight.grad is not None


# ----------------------------------------------------------------------------------------------- families
FAMILIES = {
    "container_light": (32, dict(dims=(8, 8, 16, 16), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), head_dim=8)),
    "deit_s": (32, dict(embed_dim=32, depth=2, num_heads=2)),
    "linglo_b0": (32, {}),
    "resnet50_lesa": (32, {}),
}


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_one_dino_step_for_every_family(model):
    img, kwargs = FAMILIES[model]
    torch.manual_seed(0)
    cfg = SSLConfig(model=model, img_size=img, model_kwargs=kwargs, drop_path=0.0, **TINY_HEAD)
    student, teacher = build_student_teacher(cfg)
    local = default_local_size(student.backbone, img)
    assert local == 16
    crops = [torch.randn(2, 3, img, img) for _ in range(2)] + [torch.randn(2, 3, local, local) for _ in range(2)]
    loss_fn = DINOLoss(cfg.out_dim)
    with torch.no_grad():
        t_out = teacher(crops[:2])
    s_out = student(crops)
    assert s_out.shape == (8, cfg.out_dim) and t_out.shape == (4, cfg.out_dim)
    loss = loss_fn(s_out, t_out, 0.04, 4)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in student.backbone.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())
    before = [p.detach().clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    update_teacher(student, teacher, 0.5)
    moved = sum(not torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert moved == len(before)


# ----------------------------------------------------------------------------------------------- runs
def _tiny_cfg(out, **kw):
    return SSLConfig(**{**dict(model="container_light", data="digits", output=str(out), epochs=2, batch_size=4,
                               img_size=16, local_crops=2, fraction=0.01, val_limit=20, model_kwargs=TINY_CONTAINER,
                               drop_path=0.0, seed=1, warmup_epochs=1, **TINY_HEAD), **kw})


def test_resume_equals_uninterrupted_and_first_epoch_keeps_last_layer(tmp_path):
    from ctxagg.ssl.engine import train_ssl

    whole = train_ssl(_tiny_cfg(tmp_path / "whole"), progress=False)
    part = train_ssl(_tiny_cfg(tmp_path / "part", max_steps=whole.history[1]["steps"]), progress=False)
    rest = train_ssl(_tiny_cfg(tmp_path / "part"), resume=str(tmp_path / "part"), progress=False)
    steps_per_epoch = whole.history[1]["steps"]
    assert steps_per_epoch >= 2 and len(whole.step_losses) == 2 * steps_per_epoch
    assert part.step_losses + rest.step_losses == whole.step_losses  # loss for loss, bit for bit
    a, meta_a = load_checkpoint(tmp_path / "whole" / "last.safetensors")
    b, meta_b = load_checkpoint(tmp_path / "part" / "last.safetensors")
    assert a.keys() == b.keys()
    for key in (k for k in a if not k.startswith("rng.")):
        assert torch.equal(a[key], b[key]), key
    assert [h["knn_top1"] for h in meta_a["history"]] == [h["knn_top1"] for h in meta_b["history"]]
    assert meta_a["history"][0]["epoch"] == 0 and math.isnan(meta_a["history"][0]["train_loss"])  # random init
    for name in ("metrics.csv", "curves.png", "teacher.safetensors", "config.json"):
        assert (tmp_path / "whole" / name).is_file(), name
    _, teacher_meta = load_checkpoint(tmp_path / "whole" / "teacher.safetensors")
    assert teacher_meta["kind"] == "ssl" and teacher_meta["epoch"] == 1


def test_last_layer_is_frozen_through_epoch_zero(tmp_path):
    from ctxagg.ssl.engine import train_ssl

    train_ssl(_tiny_cfg(tmp_path / "one", epochs=1), progress=False)
    tensors, _ = load_checkpoint(tmp_path / "one" / "last.safetensors")
    torch.manual_seed(1)
    init, _ = build_student_teacher(_tiny_cfg(tmp_path).resolved())
    state = init.state_dict()
    v = "head.last_layer.parametrizations.weight.original1"
    assert torch.equal(tensors[f"student.{v}"], state[v])  # frozen during epoch 0
    assert not torch.equal(tensors["student.head.mlp.0.weight"], state["head.mlp.0.weight"])  # the rest trained


def test_existing_output_is_refused_and_init_from_ssl_loads_the_teacher(tmp_path):
    from ctxagg.ssl.engine import train_ssl

    train_ssl(_tiny_cfg(tmp_path / "run", epochs=1), progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        train_ssl(_tiny_cfg(tmp_path / "run", epochs=1), progress=False)
    state, meta = load_ssl_backbone(tmp_path / "run")
    model = timm.create_model("container_light", num_classes=10,
                              **{**input_size_overrides("container_light", 16), **TINY_CONTAINER})
    missing = init_from_ssl(model, tmp_path / "run")
    assert sorted(missing) == ["head.bias", "head.weight"]
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k
    tensors, _ = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert all(torch.equal(tensors[f"teacher.backbone.{k}"], v) for k, v in state.items())
    assert meta["config"]["model"] == "container_light"
    other = timm.create_model("container_light", num_classes=10, **input_size_overrides("container_light", 16))
    with pytest.raises(CheckpointError, match="does not fit"):
        init_from_ssl(other, tmp_path / "run")


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="--method"):
        SSLConfig(method="byol").resolved().validate()
    with pytest.raises(ConfigError, match="--local-crop-size"):
        SSLConfig(img_size=32, local_crop_size=64).resolved().validate()
    with pytest.raises(ConfigError, match="--data"):
        SSLConfig(data="cifar10").resolved().validate()


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_and_write_one_run(tmp_path):
    import json

    script = tmp_path / "run_ssl.py"
    script.write_text("import sys, json\nfrom ctxagg.ssl.config import SSLConfig\nfrom ctxagg.ssl.engine import "
                      "train_ssl\ntrain_ssl(SSLConfig(**json.loads(sys.argv[1])), progress=False)\n")
    cfg = dict(_tiny_cfg(tmp_path / "ddp", batch_size=4).to_json())
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), json.dumps(cfg)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tensors, meta = load_checkpoint(tmp_path / "ddp" / "last.safetensors")
    assert meta["history"][-1]["epoch"] == 2 and math.isfinite(meta["history"][-1]["train_loss"])


def test_cli_ssl_train_probe_and_train_init(tmp_path, monkeypatch, capsys):
    """`ctxagg ssl train` writes a run, `ctxagg ssl probe` reads it, `ctxagg train --init` fine-tunes its teacher."""
    import json

    from ctxagg.cli import main

    monkeypatch.chdir(tmp_path)
    tiny = ["--model", "container_light", "--data", "digits", "--epochs", "1", "--batch-size", "4", "--img-size",
            "16", "--local-crops", "2", "--fraction", "0.01", "--val-limit", "20", "--model-kwargs",
            json.dumps(TINY_CONTAINER), "--drop-path", "0", "--warmup-epochs", "0", "--out-dim", "32",
            "--hidden-dim", "16", "--bottleneck-dim", "8", "--no-progress", "--output", "ssl"]
    assert main(["ssl", "train", *tiny]) == 0
    assert (tmp_path / "ssl" / "teacher.safetensors").is_file()
    assert main(["ssl", "train", *tiny]) == 2 and "overwrite" in capsys.readouterr().err
    assert main(["ssl", "probe", "ssl", "--epochs", "2", "--val-limit", "20", "--fraction", "0.05"]) == 0
    probe = json.loads((tmp_path / "ssl" / "probe.json").read_text())
    assert 0 <= probe["knn_top1"] <= 100 and 0 <= probe["linear_top1"] <= 100
    train = ["train", "--model", "container_light", "--img-size", "16", "--epochs", "1", "--recipe", "light",
             "--fraction", "0.05", "--val-limit", "20", "--model-kwargs", json.dumps(TINY_CONTAINER),
             "--output", "fine"]
    assert main([*train, "--init", "nowhere"]) == 2 and "--init nowhere does not exist" in capsys.readouterr().err
    # one step at a negligible learning rate (no warm-up, whose start lr is 1e-6): the backbone is still the teacher's
    assert main([*train, "--init", "ssl", "--max-steps", "1", "--lr", "1e-12", "--warmup-epochs", "0"]) == 0
    state, _ = load_ssl_backbone(tmp_path / "ssl")
    tensors, meta = load_checkpoint(tmp_path / "fine" / "last.safetensors")
    assert meta["config"]["init"] == "ssl"
    weights = [k for k in state if "running_" not in k and "num_batches" not in k]  # BN statistics move in train()
    assert len(weights) > 20
    for key in weights:
        torch.testing.assert_close(tensors[f"model.{key}"], state[key], rtol=0, atol=1e-6, msg=key)
