# SPDX-License-Identifier: Apache-2.0
"""Integrity of memory banks and saved models: foreign, edited, corrupted, truncated, future or half-written
artefacts are refused with a message naming the file and the fix, and interrupted writes leave nothing that loads."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch
from conftest import TINY_IMAGE_SIZE, make_samples, make_tiny_model
from safetensors.torch import load_file, save_file

import mrad_hf.memory.files as bank_files
import mrad_hf.models.mrad.memory_bank_mrad as memory_bank_module
from mrad_hf import MemoryBankError, MRADForAnomalyDetection
from mrad_hf.cli.main import main
from mrad_hf.memory import build_memory_bank, load_bank, save_bank
from mrad_hf.memory.files import MODEL_FOLDER, atomic_directory
from mrad_hf.models.mrad.memory_bank_mrad import tensors_checksum, verify_model_memory

from ._files import mutate, write_folder_dataset


@pytest.fixture(scope="module")
def built():
    """A tiny model, the bank it built (not attached) and the bank's bytes on disk."""
    model = make_tiny_model()
    bank = build_memory_bank(model, make_samples(6), progress=False, source="integrity")
    return model, bank


@pytest.fixture
def bank_file(built, tmp_path):
    return save_bank(built[1], tmp_path / "bank.safetensors")


def _rewrite(path, edit):
    """Load the raw tensors and header of a bank file, let `edit(tensors, metadata)` change them, write them back."""
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    metadata = json.loads(header["mrad_memory_bank"])
    edit(tensors, metadata)
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    save_file(tensors, str(path), metadata={"mrad_memory_bank": json.dumps(metadata), "format": "pt"})
    return path


def test_bank_metadata_records_what_loading_checks(built, bank_file):
    model, bank = built
    metadata = load_bank(bank_file).metadata
    assert metadata["format_version"] == memory_bank_module.BANK_FORMAT_VERSION
    assert metadata["backbone"] == model.backbone_fingerprint()
    assert metadata["backbone"]["projection_dim"] == 24 and metadata["backbone"]["hidden_size"] == 48
    assert metadata["features"]["image_size"] == TINY_IMAGE_SIZE
    assert metadata["label_convention"].startswith("values[:, 0] = normal")
    assert metadata["counts"] == {
        "image_entries": 6,
        "image_normal": 3,
        "image_anomalous": 3,
        "patch_entries": 9,
        "patch_normal": 6,
        "patch_anomalous": 3,
    }
    assert metadata["tensors_sha256"] == tensors_checksum(bank.tensors())


def test_bank_from_another_backbone_is_refused(bank_file, tmp_path, capsys):
    other = make_tiny_model(seed=1)  # same architecture, other weights
    with pytest.raises(MemoryBankError, match="weights signature.*different CLIP weights.*Rebuild the bank"):
        other.set_memory_bank(load_bank(bank_file))
    other.save_pretrained(tmp_path / "other")
    image = tmp_path / "query.png"
    from PIL import Image

    Image.fromarray(make_samples(1, seed=3)[0]["image"]).save(image)
    code = main(
        [
            "predict",
            "--model",
            str(tmp_path / "other"),
            "--bank",
            str(bank_file),
            str(image),
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mrad predict: error:")]
    assert code == 2 and len(lines) == 1 and "weights signature" in lines[0]


def test_bank_with_another_input_size_is_refused(bank_file):
    same_weights_other_size = make_tiny_model(seed=0, image_size=56)
    with pytest.raises(MemoryBankError, match=r"feature setting image_size: bank 112 vs model 56"):
        same_weights_other_size.set_memory_bank(load_bank(bank_file))


@pytest.mark.parametrize("keep", [0, 7, 8, 100, -1])
def test_truncated_bank_is_refused_naming_the_file(bank_file, keep):
    data = bank_file.read_bytes()
    bank_file.write_bytes(data[: keep if keep >= 0 else len(data) - 1])
    with pytest.raises(MemoryBankError, match=r"bank\.safetensors"):
        load_bank(bank_file)


def test_flipped_data_byte_is_caught_by_the_checksum(bank_file):
    data = bytearray(bank_file.read_bytes())
    header_length = struct.unpack("<Q", data[:8])[0]
    start, _ = json.loads(data[8 : 8 + header_length])["image_keys"]["data_offsets"]
    data[8 + header_length + start + 5] ^= 0x10  # inside image_keys' float data: still a valid safetensors file
    bank_file.write_bytes(bytes(data))
    with pytest.raises(MemoryBankError, match=r"bank\.safetensors' is corrupt: its tensors do not match the SHA-256"):
        load_bank(bank_file)


def test_edited_tensors_with_inconsistent_shapes_are_refused(bank_file):
    _rewrite(bank_file, lambda tensors, metadata: tensors.update(image_values=tensors["image_values"][:4]))
    with pytest.raises(MemoryBankError, match=r"bank\.safetensors': image_values has 4 rows but its keys have 6"):
        load_bank(bank_file)


def test_edited_consistent_tensors_are_caught_by_the_checksum(bank_file):
    _rewrite(bank_file, lambda tensors, metadata: tensors.update(image_keys=tensors["image_keys"].flip(0)))
    with pytest.raises(MemoryBankError, match="do not match the SHA-256"):
        load_bank(bank_file)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, m: t.update(image_values=t["image_values"] * 0.5), "one-hot 0/1 rows"),
        (lambda t, m: t.update(patch_keys=t["patch_keys"].long()), "patch_keys must be floating point"),
        # a format-1 bank without a checksum (as written before checksums existed) is still checked for key widths
        (
            lambda t, m: (
                t.update(image_keys=torch.nn.functional.normalize(t["image_keys"][:, :5], dim=1)),
                m.pop("tensors_sha256"),
                m.update(format_version=1),
            ),
            r"image keys are 5-d",
        ),
        (lambda t, m: m.update(format_version=99), "uses bank format 99; this mrad_hf reads up to 2. Upgrade mrad_hf"),
        (lambda t, m: m.update(format_version="1"), "invalid format_version"),
    ],
    ids=["soft-values", "integer-keys", "narrower-keys", "future-version", "string-version"],
)
def test_other_edits_are_refused(built, bank_file, edit, message):
    _rewrite(bank_file, edit)
    with pytest.raises(MemoryBankError, match=message):
        built[0].set_memory_bank(load_bank(bank_file))


def test_mutated_bank_files_never_load_as_a_different_bank(built, bank_file):
    """200 random corruptions: each is refused, or (a harmless byte, e.g. header padding) loads bit-identical."""
    original = bank_file.read_bytes()
    reference = built[1].tensors()
    rng = np.random.default_rng(21)
    refused = 0
    for _ in range(200):
        bank_file.write_bytes(mutate(original, rng))
        try:
            loaded = load_bank(bank_file)
        except MemoryBankError as error:
            assert "bank.safetensors" in str(error)
            refused += 1
            continue
        for name, tensor in reference.items():
            assert torch.equal(getattr(loaded, name), tensor), name
    assert refused >= 150


def test_killed_bank_build_leaves_no_loadable_partial_file(tmp_path, monkeypatch, capsys):
    """`mrad build-bank` killed while writing: the existing bank is intact and no temporary file is left."""
    root = write_folder_dataset(tmp_path / "data" / "widget", make_samples(4, seed=2))
    model_dir = tmp_path / "model"
    make_tiny_model().save_pretrained(model_dir)
    output = tmp_path / "banks" / "bank.safetensors"
    args = [
        "build-bank",
        "--model",
        str(model_dir),
        "--dataset",
        "folder",
        "--data-root",
        str(root),
        "--output",
        str(output),
    ]
    assert main(args) == 0
    before = output.read_bytes()
    real_save_file = bank_files.save_file

    def dies_half_way(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # half the file is on disk when the process is killed
            handle.truncate(len(open(filename, "rb").read()) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(bank_files, "save_file", dies_half_way)
    assert main(args) == 130  # interrupted
    assert output.read_bytes() == before and load_bank(output).counts()["image_entries"] == 4
    assert sorted(p.name for p in output.parent.iterdir()) == ["bank.safetensors"]
    fresh = tmp_path / "banks" / "new.safetensors"
    monkeypatch.setattr(bank_files, "save_file", dies_half_way)
    assert main(args[:-1] + [str(fresh)]) == 130
    assert not fresh.exists() and sorted(p.name for p in output.parent.iterdir()) == ["bank.safetensors"]


def test_interrupted_model_save_leaves_the_previous_folder_loadable(built, tmp_path, monkeypatch):
    model, _ = built
    target = tmp_path / "model"
    with atomic_directory(target, MODEL_FOLDER) as staging:
        model.save_pretrained(staging)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    other = make_tiny_model()
    build_memory_bank(other, make_samples(6, seed=5), progress=False)

    from mrad_hf import MRADImageProcessor

    def fails_after_the_weights(self, *args, **kwargs):  # weights and config are written, the processor is not
        raise OSError("disk full")

    monkeypatch.setattr(MRADImageProcessor, "save_pretrained", fails_after_the_weights)
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(target, MODEL_FOLDER) as staging:
            other.save_pretrained(staging)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left behind
    loaded = MRADForAnomalyDetection.from_pretrained(target)
    verify_model_memory(loaded)
    assert torch.equal(loaded.memory.image_keys, model.memory.image_keys)


def test_model_folder_mixing_two_saves_is_refused(built, tmp_path, capsys):
    """memory_bank.json of one save with model.safetensors of another (same bank sizes): transformers would load it;
    from_pretrained refuses it (it runs verify_model_memory), and so does the CLI."""
    model, _ = built
    other = make_tiny_model()
    build_memory_bank(other, make_samples(6, seed=5), progress=False)
    assert other.config.patch_bank_size == model.config.patch_bank_size  # same shapes: transformers cannot tell
    model.save_pretrained(tmp_path / "a")
    other.save_pretrained(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "memory_bank.json", tmp_path / "a" / "memory_bank.json")  # the bank's one sidecar
    with pytest.raises(MemoryBankError, match="is corrupt: its tensors do not match the SHA-256 recorded"):
        MRADForAnomalyDetection.from_pretrained(tmp_path / "a")
    code = main(["predict", "--model", str(tmp_path / "a"), str(tmp_path), "--output-dir", str(tmp_path / "out")])
    assert code == 2 and "different saves" in capsys.readouterr().err
    verify_model_memory(MRADForAnomalyDetection.from_pretrained(tmp_path / "b"))  # an intact folder passes
