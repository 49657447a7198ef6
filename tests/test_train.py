"""The training tool: exact resume, DDP == single process, eval outputs, CLI errors."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ctxagg  # noqa: F401
from ctxagg.train import TrainConfig, train
from ctxagg.train.checkpoint import load_checkpoint
from ctxagg.train.engine import build_model, seed_everything
from ctxagg.train.evaluate import evaluate_checkpoint

TINY_CONTAINER = dict(dims=(8, 8, 16, 16), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), head_dim=8)


def _tiny(tmp_path: Path, name: str, **kw) -> TrainConfig:
    base = dict(model="container_light", data="digits", output=str(tmp_path / name), img_size=16, batch_size=32,
                epochs=3, fraction=0.25, model_kwargs=TINY_CONTAINER, ema_decay=0.9, clip_grad=1.0, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    # the full DeiT recipe (Mixup/CutMix, RandAugment, random erasing, drop path, EMA, clipping) on purpose:
    # every random generator it draws from must come back exactly
    full = train(_tiny(tmp_path, "full"), progress=False)
    steps_per_epoch = full.history[0]["steps"]
    part = train(_tiny(tmp_path, "part", max_steps=steps_per_epoch), progress=False)
    assert len(part.history) == 1
    resumed = train(_tiny(tmp_path, "part"), resume=str(tmp_path / "part"), progress=False)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    for key in ("train_loss", "val_loss", "val_top1", "ema_val_top1", "lr"):
        assert [h[key] for h in resumed.history] == pytest.approx([h[key] for h in full.history], rel=1e-6), key
    a, _ = load_checkpoint(tmp_path / "full" / "last.safetensors")
    b, _ = load_checkpoint(tmp_path / "part" / "last.safetensors")
    for key in a:
        if not key.startswith("rng."):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_run_writes_metrics_plot_and_checkpoints_that_eval_reads(tmp_path):
    cfg = _tiny(tmp_path, "run", recipe="light", epochs=2, fraction=0.5)
    result = train(cfg, progress=False)
    out = tmp_path / "run"
    for name in ("metrics.csv", "curves.png", "config.json", "last.safetensors", "model.safetensors",
                 "model_best.safetensors"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert float(rows[-1]["val_top1"]) == pytest.approx(result.history[-1]["val_top1"], rel=1e-5)
    best = max(result.history, key=lambda h: h["val_top1"])
    report = evaluate_checkpoint(str(out / "model_best.safetensors"), output=str(tmp_path / "eval"))
    assert report["top1"] == pytest.approx(best["val_top1"], abs=1e-6)  # same data, same transform
    assert len(report["per_class_top1"]) == 10 and report["count"] == 359
    confusion = torch.tensor(report["confusion"])
    assert confusion.sum() == 359 and confusion.diag().sum() == round(report["top1"] * 359 / 100)
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["top1"] == report["top1"]
    with pytest.raises(ValueError, match="trained as 'container_light', not 'container_dw3'"):
        evaluate_checkpoint(str(out / "model_best.safetensors"), model="container_dw3")


def test_training_learns_digits(tmp_path):
    cfg = _tiny(tmp_path, "learn", recipe="light", epochs=4, fraction=1.0, batch_size=64, ema_decay=0.0,
                model_kwargs=dict(TINY_CONTAINER, dims=(16, 16, 32, 32)))
    result = train(cfg, progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_top1 > 60  # chance is 10%


@pytest.mark.parametrize("argv,message", [
    (["train", "--model", "container_lite"], "Did you mean: container_light"),
    (["train", "--batch-size", "31"], "needs an even --batch-size"),
    (["train", "--data", "imagefolder:/does/not/exist"], "--data path /does/not/exist does not exist"),
    (["train", "--data", "kaggle:x"], "unknown --data 'kaggle:x'"),
    (["train", "--fraction", "1.5"], "--fraction must be in (0, 1]"),
    (["train", "--recipe", "fast"], "unknown --recipe 'fast'"),
])
def test_cli_refuses_bad_settings_before_any_work(argv, message, capsys):
    from ctxagg.cli import main
    try:
        code = main(argv)
    except SystemExit as exc:
        code, err = 1, str(exc)
    else:
        err = capsys.readouterr().err
    assert code != 0 and message in err


def test_ddp_on_two_cpu_processes_equals_single_process_training(tmp_path):
    """torchrun + gloo, 2 processes × 8 images == 1 process × 16 images (same global batch and order).

    Container-PAM (LayerNorm) is used because BatchNorm normalises each process's sub-batch on CPU
    (SyncBatchNorm is GPU-only), which no implementation can make equal to one process."""
    kwargs = json.dumps(dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2))
    args = ["train", "--model", "container_pam", "--data", "digits", "--img-size", "16", "--epochs", "1",
            "--batch-size", "16", "--fraction", "0.1", "--recipe", "light", "--drop-path", "0", "--max-steps", "4",
            "--no-augment", "--seed", "0", "--model-kwargs", kwargs]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    done = subprocess.run([sys.executable, "-m", "ctxagg.cli", *args, "--output", str(single)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ctxagg.cli", *args, "--output", str(ddp)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, meta_a = load_checkpoint(single / "last.safetensors")
    b, meta_b = load_checkpoint(ddp / "last.safetensors")
    assert meta_a["history"][0]["steps"] == meta_b["history"][0]["steps"] == 4
    for key in (k for k in a if k.startswith("model.")):
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    seed_everything(0)  # the initial weights, as train() builds them
    init = build_model(TrainConfig(model="container_pam", img_size=16, model_kwargs=json.loads(kwargs)), 10)
    moved = [k for k, v in init.state_dict().items() if not torch.allclose(v, a[f"model.{k}"])]
    assert len(moved) > 10  # 4 steps really trained (so the equality above is not trivial)
    assert meta_b["history"][0]["train_loss"] == pytest.approx(meta_a["history"][0]["train_loss"], rel=1e-4)


@pytest.mark.parametrize("model", ["container_light", "container_pam", "linglo_b0", "resnet50_lesa", "deit_s_dw_rel",
                                   "swin_t_scale_relu_rel"])
def test_every_family_trains_on_cifar_size_input(tmp_path, model):
    cfg = TrainConfig(model=model, data="digits", img_size=32, batch_size=8, epochs=1, fraction=0.05, max_steps=2,
                      recipe="light", output=str(tmp_path / model), val_fraction=0.05)
    result = train(cfg, progress=False)
    assert result.history[0]["steps"] == 2 and result.history[0]["train_loss"] > 0
    meta = load_checkpoint(tmp_path / model / "model.safetensors")[1]
    assert meta["config"]["img_size"] == 32


def test_a_library_drawing_random_numbers_while_data_loads_does_not_change_the_run(tmp_path, monkeypatch):
    """scikit-learn draws from Python's global generator when first imported (the digits loader imports it lazily),
    so a process's first run used to differ from its second; every generator is seeded after the data is loaded."""
    import random

    import numpy as np

    from ctxagg.train import engine

    plain = train(_tiny(tmp_path, "plain", epochs=1, max_steps=2), progress=False)
    load = engine._load_arrays

    def load_and_draw(cfg):
        random.random(), np.random.rand(), torch.rand(1)  # what a first import may do
        return load(cfg)

    monkeypatch.setattr(engine, "_load_arrays", load_and_draw)
    drawn = train(_tiny(tmp_path, "drawn", epochs=1, max_steps=2), progress=False)
    assert [h["train_loss"] for h in drawn.history] == [h["train_loss"] for h in plain.history]
