# SPDX-License-Identifier: Apache-2.0
"""Memory bank artefact: round trip, validation, atomic writes, clear errors for broken files."""

import pytest
import torch
from safetensors.torch import save_file

from mrad_hf.memory import build_memory_bank, load_bank, save_bank
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
    path = save_bank(bank, tmp_path / "bank.safetensors")
    loaded = load_bank(path)
    for name, tensor in bank.tensors().items():
        assert torch.equal(tensor, getattr(loaded, name)), name
    assert loaded.metadata["source"] == "unit" and loaded.metadata["format_version"] == BANK_FORMAT_VERSION
    assert loaded.counts() == {
        "image_entries": 5,
        "image_normal": 2,
        "image_anomalous": 3,
        "patch_entries": 7,
        "patch_normal": 5,
        "patch_anomalous": 2,
    }
    assert "image=5 x 8 (3 anomalous)" in repr(loaded)


def test_directory_path_resolves_to_default_name(tmp_path):
    save_bank(_bank(), tmp_path)
    assert (tmp_path / "memory_bank.safetensors").exists()
    assert load_bank(tmp_path).counts()["patch_entries"] == 7


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
        load_bank(tmp_path / "nothing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(MemoryBankError, match="garbage.safetensors.*not a readable safetensors"):
        load_bank(garbage)
    path = save_bank(_bank(), tmp_path / "bank.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(MemoryBankError, match="truncated.safetensors"):
        load_bank(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(MemoryBankError, match="not an MRAD memory bank"):
        load_bank(foreign)


def test_interrupted_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = save_bank(_bank(), tmp_path / "bank.safetensors")
    before = path.read_bytes()
    import mrad_hf.memory.files as module

    def exploding_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(module, "save_file", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        save_bank(_bank(n_patch=3), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]  # no temporary left behind


def test_checksum_tracks_every_tensor_and_ignores_metadata():
    from mrad_hf.models.mrad.memory_bank_mrad import tensors_checksum

    bank = _bank()
    assert bank.metadata["tensors_sha256"] == tensors_checksum(bank.tensors())
    assert (
        MemoryBank(**bank.tensors(), metadata={"source": "other"}).metadata["tensors_sha256"]
        == bank.metadata["tensors_sha256"]
    )
    for name in ("image_keys", "patch_keys"):
        edited = dict(bank.tensors())
        edited[name] = edited[name].clone()
        edited[name][0, 0] = torch.nextafter(edited[name][0, 0], torch.tensor(2.0))  # one ulp
        assert MemoryBank(**edited).metadata["tensors_sha256"] != bank.metadata["tensors_sha256"], name
    sources = dict(bank.tensors(), patch_sources=bank.patch_sources.flip(0))
    assert MemoryBank(**sources).metadata["tensors_sha256"] != bank.metadata["tensors_sha256"]


def _rewrite_header(path, edit):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    metadata = json.loads(header["mrad_memory_bank"])
    edit(metadata)
    save_file(tensors, str(path), metadata={"mrad_memory_bank": json.dumps(metadata), "format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["calibration"].update(image_threshold=0.2001), "metadata field 'calibration' was edited"),
        (lambda m: m.pop("calibration"), "metadata field 'calibration' was removed"),
        (lambda m: m["features"].update(image_size=518), "metadata field 'features' was edited"),
        (lambda m: m.pop("backbone"), "metadata field 'backbone' was removed"),
        (lambda m: m.pop("metadata_sha256"), "metadata checksums .* were removed"),
        (
            lambda m: m["calibration"].update(image_threshold=float("nan")),
            r"'image_threshold' is nan; it must be a finite number",
        ),
    ],
)
def test_the_checksum_covers_the_answer_changing_metadata(tmp_path, edit, message):
    bank = _bank()
    bank.metadata.update(
        backbone={"hidden_size": 12, "projection_dim": 8, "weights_signature": [0.1] * 30},
        features={"image_size": 112},
        calibration={"image_threshold": 0.2, "pixel_threshold": 0.5},
    )
    path = save_bank(bank, tmp_path / "bank.safetensors")
    assert load_bank(path).metadata["calibration"]["image_threshold"] == 0.2  # intact: loads
    _rewrite_header(path, edit)
    with pytest.raises(MemoryBankError, match=message):
        load_bank(path)


def test_a_format_1_bank_still_loads_with_its_tensor_checksum(tmp_path):
    bank = _bank()
    path = save_bank(bank, tmp_path / "bank.safetensors")
    _rewrite_header(path, lambda m: (m.pop("metadata_sha256"), m.update(format_version=1)))
    assert load_bank(path).counts() == bank.counts()
    _rewrite_header(path, lambda m: m.update(tensors_sha256="0" * 64))
    with pytest.raises(MemoryBankError, match="tensors do not match"):
        load_bank(path)


def test_the_backbone_signature_tells_casts_from_other_weights():
    from conftest import make_tiny_model

    from mrad_hf.models.mrad.memory_bank_mrad import _signature_problem, backbone_fingerprint

    model = make_tiny_model(seed=0)
    full = backbone_fingerprint(model.clip)["weights_signature"]
    for dtype in (torch.bfloat16, torch.float16):
        cast = backbone_fingerprint(make_tiny_model(seed=0).clip.to(dtype))["weights_signature"]
        assert _signature_problem(full, cast) is None, dtype
    other = backbone_fingerprint(make_tiny_model(seed=1).clip)["weights_signature"]
    assert "different CLIP weights" in _signature_problem(full, other)


def test_a_datasets_row_that_fails_to_decode_is_a_named_error_not_a_raw_pil_error(tmp_path, tiny_model):
    """`datasets` decodes Image columns itself: a truncated file must surface as MRADInputError naming the row."""
    import datasets
    import numpy as np
    from PIL import Image

    from mrad_hf import MRADInputError

    good = tmp_path / "good.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:60])  # a PNG header and nothing else
    rows = datasets.Dataset.from_dict({"image": [str(good), str(broken)], "label": [0, 1]})
    rows = rows.cast_column("image", datasets.Image())
    with pytest.raises(MRADInputError, match=r"Sample 1 could not be read .*decode=False"):
        build_memory_bank(tiny_model, rows, progress=False, allow_no_anomalies=True)


def test_keys_that_are_not_unit_length_are_refused_naming_the_tensor_and_row():
    """The reference stores L2-normalised keys (retrieval is cosine): a scaled key would skew the softmax silently."""
    bank = _bank()
    with pytest.raises(MemoryBankError, match=r"image_keys are not unit length \(5 rows, row 0: L2 norm 10\)"):
        MemoryBank(bank.image_keys * 10, bank.image_values, bank.patch_keys, bank.patch_values)
    scaled = bank.patch_keys.clone()
    scaled[3] *= 1.01  # one prototype 1 % too long
    with pytest.raises(MemoryBankError, match=r"patch_keys are not unit length \(1 rows, row 3: L2 norm 1.01\)"):
        MemoryBank(bank.image_keys, bank.image_values, scaled, bank.patch_values)
    rounded = (bank.image_keys.double() * (1 + 1e-5)).float()  # float32/fp16 rounding of normalised keys is fine
    assert MemoryBank(rounded, bank.image_values, bank.patch_keys, bank.patch_values).counts() == bank.counts()
    assert MemoryBank(bank.image_keys.half().float(), bank.image_values, bank.patch_keys, bank.patch_values)
    views = MemoryBank(bank.image_keys[:, :0], bank.image_values, bank.patch_keys[:, :0], bank.patch_values)
    assert views.counts() == bank.counts()  # zero-width provenance views (tools.explain) carry no keys to check


@pytest.mark.parametrize("version", [True, False, 0, -5, 1.0, "2", None, 3])
def test_the_format_version_must_be_an_integer_this_version_reads(version):
    from mrad_hf.models.mrad.memory_bank_mrad import verify_seal

    bank = _bank()
    stored = {**bank.metadata, "format_version": version}
    with pytest.raises(MemoryBankError, match=rf"origin: format_version {version!r} is not a format this mrad_hf"):
        verify_seal(stored, bank, "origin")
    stored.pop("format_version")
    with pytest.raises(MemoryBankError, match="format_version None is not a format"):
        verify_seal(stored, bank, "origin")  # removed: every format wrote it
    verify_seal(dict(bank.metadata), bank, "origin")  # intact: accepted
    verify_seal({}, bank, "origin")  # no metadata at all (no sidecar): check_compatible's trust_bank decides


@pytest.mark.parametrize("removed", ["tensors_sha256", "metadata_sha256"])
def test_a_format_2_bank_without_a_checksum_is_refused(tmp_path, removed):
    path = save_bank(_bank(), tmp_path / "bank.safetensors")
    _rewrite_header(path, lambda m: m.pop(removed))
    with pytest.raises(MemoryBankError, match=rf"bank.safetensors': the \w+ checksums \('{removed}'\) were removed"):
        load_bank(path)


def test_a_model_folder_sidecar_without_the_tensor_checksum_is_refused(model_with_bank, tmp_path):
    import json

    from mrad_hf import MRADForAnomalyDetection

    model_with_bank.save_pretrained(tmp_path)
    sidecar = json.loads((tmp_path / "memory_bank.json").read_text())
    sidecar.pop("tensors_sha256")
    (tmp_path / "memory_bank.json").write_text(json.dumps(sidecar))
    with pytest.raises(
        MemoryBankError, match=r"memory bank .*: the tensors checksums \('tensors_sha256'\) were removed"
    ):
        MRADForAnomalyDetection.from_pretrained(tmp_path)
    (tmp_path / "memory_bank.json").write_text(json.dumps({**sidecar, "format_version": True}))
    with pytest.raises(MemoryBankError, match="format_version True is not a format this mrad_hf reads"):
        MRADForAnomalyDetection.from_pretrained(tmp_path)


BACKBONE = {"hidden_size": 12, "projection_dim": 8, "weights_signature": [0.1] * 30}
FEATURES = {"image_size": 112, "feature_layer": 4, "region_rule": "strict"}


@pytest.mark.parametrize(
    "backbone, features, unchecked",
    [
        ({"hidden_size": 12, "projection_dim": 8}, FEATURES, r"backbone weights identity \(weights_signature"),
        ({**BACKBONE, "weights_signature": None}, FEATURES, r"backbone weights identity"),
        (BACKBONE, {"image_size": 112}, r"feature settings \['feature_layer', 'region_rule'\]"),
    ],
    ids=["no-weights-identity", "null-signature", "partial-features"],
)
def test_a_fingerprint_or_feature_settings_with_fields_removed_need_trust_bank(backbone, features, unchecked):
    """Only recorded fields can be compared: a bank missing some must not pass as checked (another backbone's bank
    with its signature deleted would otherwise attach silently)."""
    import warnings

    bank = _bank()
    bank.metadata.update(backbone=backbone, features=features)
    with pytest.raises(MemoryBankError, match=f"This bank has no {unchecked}.*trust_bank=True"):
        bank.check_compatible(BACKBONE, FEATURES)
    with pytest.warns(UserWarning, match=f"trust_bank=True: not checked: {unchecked}"):
        bank.check_compatible(BACKBONE, FEATURES, trust_bank=True)
    bank.metadata.update(backbone=BACKBONE, features=FEATURES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bank.check_compatible(BACKBONE, FEATURES)  # complete: checked, silent
        bank.check_compatible({**BACKBONE, "weights_sha256": "ab"}, FEATURES)  # format-1 hash alone is an identity
        bank.metadata["backbone"] = {"hidden_size": 12, "projection_dim": 8, "weights_sha256": "ab"}
        bank.check_compatible({**BACKBONE, "weights_sha256": "ab"}, FEATURES)
