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


def _bank_file(tmp_path, edit_tensors=lambda t: None, edit_metadata=lambda m: None):
    """A saved bank whose tensors / header metadata were then edited in place (as a hostile file would be)."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from mrad_hf.models.mrad.memory_bank_mrad import MemoryBank

    keys, values = torch.eye(3, 4), torch.eye(2)
    bank = MemoryBank(keys, values[[0, 1, 1]], keys.clone(), values[[1, 0, 0]], metadata={"source": "unit"})
    path = files.save_bank(bank, tmp_path / "bank.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["mrad_memory_bank"])
    edit_tensors(tensors)
    edit_metadata(metadata)
    save_file(tensors, str(path), metadata={"mrad_memory_bank": json.dumps(metadata), "format": "pt"})
    return path


def test_load_bank_names_the_file_for_metadata_nested_too_deeply_to_parse(tmp_path):
    import json

    import pytest
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from mrad_hf.models.mrad.memory_bank_mrad import MemoryBankError

    path = _bank_file(tmp_path)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["mrad_memory_bank"])
    nested = json.dumps(metadata)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    save_file(tensors, str(path), metadata={"mrad_memory_bank": nested, "format": "pt"})
    with pytest.raises(MemoryBankError, match=r"bank\.safetensors' has corrupt bank metadata \(maximum recursion"):
        files.load_bank(path)


def test_load_bank_refuses_bool_or_integer_values_naming_the_tensor(tmp_path, capsys):
    """One-hot bool/int values pass the 0/1 test but break counting later (argmax on bool): refuse them at load,
    and the CLI prints one line naming file and tensor."""
    import pytest
    import torch

    from mrad_hf.cli.main import main
    from mrad_hf.models.mrad.memory_bank_mrad import MemoryBankError

    for name, dtype in (("image_values", torch.bool), ("patch_values", torch.int64), ("patch_sources", torch.bool)):
        path = _bank_file(tmp_path, lambda t: t.update({name: t[name].to(dtype)}), lambda m: m.pop("tensors_sha256"))
        with pytest.raises(MemoryBankError, match=rf"bank\.safetensors': {name} must be \w+.*, got {dtype}"):
            files.load_bank(path)
    path = _bank_file(tmp_path, lambda t: t.update(image_values=t["image_values"].bool()))
    assert main(["bank", "info", str(path)]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"mrad bank: error: '{path}': image_values must be floating point, got torch.bool."]


def test_load_bank_refuses_format_versions_that_are_not_integers_from_1(tmp_path):
    import pytest

    from mrad_hf.models.mrad.memory_bank_mrad import MemoryBankError

    for version in (True, 0, -5, 1.0, None):
        path = _bank_file(tmp_path, edit_metadata=lambda m: m.update(format_version=version))
        with pytest.raises(MemoryBankError, match=rf"bank\.safetensors' has an invalid format_version {version!r}"):
            files.load_bank(path)
    path = _bank_file(tmp_path, edit_metadata=lambda m: m.pop("format_version"))
    with pytest.raises(MemoryBankError, match="invalid format_version None"):
        files.load_bank(path)
    path = _bank_file(tmp_path, edit_metadata=lambda m: (m.pop("metadata_sha256"), m.update(format_version=1)))
    assert files.load_bank(path).counts()["image_anomalous"] == 2  # format 1 (no metadata seal) still reads
