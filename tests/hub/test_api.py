# SPDX-License-Identifier: Apache-2.0
"""`load_model` / `load_detector_bundle` on hostile or edited model folders: a folder's own code never runs (nor
prompts), edited preprocessing or sizes are refused with one message naming the file, saved models round-trip."""

import io
import json
import re

import pytest
import torch
from conftest import make_samples

from mrad_hf import MRADImageProcessor
from mrad_hf.hub.api import load_detector_bundle, load_model
from mrad_hf.memory import save_model

#: Folder code that leaves a mark when it runs: the test fails if the file appears.
FOLDER_CODE = """
import pathlib

pathlib.Path({marker!r}).write_text("the folder's code ran")

from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil


class EvilProcessor(CLIPImageProcessorPil):
    pass
"""


@pytest.fixture
def saved(model_with_bank, tmp_path):
    folder = tmp_path / "model"
    model_with_bank.save_pretrained(folder)
    return folder


def _edit(path, **changes):
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize("processor_type", ["EvilProcessor", "MRADImageProcessor"])
def test_a_folder_whose_auto_map_names_its_own_code_never_runs_it_nor_prompts(
    saved, tmp_path, monkeypatch, capfd, processor_type
):
    marker = tmp_path / "ran.txt"
    (saved / "evil_proc.py").write_text(FOLDER_CODE.format(marker=str(marker)))
    auto_map = {"AutoImageProcessor": "evil_proc.EvilProcessor"}
    _edit(saved / "preprocessor_config.json", auto_map=auto_map, image_processor_type=processor_type)
    _edit(saved / "config.json", auto_map={**auto_map, "AutoConfig": "evil_proc.X", "AutoModel": "evil_proc.X"})
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 5))  # a prompt, were there one, would be answered "yes"
    if processor_type == "EvilProcessor":
        message = f"{saved / 'preprocessor_config.json'} names image_processor_type 'EvilProcessor', not MRAD's"
        with pytest.raises(ValueError, match=re.escape(message)):
            load_detector_bundle(saved)
    else:  # MRAD's own type with a hostile auto_map: MRAD's installed class, the folder's code ignored
        assert type(load_detector_bundle(saved)[1]) is MRADImageProcessor
    assert not marker.exists()
    printed = capfd.readouterr()
    assert "custom code" not in printed.out + printed.err and "trust_remote_code" not in printed.out + printed.err


@pytest.mark.parametrize(
    "changes, shown",
    [
        ({"image_mean": [0, 0, 0]}, "image_mean [0, 0, 0] in the file vs [0.48145466, 0.4578275, 0.40821073] from"),
        ({"image_std": [1, 1, 1]}, "image_std [1, 1, 1] in the file vs [0.26862954, 0.26130258, 0.27577711] from"),
        ({"do_normalize": False}, "do_normalize False in the file vs True from"),
        ({"do_rescale": False}, "do_rescale False in the file vs True from"),
        ({"rescale_factor": 0.5}, "rescale_factor 0.5 in the file vs 0.00392156862745098 from"),
        ({"resample": 2}, "resample 2 in the file vs 3 from"),
        ({"do_resize": False}, "do_resize False in the file vs True from"),
        ({"size": {"height": 28, "width": 28}}, "size {'height': 28, 'width': 28} in the file vs {'height': 112, "),
        ({"image_size": 28}, "size {'height': 28, 'width': 28} in the file vs {'height': 112, "),  # the older key
        ({"do_center_crop": True}, "do_center_crop True in the file vs False from"),
        ({"do_convert_rgb": False}, "do_convert_rgb False in the file vs True from"),
        (
            {"do_normalize": False, "resample": 0},
            "resample 0 in the file vs 3 from config.json; do_normalize False in the file vs True from",
        ),
    ],
)
def test_edited_preprocessing_is_refused_naming_the_file_the_fields_and_the_fix(saved, changes, shown):
    if "image_size" in changes:  # folders saved before kept `image_size`, no `size`
        content = json.loads((saved / "preprocessor_config.json").read_text())
        content.pop("size"), content.pop("crop_size")
        (saved / "preprocessor_config.json").write_text(json.dumps(content))
    _edit(saved / "preprocessor_config.json", **changes)
    with pytest.raises(ValueError) as caught:
        load_detector_bundle(saved)
    message = str(caught.value)
    assert message.startswith(f"{saved / 'preprocessor_config.json'} and the model's config.json")
    assert shown in message and message.count(" in the file vs ") == len(changes)
    assert message.endswith(
        "Restore the edited file, or re-save the model with save_pretrained (it writes the processor config.json describes)."
    )


def test_an_edited_config_json_statistic_is_refused_too(saved):
    _edit(saved / "config.json", image_mean=[0.5, 0.5, 0.5])  # the processor file is the original one
    with pytest.raises(
        ValueError, match=r"image_mean \[0.48145466, 0.4578275, 0.40821073\] in the file vs \[0.5, 0.5"
    ):
        load_detector_bundle(saved)


@pytest.mark.parametrize(
    "content, reason",
    [("[1, 2]", "holds a JSON list, not an object"), ('"str"', "holds a JSON str, not an object")]
    + [("[" * 100_000 + "]" * 100_000, r"is not readable JSON \(maximum recursion depth exceeded")],
)
def test_a_processor_file_that_is_not_a_json_object_is_refused_naming_it(saved, content, reason):
    (saved / "preprocessor_config.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(saved / "preprocessor_config.json")) + " " + reason):
        load_detector_bundle(saved)


@pytest.mark.parametrize("save", ["save_pretrained", "save_model"])
def test_a_saved_model_round_trips_with_the_config_s_processor(model_with_bank, tmp_path, save):
    folder = tmp_path / "model"
    model_with_bank.save_pretrained(folder) if save == "save_pretrained" else save_model(model_with_bank, folder)
    model, processor = load_detector_bundle(folder)
    expected = MRADImageProcessor.from_config(model_with_bank.config)
    settings = {key: value for key, value in processor.to_dict().items() if key != "auto_map"}  # save adds auto_map
    assert type(processor) is MRADImageProcessor and settings == expected.to_dict()
    images = [s["image"] for s in make_samples(2, seed=31)]
    with torch.no_grad():
        scores = model(**processor(images)).anomaly_score
        assert torch.equal(scores, model_with_bank(**expected(images)).anomaly_score)


def test_the_torchvision_backend_of_a_saved_model_is_no_edit(saved):
    pytest.importorskip("torchvision")
    from mrad_hf.models.mrad.image_processing_mrad import MRADImageProcessorFast

    assert type(load_detector_bundle(saved, backend="torchvision")[1]) is MRADImageProcessorFast


@pytest.mark.parametrize(
    "edit, shown",
    [
        (lambda c: c.update(image_bank_size=5), "memory.image_keys [6, 24] saved vs [5, 24] configured"),
        (
            lambda c: c["clip_config"]["vision_config"].update(hidden_size=96),
            "clip.vision_model.embeddings.class_embedding [48] saved vs [96] configured",  # the first of them
        ),
    ],
)
def test_a_config_json_whose_sizes_do_not_fit_the_weights_is_one_error_naming_the_folder(saved, capfd, edit, shown):
    from transformers.modeling_utils import logger as loading_logger

    content = json.loads((saved / "config.json").read_text())
    edit(content)
    (saved / "config.json").write_text(json.dumps(content))
    with pytest.raises(ValueError) as caught:
        load_model(saved)
    message = str(caught.value)
    assert message.startswith(f"Model '{saved}': its config.json does not match its model.safetensors (tensor shapes")
    assert shown in message and "Restore config.json, or re-save the model." in message
    assert "ignore_mismatched_sizes" not in message
    printed = capfd.readouterr()
    assert "LOAD REPORT" not in printed.out + printed.err  # held back: the error says it all
    assert not [held for held in loading_logger.filters if type(held).__name__ == "_HeldLoadReports"]  # removed
