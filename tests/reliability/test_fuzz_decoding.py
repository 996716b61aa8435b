# SPDX-License-Identifier: Apache-2.0
"""Fuzz: random bytes and mutated PNG/JPEG/TIFF/BMP/GIF/WebP files, fed as images to the processor + model,
the pipeline and `mrad predict` (in process). Each case must end in a clean `MRADInputError` / a listed,
one-line failure naming the file, or, where the mutated file still decodes, in a finite score.

Deterministic seeds; the tiny model is built once per module; undecodable files fail before the network.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import make_samples, make_tiny_model

from mrad_hf import MRADImageProcessor, MRADInputError
from mrad_hf.cli.main import main
from mrad_hf.memory import build_memory_bank

from ._files import fuzz_cases, valid_image_bytes, write


@pytest.fixture(scope="module")
def fuzz_model():
    model = make_tiny_model()
    build_memory_bank(model, make_samples(6), batch_size=6, progress=False)
    return model


@pytest.fixture(scope="module")
def saved_fuzz_model(fuzz_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-model")
    fuzz_model.save_pretrained(folder)
    return folder


def _load_or_error(processor, path):
    """(decoded image, None) or (None, message); anything but MRADInputError propagates and fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's own warnings about odd chunks are not errors
        try:
            return processor.load(path), None
        except MRADInputError as error:
            return None, str(error)


@pytest.mark.parametrize("seed", [11, 12])
def test_fuzzed_files_give_a_clean_error_or_a_finite_score(fuzz_model, tmp_path, seed):
    processor = MRADImageProcessor.from_config(fuzz_model.config)
    decoded, errors = [], 0
    for name, data in fuzz_cases(300, seed):
        path = write(tmp_path / name, data)
        image, message = _load_or_error(processor, path)
        if message is not None:
            errors += 1
            assert str(path) in message, message
            assert "\n" not in message
        else:
            decoded.append(image)
    assert errors >= 150 and len(decoded) >= 20  # the fuzz exercises both outcomes
    with torch.no_grad():
        for start in range(0, len(decoded), 32):
            outputs = fuzz_model(**processor(decoded[start : start + 32]))
            assert torch.isfinite(outputs.anomaly_score).all() and torch.isfinite(outputs.anomaly_map).all()


def test_fuzzed_files_through_the_pipeline(fuzz_model, tmp_path):
    from transformers import pipeline

    detector = pipeline(
        "anomaly-detection", model=fuzz_model, image_processor=MRADImageProcessor.from_config(fuzz_model.config)
    )
    outcomes = {"error": 0, "scored": 0}
    for name, data in fuzz_cases(50, seed=13):
        path = write(tmp_path / name, data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = detector(str(path))
            except MRADInputError as error:
                assert str(path) in str(error)
                outcomes["error"] += 1
                continue
        assert math.isfinite(result["score"]) and np.isfinite(result["anomaly_map"]).all()
        outcomes["scored"] += 1
    assert outcomes["error"] >= 25 and outcomes["scored"] >= 3


def test_fuzzed_folder_through_mrad_predict(saved_fuzz_model, tmp_path):
    folder = tmp_path / "inputs"
    cases = fuzz_cases(80, seed=14)
    for name, data in cases:
        write(folder / name, data)
    write(folder / "zz_valid.png", valid_image_bytes(0)["png"])
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["predict", "--model", str(saved_fuzz_model), str(folder), "--output-dir", str(out)]) == 0
    summary = json.loads((out / "scores.json").read_text())
    listed = {record["path"] for record in summary["results"]} | {failure["path"] for failure in summary["failures"]}
    from mrad_hf.data.loaders import IMAGE_EXTENSIONS  # every format the decoder reads, .webp and .gif included

    images = {str(path) for path in folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS}
    assert listed == images  # every image file is either scored or listed as a failure; nothing lost silently
    assert summary["failed"] == len(summary["failures"]) >= 30
    for failure in summary["failures"]:
        assert failure["path"] in failure["error"] and "\n" not in failure["error"]
    assert all(math.isfinite(record["score"]) for record in summary["results"])
    assert str(folder / "zz_valid.png") in {record["path"] for record in summary["results"]}


def test_fuzzed_file_with_on_error_fail_exits_2_naming_the_file(saved_fuzz_model, tmp_path, capsys):
    processor = MRADImageProcessor(image_size=112)
    broken = [
        (name, data)
        for name, data in fuzz_cases(80, seed=15)
        if _load_or_error(processor, write(tmp_path / "probe" / name, data))[1]
    ]
    for name, data in broken[:5]:
        path = write(tmp_path / "single" / name, data)
        code = main(
            [
                "predict",
                "--model",
                str(saved_fuzz_model),
                str(path),
                "--output-dir",
                str(tmp_path / "out" / name),
                "--on-error",
                "fail",
            ]
        )
        lines = [
            line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()
        ]  # progress bars aside
        assert code == 2
        assert len(lines) == 1 and lines[0].startswith("mrad predict: error:") and str(path) in lines[0], lines
