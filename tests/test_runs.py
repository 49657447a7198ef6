"""Run folders (issue 22): unique per run, `latest` pointer, existing results refused unless --overwrite."""
import os
import threading
from pathlib import Path

import pytest

from ctxagg import runs
from ctxagg.errors import CtxaggError, RunExistsError
from ctxagg.runs import (POINTER_MAGIC, data_tag, describe_run, new_run_dir, refuse_existing, resolve_run_path,
                         update_latest)


def test_run_names_carry_parts_and_a_second_stamp(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "timestamp", lambda now=None: "20260102-030405")
    assert new_run_dir(tmp_path, "container_light", "digits").name == "container_light-digits-20260102-030405"
    # the same second again: a suffix, never the same folder
    assert new_run_dir(tmp_path, "container_light", "digits").name == "container_light-digits-20260102-030405-1"
    assert new_run_dir(tmp_path, "eval", "val", stamp=False).name == "eval-val"
    assert new_run_dir(tmp_path, "eval", "val", stamp=False).name == "eval-val-1"
    assert new_run_dir(tmp_path, "a b/c").name == "a-b-c-20260102-030405"


def test_concurrent_starts_in_the_same_second_get_distinct_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "timestamp", lambda now=None: "20260102-030405")
    made, barrier = [], threading.Barrier(8)

    def start():
        barrier.wait()
        made.append(new_run_dir(tmp_path, "m", "d"))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8 and all(p.is_dir() for p in made)
    assert sorted(p.name for p in made) == sorted(["m-d-20260102-030405"] + [f"m-d-20260102-030405-{i}"
                                                                             for i in range(1, 8)])


def test_data_tags():
    assert data_tag("digits") == "digits"
    assert data_tag("cifar10:/data/cifar10-jpeg") == "cifar10"
    assert data_tag("imagefolder:/data/my flowers/") == "my-flowers"


def _fake_run(folder: Path, epochs: int = 3, best: float = 96.66) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model": "container_light", "data": "digits", "epochs": 8}')
    rows = [f"{e},{best - (epochs - 1 - e)}" for e in range(epochs)]
    (folder / "metrics.csv").write_text("epoch,val_top1\n" + "\n".join(rows) + "\n")
    (folder / "last.safetensors").write_bytes(b"weights")


def test_an_existing_run_is_refused_naming_it_and_nothing_changes(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(RunExistsError) as info:
        refuse_existing(run, resumable=True, outputs=["last.safetensors"])
    message = str(info.value)
    assert f"--output {run} already holds a container_light run on digits (3 of 8 epochs done, best val top-1 " \
           "96.66%); nothing was changed" in message
    assert f"--resume {run}" in message and "--overwrite" in message
    assert isinstance(info.value, CtxaggError)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_overwrite_removes_only_what_the_command_writes(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    (run / "notes.txt").write_text("mine")
    (run / ".last.safetensors.abc.tmp").write_bytes(b"torn")
    assert refuse_existing(run, overwrite=True, outputs=["last.safetensors", "metrics.csv"]) == run
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "notes.txt"]


def test_absent_or_empty_folders_pass_and_files_are_refused(tmp_path):
    assert refuse_existing(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".x.tmp").write_text("")  # a temp file is not a result
    assert refuse_existing(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "file").write_text("keep")
    with pytest.raises(RunExistsError, match="exists and is not a folder"):
        refuse_existing(tmp_path / "file", overwrite=True)
    other = tmp_path / "bench"
    other.mkdir()
    for name in ("a.json", "b.csv", "c.png", "d.txt", "e.md"):
        (other / name).write_text("x")
    assert describe_run(other) == "5 file(s) from an earlier command (a.json, b.csv, c.png, d.txt and 1 more)"
    with pytest.raises(RunExistsError, match=r"Use another --out or --overwrite to replace it$"):
        refuse_existing(other, flag="--out")


def test_latest_is_a_symlink_to_the_newest_and_an_old_latest_folder_is_moved_not_lost(tmp_path):
    old = tmp_path / "latest"
    _fake_run(old)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    update_latest(tmp_path, a)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("latest-moved-")]
    assert len(moved) == 1 and (moved[0] / "last.safetensors").read_bytes() == b"weights"
    assert os.readlink(tmp_path / "latest") == "a"
    update_latest(tmp_path, b)
    assert os.readlink(tmp_path / "latest") == "b" and (tmp_path / "latest").resolve() == b.resolve()


def test_latest_falls_back_to_a_pointer_file_that_paths_follow(tmp_path, monkeypatch):
    def no_symlinks(*args, **kwargs):
        raise OSError("symlinks are not supported here")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    run = tmp_path / "runs" / "m-d-1"
    run.mkdir(parents=True)
    (run / "model_best.safetensors").write_text("w")
    update_latest(tmp_path / "runs", run)
    latest = tmp_path / "runs" / "latest"
    assert latest.is_file() and latest.read_text().splitlines() == [POINTER_MAGIC, "m-d-1"]
    assert resolve_run_path(latest / "model_best.safetensors") == run / "model_best.safetensors"
    assert resolve_run_path(latest) == run
    assert resolve_run_path(tmp_path / "elsewhere" / "x") == tmp_path / "elsewhere" / "x"
