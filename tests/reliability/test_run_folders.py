# SPDX-License-Identifier: Apache-2.0
"""A run folder is never reused for a different run, and nothing a run computed is lost (issue 13 §4-5).

`mrad evaluate` / `mrad train` / `mrad predict` record a run fingerprint in `run.json`; a rerun resumes only when it
matches, otherwise it is refused naming the differing fields and the two flags. `mrad predict` streams per-image
results to `scores.jsonl`, so an injected failure (disk full, out of memory, a 232-character name) costs that image
only, a killed run resumes where it stopped, and a torn last line is dropped. `--seed` makes two `mrad train` runs on
a local CLIP folder give the same model."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from conftest import make_samples, make_tiny_model, make_tiny_trained_model
from PIL import Image
from safetensors.torch import load_file

from mrad_hf.cli.main import main
from mrad_hf.memory import build_memory_bank
from mrad_hf.tools.run_folder import (
    INCOMPLETE_MARKER,
    JsonLinesWriter,
    RunFolderError,
    bounded_name,
    open_run_folder,
    read_json_lines,
    run_fingerprint,
)
from reliability._files import write_folder_dataset


@pytest.fixture
def widget(tmp_path):
    return write_folder_dataset(tmp_path / "widget", make_samples(6, seed=51))


@pytest.fixture
def two_models(tmp_path, widget):
    """Two saved models with banks from the same data: A (seed 0) and B (seed 1), different weights."""
    folders = []
    for seed, name in ((0, "A"), (1, "B")):
        model = make_tiny_model(seed=seed)
        build_memory_bank(model, make_samples(6, seed=52), source="aux", progress=False)
        model.save_pretrained(tmp_path / name)
        folders.append(tmp_path / name)
    return folders


# ---------------------------------------------------------------- evaluate
def test_evaluate_into_a_folder_of_another_model_is_refused_naming_the_fields(tmp_path, widget, two_models, capsys):
    model_a, model_b = two_models
    out = tmp_path / "eval"
    base = ["evaluate", "--dataset", "folder", "--data-root", str(widget), "--output-dir", str(out), "--heatmaps", "0"]
    assert main(base + ["--model", str(model_a)]) == 0
    score_a = json.loads((out / "results.json").read_text())["mean"]
    assert not (out / INCOMPLETE_MARKER).exists() and json.loads((out / "run.json").read_text())["complete"] is True
    capsys.readouterr()
    assert main(base + ["--model", str(model_b)]) == 2  # before: A's per-category results silently relabelled B
    err = capsys.readouterr().err
    assert (
        "holds a run of 'mrad evaluate' that differs from this one (model.bank_sha256: " in err
        and "; model.weights_sha256: " in err
    )
    assert "Pass --overwrite to delete its results and start over, --resume-anyway to keep them" in err
    assert json.loads((out / "results.json").read_text())["mean"] == score_a  # untouched
    assert main(base + ["--model", str(model_b), "--overwrite"]) == 0
    score_b = json.loads((out / "results.json").read_text())["mean"]
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "folder",
                "--data-root",
                str(widget),
                "--output-dir",
                str(tmp_path / "fresh_b"),
                "--heatmaps",
                "0",
                "--model",
                str(model_b),
            ]
        )
        == 0
    )
    assert score_b == json.loads((tmp_path / "fresh_b" / "results.json").read_text())["mean"] != score_a
    # the same run again resumes (nothing recomputed); --resume-anyway keeps B's results and records why
    assert main(base + ["--model", str(model_b)]) == 0
    assert main(base + ["--model", str(model_a), "--resume-anyway"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert any(line.startswith("model.weights_sha256:") for line in run["resumed_anyway_despite"])


# ---------------------------------------------------------------- train
@pytest.mark.usefixtures("reset_accelerate")
def test_train_into_a_folder_of_another_run_is_refused(tmp_path):
    from mrad_hf.training.trainer import MRADTrainingArguments, train_mrad

    samples = make_samples(8, seed=53)
    args = dict(output_dir=str(tmp_path), batch_size=4, max_steps_per_epoch=1)
    first = train_mrad(
        make_tiny_trained_model("ft"), samples, MRADTrainingArguments(learning_rate=1e-3, **args), progress=False
    )
    before = (Path(first.final_model_dir) / "model.safetensors").read_bytes()
    _reset_accelerate()
    with pytest.raises(RunFolderError, match=r"settings.learning_rate: 0.001 -> 0.002"):
        train_mrad(
            make_tiny_trained_model("ft"), samples, MRADTrainingArguments(learning_rate=2e-3, **args), progress=False
        )
    _reset_accelerate()
    with pytest.raises(RunFolderError, match=r"dataset.items: 8 -> 6"):
        train_mrad(
            make_tiny_trained_model("ft"),
            samples[:6],
            MRADTrainingArguments(learning_rate=1e-3, **args),
            progress=False,
        )
    assert (Path(first.final_model_dir) / "model.safetensors").read_bytes() == before  # the old model is still there
    _reset_accelerate()
    again = train_mrad(
        make_tiny_trained_model("ft"),
        samples,
        MRADTrainingArguments(learning_rate=2e-3, overwrite=True, **args),
        progress=False,
    )
    assert (Path(again.final_model_dir) / "model.safetensors").read_bytes() != before


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.usefixtures("reset_accelerate")
def test_seed_makes_two_train_runs_on_a_local_clip_folder_identical(tmp_path, widget):
    make_tiny_model().clip.save_pretrained(tmp_path / "clip")
    finals = {}
    for name, seed in (("one", 7), ("two", 7), ("other", 8)):
        _reset_accelerate()
        assert (
            main(
                [
                    "train",
                    "--variant",
                    "ft",
                    "--clip",
                    str(tmp_path / "clip"),
                    "--aux-dataset",
                    "folder",
                    "--aux-root",
                    str(widget),
                    "--output-dir",
                    str(tmp_path / name),
                    "--image-size",
                    "112",
                    "--batch-size",
                    "2",
                    "--max-steps-per-epoch",
                    "2",
                    "--seed",
                    str(seed),
                ]
            )
            == 0
        )
        finals[name] = load_file(str(tmp_path / name / "final" / "model.safetensors"))
    heads = [key for key in finals["one"] if key.startswith(("image_projection", "patch_projection"))]
    assert heads and all(torch.equal(finals["one"][key], finals["two"][key]) for key in finals["one"])
    assert not all(torch.equal(finals["one"][key], finals["other"][key]) for key in heads)  # the seed matters


# ---------------------------------------------------------------- predict
@pytest.fixture
def queries(tmp_path):
    folder = tmp_path / "queries" / "crack"
    folder.mkdir(parents=True)
    for index, sample in enumerate(make_samples(4, seed=54)):
        Image.fromarray(sample["image"]).save(folder / f"q{index}.png")
    Image.fromarray(make_samples(1, seed=55)[0]["image"]).save(
        folder / ("n" * 228 + ".png")
    )  # a legal 232-character name
    return tmp_path / "queries"


def _predict(model, queries, out, *extra):
    return main(["predict", "--model", str(model), str(queries), "--output-dir", str(out), *extra])


def test_predict_failures_cost_one_image_and_long_names_are_bounded(tmp_path, two_models, queries, monkeypatch):
    import mrad_hf.tools.visualization as visualization
    from mrad_hf.models.mrad.image_processing_mrad import MRADImageProcessor

    save_panel, load = visualization.save_panel, MRADImageProcessor.load

    def disk_full_on_q2(path, *args, **kwargs):
        if "q2" in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_panel(path, *args, **kwargs)

    def memory_error_on_q3(self, image, *args, **kwargs):
        if str(image).endswith("q3.png"):
            raise MemoryError()
        return load(self, image, *args, **kwargs)

    monkeypatch.setattr(visualization, "save_panel", disk_full_on_q2)
    monkeypatch.setattr(MRADImageProcessor, "load", memory_error_on_q3)
    out = tmp_path / "out"
    assert _predict(two_models[0], queries, out) == 0
    summary = json.loads((out / "scores.json").read_text())
    assert summary["scored"] == 3 and summary["failed"] == 2
    errors = {Path(f["path"]).name: f["error"] for f in summary["failures"]}
    assert "No space left on device" in errors["q2.png"] and "MemoryError" in errors["q3.png"]
    long = next(r for r in summary["results"] if Path(r["path"]).name.startswith("nnnn"))
    heatmap = Path(long["heatmap"])
    assert (
        heatmap.is_file() and len(heatmap.name.encode()) <= 255 - 14 and heatmap.name.startswith("00000_crack_nnnn")
    )  # sorted first
    assert len(read_json_lines(out / "scores.jsonl")) == 5  # every image has its line, written as it was computed


def test_a_stopped_predict_run_resumes_and_a_different_one_is_refused(
    tmp_path, two_models, queries, monkeypatch, capsys
):
    import mrad_hf.tools.visualization as visualization

    save_panel = visualization.save_panel
    monkeypatch.setattr(
        visualization,
        "save_panel",
        lambda path, *a, **k: (
            (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left"))
            if "q2" in Path(path).name
            else save_panel(path, *a, **k)
        ),
    )
    out = tmp_path / "out"
    assert _predict(two_models[0], queries, out, "--on-error", "fail") == 2
    assert "scores so far are in" in capsys.readouterr().err
    kept = read_json_lines(out / "scores.jsonl")
    assert [Path(r["path"]).name for r in kept] == [
        "n" * 228 + ".png",
        "q0.png",
        "q1.png",
    ]  # computed before the failure
    assert (out / INCOMPLETE_MARKER).exists() and not (out / "scores.json").exists()
    with open(out / "scores.jsonl", "a", encoding="utf-8") as handle:  # what kill -9 in mid-write leaves
        handle.write('{"path": "torn')
    monkeypatch.setattr(visualization, "save_panel", save_panel)
    assert _predict(two_models[1], queries, out) == 2  # another model into the unfinished folder: refused, never mixed
    assert (
        "holds an unfinished run of 'mrad predict' that differs from this one (model.bank_sha256"
        in capsys.readouterr().err
    )
    assert _predict(two_models[0], queries, out, "--on-error", "fail") == 0  # same run: resumed
    assert "already done" in capsys.readouterr().out
    summary = json.loads((out / "scores.json").read_text())
    assert summary["scored"] == 5 and summary["failed"] == 0 and not (out / INCOMPLETE_MARKER).exists()
    assert [r["score"] for r in summary["results"][:3]] == [
        r["score"] for r in kept
    ]  # the earlier scores are kept as they were
    fresh = tmp_path / "fresh"
    assert _predict(two_models[0], queries, fresh, "--on-error", "fail") == 0
    assert [r["score"] for r in json.loads((fresh / "scores.json").read_text())["results"]] == pytest.approx(
        [r["score"] for r in summary["results"]], abs=1e-6
    )


# ---------------------------------------------------------------- the pieces
def test_json_lines_survive_a_torn_line_and_bounded_names_stay_unique(tmp_path):
    with JsonLinesWriter(tmp_path / "a.jsonl") as lines:
        lines.write({"i": 1})
        lines.write({"i": 2})
    (tmp_path / "a.jsonl").write_bytes((tmp_path / "a.jsonl").read_bytes() + b'{"i": 3')
    assert read_json_lines(tmp_path / "a.jsonl") == [{"i": 1}, {"i": 2}]
    assert (tmp_path / "a.jsonl").read_bytes().endswith(b'{"i": 2}\n')  # repaired so that appends continue cleanly
    one, two = (
        bounded_name(3, "data/crack/" + "é" * 200 + "a.png"),
        bounded_name(3, "data/crack/" + "é" * 200 + "b.png"),
    )
    assert one != two and one.startswith("00003_crack_") and all(len(n.encode()) <= 239 for n in (one, two))
    assert bounded_name(12, "x/good/001.png") == "00012_good_001.png"


def test_open_run_folder_lists_every_differing_field(tmp_path):
    first = run_fingerprint(command="predict", settings={"threshold": 0.5, "stretch": False})
    open_run_folder(tmp_path, first, artefacts=("scores.jsonl",))
    (tmp_path / "scores.jsonl").write_text("")
    second = run_fingerprint(command="predict", settings={"threshold": 0.7, "stretch": True})
    with pytest.raises(RunFolderError) as error:
        open_run_folder(tmp_path, second, artefacts=("scores.jsonl",))
    assert "settings.stretch: false -> true; settings.threshold: 0.5 -> 0.7" in str(error.value)
    (tmp_path / "other.txt").write_text("the user's file")
    assert open_run_folder(tmp_path, second, artefacts=("scores.jsonl",), overwrite=True).state == "new"
    assert not (tmp_path / "scores.jsonl").exists() and (tmp_path / "other.txt").read_text() == "the user's file"
    # results without any run.json (an older run) are not taken for this run either
    (tmp_path / "run.json").unlink()
    (tmp_path / "scores.jsonl").write_text("")
    with pytest.raises(RunFolderError, match=r"run.json: missing"):
        open_run_folder(tmp_path, second, artefacts=("scores.jsonl",))


def test_kill_9_during_predict_is_detected_and_resumed_never_mixed(tmp_path, two_models, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "many" / "good"
    folder.mkdir(parents=True)
    for index, sample in enumerate(make_samples(40, seed=56)):
        Image.fromarray(sample["image"]).save(folder / f"{index:03d}.png")
    out = tmp_path / "out"
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mrad_hf",
            "predict",
            "--model",
            str(two_models[0]),
            str(folder),
            "--output-dir",
            str(out),
        ],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "scores.jsonl").is_file() and len((out / "scores.jsonl").read_bytes().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, "predict finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(read_json_lines(out / "scores.jsonl", repair=False))
    assert 3 <= done_before < 40 and (out / INCOMPLETE_MARKER).exists() and not (out / "scores.json").exists()
    assert _predict(two_models[1], folder, out) == 2  # another model: refused, the killed run's files are not mixed in
    assert "holds an unfinished run of 'mrad predict'" in capsys.readouterr().err
    assert _predict(two_models[0], folder, out) == 0  # the same run: resumed
    assert "already done" in capsys.readouterr().out
    summary = json.loads((out / "scores.json").read_text())
    assert summary["scored"] == 40 and len({r["path"] for r in summary["results"]}) == 40
    fresh = tmp_path / "fresh"
    assert _predict(two_models[0], folder, fresh) == 0
    assert [r["score"] for r in summary["results"]] == pytest.approx(
        [r["score"] for r in json.loads((fresh / "scores.json").read_text())["results"]], abs=1e-6
    )
