# SPDX-License-Identifier: Apache-2.0
"""Saves are whole, single-writer, tidy and honour the umask (issue 13 §5).

`build-bank --save-model` writes the model before the bank, so a model save that fails (disk full) leaves the old bank
and the old model both as they were; a second concurrent writer of the same bank or model folder is refused by a
kernel lock; what a killed `atomic_directory` save left (staging folder, set-aside previous folder) is cleaned on the
next save; saved files and folders get the mode the umask says (mkstemp/mkdtemp alone give 0600 / 0700)."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from conftest import make_samples, make_tiny_model

from mrad_hf import MemoryBank, MRADForAnomalyDetection
from mrad_hf.cli.main import main
from mrad_hf.memory import load_bank, save_bank
from mrad_hf.memory.files import MODEL_FOLDER, FolderKind, atomic_directory
from mrad_hf.tools.run_folder import RunFolderError, writer_lock
from reliability._files import write_folder_dataset

ANY_FOLDER = FolderKind("a test folder", lambda folder: True, ("*",))  # every file is a previous output


@pytest.fixture
def setup(tmp_path):
    data = write_folder_dataset(tmp_path / "widget", make_samples(6, seed=61))
    make_tiny_model().save_pretrained(tmp_path / "tiny")
    command = [
        "build-bank",
        "--model",
        str(tmp_path / "tiny"),
        "--dataset",
        "folder",
        "--data-root",
        str(data),
        "--output",
        str(tmp_path / "bank.safetensors"),
        "--save-model",
        str(tmp_path / "model"),
        "--batch-size",
        "4",
    ]
    return tmp_path, command


def _tree(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_failed_model_save_leaves_the_old_bank_and_model(setup, monkeypatch, capsys):
    tmp_path, command = setup
    assert main(command) == 0
    bank_before, model_before = (tmp_path / "bank.safetensors").read_bytes(), _tree(tmp_path / "model")

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MRADForAnomalyDetection, "save_pretrained", disk_full)
    assert main(command[:-2] + ["--batch-size", "2"]) == 2  # another bank (other batch size), the save fails
    assert "No space left on device" in capsys.readouterr().err
    assert (tmp_path / "bank.safetensors").read_bytes() == bank_before  # not a new bank beside the old model
    assert _tree(tmp_path / "model") == model_before
    assert (
        sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model.") and not p.name.endswith(".lock"))
        == []
    )


def test_a_second_writer_is_refused(setup, capsys):
    tmp_path, command = setup
    with writer_lock(tmp_path / "model", "the model folder"):  # what a concurrent build-bank to the same output holds
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"Another mrad process (pid {os.getpid()}) is writing the model folder '{tmp_path / 'model'}'" in err
        assert not (tmp_path / "bank.safetensors").exists()
        with pytest.raises(RunFolderError, match="is writing the bank"):
            with writer_lock(tmp_path / "model", "the bank"):
                pass
    assert main(command) == 0  # released with its holder (the kernel releases it even after kill -9)
    assert load_bank(tmp_path / "bank.safetensors").counts()["image_entries"] == 6


def test_crashed_staging_folders_are_cleaned_on_the_next_save(tmp_path):
    target = tmp_path / "model"
    dead_pid = 2**22 + 17  # above Linux's pid_max: no such process
    stale = tmp_path / f".model.{dead_pid}.abcd1234.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    live = tmp_path / f".model.{os.getpid()}.live0000.tmp"  # a save in progress in a live process: kept
    live.mkdir()
    set_aside = tmp_path / ".model.old-xyz"  # a swap that died after moving the previous folder aside
    set_aside.mkdir()
    (set_aside / "config.json").write_text("{}")
    with atomic_directory(target, ANY_FOLDER) as staging:
        (staging / "config.json").write_text('{"new": true}')
    assert not stale.exists() and live.exists()
    assert (target / "config.json").read_text() == '{"new": true}'  # the set-aside folder was put back, then replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name])
    set_aside.mkdir()
    with atomic_directory(target, ANY_FOLDER) as staging:  # with `model` present, a leftover old folder is removed
        (staging / "config.json").write_text("{}")
    assert not set_aside.exists()


@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)]
)
def test_saved_files_and_folders_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        bank = MemoryBank(
            image_keys=torch.eye(2, 4),
            image_values=torch.eye(2),
            patch_keys=torch.eye(2, 4),
            patch_values=torch.eye(2),
        )
        path = save_bank(bank, tmp_path / "bank.safetensors")
        with atomic_directory(tmp_path / "folder", MODEL_FOLDER) as staging:
            (staging / "a.txt").write_text("x")
        with atomic_directory(tmp_path / "model", MODEL_FOLDER) as staging:
            make_tiny_model().save_pretrained(staging)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == dir_mode
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "model").iterdir()} == {
        file_mode
    }  # model.safetensors too
