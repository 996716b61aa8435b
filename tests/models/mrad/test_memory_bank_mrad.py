# SPDX-License-Identifier: Apache-2.0
"""Memory bank artefact: round trip, validation, atomic writes, clear errors for broken files."""

import pytest
import torch
from safetensors.torch import save_file

from mrad_hf.models.mrad.memory_bank_mrad import BANK_FORMAT_VERSION, MemoryBank, MemoryBankError
from mrad_hf.models.mrad.retrieval_mrad import l2_normalize, one_hot_labels


def _bank(n_image=5, n_patch=7):
    generator = torch.Generator().manual_seed(0)
    return MemoryBank(
        image_keys=l2_normalize(torch.randn(n_image, 8, generator=generator)),
        image_values=one_hot_labels(torch.tensor([0, 1, 0, 1, 1][:n_image])),
        patch_keys=l2_normalize(torch.randn(n_patch, 12, generator=generator)),
        patch_values=one_hot_labels(torch.tensor([1, 0, 0, 1, 0, 0, 0][:n_patch])),
        patch_sources=torch.arange(n_patch) % n_image,
        metadata={"source": "unit", "image_ids": [f"a{i}" for i in range(n_image)]},
    )


def test_round_trip_bit_exact(tmp_path):
    bank = _bank()
    path = bank.save(tmp_path / "bank.safetensors")
    loaded = MemoryBank.load(path)
    for name, tensor in bank.tensors().items():
        assert torch.equal(tensor, getattr(loaded, name)), name
    assert loaded.metadata["source"] == "unit" and loaded.metadata["format_version"] == BANK_FORMAT_VERSION
    assert loaded.counts() == {
        "image_entries": 5, "image_normal": 2, "image_anomalous": 3,
        "patch_entries": 7, "patch_normal": 5, "patch_anomalous": 2,
    }
    assert "image=5 x 8 (3 anomalous)" in repr(loaded)


def test_directory_path_resolves_to_default_name(tmp_path):
    _bank().save(tmp_path)
    assert (tmp_path / "memory_bank.safetensors").exists()
    assert MemoryBank.load(tmp_path).counts()["patch_entries"] == 7


def test_validation_errors():
    bank = _bank()
    with pytest.raises(MemoryBankError, match="image_values must be"):
        MemoryBank(bank.image_keys, torch.zeros(5, 3), bank.patch_keys, bank.patch_values)
    with pytest.raises(MemoryBankError, match="has 4 rows but its keys have 7"):
        MemoryBank(bank.image_keys, bank.image_values, bank.patch_keys, bank.patch_values[:4])
    with pytest.raises(MemoryBankError, match="NaN"):
        MemoryBank(bank.image_keys * float("nan"), bank.image_values, bank.patch_keys, bank.patch_values)


def test_broken_files_are_refused_with_the_file_name(tmp_path):
    with pytest.raises(MemoryBankError, match="does not exist"):
        MemoryBank.load(tmp_path / "nothing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(MemoryBankError, match="garbage.safetensors.*not a readable safetensors"):
        MemoryBank.load(garbage)
    path = _bank().save(tmp_path / "bank.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(MemoryBankError, match="truncated.safetensors"):
        MemoryBank.load(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(MemoryBankError, match="not an MRAD memory bank"):
        MemoryBank.load(foreign)


def test_interrupted_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = _bank().save(tmp_path / "bank.safetensors")
    before = path.read_bytes()
    import mrad_hf.models.mrad.memory_bank_mrad as module

    def exploding_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(module, "save_file", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        _bank(n_patch=3).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]  # no temporary left behind


def test_checksum_tracks_every_tensor_and_ignores_metadata():
    from mrad_hf.models.mrad.memory_bank_mrad import tensors_checksum

    bank = _bank()
    assert bank.metadata["tensors_sha256"] == tensors_checksum(bank.tensors())
    assert MemoryBank(**bank.tensors(), metadata={"source": "other"}).metadata["tensors_sha256"] == bank.metadata["tensors_sha256"]
    for name in ("image_keys", "patch_keys"):
        edited = dict(bank.tensors())
        edited[name] = edited[name].clone()
        edited[name][0, 0] = torch.nextafter(edited[name][0, 0], torch.tensor(2.0))  # one ulp
        assert MemoryBank(**edited).metadata["tensors_sha256"] != bank.metadata["tensors_sha256"], name
    sources = dict(bank.tensors(), patch_sources=bank.patch_sources.flip(0))
    assert MemoryBank(**sources).metadata["tensors_sha256"] != bank.metadata["tensors_sha256"]


def test_atomic_directory_replaces_on_success_and_keeps_the_old_folder_on_error(tmp_path):
    from mrad_hf.models.mrad.memory_bank_mrad import atomic_directory

    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_directory(target) as staging:
            (staging / "a.txt").write_text("second")
            raise RuntimeError("half way")
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (target / "a.txt").read_text() == "first"
    with atomic_directory(target) as staging:
        (staging / "b.txt").write_text("third")
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folders left
