# SPDX-License-Identifier: Apache-2.0
"""The `mrad` command: build-bank and predict on a user folder, bad files skipped, clear one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_samples, make_tiny_model
from PIL import Image

from mrad_hf import MRADImageProcessor
from mrad_hf.cli.main import main
from mrad_hf.memory import build_memory_bank, load_bank


@pytest.fixture
def user_folder(tmp_path):
    """The documented generic layout: good/, <defect>/ with <stem>_mask.png beside the image."""
    from reliability._files import write_folder_dataset

    return write_folder_dataset(tmp_path / "widget", make_samples(6, seed=21))


@pytest.fixture
def saved_tiny(tmp_path):
    path = tmp_path / "tiny"
    make_tiny_model().save_pretrained(path)
    return path


def test_build_bank_then_predict_with_a_bad_file(user_folder, saved_tiny, tmp_path, capsys):
    bank_path, model_dir = tmp_path / "bank.safetensors", tmp_path / "with_bank"
    code = main(
        [
            "build-bank",
            "--model",
            str(saved_tiny),
            "--dataset",
            "folder",
            "--data-root",
            str(user_folder),
            "--output",
            str(bank_path),
            "--save-model",
            str(model_dir),
            "--batch-size",
            "4",
        ]
    )
    assert code == 0
    bank = load_bank(bank_path)
    assert bank.counts()["image_entries"] == 6 and bank.counts()["patch_anomalous"] == 3
    assert bank.metadata["source"] == "folder"

    queries = tmp_path / "queries"
    queries.mkdir()
    query_images = [s["image"] for s in make_samples(3, seed=22)]
    for index, image in enumerate(query_images):
        Image.fromarray(image).save(queries / f"q{index}.png")
    (queries / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    assert (
        main(["predict", "--model", str(model_dir), str(queries), "--output-dir", str(out), "--threshold", "0.5"]) == 0
    )
    summary = json.loads((out / "scores.json").read_text())
    assert summary["scored"] == 3 and summary["failed"] == 1
    failure = summary["failures"][0]
    assert failure["path"].endswith("broken.png") and "broken.png" in failure["error"]
    # scores equal the model's own
    from mrad_hf import MRADForAnomalyDetection

    model = MRADForAnomalyDetection.from_pretrained(model_dir)
    processor = MRADImageProcessor.from_config(model.config)
    expected = model(**processor(query_images)).anomaly_score.tolist()
    assert [r["score"] for r in summary["results"]] == pytest.approx(expected, abs=1e-6)
    assert all(r["label"] in ("anomaly", "normal") for r in summary["results"])
    panel = Image.open(summary["results"][0]["heatmap"])
    assert panel.size[0] == 2 * 120 and panel.mode == "RGB"

    assert (
        main(
            [
                "predict",
                "--model",
                str(model_dir),
                str(queries),
                "--output-dir",
                str(out),
                "--on-error",
                "fail",
                "--overwrite",
            ]
        )
        == 2
    )
    assert "broken.png" in capsys.readouterr().err


def test_build_bank_outputs_never_replace_what_the_package_did_not_write(user_folder, saved_tiny, tmp_path, capsys):
    """--output over an image and --save-model over the CLIP folder it reads are refused in one line, before any
    work (nothing is built, nothing changes); --save-model into the data folder adds the model beside the data."""
    image = next(user_folder.glob("good/*.png"))
    before = {path: path.read_bytes() for path in [*user_folder.rglob("*.png"), *saved_tiny.iterdir()]}
    base = ["build-bank", "--model", str(saved_tiny), "--dataset", "folder", "--data-root", str(user_folder)]
    assert main([*base, "--output", str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mrad build-bank: error:") and "is not an MRAD memory bank" in err and "Building" not in err
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip"}))
    assert main([*base, "--output", str(tmp_path / "b.safetensors"), "--save-model", str(clip)]) == 2
    assert "is not an MRAD model folder but holds config.json" in capsys.readouterr().err
    assert not (tmp_path / "b.safetensors").exists() and json.loads((clip / "config.json").read_text()) == {
        "model_type": "clip"
    }
    assert main([*base, "--output", str(tmp_path / "b.safetensors"), "--save-model", str(user_folder)]) == 0
    assert all(path.read_bytes() == content for path, content in before.items())
    assert (user_folder / "config.json").is_file() and (user_folder / "memory_bank.json").is_file()


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["predict", "--clip", "random-small", str(tmp_path / "nope.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mrad predict: error:") and "neither an image file nor a folder" in err
    assert (
        main(
            [
                "build-bank",
                "--dataset",
                "mvtec",
                "--data-root",
                str(tmp_path),
                "--output",
                str(tmp_path / "b.safetensors"),
            ]
        )
        == 2
    )
    assert "Pass --model" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    """The README's main job, as written (a relative output folder, here reached through a symlink): synthetic
    benchmark -> bank -> scores, AUROCs and heatmap PNGs, honest about weights; then the printed next command scores
    an image with the saved model and gets the demo's own score for it."""
    import shlex

    from sklearn.metrics import roc_auc_score

    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    out = Path("link/outputs/demo")  # relative, and through a symlink: the loaders' absolute paths must still match
    assert main(["demo", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "RANDOMLY INITIALISED CLIP" in printed and "Retrieval temperature: 0.01" in printed
    results = json.loads((out / "demo_results.json").read_text())
    assert results["pretrained"] is False and results["protocol"] == "held-out-images"
    scores = results["scores"]
    assert len(scores) == 27 and printed.count(" score=") == 27  # every held-out image scored, none lost on a path
    for record in scores:  # the label column is the ground truth, and says so (the demo makes no decision)
        truth = "anomaly" if record["label"] else "normal "
        assert f"truth={truth}  score={record['score']:.6f}  " in printed
    assert results["image_auroc"] == pytest.approx(
        roc_auc_score([s["label"] for s in scores], [s["score"] for s in scores])
    )
    assert results["pixel_auroc"] > 0.75  # retrieval localises the pasted defects (measured 0.95)
    heatmaps = sorted((out / "heatmaps").glob("*.png"))
    assert len(heatmaps) == len(scores) and Image.open(heatmaps[0]).size == (3 * 256, 256 + 18)
    assert load_bank(out / "memory_bank.safetensors").counts()["image_entries"] == len(scores)

    # the next command the demo prints works as printed, with the model it saved
    next_command = [line.strip() for line in printed.splitlines() if line.strip().startswith("mrad predict --model")]
    assert len(next_command) == 1
    argv = shlex.split(next_command[0].replace("path/to/your_image.png", shlex.quote(scores[4]["path"])))[1:]
    assert main(argv) == 0
    predicted = json.loads((Path(argv[argv.index("--output-dir") + 1]) / "scores.json").read_text())
    assert [r["score"] for r in predicted["results"]] == pytest.approx([scores[4]["score"]], abs=1e-6)


def test_evaluate_cross_dataset_tables_match_independent_metrics(tmp_path, saved_tiny, capsys):
    """`mrad evaluate`: memory from one synthetic benchmark, scoring another; the table equals metrics recomputed here."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from mrad_hf import MRADForAnomalyDetection
    from mrad_hf.data.loaders import load_mvtec_layout
    from mrad_hf.data.synthetic import make_synthetic_benchmark

    aux = make_synthetic_benchmark(
        tmp_path / "aux", categories=("brick",), n_test_good=3, n_test_per_defect=1, image_size=96, seed=1
    )
    target = make_synthetic_benchmark(
        tmp_path / "target", categories=("grass", "gravel"), n_test_good=3, n_test_per_defect=1, image_size=96, seed=2
    )
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--model",
        str(saved_tiny),
        "--bank-from",
        "mvtec-layout",
        "--bank-root",
        str(aux),
        "--dataset",
        "mvtec-layout",
        "--data-root",
        str(target),
        "--output-dir",
        str(out),
        "--heatmaps",
        "2",
    ]
    assert main(args) == 0
    assert "| **mean** |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [r["category"] for r in results["per_category"]] == ["grass", "gravel"]

    model = MRADForAnomalyDetection.from_pretrained(saved_tiny)
    model.set_memory_bank(load_bank(out / "memory_bank.safetensors"))
    processor = MRADImageProcessor.from_config(model.config)
    recomputed = {}
    for category in ("grass", "gravel"):
        rows = [r for r in load_mvtec_layout(target) if r["category"] == category]
        inputs = processor([r["image"] for r in rows], masks=[r["mask"] for r in rows])
        outputs = model(pixel_values=inputs["pixel_values"])
        labels = [r["label"] for r in rows]
        recomputed[category] = {
            "image_auroc": roc_auc_score(labels, outputs.anomaly_score.numpy()),
            "image_ap": average_precision_score(labels, outputs.anomaly_score.numpy()),
            "pixel_auroc": roc_auc_score(inputs["masks"].numpy().ravel() > 0.5, outputs.anomaly_map.numpy().ravel()),
        }
    for record in results["per_category"]:
        for key, value in recomputed[record["category"]].items():
            assert record["metrics"][key] == pytest.approx(value, abs=1e-6), (record["category"], key)
    for key in ("image_auroc", "pixel_auroc"):
        assert results["mean"][key] == pytest.approx(np.mean([recomputed[c][key] for c in recomputed]), abs=1e-6)
    table = (out / "results.md").read_text()
    assert f"{100 * recomputed['grass']['image_auroc']:.1f}" in table.splitlines()[2]
    assert (out / "results.csv").read_text().splitlines()[-1].startswith("mean,")
    assert len(list((out / "heatmaps").glob("*.png"))) == 4
    # resumable: finished categories are read back, not recomputed
    (out / "per_category" / "grass.json").write_text(
        (out / "per_category" / "grass.json").read_text().replace('"images": 7', '"images": 7, "resumed": true')
    )
    assert main(args) == 0
    assert json.loads((out / "per_category" / "grass.json").read_text())["resumed"] is True


def test_folder_inputs_skip_ground_truth_masks(tmp_path, capsys):
    from PIL import Image

    from mrad_hf.cli.common import _collect_images

    for relative in ("test/good/000.png", "test/hole/001.png", "ground_truth/hole/001_mask.png", "extra/002_mask.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / relative)
    found = _collect_images([str(tmp_path)])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["test/good/000.png", "test/hole/001.png"]
    assert "Skipping 2 ground-truth mask file(s)" in capsys.readouterr().out


def test_a_command_s_output_folder_is_never_read_as_its_input(tmp_path, capsys):
    """An output folder inside an input folder is skipped with a count (a rerun scores the same images, not its own
    heatmaps, even through a symlink); an input folder inside or equal to the output folder is refused."""
    from mrad_hf.cli.common import CLIError, _collect_images

    model = make_tiny_model()
    build_memory_bank(model, make_samples(4, seed=51), source="test", progress=False)
    model.save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for index, sample in enumerate(make_samples(2, seed=52)):
        Image.fromarray(sample["image"]).save(images / f"q{index}.png")
    out = images / "out"
    for _ in range(2):
        assert main(["predict", "--model", str(tmp_path / "model"), str(images), "--output-dir", str(out)]) == 0
        summary = json.loads((out / "scores.json").read_text())
        assert [Path(r["path"]).name for r in summary["results"]] == ["q0.png", "q1.png"] and not summary["failures"]
    assert len(list((out / "heatmaps").iterdir())) == 2
    assert "Skipping 5 file(s) under" in capsys.readouterr().out  # 2 heatmaps, run.json, scores.json, scores.jsonl
    (images / "link").symlink_to(out, target_is_directory=True)  # the outputs reached another way are outputs too
    assert [p.name for p in _collect_images([str(images)], output_dir=out)] == ["q0.png", "q1.png"]
    assert len(_collect_images([str(images)])) == 2 + 2 + 2  # without the rule: both heatmap copies are "inputs"
    for output_dir in (images, tmp_path):
        with pytest.raises(CLIError, match="inside the output folder"):
            _collect_images([str(images)], output_dir=output_dir)
    assert [p.name for p in _collect_images([str(images / "q0.png")], output_dir=images)] == ["q0.png"]  # named file


def test_dataset_rows_in_the_output_folder_are_left_out(tmp_path, capsys):
    from mrad_hf.cli.common import CLIError, without_outputs
    from mrad_hf.data.loaders import load_folder

    root = tmp_path / "widget"
    for relative in ("good/000.png", "good/001.png", "hole/002.png"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / relative)
    dataset = load_folder(root)
    kept = without_outputs(dataset, root / "hole", "--dataset folder")
    assert sorted(kept["id"]) == ["good/000.png", "good/001.png"]
    assert "Leaving out 1 image(s) of --dataset folder" in capsys.readouterr().out
    assert without_outputs(dataset, root / "out", "--dataset folder") is dataset
    with pytest.raises(CLIError, match="Every image of --dataset folder is inside the output folder"):
        without_outputs(dataset, root, "--dataset folder")


def test_a_multi_frame_image_is_one_warning_line_naming_it(model_with_bank, tmp_path, capsys):
    model_with_bank.save_pretrained(tmp_path / "model")
    (tmp_path / "in").mkdir()
    frames = [Image.fromarray(s["image"]) for s in make_samples(3, seed=23)]
    frames[0].save(tmp_path / "in" / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "in" / "still.png")
    args = ["predict", "--model", str(tmp_path / "model"), str(tmp_path / "in"), "--output-dir", str(tmp_path / "out")]
    assert main(args) == 0
    err = capsys.readouterr().err
    lines = [line.split("\r")[-1] for line in err.splitlines() if "frame" in line]  # after any progress bar redraw
    expected = (
        f"WARNING: Image '{tmp_path / 'in' / 'anim.gif'}': scoring frame 1 of 3, the rest ignored (split the file"
    )
    assert len(lines) == 1 and lines[0].startswith(expected) and "UserWarning" not in err
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["scored"] == 2


def test_hostile_or_edited_model_folders_are_one_error_line(model_with_bank, tmp_path, capfd, monkeypatch):
    import io

    folder, marker = tmp_path / "model", tmp_path / "ran.txt"
    model_with_bank.save_pretrained(folder)
    Image.fromarray(make_samples(1, seed=24)[0]["image"]).save(tmp_path / "q.png")
    args = ["predict", "--model", str(folder), str(tmp_path / "q.png"), "--output-dir", str(tmp_path / "out")]
    processor_file, config_file = folder / "preprocessor_config.json", folder / "config.json"
    original = {path: path.read_text() for path in (processor_file, config_file)}
    (folder / "evil_proc.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 5))  # a prompt, were there one, would be answered "yes"
    edits = {  # file -> (edit, what the one error line says)
        processor_file: [
            (
                {"auto_map": {"AutoImageProcessor": "evil_proc.P"}, "image_processor_type": "P"},
                f"{processor_file} names image_processor_type 'P', not MRAD's image processor",
            ),
            ({"image_mean": [0, 0, 0]}, f"{processor_file} and the model's config.json"),
        ],
        config_file: [
            ({"image_bank_size": 5}, f"Model '{folder}': its config.json does not match its model.safetensors"),
        ],
    }
    for path, cases in edits.items():
        for changes, message in cases:
            path.write_text(json.dumps({**json.loads(original[path]), **changes}))
            assert main(args) == 2
            printed = capfd.readouterr()
            lines = [line for line in printed.err.splitlines() if "error" in line]
            assert len(lines) == 1 and lines[0].startswith(f"mrad predict: error: {message}")
            assert "LOAD REPORT" not in printed.err and "custom code" not in printed.out + printed.err
            path.write_text(original[path])
    assert not marker.exists()


def test_a_random_backbone_is_named_by_every_later_command_and_result(user_folder, tmp_path, capsys, monkeypatch):
    """A model built on `--clip random-*` keeps saying so: its bank records the name, and predict / evaluate /
    calibrate / explain print the NOTE and record it in their JSON (an evaluation is marked not pretrained)."""
    from mrad_hf.memory.building import random_backbone

    bank_path, model_dir = tmp_path / "bank.safetensors", tmp_path / "random_model"
    build = ["build-bank", "--clip", "random-tiny", "--dataset", "folder", "--data-root", str(user_folder)]
    assert main([*build, "--output", str(bank_path), "--save-model", str(model_dir)]) == 0
    capsys.readouterr()
    assert load_bank(bank_path).metadata["random_backbone"] == "random-tiny"
    from mrad_hf import MRADForAnomalyDetection

    assert random_backbone(MRADForAnomalyDetection.from_pretrained(model_dir)) == "random-tiny"
    assert random_backbone(make_tiny_model()) is None  # nothing said it was random: no claim either way

    good = user_folder / "good"
    assert main(["predict", "--model", str(model_dir), str(good), "--output-dir", str(tmp_path / "p")]) == 0
    assert "RANDOMLY INITIALISED (random-tiny; its bank records it)" in capsys.readouterr().out
    assert json.loads((tmp_path / "p" / "scores.json").read_text())["random_backbone"] == "random-tiny"

    evaluate = ["evaluate", "--model", str(model_dir), "--dataset", "folder", "--data-root", str(user_folder)]
    assert main([*evaluate, "--output-dir", str(tmp_path / "e"), "--heatmaps", "0"]) == 0
    assert capsys.readouterr().out.count("RANDOMLY INITIALISED") == 2  # on loading, and again below the table
    run = json.loads((tmp_path / "e" / "results.json").read_text())["run"]
    assert run["pretrained"] is False and run["random_backbone"] == "random-tiny"

    explain = ["explain", "--model", str(model_dir), str(good / "000.png"), "--output-dir", str(tmp_path / "x")]
    assert main(explain) == 0
    assert "RANDOMLY INITIALISED" in capsys.readouterr().out
    assert json.loads((tmp_path / "x" / "explanations.json").read_text())[0]["random_backbone"] == "random-tiny"

    assert main(["bank", "info", str(bank_path)]) == 0
    assert "RANDOMLY INITIALISED CLIP backbone (random-tiny)" in capsys.readouterr().out
    assert main(["bank", "info", str(bank_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["random_backbone"] == "random-tiny"

    from types import SimpleNamespace

    from mrad_hf.hub import api

    monkeypatch.setattr(api, "push_model", lambda *args, **kwargs: SimpleNamespace(oid="abc", commit_url="url"))
    assert main(["push", str(model_dir), "someone/random-model"]) == 0  # no network: the Hub call is replaced
    assert "RANDOMLY INITIALISED (random-tiny; its bank records it)" in capsys.readouterr().out


def test_a_good_only_bank_is_refused_with_command_line_advice(tmp_path, capsys):
    """A folder with only good/ images: the refusal tells a CLI user what to add, never a Python keyword."""
    from reliability._files import write_folder_dataset

    good_only = write_folder_dataset(tmp_path / "parts", [s for s in make_samples(6, seed=23) if s["mask"] is None])
    build = ["build-bank", "--clip", "random-tiny", "--dataset", "folder", "--data-root", str(good_only)]
    assert main([*build, "--output", str(tmp_path / "b.safetensors")]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith("mrad build-bank: error: The memory bank would have no anomalous entry")
    assert (
        "add defect images with their masks. With --dataset folder: one folder per defect kind beside good/" in error
    )
    assert "allow_no_anomalies" not in error and "label 1" not in error


def test_a_random_backbone_gets_the_sharp_retrieval_temperature_unless_one_is_given(user_folder, tmp_path, capsys):
    """At the reference's 1.0 random features retrieve uniformly: a new random-backbone model uses
    RANDOM_DEMO_TEMPERATURE and says so; an explicit --retrieval-temperature is kept, silently."""
    from mrad_hf import MRADForAnomalyDetection
    from mrad_hf.cli.common import RANDOM_DEMO_TEMPERATURE

    build = ["build-bank", "--clip", "random-tiny", "--dataset", "folder", "--data-root", str(user_folder)]
    for extra, expected in (([], RANDOM_DEMO_TEMPERATURE), (["--retrieval-temperature", "0.5"], 0.5)):
        model_dir = tmp_path / f"model{len(extra)}"
        assert main([*build, *extra, "--output", str(tmp_path / "b.safetensors"), "--save-model", str(model_dir)]) == 0
        said = f"Retrieval temperature: {RANDOM_DEMO_TEMPERATURE} for the random backbone" in capsys.readouterr().out
        assert said == (not extra)
        assert MRADForAnomalyDetection.from_pretrained(model_dir).config.retrieval_temperature == expected


def test_build_bank_names_a_plain_folder_without_a_split_and_its_bar_has_a_total(user_folder, tmp_path, capsys):
    build = ["build-bank", "--clip", "random-tiny", "--dataset", "folder", "--data-root", str(user_folder)]
    assert main([*build, "--output", str(tmp_path / "b.safetensors")]) == 0
    captured = capsys.readouterr()
    assert f"Building the memory bank from 6 images in {user_folder}: 3 normal, 3 anomalous\n" in captured.out
    assert "split" not in captured.out and "Building memory bank: 100%" in captured.err and "6/6" in captured.err
