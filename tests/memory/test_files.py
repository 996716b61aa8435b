# SPDX-License-Identifier: Apache-2.0
"""Atomic saves reach the disk (the new content is synced before the rename and the folder after it), and an output
never replaces what the package did not write (`FolderKind`, `check_output_folder`, `check_bank_output`)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from mrad_hf.memory import files
from mrad_hf.models.mrad.memory_bank_mrad import MemoryBank

ANY_FOLDER = files.FolderKind("a test folder", lambda folder: True, ("*",))  # every file is a previous output


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
    with files.atomic_directory(tmp_path / "model", ANY_FOLDER) as staging:
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


def test_atomic_directory_replaces_on_success_and_keeps_the_old_folder_on_error(tmp_path):
    target = tmp_path / "out"
    with files.atomic_directory(target, ANY_FOLDER) as staging:
        (staging / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError, match="half way"):
        with files.atomic_directory(target, ANY_FOLDER) as staging:
            (staging / "a.txt").write_text("second")
            raise RuntimeError("half way")
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (target / "a.txt").read_text() == "first"
    with files.atomic_directory(target, ANY_FOLDER) as staging:
        (staging / "b.txt").write_text("third")
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folders left


class _ModelSaver:
    """What `save_pretrained` of an MRAD model writes, with or without a calibration (a stand-in, instant)."""

    def __init__(self, calibrated: bool):
        self.calibrated = calibrated

    def save_pretrained(self, folder, **kwargs):
        (folder / "config.json").write_text(json.dumps({"model_type": "mrad", "calibrated": self.calibrated}))
        (folder / "model.safetensors").write_text("weights")
        if self.calibrated:
            (folder / "calibration.json").write_text("{}")


def test_a_model_save_never_overwrites_a_folder_it_did_not_write(tmp_path):
    clip = tmp_path / "clip"  # a CLIP checkpoint: config.json and model.safetensors that are not an MRAD model's
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (clip / "model.safetensors").write_text("the CLIP weights")
    before = {path.name: path.read_text() for path in clip.iterdir()}
    with pytest.raises(FileExistsError, match="is not an MRAD model folder but holds config.json, model.safetensors"):
        files.save_model(_ModelSaver(calibrated=False), clip)
    with pytest.raises(FileExistsError, match="is not an MRAD model folder"):
        with files.atomic_directory(clip, files.MODEL_FOLDER):
            raise AssertionError("refused before the work starts")
    assert {path.name: path.read_text() for path in clip.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["clip"]  # no staging folder left


def test_a_model_save_keeps_the_users_files_and_drops_the_previous_saves_stale_outputs(tmp_path):
    """Into a folder of the user's files (a dataset) the save adds its own; over a previous save, a calibration.json the
    new model does not have is removed (its thresholds belonged to the old bank), notes and subfolders stay."""
    data = tmp_path / "data"
    (data / "good").mkdir(parents=True)
    (data / "good" / "0.png").write_bytes(b"png")
    files.save_model(_ModelSaver(calibrated=True), data)
    assert sorted(os.listdir(data)) == ["calibration.json", "config.json", "good", "model.safetensors"]
    (data / "notes.txt").write_text("mine")
    files.save_model(_ModelSaver(calibrated=False), data)
    assert sorted(os.listdir(data)) == ["config.json", "good", "model.safetensors", "notes.txt"]
    assert (data / "good" / "0.png").read_bytes() == b"png" and (data / "notes.txt").read_text() == "mine"


def test_a_folder_swap_carries_the_users_files_and_inputs_over(tmp_path):
    """`atomic_directory` over a previous output: the user's files (and an input inside the folder) survive the swap,
    stale outputs do not; over a folder holding only the user's files, all of them survive."""
    target = tmp_path / "export"
    with files.atomic_directory(target, files.MODEL_FOLDER) as staging:
        _ModelSaver(calibrated=True).save_pretrained(staging)
    (target / "deploy_notes.txt").write_text("keep")
    (target / "sub").mkdir()
    (target / "sub" / "x.bin").write_bytes(b"x")
    with files.atomic_directory(target, files.MODEL_FOLDER) as staging:
        _ModelSaver(calibrated=False).save_pretrained(staging)
    assert sorted(os.listdir(target)) == ["config.json", "deploy_notes.txt", "model.safetensors", "sub"]
    assert (target / "sub" / "x.bin").read_bytes() == b"x"
    converted = tmp_path / "u4"  # `mrad convert clip u4/vit.pt u4`
    converted.mkdir()
    (converted / "vit.pt").write_bytes(b"the input checkpoint")
    with files.atomic_directory(converted, files.CLIP_FOLDER) as staging:
        (staging / "config.json").write_text(json.dumps({"model_type": "clip"}))
    assert (converted / "vit.pt").read_bytes() == b"the input checkpoint"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export", "u4"]


def _bank() -> MemoryBank:
    keys = torch.nn.functional.normalize(torch.ones(2, 4), dim=1)
    return MemoryBank(image_keys=keys, image_values=torch.eye(2), patch_keys=keys.clone(), patch_values=torch.eye(2))


def test_a_bank_is_written_only_to_a_new_path_or_over_a_bank(tmp_path):
    image = tmp_path / "000.png"
    Image.new("RGB", (4, 4)).save(image)
    original = image.read_bytes()
    with pytest.raises(FileExistsError, match="exists and is not an MRAD memory bank"):
        files.save_bank(_bank(), image)
    weights = tmp_path / "model.safetensors"  # a safetensors file, but not a bank
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(weights))
    with pytest.raises(FileExistsError, match="not an MRAD memory bank"):
        files.save_bank(_bank(), weights)
    assert image.read_bytes() == original
    path = files.save_bank(_bank(), tmp_path / "bank.safetensors")
    assert files.save_bank(_bank(), path) == path and files.load_bank(path).counts()["image_entries"] == 2


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
