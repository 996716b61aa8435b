# SPDX-License-Identifier: Apache-2.0
"""Official MRAD bank files -> mrad-hf MemoryBank: random files in exactly the official format (`torch.save` of
`{"keys": (N, D), "values": (N, 2) one-hot}`), converted and attached, must give the maps and scores that the
reference computation (`tests/reference_mrad.py`) gets from the original tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_IMAGE_SIZE, make_samples
from reference_mrad import reference_tf_score

from mrad_hf import MRADImageProcessor
from mrad_hf.conversion.common import ConversionError
from mrad_hf.conversion.convert_official_bank import convert_official_bank, main
from mrad_hf.memory import load_bank


def official_cache(rows: int, width: int, seed: int, anomalous_every: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(rows, width, generator=generator), dim=-1)
    labels = (torch.arange(rows) % anomalous_every == 0).long()
    return {"keys": keys, "values": F.one_hot(labels, num_classes=2).float()}


def write_pair(folder: Path, model, dataset: str = "visa", seed: int = 0):
    image = official_cache(9, model.config.image_key_dim, seed)
    patch = official_cache(14, model.config.patch_key_dim, seed + 1, anomalous_every=2)
    torch.save(image, folder / f"cache_model_{dataset}.pt")
    torch.save(patch, folder / f"cache_patch_model_{dataset}.pt")
    return image, patch


def test_converted_bank_scores_equal_reference_on_original_tensors(tmp_path, tiny_model):
    image, patch = write_pair(tmp_path, tiny_model)
    bank = convert_official_bank(
        tmp_path / "cache_model_visa.pt",
        tmp_path / "cache_patch_model_visa.pt",
        tmp_path / "visa.safetensors",
        model=tiny_model,
    )

    saved = load_bank(tmp_path / "visa.safetensors")
    assert bank.counts() == saved.counts() and bank.metadata["tensors_sha256"] == saved.metadata["tensors_sha256"]
    assert torch.equal(saved.image_keys, image["keys"]) and torch.equal(saved.patch_values, patch["values"])
    meta = saved.metadata
    assert meta["source"] == "visa" and meta["backbone"] == tiny_model.backbone_fingerprint()
    assert meta["conversion"]["image_file"] == "cache_model_visa.pt" and len(meta["conversion"]["patch_sha256"]) == 64
    assert meta["counts"]["image_anomalous"] == 3 and meta["counts"]["patch_anomalous"] == 7

    tiny_model.set_memory_bank(saved)  # strict: the fingerprint matches
    pixels = MRADImageProcessor.from_config(tiny_model.config)([s["image"] for s in make_samples(3, seed=4)])[
        "pixel_values"
    ]
    with torch.no_grad():
        out = tiny_model(pixel_values=pixels)
    ref_maps, ref_scores = reference_tf_score(
        tiny_model.clip, pixels, image["keys"], image["values"], patch["keys"], patch["values"], TINY_IMAGE_SIZE
    )
    torch.testing.assert_close(out.anomaly_map, torch.from_numpy(ref_maps).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.anomaly_score, torch.from_numpy(ref_scores).float(), rtol=0, atol=1e-5)
    assert float(torch.from_numpy(ref_scores).std()) > 0  # the images get different scores: a real comparison


def test_without_model_backbone_is_unknown_and_widths_come_from_the_files(tmp_path, tiny_model, capsys):
    generator = torch.Generator().manual_seed(0)
    torch.save(
        {"keys": F.normalize(torch.randn(4, 768, generator=generator), dim=-1), "values": torch.eye(2)[[0, 1, 1, 0]]},
        tmp_path / "cache_model_mvtec.pt",
    )
    torch.save(
        {
            "keys": F.normalize(torch.randn(6, 1024, generator=generator), dim=-1),
            "values": torch.eye(2)[[1, 0, 1, 0, 0, 0]],
        },
        tmp_path / "cache_patch_model_mvtec.pt",
    )
    assert (
        main(["--cache-dir", str(tmp_path), "--dataset", "mvtec", "--output", str(tmp_path / "out.safetensors")]) == 0
    )
    bank = load_bank(tmp_path / "out.safetensors")
    assert bank.metadata["backbone"] is None and bank.metadata["conversion"]["backbone"].startswith("unknown")
    assert bank.metadata["source"] == "mvtec" and bank.metadata["features"]["image_size"] == 518
    assert "Wrote" in capsys.readouterr().out

    write_pair(tmp_path, tiny_model, dataset="visa")  # 24 / 48-d keys: not ViT-L/14's, still a valid bank
    assert main(["--cache-dir", str(tmp_path), "--dataset", "visa", "--output", str(tmp_path / "x.safetensors")]) == 0
    assert load_bank(tmp_path / "x.safetensors").counts()["image_entries"] == 9
    # with a model, its widths are checked: the ViT-L/14-wide mvtec files do not fit the tiny backbone
    assert (
        main(
            ["--cache-dir", str(tmp_path), "--dataset", "mvtec", "--output", str(tmp_path / "y.safetensors")]
            + ["--model", str(_saved(tiny_model, tmp_path / "model"))]
        )
        == 2
    )
    assert "keys are 768-d but 24-d were expected" in capsys.readouterr().err
    assert not (tmp_path / "y.safetensors").exists()


def _saved(model, folder):
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "payload, message",
    [
        (
            {"keys": torch.zeros(3, 24), "values": torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])},
            r"values are not one-hot \(rows \[1\]",
        ),
        (
            {"keys": torch.zeros(3, 24), "values": torch.eye(2)[[0, 1, 0]], "labels": torch.zeros(3)},
            r"unknown keys: \['labels'\]",
        ),
        ({"keys": torch.zeros(3, 24)}, r"missing keys: \['values'\]"),
        ({"keys": torch.zeros(3, 24), "values": torch.eye(2)[[0, 1]]}, r"values must be \(3, 2\) one-hot"),
        ([torch.zeros(3, 24)], "holds a list, not a dict"),
    ],
)
def test_malformed_official_files_are_refused_with_the_reason(tmp_path, tiny_model, payload, message):
    write_pair(tmp_path, tiny_model)
    torch.save(payload, tmp_path / "cache_model_visa.pt")
    with pytest.raises(ConversionError, match=message) as error:
        convert_official_bank(
            tmp_path / "cache_model_visa.pt", tmp_path / "cache_patch_model_visa.pt", model=tiny_model
        )
    assert "cache_model_visa.pt" in str(error.value)


def test_keys_that_are_not_unit_length_are_refused(tmp_path, tiny_model):
    """The official code stores F.normalize'd keys and scores with them as they are (no re-normalisation): keys x10
    would silently sharpen every retrieval softmax, so such a file is refused, naming it, the rows and their norms."""
    image, patch = write_pair(tmp_path, tiny_model)
    scaled = dict(patch, keys=patch["keys"].clone())
    scaled["keys"][[3, 8]] *= 10
    torch.save(scaled, tmp_path / "cache_patch_model_visa.pt")
    with pytest.raises(ConversionError) as error:
        convert_official_bank(tmp_path / "cache_model_visa.pt", tmp_path / "cache_patch_model_visa.pt")
    message = str(error.value)
    assert "Official patch-level bank '" in message and "cache_patch_model_visa.pt'" in message
    assert "2 of 14 keys are not unit length (rows [3, 8] have norms [10.0, 10.0])" in message
    zero = dict(image, keys=image["keys"].clone())
    zero["keys"][0] = 0
    torch.save(zero, tmp_path / "cache_model_visa.pt")
    with pytest.raises(ConversionError, match=r"1 of 9 keys are not unit length \(rows \[0\] have norms \[0.0\]\)"):
        convert_official_bank(tmp_path / "cache_model_visa.pt", tmp_path / "cache_patch_model_visa.pt")
    # fp16 rounding of unit keys (how a half-precision run stores them) stays within the tolerance and converts as is
    write_pair(tmp_path, tiny_model)
    half = dict(image, keys=image["keys"].half())
    torch.save(half, tmp_path / "cache_model_visa.pt")
    bank = convert_official_bank(tmp_path / "cache_model_visa.pt", tmp_path / "cache_patch_model_visa.pt")
    assert torch.equal(bank.image_keys, half["keys"].float())
