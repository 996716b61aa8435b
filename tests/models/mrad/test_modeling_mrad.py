# SPDX-License-Identifier: Apache-2.0
"""MRAD-TF end to end against the reference-style computation; save/load; AutoModel; remote code; from_clip."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_IMAGE_SIZE, make_samples, make_tiny_model, tiny_clip_config
from reference_mrad import reference_build_banks, reference_tf_score
from transformers import AutoConfig, AutoModel, CLIPModel

from mrad_hf import MemoryBankError, MRADConfig, MRADForAnomalyDetection, MRADImageProcessor
from mrad_hf.memory import build_memory_bank, load_bank, save_bank, save_model
from mrad_hf.memory.tools import image_sha256


def _inputs(model, samples):
    processor = MRADImageProcessor.from_config(model.config)
    return processor([s["image"] for s in samples], masks=[s["mask"] for s in samples])


def test_bank_and_scores_match_reference(model_with_bank, samples):
    model = model_with_bank
    inputs = _inputs(model, samples)
    labels = torch.tensor([s["label"] for s in samples])
    ref = reference_build_banks(model.clip, inputs["pixel_values"].split(4), labels.split(4), inputs["masks"].split(4))
    bank = model.get_memory_bank()
    for ours, theirs in zip((bank.image_keys, bank.image_values, bank.patch_keys, bank.patch_values), ref):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert bank.counts()["image_anomalous"] == 3

    queries = make_samples(4, seed=7)
    query_inputs = _inputs(model, queries)
    outputs = model(pixel_values=query_inputs["pixel_values"])
    ref_maps, ref_scores = reference_tf_score(model.clip, query_inputs["pixel_values"], *ref, TINY_IMAGE_SIZE)
    np.testing.assert_allclose(outputs.anomaly_map.numpy(), ref_maps, atol=1e-5)
    np.testing.assert_allclose(outputs.anomaly_score.numpy(), ref_scores, atol=1e-5)
    assert outputs.patch_probabilities.shape == (4, 64, 2)
    torch.testing.assert_close(outputs.patch_probabilities.sum(-1), torch.ones(4, 64))


def test_batch_composition_does_not_change_results(model_with_bank):
    inputs = _inputs(model_with_bank, make_samples(4, seed=3))["pixel_values"]
    together = model_with_bank(pixel_values=inputs)
    alone = [model_with_bank(pixel_values=x) for x in inputs.split(1)]
    torch.testing.assert_close(together.anomaly_score, torch.cat([a.anomaly_score for a in alone]), atol=1e-6, rtol=0)


def test_save_load_automodel_bit_exact(model_with_bank, tmp_path):
    model_with_bank.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mrad" and saved["patch_bank_size"] == model_with_bank.config.patch_bank_size
    assert saved["auto_map"]["AutoModel"] == "modeling_mrad.MRADForAnomalyDetection"
    assert (tmp_path / "preprocessor_config.json").exists() and (tmp_path / "pipeline_anomaly_detection.py").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MRADConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, MRADForAnomalyDetection)
    for name, buffer in model_with_bank.memory.named_buffers():
        assert torch.equal(buffer, getattr(loaded.memory, name)), name
    pixels = _inputs(model_with_bank, make_samples(2, seed=5))["pixel_values"]
    assert torch.equal(model_with_bank(pixel_values=pixels).anomaly_map, loaded(pixel_values=pixels).anomaly_map)
    assert loaded.get_memory_bank().metadata["source"] == "unit-test"
    assert not any(p.requires_grad for p in loaded.clip.parameters())


def test_remote_code_loads_in_fresh_process_without_mrad_hf(model_with_bank, tmp_path):
    model_with_bank.save_pretrained(tmp_path / "model")
    pixels = _inputs(model_with_bank, make_samples(2, seed=5))["pixel_values"]
    np.save(tmp_path / "pixels.npy", pixels.numpy())  # a plain array file: no pickle
    expected = model_with_bank(pixel_values=pixels).anomaly_score
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["mrad_hf"] = None  # the package is not importable in this process
        import numpy as np, torch
        from transformers import AutoModel, pipeline
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        pixels = torch.from_numpy(np.load({str(tmp_path / "pixels.npy")!r}, allow_pickle=False))
        print(",".join(repr(v) for v in model(pixel_values=pixels).anomaly_score.tolist()))
        pipe = pipeline("anomaly-detection", model={str(tmp_path / "model")!r}, trust_remote_code=True, device="cpu")
        print(pipe(np.zeros((30, 40, 3), dtype=np.uint8))["anomaly_map"].shape)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    np.testing.assert_array_equal(np.array([float(v) for v in lines[-2].split(",")]), expected.numpy())
    assert lines[-1] == "(30, 40)"


def test_from_clip_folder_and_instance(tmp_path):
    torch.manual_seed(3)
    clip = CLIPModel(tiny_clip_config()).eval()
    clip.save_pretrained(tmp_path / "clip")
    from_folder = MRADForAnomalyDetection.from_clip(tmp_path / "clip", image_size=56, image_score_weight=0.5)
    from_instance = MRADForAnomalyDetection.from_clip(clip, image_size=56)
    assert from_folder.config.image_score_weight == 0.5 and from_folder.config.image_size == 56
    for (name, a), (_, b) in zip(from_folder.clip.state_dict().items(), clip.state_dict().items()):
        assert torch.equal(a, b), name
    assert from_instance.clip is clip
    assert from_folder.memory.image_keys.shape == (0, 24) and from_instance.memory.image_keys.device.type == "cpu"
    with pytest.raises(OSError, match="Could not load a CLIP configuration"):
        MRADForAnomalyDetection.from_clip(tmp_path / "missing")


def test_empty_bank_and_foreign_bank_errors(tiny_model, samples, tmp_path):
    pixels = _inputs(tiny_model, samples[:1])["pixel_values"]
    with pytest.raises(MemoryBankError, match="no memory bank"):
        tiny_model(pixel_values=pixels)
    bank = build_memory_bank(tiny_model, samples, progress=False, attach=False)
    bank_path = save_bank(bank, tmp_path / "bank.safetensors")
    other = make_tiny_model(seed=1)  # same architecture, different weights
    with pytest.raises(MemoryBankError, match="weights signature entry .*different CLIP weights"):
        other.set_memory_bank(load_bank(bank_path))
    with pytest.warns(UserWarning, match="does not match"):
        other.set_memory_bank(load_bank(bank_path), strict=False)
    same_backbone = make_tiny_model(seed=0, image_size=TINY_IMAGE_SIZE)
    wider_clip = MRADForAnomalyDetection.from_clip(tiny_clip_config(hidden_size=64), image_size=TINY_IMAGE_SIZE)
    with pytest.raises(MemoryBankError, match="patch keys are 48-d"):
        wider_clip.set_memory_bank(load_bank(bank_path))
    different_features = make_tiny_model(seed=0, vv_start_layer=2)
    with pytest.raises(MemoryBankError, match="vv_start_layer"):
        different_features.set_memory_bank(load_bank(bank_path))
    same_backbone.set_memory_bank(load_bank(bank_path))  # same weights and settings: accepted
    assert same_backbone(pixel_values=pixels).anomaly_score.shape == (1,)


def test_bank_build_is_independent_of_batch_size(tiny_model, samples):
    one = build_memory_bank(tiny_model, samples, batch_size=1, progress=False, attach=False)
    five = build_memory_bank(tiny_model, samples, batch_size=5, progress=False, attach=False)
    torch.testing.assert_close(one.patch_keys, five.patch_keys, atol=1e-6, rtol=0)
    assert one.metadata["image_ids"] == [f"img{i}" for i in range(6)]
    assert one.patch_sources.tolist() == five.patch_sources.tolist()


def test_sample_validation_and_unmasked_anomaly_warning(tiny_model):
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="label must be 0"):
        build_memory_bank(tiny_model, [(image, 3)], progress=False)
    with pytest.raises(ValueError, match="unknown label 'weird'"):
        build_memory_bank(tiny_model, [{"image": image, "label": "weird"}], progress=False)
    with pytest.raises(MemoryBankError, match="No samples"):
        build_memory_bank(tiny_model, [], progress=False)
    with (
        pytest.warns(UserWarning, match="had no mask"),
        pytest.raises(MemoryBankError, match="no anomalous entry at the pixel level"),
    ):
        build_memory_bank(tiny_model, [(image, "anomaly"), (image, "normal")], progress=False, attach=False)
    with (
        pytest.warns(UserWarning, match="had no mask"),
        pytest.warns(UserWarning, match="allow_no_anomalies=True: .* pixel level"),
    ):
        bank = build_memory_bank(
            tiny_model, [(image, "anomaly"), (image, "normal")], progress=False, attach=False, allow_no_anomalies=True
        )
    assert bank.counts()["patch_anomalous"] == 0 and bank.counts()["image_anomalous"] == 1


def test_save_model_is_staged_and_keeps_the_users_other_files(model_with_bank, tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    save_model(model_with_bank, target)
    assert (target / "notes.txt").read_text() == "mine" and (target / "config.json").is_file()
    assert not list(tmp_path.glob(".model.*"))  # no staging folder left behind
    reloaded = AutoModel.from_pretrained(target)
    assert torch.equal(reloaded.memory.image_keys, model_with_bank.memory.image_keys)

    def crash(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(MRADForAnomalyDetection, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(model_with_bank, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()  # a new folder appears complete or not at all
    with pytest.raises(OSError, match="disk full"):
        save_model(model_with_bank, target)
    assert (
        AutoModel.from_pretrained(target).config.image_bank_size == model_with_bank.config.image_bank_size
    )  # old save intact


@pytest.mark.parametrize("variant", ["ft", "clip"])
def test_trained_variants_load_as_remote_code_without_mrad_hf(variant, tmp_path):
    from conftest import make_tiny_trained_model

    model = make_tiny_trained_model(variant)
    build_memory_bank(model, make_samples(4), batch_size=4, progress=False)
    model.save_pretrained(tmp_path / "model")
    pixels = _inputs(model, make_samples(2, seed=5))["pixel_values"]
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    with torch.no_grad():
        expected = model(pixel_values=pixels).anomaly_score
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["mrad_hf"] = None
        import numpy as np, torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__ and model.config.variant == {variant!r}
        pixels = torch.from_numpy(np.load({str(tmp_path / "pixels.npy")!r}, allow_pickle=False))
        with torch.no_grad():
            print(",".join(repr(v) for v in model(pixel_values=pixels).anomaly_score.tolist()))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(
        np.array([float(v) for v in result.stdout.strip().splitlines()[-1].split(",")]), expected.numpy(), atol=1e-6
    )


# ---------------------------------------------------------------------- issue 12 §2, issue 13 §3, issue 14 §2
def test_a_bank_without_anomalous_entries_is_refused_with_the_fix(tiny_model, samples):
    normals = [sample for sample in samples if sample["label"] == 0]
    with pytest.raises(
        MemoryBankError,
        match=r"no anomalous entry at the image and pixel level \(3 images, 0 anomalous.*add defect images with label 1",
    ):
        build_memory_bank(tiny_model, normals, progress=False)
    assert tiny_model.config.image_bank_size == 0  # nothing was attached
    with pytest.warns(UserWarning, match="p_anomaly = 0 for every query"):
        bank = build_memory_bank(tiny_model, normals, progress=False, attach=False, allow_no_anomalies=True)
    assert bank.counts()["image_anomalous"] == bank.counts()["patch_anomalous"] == 0


def test_bank_ids_are_never_absolute_paths_and_record_file_hashes(tiny_model, samples, tmp_path):
    import hashlib

    from PIL import Image

    folder = tmp_path / "private" / "line3"
    folder.mkdir(parents=True)
    rows = []
    for index, sample in enumerate(samples[:4]):
        path = folder / f"part{index}.png"
        Image.fromarray(sample["image"]).save(path)
        rows.append({"image": str(path), "label": sample["label"], "mask": sample["mask"]})
    rows[0]["id"] = "good/part0.png"  # an id relative to the dataset root is kept as given
    rows[1]["id"] = str(path)  # an absolute id is reduced to its file name
    rows.append({"image": samples[5]["image"], "label": 1, "mask": samples[5]["mask"], "sha256": "ab" * 32})
    bank = build_memory_bank(tiny_model, rows, progress=False, attach=False, source="line-3")
    assert bank.metadata["image_ids"] == ["good/part0.png", "part3.png", "part2.png", "part3.png", "sample-4"]
    assert not any(str(tmp_path) in str(value) for value in bank.metadata.values())
    assert bank.metadata["image_sources"] == ["line-3", "line-3", "line3", "line3", "line-3"]
    assert image_sha256(bank)[2] == hashlib.sha256((folder / "part2.png").read_bytes()).hexdigest()
    assert image_sha256(bank)[4] == "ab" * 32


def test_config_is_data_and_the_bank_and_calibration_live_in_sidecars(model_with_bank, tmp_path):
    import json

    model_with_bank.calibration = {"image_threshold": 0.5, "pixel_threshold": 0.4, "target_fpr": 0.05}
    model_with_bank.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "memory_bank_metadata" not in config and "calibration" not in config
    assert config["image_bank_size"] == model_with_bank.config.image_bank_size  # buffer shapes stay in the config
    sidecar = json.loads((tmp_path / "memory_bank.json").read_text())
    assert sidecar["counts"] == model_with_bank.get_memory_bank().counts() and sidecar["image_ids"][0] == "img0"
    assert json.loads((tmp_path / "calibration.json").read_text())["image_threshold"] == 0.5
    reloaded = MRADForAnomalyDetection.from_pretrained(tmp_path)
    assert reloaded.calibration["pixel_threshold"] == 0.4
    assert reloaded.memory_bank_metadata["tensors_sha256"] == sidecar["tensors_sha256"]


def _edit_json(path, edit):
    import json

    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["features"].update(image_size=224), "metadata field 'features' was edited"),
        (lambda m: m["backbone"].update(patch_size=16), "metadata field 'backbone' was edited"),
        (
            lambda m: m.update(label_convention="values[:, 0] = anomaly"),
            "metadata field 'label_convention' was edited",
        ),
        (lambda m: m["counts"].update(image_anomalous=0), "metadata field 'counts' was edited"),
        (lambda m: m.update(calibration={"image_threshold": 0.1}), "metadata field 'calibration' was added"),
        (lambda m: m.update(tensors_sha256="0" * 64), "tensors do not match"),
    ],
)
def test_an_edited_bank_sidecar_is_refused_naming_the_field(model_with_bank, tmp_path, edit, message):
    model_with_bank.save_pretrained(tmp_path)
    _edit_json(tmp_path / "memory_bank.json", edit)
    with pytest.raises(MemoryBankError, match=message):
        MRADForAnomalyDetection.from_pretrained(tmp_path)


def test_a_bank_without_fingerprint_needs_trust_bank_and_warns_what_was_not_checked(model_with_bank, tmp_path):
    bank = model_with_bank.get_memory_bank()
    for field in ("backbone", "features"):
        bank.metadata.pop(field)
    bank.seal()  # a consistent file whose provenance fields were never recorded
    path = save_bank(bank, tmp_path / "bank.safetensors")
    fresh = make_tiny_model()
    with pytest.raises(MemoryBankError, match="no backbone fingerprint and no feature settings.*trust_bank=True"):
        fresh.set_memory_bank(load_bank(path))
    with pytest.warns(UserWarning, match="not checked: backbone fingerprint, feature settings"):
        fresh.set_memory_bank(load_bank(path), trust_bank=True)
    fresh.save_pretrained(tmp_path / "model")
    with pytest.raises(MemoryBankError, match="no backbone fingerprint"):
        MRADForAnomalyDetection.from_pretrained(tmp_path / "model")
    with pytest.warns(UserWarning, match="not checked"):
        MRADForAnomalyDetection.from_pretrained(tmp_path / "model", trust_bank=True)


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -0.5, 7.0])
def test_nan_inf_and_out_of_range_thresholds_are_refused_at_load(model_with_bank, tmp_path, threshold):
    model_with_bank.save_pretrained(tmp_path)
    (tmp_path / "calibration.json").write_text(
        '{"image_threshold": %s, "pixel_threshold": 0.5}'
        % ("NaN" if threshold != threshold else repr(threshold).replace("inf", "Infinity"))
    )
    with pytest.raises(
        MemoryBankError, match=r"calibration.json.*'image_threshold' is .*must be a finite number in \[0, 2\]"
    ):
        MRADForAnomalyDetection.from_pretrained(tmp_path)


@pytest.mark.parametrize("filename", ["memory_bank.json", "calibration.json"])
@pytest.mark.parametrize(
    "content, reason",
    [
        ("[" * 100_000 + "]" * 100_000, "maximum recursion depth exceeded"),  # parses in C, then recurses
        ("[1, 2]", "it holds a JSON list, not an object"),
        ('"text"', "it holds a JSON str, not an object"),
        ("{", "Expecting property name"),
    ],
)
def test_a_sidecar_that_is_not_a_json_object_is_refused_naming_the_file(
    model_with_bank, tmp_path, filename, content, reason
):
    model_with_bank.calibration = {"image_threshold": 0.5, "pixel_threshold": 0.4}
    model_with_bank.save_pretrained(tmp_path)
    (tmp_path / filename).write_text(content)
    with pytest.raises(
        MemoryBankError, match=rf"'{tmp_path / filename}' is not a readable JSON object \({reason}.*re-save"
    ):
        MRADForAnomalyDetection.from_pretrained(tmp_path)


@pytest.mark.parametrize("saved, edited", [("tf", "ft"), ("ft", "clip"), ("ft", "tf")])
def test_a_changed_variant_in_config_json_is_an_error_naming_the_weights(saved, edited, tmp_path):
    from conftest import make_tiny_trained_model

    model = make_tiny_trained_model(saved) if saved != "tf" else make_tiny_model()
    model.save_pretrained(tmp_path)
    _edit_json(
        tmp_path / "config.json",
        lambda c: c.update(
            variant=edited,
            prompt_token_ids=c.get("prompt_token_ids")
            or [[0] + [5] * 12 + [7, 8, 98], [0] + [5] * 12 + [9, 7, 8, 98]],
            deep_prompt_depth=3,
        ),
    )
    expected = (
        r"lacks the trained weights \[.*(image_projection|prompt_learner)"
        if edited != "tf"
        else "holds trained weights of another variant"
    )
    with pytest.raises(ValueError, match=expected):
        MRADForAnomalyDetection.from_pretrained(tmp_path)
