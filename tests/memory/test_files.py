# SPDX-License-Identifier: Apache-2.0
"""Atomic saves reach the disk: the new content is synced before the rename and the folder after it."""

from __future__ import annotations

import os

from mrad_hf.memory import files


def _record_fsyncs(monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    return synced


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    synced = _record_fsyncs(monkeypatch)
    target = tmp_path / "scores.json"
    files.atomic_write(target, lambda tmp: open(tmp, "w").write("{}"))
    assert target.read_text() == "{}"
    assert synced[0].endswith(".tmp") and ".scores.json." in synced[0]  # the staged file, before the rename
    assert synced[-1] == str(tmp_path)  # the folder entry of the renamed file


def test_atomic_directory_syncs_every_file_and_the_parent(tmp_path, monkeypatch):
    synced = _record_fsyncs(monkeypatch)
    with files.atomic_directory(tmp_path / "model") as staging:
        (staging / "config.json").write_text("{}")
        (staging / "model.safetensors").write_bytes(b"x")
    assert sum(path.endswith(("config.json", "model.safetensors")) for path in synced) == 2
    assert synced[-1] == str(tmp_path) and sorted(os.listdir(tmp_path)) == ["model"]


def test_save_model_into_an_existing_folder_syncs_each_moved_file(tmp_path, monkeypatch):
    class Saver:
        def save_pretrained(self, folder, **kwargs):
            for name in ("model.safetensors", "config.json"):
                (folder / name).write_text(name)

    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("the user's")
    synced = _record_fsyncs(monkeypatch)
    files.save_model(Saver(), target)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "notes.txt"]
    staged = [path for path in synced if path.endswith(("model.safetensors", "config.json")) and ".staging" in path]
    assert len(staged) == 2 and synced.count(str(target)) == 2  # each file before its move, the folder after it
