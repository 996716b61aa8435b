# SPDX-License-Identifier: Apache-2.0
"""`mrad predict` and `mrad evaluate` under `torchrun --nproc_per_node 2` and `accelerate launch --num_processes 2`
(CPU, gloo) give what one process gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_samples, make_tiny_model, run_two_processes_and_one
from PIL import Image

from mrad_hf.memory import build_memory_bank


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_process_predict_and_evaluate_equal_one_process(tmp_path, monkeypatch, launcher):
    from mrad_hf.data.synthetic import make_synthetic_benchmark

    inputs = tmp_path / "inputs"
    model = make_tiny_model()
    build_memory_bank(model, make_samples(6, seed=3), source="test", progress=False)
    model.save_pretrained(inputs / "model")
    queries = inputs / "queries"
    queries.mkdir()
    for index, sample in enumerate(make_samples(7, seed=9)):  # 4 batches of 2: 2 + 2 per process
        Image.fromarray(sample["image"]).save(queries / f"q{index}.png")
    (queries / "q3_broken.png").write_bytes(b"not an image")
    make_synthetic_benchmark(
        inputs / "benchmark", categories=("grass", "gravel"), n_test_good=3, n_test_per_defect=1, image_size=96, seed=2
    )
    monkeypatch.setenv("MRAD_TWO_PROCESS_INPUTS", str(inputs))
    script = Path(__file__).with_name("two_process_cli.py")
    run_two_processes_and_one(script, tmp_path / "two", tmp_path / "one", launcher=launcher)

    one, two = (json.loads((tmp_path / name / "predict" / "scores.json").read_text()) for name in ("one", "two"))
    assert one["scored"] == 7 and one["failed"] == 1 and two["failed"] == 1
    assert two["failures"][0]["path"].endswith("q3_broken.png")
    assert [r["path"] for r in two["results"]] == [r["path"] for r in one["results"]]
    assert [r["score"] for r in two["results"]] == pytest.approx([r["score"] for r in one["results"]], abs=1e-6)
    assert [r["label"] for r in two["results"]] == [r["label"] for r in one["results"]]
    assert all(Path(r["heatmap"]).is_file() for r in two["results"])
    lines = (tmp_path / "two" / "predict" / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 8  # written once, by process 0

    one, two = (json.loads((tmp_path / name / "evaluate" / "results.json").read_text()) for name in ("one", "two"))
    assert [r["category"] for r in two["per_category"]] == ["grass", "gravel"]
    assert [r["images"] for r in two["per_category"]] == [r["images"] for r in one["per_category"]]
    for key, value in one["mean"].items():
        assert two["mean"][key] == pytest.approx(value, abs=1e-6), key
    for category in ("grass", "gravel"):
        records = [
            json.loads((tmp_path / n / "evaluate" / "per_category" / f"{category}.json").read_text())
            for n in ("one", "two")
        ]
        assert [s["path"] for s in records[1]["scores"]] == [s["path"] for s in records[0]["scores"]]
        assert [s["score"] for s in records[1]["scores"]] == pytest.approx(
            [s["score"] for s in records[0]["scores"]], abs=1e-6
        )
