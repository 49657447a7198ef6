"""Robustness (issue 9): every fault is provoked, and each test asserts the message and that no data was lost.

Checkpoints (unsafe pickles, wrong model, corrupt/truncated files, disk full), inputs (channels, size, dtype,
NaN/Inf, empty batch) for every model family, data (corrupt/truncated/non-image/unreadable files, empty classes,
out-of-range labels), training faults (SIGKILL mid-epoch, non-finite loss or weights) and CLI refusals.
"""
import errno
import gzip
import json
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ctxagg  # noqa: F401
from ctxagg.checks import (InputError, InputTypeError, NonFiniteInputError, add_input_checks, check_images,
                           enable_input_checks)
from ctxagg.train import TrainConfig, train
from ctxagg.train import engine
from ctxagg.train.checkpoint import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint
from ctxagg.train.data import BadImageError, DataError, load_dataset, load_image_folder
from ctxagg.train.engine import NonFiniteLossError, build_model

TINY = dict(dims=(8, 8, 16, 16), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), head_dim=8)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread is several times faster than two fighting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(tmp_path: Path, name: str = "run", **kw) -> TrainConfig:
    base = dict(model="container_light", data="digits", img_size=16, batch_size=32, epochs=2, fraction=0.1,
                model_kwargs=TINY, recipe="light", output=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


def _tiny_model(num_classes: int = 10, **kw) -> torch.nn.Module:
    return build_model(TrainConfig(model=kw.pop("model", "container_light"), img_size=16,
                                   model_kwargs={**TINY, **kw}), num_classes)


# ---------------------------------------------------------------------------------------------- checkpoints


class _Payload:
    """A pickle that runs a shell command when unpickled (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zipped, legacy = tmp_path / "evil.pth", tmp_path / "evil.bin"
    torch.save({**model.state_dict(), "payload": _Payload(marker)}, zipped)
    legacy.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}, protocol=2))
    for path in (zipped, legacy):
        with pytest.raises(CheckpointError, match=f"refusing to load {path}: it holds pickled Python objects") as err:
            load_model_weights(model, path)
        assert "system" in str(err.value)  # names what it refused
        assert not marker.exists()
    from ctxagg.train.evaluate import evaluate_checkpoint
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        evaluate_checkpoint(str(zipped))  # eval reads safetensors only
    assert not marker.exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the payload is real: an unsafe load would have run it
    pickle.loads(legacy.read_bytes())
    assert marker.exists()


def test_a_malicious_cifar_batch_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    _write_cifar(tmp_path / "cifar")
    (tmp_path / "cifar" / "data_batch_2").write_bytes(pickle.dumps({b"data": _Payload(marker)}, protocol=2))
    with pytest.raises(DataError, match=r"cannot read CIFAR batch .*data_batch_2: .*refusing to load posix.system"):
        load_dataset(f"cifar10:{tmp_path / 'cifar'}")
    assert not marker.exists()


def _weights(model, drop=(), add=None, prefix="model."):
    state = {f"{prefix}{k}": v for k, v in model.state_dict().items() if k not in drop}
    state.update(add or {})
    return state


@pytest.mark.parametrize("case", ["missing", "unexpected", "mis-shaped", "other model", "plain torch file"])
def test_a_checkpoint_that_does_not_fit_names_the_keys(tmp_path, case):
    source = _tiny_model()
    meta = dict(config=_cfg(tmp_path).to_json(), epoch=0)
    path = tmp_path / "ckpt.safetensors"
    target = _tiny_model()
    if case == "missing":
        save_checkpoint(path, _weights(source, drop=("head.weight",)), meta)
        expected = ["1 missing keys: head.weight"]
    elif case == "unexpected":
        save_checkpoint(path, _weights(source, add={"model.extra.bias": torch.zeros(3)}), meta)
        expected = ["1 unexpected keys: extra.bias"]
    elif case == "mis-shaped":
        save_checkpoint(path, _weights(_tiny_model(num_classes=5)), meta)
        expected = ["2 mis-shaped keys: head.bias: checkpoint (5,) vs model (10,), head.weight: checkpoint (5, 16) "
                    "vs model (10, 16)"]
    elif case == "other model":
        save_checkpoint(path, _weights(source), meta)
        target = _tiny_model(model="container_dw3")
        expected = ["(it was trained as 'container_light')", "missing keys", "unexpected keys", "mis-shaped keys"]
    else:
        path = tmp_path / "weights.pth"
        torch.save(_weights(source, drop=("norm.bias",), prefix=""), path)
        expected = ["1 missing keys: norm.bias"]
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_model_weights(target, path)
    message = str(err.value)
    assert message.startswith(f"checkpoint {path} does not fit this model")
    for part in expected:
        assert part in message
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing half-loaded


def _corruptions(data: bytes) -> dict[str, bytes]:
    header_len = struct.unpack("<Q", data[:8])[0]
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # a bit flip inside the tensor bytes: safetensors' own checks cannot see it
    garbled = bytearray(data)
    garbled[8:16] = b"\x00\xff" * 4
    return {"empty": b"", "4 bytes": data[:4], "inside the header": data[:8 + header_len // 2],
            "inside the tensors": data[:len(data) - 10], "garbled header": bytes(garbled),
            "flipped tensor byte": bytes(flipped)}


def test_truncated_or_corrupt_safetensors_raise_checkpoint_error_naming_the_file(tmp_path):
    model = _tiny_model()
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, _weights(model), dict(epoch=3))
    tensors, meta = load_checkpoint(good)
    assert meta == dict(epoch=3) and len(tensors) == len(model.state_dict())
    for name, data in _corruptions(good.read_bytes()).items():
        bad = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(CheckpointError, match=str(bad)) as err:
            load_checkpoint(bad)
        assert "not a readable safetensors checkpoint" in str(err.value) or "is corrupt" in str(err.value), name
        with pytest.raises(CheckpointError, match=str(bad)):
            load_model_weights(model, bad)
    assert "SHA-256" in str(pytest.raises(CheckpointError, load_checkpoint,
                                          tmp_path / "flipped_tensor_byte.safetensors").value)


class _FullDisk:
    """A file object that takes the first half of the data, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, where):
    path = tmp_path / "run" / "last.safetensors"
    save_checkpoint(path, _weights(_tiny_model()), dict(epoch=0))
    previous = path.read_bytes()
    if where == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FullDisk(real_fdopen(fd, *a, **k)))
    else:
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", full)
    torch.manual_seed(1)
    with pytest.raises(OSError, match=f"could not write {path} .*No space left on device.*previous file is "
                                      "unchanged") as err:
        save_checkpoint(path, _weights(_tiny_model()), dict(epoch=1))
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == previous
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.safetensors"]  # no temp file left
    assert load_checkpoint(path)[1] == dict(epoch=0)


# --------------------------------------------------------------------------------------------------- inputs

FAMILIES = {  # tiny versions of every family, built the way `ctxagg train` builds them (with input checks)
    "container_light": TINY,
    "container_mlp": TINY,  # fixed-size token-MLP affinities
    "linglo_b0": dict(dims=(8, 8, 16, 16), depths=(1, 1, 1, 1), heads=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2)),
    "resnet50_lesa": dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)),
    "deit_s": dict(embed_dim=32, depth=1, num_heads=2),
    "container_pam": dict(embed_dim=32, depth=1, num_heads=2),
    "swin_t_dw": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
}
FIXED_SIZE = {"container_mlp", "container_pam"}  # DeiT/Swin rows take any size (dynamic_img_size, strict_img_size=False)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_refuses_bad_inputs_by_name(name):
    model = build_model(TrainConfig(model=name, img_size=32, model_kwargs=FAMILIES[name]), 10).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    cases = [
        (torch.randn(2, 4, 32, 32), InputError, f"{name} was built for 3 input channels, got 4"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), InputTypeError,
         f"{name} expects a floating-point image tensor, got torch.uint8"),
        (torch.randn(0, 3, 32, 32), InputError, f"{name} got an empty batch (0, 3, 32, 32); expected at least one "
                                                "image (3, H, W)"),
        (torch.randn(3, 32, 32), InputError, f"{name} expects images shaped (B, C, H, W), got (3, 32, 32)"),
    ]
    if name in FIXED_SIZE:
        cases.append((torch.randn(2, 3, 40, 40), InputError, f"{name} has fixed-size layers (token-MLP affinities, "
                                                             "position tables) built for 32×32 input, got 40×40"))
    for x, kind, message in cases:
        with pytest.raises(kind) as err:
            model(x)
        assert message in str(err.value)
    assert isinstance(InputTypeError("x"), TypeError) and isinstance(InputTypeError("x"), ValueError)


def test_a_fixed_size_model_is_built_at_the_training_img_size():
    # `ctxagg train --model container_mlp --img-size 24` builds the token MLPs for 24² (not 224²); 32² is then refused
    model = build_model(TrainConfig(model="container_mlp", img_size=24, model_kwargs=TINY), 10).eval()
    assert model(torch.randn(1, 3, 24, 24)).shape == (1, 10)
    with pytest.raises(InputError, match="built for 24×24 input, got 32×32; build it with img_size=32"):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", ["container_light", "resnet50_lesa", "deit_s"])
def test_nan_and_inf_inputs_are_refused_when_checks_are_on(name):
    model = build_model(TrainConfig(model=name, img_size=32, model_kwargs=FAMILIES[name]), 10).eval()
    x = torch.randn(4, 3, 32, 32)
    x[1, 0, 3, 3], x[3, 2, 0, 0] = float("nan"), float("inf")
    assert not torch.isfinite(model(x)).all()  # off by default: garbage out, no cost
    message = rf"{name} input has 1 NaN and 1 Inf values \(of 12288\) in 2 of 4 images \(batch indices 1, 3\)"
    with enable_input_checks():
        with pytest.raises(NonFiniteInputError, match=message):
            model(x)
    checks = add_input_checks(model, finite=True)
    with pytest.raises(NonFiniteInputError, match=message):
        model(x)
    assert torch.isfinite(model(torch.nan_to_num(x, 0.0, 0.0, 0.0))).all()
    checks.remove()
    model(x)
    with pytest.raises(InputError, match="got an empty batch"):  # the default checks stay
        model(x[:0])


def test_check_images_on_its_own():
    check_images(torch.randn(1, 3, 8, 8), in_chans=3, finite=True)
    with pytest.raises(InputTypeError, match="expects an image tensor shaped"):
        check_images([[0.0]])


# ----------------------------------------------------------------------------------------------------- data


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def _folder(root: Path) -> Path:
    """Two classes whose pixel value encodes the label (0 → 10, 1 → 200), so a wrong label is visible."""
    for i in range(3):
        _png(root / "cat" / f"{i}.png", 10)
        _png(root / "dog" / f"{i}.png", 200)
    (root / "cat" / "README.txt").write_text("not an image, and not pretending to be one")
    (root / ".ipynb_checkpoints").mkdir()
    return root


def _labels_match_pixels(arrays) -> bool:
    return all((img[0, 0, 0] == 10) == (label == 0) for img, label in zip(arrays.images, arrays.labels))


def _bad_files(root: Path) -> list[tuple[str, Path]]:
    good = (root / "cat" / "0.png").read_bytes()
    truncated = root / "cat" / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    not_an_image = root / "dog" / "notes.jpg"
    not_an_image.write_text("a text file with an image suffix")
    unreadable = root / "dog" / "folder.png"  # a directory where a file is expected
    unreadable.mkdir()
    # in the order the loader meets them (sorted paths)
    return [("cannot decode image", truncated), ("cannot read image file", unreadable),
            ("cannot decode image", not_an_image)]


def test_an_image_folder_with_bad_files_stops_naming_each_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CTXAGG_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "images")
    arrays = load_image_folder(root, None)
    assert arrays.classes == ["cat", "dog"] and len(arrays.labels) == 6 and _labels_match_pixels(arrays)
    bad = _bad_files(root)
    for message, path in bad:
        with pytest.raises(BadImageError, match=f"{message} {path}"):
            load_image_folder(root, None)
        (path.rmdir() if path.is_dir() else path.unlink())  # fix it; the next one is reported


def test_skip_bad_images_skips_counts_and_keeps_every_label_right(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CTXAGG_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "images")
    bad = _bad_files(root)
    with caplog.at_level(logging.WARNING, "ctxagg.data"):
        arrays = load_image_folder(root, None, skip_bad=True)
    assert "skipped 3 unreadable image(s)" in caplog.text
    assert sorted(arrays.skipped) == sorted(str(p) for _, p in bad)  # README.txt is not among them
    assert len(arrays.labels) == 6 and _labels_match_pixels(arrays)
    # the decode cache remembers the skipped files: without --skip-bad-images the cached load still stops
    with pytest.raises(BadImageError, match="bad image.* recorded in the decode cache.*--skip-bad-images"):
        load_image_folder(root, None)
    caches = list((tmp_path / "cache").glob("imagefolder-*.npz"))
    assert len(caches) == 1
    caches[0].write_bytes(caches[0].read_bytes()[:100])  # a torn cache is rebuilt, not trusted
    with caplog.at_level(logging.WARNING, "ctxagg.data"):
        again = load_image_folder(root, None, skip_bad=True)
    assert "ignoring unreadable decode cache" in caplog.text
    assert np.array_equal(again.images, arrays.images) and np.array_equal(again.labels, arrays.labels)


def test_a_permission_denied_image_is_a_bad_image(tmp_path, monkeypatch):
    monkeypatch.setenv("CTXAGG_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "images")
    locked = root / "dog" / "1.png"
    real_open = Image.open

    def open_(fp, *a, **k):  # tests run as root, which chmod cannot lock out
        if Path(fp) == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", open_)
    with pytest.raises(BadImageError, match=f"cannot read image file {locked}: Permission denied"):
        load_image_folder(root, None)
    arrays = load_image_folder(root, None, skip_bad=True)
    assert arrays.skipped == [str(locked)] and len(arrays.labels) == 5 and _labels_match_pixels(arrays)


def test_an_unlistable_class_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("CTXAGG_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "images")
    real_rglob = Path.rglob

    def rglob(self, pattern):
        if self.name == "dog":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_rglob(self, pattern)

    monkeypatch.setattr(Path, "rglob", rglob)
    with pytest.raises(DataError, match=f"cannot list folder {root / 'dog'}: Permission denied"):
        load_image_folder(root, None)


def test_an_empty_class_folder_stops_the_load(tmp_path, monkeypatch):
    monkeypatch.setenv("CTXAGG_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "images")
    (root / "bird").mkdir()
    (root / "bird" / "labels.csv").write_text("x")
    with pytest.raises(DataError, match=f"class folder {root / 'bird'} has no images .*holds 1 other file"):
        load_image_folder(root, None)
    (root / "bird" / "only.jpg").write_text("broken")  # a class whose every image is bad would vanish silently
    with pytest.raises(DataError, match=f"class folder.* {root / 'bird'} have no readable image left after "
                                        "skipping 1 bad one"):
        load_image_folder(root, None, skip_bad=True)


def _idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_an_out_of_range_mnist_label_is_never_used(tmp_path, caplog):
    root = tmp_path / "mnist"
    root.mkdir()
    labels = np.arange(20) % 10
    labels[5] = 12
    _idx(root / "train-images-idx3-ubyte.gz", np.arange(20 * 28 * 28).reshape(20, 28, 28) % 256)
    _idx(root / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match=f"MNIST labels {root / 'train-labels-idx1-ubyte.gz'}: label 12 at index 5 is "
                                        "outside the 10 classes 0-9"):
        load_dataset(f"mnist:{root}", val_fraction=0.2)
    with caplog.at_level(logging.WARNING, "ctxagg.data"):
        train_arrays, val_arrays = load_dataset(f"mnist:{root}", val_fraction=0.2, skip_bad=True)
    assert "skipped 1 sample(s)" in caplog.text
    assert len(train_arrays.labels) + len(val_arrays.labels) == 19
    assert 12 not in train_arrays.labels and 12 not in val_arrays.labels
    _idx(root / "train-labels-idx1-ubyte.gz", labels[:-1])  # one label short
    with pytest.raises(DataError, match="holds 20 images but .* holds 19 labels"):
        load_dataset(f"mnist:{root}")
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01")[:-6])  # truncated gzip
    with pytest.raises(DataError, match="cannot read idx file .*train-labels-idx1-ubyte.gz"):
        load_dataset(f"mnist:{root}")


def _write_cifar(root: Path, bad_label_in: str = "") -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [i % 10 for i in range(10)]
        if name == bad_label_in:
            labels[7] = 10
        batch = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": labels}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))  # the python-2 protocol of the real files


def test_an_out_of_range_cifar_label_is_never_used(tmp_path):
    _write_cifar(tmp_path / "ok")
    train_arrays, val_arrays = load_dataset(f"cifar10:{tmp_path / 'ok'}")
    assert len(train_arrays.labels) == 50 and len(val_arrays.labels) == 10
    _write_cifar(tmp_path / "bad", bad_label_in="data_batch_3")
    with pytest.raises(DataError, match=f"CIFAR batch {tmp_path / 'bad' / 'data_batch_3'}: label 10 at index 7"):
        load_dataset(f"cifar10:{tmp_path / 'bad'}")
    train_arrays, _ = load_dataset(f"cifar10:{tmp_path / 'bad'}", skip_bad=True)
    assert len(train_arrays.labels) == 49 and train_arrays.labels.max() == 9
    assert train_arrays.skipped == [f"{tmp_path / 'bad' / 'data_batch_3'}: 1 sample(s)"]
    (tmp_path / "bad" / "data_batch_4").write_bytes((tmp_path / "bad" / "data_batch_4").read_bytes()[:500])
    with pytest.raises(DataError, match=f"cannot read CIFAR batch {tmp_path / 'bad' / 'data_batch_4'}"):
        load_dataset(f"cifar10:{tmp_path / 'bad'}", skip_bad=True)


# ------------------------------------------------------------------------------------------- training faults


def _cli_args(tmp_path: Path, out: Path, epochs: int) -> list[str]:
    kwargs = json.dumps(dict(dims=[8, 8, 16, 16], depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2], head_dim=8))
    return ["train", "--model", "container_light", "--data", "digits", "--img-size", "16", "--batch-size", "32",
            "--epochs", str(epochs), "--fraction", "0.5", "--recipe", "light", "--model-kwargs", kwargs,
            "--output", str(out)]


def test_a_run_killed_mid_epoch_keeps_an_intact_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "ctxagg.cli", *_cli_args(tmp_path, out, epochs=3)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.safetensors").exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.02)
        time.sleep(0.3)  # the second epoch is running
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    tensors, meta = load_checkpoint(out / "last.safetensors")  # SHA-256 verified: intact, not just parseable
    done = meta["epoch"]
    assert 0 <= done < 2 and len(meta["history"]) == done + 1
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())
    model = build_model(TrainConfig.from_json(meta["config"]), meta["num_classes"])
    load_model_weights(model, out / "last.safetensors")

    resumed = subprocess.run([sys.executable, "-m", "ctxagg.cli", *_cli_args(tmp_path, out, epochs=3), "--resume",
                              str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"epoch {done + 2}:" in resumed.stdout and f"epoch {done + 1}:" not in resumed.stdout  # continued
    tensors2, meta2 = load_checkpoint(out / "last.safetensors")
    assert meta2["epoch"] == 2 and [h["epoch"] for h in meta2["history"]] == [0, 1, 2]
    assert meta2["history"][: done + 1] == meta["history"]  # the finished epochs are kept as they were
    assert not list(out.glob(".*.tmp"))  # a temp file a kill may leave is cleaned up on resume


class _PoisonLoss:
    """Make the training loss NaN at the given 0-based training forward passes."""

    def __init__(self, monkeypatch, at):
        self.at, self.calls = set(at), 0
        real = engine.build_model

        def build(cfg, num_classes):
            model = real(cfg, num_classes)
            model.register_forward_hook(self.hook)
            return model

        monkeypatch.setattr(engine, "build_model", build)

    def hook(self, module, args, output):
        if not module.training:
            return None
        self.calls += 1
        return output * float("nan") if self.calls - 1 in self.at else None


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_epoch(tmp_path, monkeypatch):
    _PoisonLoss(monkeypatch, at={6, 9})  # 4 steps per epoch: epoch 1, batch 2
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at epoch 1, batch 2 \(step 6, lr .*\); "
                                                 r"stopping.*--skip-nonfinite"):
        train(_cfg(tmp_path, epochs=3), progress=False)
    tensors, meta = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert meta["epoch"] == 0 and all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    # what the message advises works on resume too: --skip-nonfinite is honoured, the next bad step is skipped
    resumed = train(_cfg(tmp_path, epochs=3, skip_nonfinite=True), resume=str(tmp_path / "run"), progress=False)
    assert [h["skipped_steps"] for h in resumed.history] == [0, 1, 0] and resumed.history[-1]["steps"] == 11


def test_skip_nonfinite_skips_and_counts_the_step(tmp_path, monkeypatch, caplog):
    _PoisonLoss(monkeypatch, at={1, 6})
    with caplog.at_level(logging.WARNING, "ctxagg.train"):
        result = train(_cfg(tmp_path, skip_nonfinite=True), progress=False)
    assert [h["skipped_steps"] for h in result.history] == [1, 1] and result.history[-1]["steps"] == 6
    assert "non-finite loss nan at epoch 0, batch 1 (step 1" in caplog.text and "step skipped" in caplog.text
    tensors, _ = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    assert "skipped_steps" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]


def test_skip_nonfinite_still_stops_when_every_step_is_non_finite(tmp_path, monkeypatch):
    _PoisonLoss(monkeypatch, at=range(100))
    with pytest.raises(NonFiniteLossError, match="every one of the 4 steps of epoch 0 had a non-finite loss"):
        train(_cfg(tmp_path, skip_nonfinite=True), progress=False)
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_weights_that_became_non_finite_are_never_saved(tmp_path, monkeypatch):
    real = engine.create_optimizer_v2

    def create(model, *a, **k):  # the epoch's last optimiser step corrupts a weight (finite losses, Inf model)
        optimizer = real(model, *a, **k)
        head, steps = model.head.weight, []

        def corrupt(opt, args, kwargs):
            steps.append(1)
            if len(steps) == 4:
                head.data.fill_(float("inf"))

        optimizer.register_step_post_hook(corrupt)
        return optimizer

    monkeypatch.setattr(engine, "create_optimizer_v2", create)
    with pytest.raises(NonFiniteLossError, match="model weights became non-finite during epoch 0 .*head.weight"):
        train(_cfg(tmp_path, epochs=1), progress=False)
    assert not (tmp_path / "run" / "last.safetensors").exists()
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------------- CLI


def _cli(argv, capsys) -> tuple[int, str]:
    from ctxagg.cli import main
    try:
        code = main(argv)
    except SystemExit as exc:
        return 1, str(exc)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["train", "--model", "container_lite"],
    ["eval", "--checkpoint", "missing.safetensors", "--model", "container_lite"],
    ["compare", "--models", "container_light,container_lite", "--output", "unused"],
    ["bench", "throughput", "--models", "container_lite", "--output", "unused"],
    ["bench", "deploy", "--models", "container_lite", "--output", "unused"],
    ["inspect", "--model", "container_lite", "--image", "unused.png", "--output", "unused"],
    ["export", "--model", "container_lite", "--output", "unused.onnx"],
])
def test_unknown_model_names_suggest_the_nearest_for_every_subcommand(argv, capsys):
    code, err = _cli(argv, capsys)
    assert code != 0 and "unknown model 'container_lite'. Did you mean: container_light" in err


def test_invalid_settings_fail_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    for extra, message in [
        (["--workers", "-1"], "--workers must be 0 or more, got -1"),
        (["--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
        (["--opt", "adamz"], "unknown --opt 'adamz'"),
        (["--max-steps", "0"], "--max-steps must be at least 1"),
        (["--model-kwargs", "[1, 2]"], "--model-kwargs must be a JSON object"),
        (["--resume", str(tmp_path / "nothing")], f"--resume {tmp_path / 'nothing'} does not exist"),
        (["--resume", str(tmp_path)], f"--resume {tmp_path}: no last.safetensors in that folder"),
    ]:
        code, err = _cli(["train", "--output", str(out), *extra], capsys)
        assert code == 2 and message in err, (extra, err)
        assert not out.exists()  # nothing was started
    weights_only = tmp_path / "model.safetensors"
    save_checkpoint(weights_only, {"model.x": torch.zeros(1)}, dict(config=TrainConfig().to_json(), epoch=0))
    code, err = _cli(["train", "--output", str(out), "--resume", str(weights_only)], capsys)
    assert code == 2 and "is not a resumable training state" in err
    file_as_output = tmp_path / "a_file"
    file_as_output.write_text("keep me")
    code, err = _cli(["train", "--output", str(file_as_output)], capsys)
    assert code == 2 and f"--output {file_as_output} exists and is not a folder" in err
    assert file_as_output.read_text() == "keep me"


# ------------------------------------------------------------------------------ run folders (issue 22)


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


RUN_FILES = ("config.json", "metrics.csv", "curves.png", "last.safetensors", "model.safetensors",
             "model_best.safetensors")


def test_two_default_runs_leave_two_complete_folders_and_latest_points_to_the_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = train(_cfg(tmp_path, output=None, epochs=1, max_steps=2), progress=False)
    kept = _files(first.output)
    second = train(_cfg(tmp_path, output=None, epochs=1, max_steps=1, img_size=17), progress=False)
    assert first.output != second.output and first.output.parent == second.output.parent == Path("runs")
    assert first.output.name.startswith("container_light-digits-20")
    for run in (first.output, second.output):
        assert all((run / name).stat().st_size > 0 for name in RUN_FILES), sorted(os.listdir(run))
    assert _files(first.output) == kept  # the first run is untouched, byte for byte
    latest = Path("runs/latest")
    assert latest.is_symlink() and latest.resolve() == second.output.resolve()
    assert load_checkpoint(latest / "model_best.safetensors")[1]["config"]["img_size"] == 17
    assert load_checkpoint(first.output / "model_best.safetensors")[1]["config"]["img_size"] == 16
    # the README's `--resume runs/latest` continues the newest run in its own folder
    resumed = train(_cfg(tmp_path, output=None, epochs=2, img_size=17), resume="runs/latest", progress=False)
    assert resumed.output.resolve() == second.output.resolve() and len(resumed.history) == 2
    assert sorted(p.name for p in Path("runs").iterdir()) == sorted([first.output.name, second.output.name, "latest"])


def test_an_explicit_output_holding_a_run_is_refused_naming_it_and_nothing_changes(tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(tmp_path, epochs=1, max_steps=2), progress=False)
    before = _files(out)
    best = max(h["val_top1"] for h in load_checkpoint(out / "last.safetensors")[1]["history"])
    argv = _cli_args(tmp_path, out, epochs=1)
    code, err = _cli(argv, capsys)
    assert code == 2, err
    assert f"--output {out} already holds a container_light run on digits (1 of 1 epochs done, best val top-1 " \
           f"{best:.2f}%); nothing was changed" in err
    assert f"--resume {out} to continue it" in err and "--overwrite to replace it" in err
    assert _files(out) == before  # byte-identical, not even rewritten
    code, err = _cli([*argv, "--overwrite", "--max-steps", "1"], capsys)
    assert code == 0, err
    _, meta = load_checkpoint(out / "last.safetensors")
    assert meta["history"][0]["steps"] == 1 and meta["config"]["fraction"] == 0.5  # the new run replaced it


def test_eval_inspect_bench_export_compare_never_replace_earlier_results(tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(tmp_path, epochs=1, max_steps=1), progress=False)
    from ctxagg.train.evaluate import evaluate_checkpoint
    first = evaluate_checkpoint(str(out), batch_size=256)
    second = evaluate_checkpoint(str(out), batch_size=256)
    assert (Path(first["output"]).name, Path(second["output"]).name) == ("eval-val", "eval-val-1")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "bench.json").write_text("earlier results")
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    export_file = tmp_path / "model.onnx"
    export_file.write_text("earlier export")
    for argv in (["eval", "--checkpoint", str(out), "--output", str(taken)],
                 ["inspect", "--checkpoint", str(out), "--image", str(image), "--output", str(taken)],
                 ["bench", "throughput", "--models", "container_light", "--output", str(taken)],
                 ["bench", "sweep", "--output", str(taken)], ["bench", "deploy", "--output", str(taken)],
                 ["compare", "--models", "container_light", "--output", str(taken)],
                 ["export", "--checkpoint", str(out), "--output", str(export_file)]):
        code, err = _cli(argv, capsys)
        assert code == 2 and "nothing was changed" in err and "--overwrite" in err, (argv, err)
    assert (taken / "bench.json").read_text() == "earlier results" and sorted(os.listdir(taken)) == ["bench.json"]
    assert export_file.read_text() == "earlier export"
    code, err = _cli(["inspect", "--checkpoint", str(out), "--image", str(image), "--output", str(taken),
                      "--overwrite"], capsys)
    assert code == 0 and (taken / "inspect.json").is_file() and (taken / "bench.json").is_file()


# ---------------------------------------------------------------------------------------- CLI error policy


def test_library_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from ctxagg.cli import main
    from ctxagg.errors import ConfigError
    from ctxagg.train import evaluate as evaluate_module

    def refuse(*args, **kwargs):
        raise ConfigError("what was wrong, and what is allowed")

    monkeypatch.setattr(evaluate_module, "evaluate_checkpoint", refuse)
    assert main(["eval", "--checkpoint", "x"]) == 2
    assert capsys.readouterr().err == "error: what was wrong, and what is allowed\n"
    for argv, env in ((["--debug", "eval", "--checkpoint", "x"], "0"), (["eval", "--checkpoint", "x", "--debug"], ""),
                      (["eval", "--checkpoint", "x"], "1")):
        monkeypatch.setenv("CTXAGG_DEBUG", env)
        with pytest.raises(ConfigError, match="what was wrong"):  # the traceback, on request
            main(argv)
    monkeypatch.delenv("CTXAGG_DEBUG")

    def bug(*args, **kwargs):  # a ValueError/RuntimeError from inside torch is a bug, not bad input
        raise ValueError("Expected all tensors to be on the same device")

    monkeypatch.setattr(evaluate_module, "evaluate_checkpoint", bug)
    with pytest.raises(ValueError, match="same device"):
        main(["eval", "--checkpoint", "x"])


def test_old_bench_flags_get_a_message_naming_the_new_subcommand(capsys):
    from ctxagg.cli import main
    for argv, tool in ((["bench", "--sweep", "resolution"], "sweep"), (["bench", "--compare-eager"], "deploy"),
                       (["bench", "--models", "container_light", "--out", "x"], "throughput")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "ctxagg bench {throughput,sweep,deploy,dense,train}" in err, err
        assert f"use `ctxagg bench {tool} ...`" in err, err


def test_out_is_an_alias_of_output_with_a_note(tmp_path, capsys):
    from ctxagg.cli import build_parser
    args = build_parser().parse_args(["inspect", "--model", "container_light", "--image", "x.png", "--out", "d"])
    assert args.output == "d" and "note: --out is deprecated; use --output" in capsys.readouterr().err
    args = build_parser().parse_args(["bench", "sweep", "--output", "e"])
    assert args.output == "e" and args.tool == "sweep" and args.batch_size == 16


def test_python_m_ctxagg_is_the_ctxagg_command():
    done = subprocess.run([sys.executable, "-m", "ctxagg", "train", "--model", "container_lite"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "unknown model 'container_lite'. Did you mean: container_light" in done.stderr
    assert done.stderr.count("\n") == 1  # one line, no traceback
