# SPDX-License-Identifier: Apache-2.0
"""One CLI (issue 12 §3): help without heavy imports, the shared model options and their bounds, missing local
paths reported before any Hub attempt, --device / --dtype reaching the model, batched predict equal to one by one,
messages in command-line terms, logging through progress bars and from rank 0 only."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_samples, make_tiny_model
from PIL import Image

from mrad_hf.cli import common
from mrad_hf.cli.main import build_parser, main
from mrad_hf.memory import build_memory_bank, load_bank, save_bank

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAVY_MODULES = ("torch", "transformers", "numpy", "PIL", "datasets", "accelerate", "safetensors", "huggingface_hub")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd=REPO_ROOT, timeout=300
    )


def _commands(parser: argparse.ArgumentParser, prefix=()):
    """(path, parser) of every command and sub-command, e.g. (("bank", "add"), <parser>)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _commands(sub, (*prefix, name))


# ---------------------------------------------------------------------- help: fast, complete
def test_every_help_answers_without_importing_torch_or_transformers():
    """`mrad --help`, `mrad --version` and every `mrad <command> --help` build the parser from the standard library
    only (the eager imports cost 6 CPU-s before)."""
    code = """
import contextlib, io, json, sys
import argparse
from mrad_hf.cli.main import build_parser, main
def commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield [*prefix, name]
                yield from commands(sub, (*prefix, name))
paths = [[]] + list(commands(build_parser()))
for argv in [path + ["--help"] for path in paths] + [["--version"]]:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exit:
            assert exit.code == 0, (argv, exit.code)
print(json.dumps({"commands": len(paths), "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY_MODULES,)
    result = _python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["commands"] >= 16 and report["heavy"] == []


def test_import_mrad_hf_is_lazy_and_still_registers_with_transformers(tmp_path):
    """`import mrad_hf` loads no torch; transformers' Auto classes and pipeline still know MRAD afterwards, whether
    transformers comes after mrad_hf, before it, or through one of mrad_hf's own modules."""
    folder = tmp_path / "tiny"
    make_tiny_model().save_pretrained(folder)
    check = f"""
from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.pipelines import PIPELINE_REGISTRY
model = AutoModel.from_pretrained({str(folder)!r})
assert type(model).__module__ == "mrad_hf.models.mrad.modeling_mrad", type(model).__module__  # not remote code
assert type(AutoImageProcessor.from_pretrained({str(folder)!r})).__name__ == "MRADImageProcessor"
assert "mrad" in CONFIG_MAPPING and "anomaly-detection" in PIPELINE_REGISTRY.get_supported_tasks()
print("ok")
"""
    lazy = _python(
        "import sys, mrad_hf\nprint(sorted(m for m in %r if m in sys.modules), mrad_hf.__version__)" % (HEAVY_MODULES,)
    )
    assert lazy.stdout.split() == ["[]", "0.1.0"], lazy.stderr
    for first in (
        "import mrad_hf",
        "import transformers\nimport mrad_hf",
        "from mrad_hf.models.mrad.modeling_mrad import MRADForAnomalyDetection",
        "import mrad_hf\nmrad_hf.MRADConfig",
    ):
        result = _python(first + "\n" + check)
        assert result.stdout.strip() == "ok", (first, result.stderr[-2000:])


def test_every_command_and_option_is_described_and_shows_its_default():
    parser = build_parser()
    for path, sub in _commands(parser):
        assert sub.description and "\n" not in sub.description.strip(), path
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, (path, action.dest)
            if action.default is not None and action.default is not False and action.option_strings:
                assert "default" in formatter._get_help_string(action).lower(), (path, action.dest)
    help_text = parser.format_help()
    for path, _ in _commands(parser):
        assert path[-1] in help_text or path[0] in help_text


def test_version_is_the_installed_one_and_the_package_s(capsys):
    from importlib.metadata import version

    import mrad_hf

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"mrad {version('mrad-hf')}"
    assert version("mrad-hf") == mrad_hf.__version__


def test_the_model_options_are_the_same_on_every_model_command():
    shared = {
        "--clip",
        "--image-size",
        "--retrieval-temperature",
        "--dtype",
        "--device",
        "--batch-size",
        "--on-error",
        "--seed",
    }
    parser = build_parser()
    commands = dict(_commands(parser))
    for path in [("predict",), ("evaluate",), ("build-bank",), ("calibrate",), ("explain",), ("bank", "add")]:
        options = {option for action in commands[path]._actions for option in action.option_strings}
        assert shared | {"--model"} <= options, (path, sorted(shared | {"--model"} - options))
    for path in [("predict",), ("evaluate",), ("calibrate",), ("explain",), ("serve",)]:
        options = {option for action in commands[path]._actions for option in action.option_strings}
        assert {"--bank", "--trust-bank", "--device", "--dtype"} <= options, path
    # one definition: the same help text for the same option everywhere
    helps: dict[str, set] = {}
    for path, sub in commands.items():
        if path[0] == "convert":  # the converters' own options (`convert checkpoint --clip` takes no random backbone)
            continue
        for action in sub._actions:
            for option in action.option_strings:
                if option in shared - {"--seed", "--image-size", "--retrieval-temperature", "--device"}:
                    helps.setdefault(option, set()).add(action.help)
    assert all(len(texts) == 1 for texts in helps.values()), helps


def test_dedup_default_agrees_with_the_bank_tools():
    from mrad_hf.cli.tools import DEFAULT_DEDUP_THRESHOLD
    from mrad_hf.memory.tools import DEFAULT_DEDUP_THRESHOLD as BANK_TOOLS_DEFAULT

    assert DEFAULT_DEDUP_THRESHOLD == BANK_TOOLS_DEFAULT


# ---------------------------------------------------------------------- bounds at parse time
@pytest.mark.parametrize(
    "argv, option",
    [
        (["predict", "--batch-size", "0", "x.png"], "--batch-size"),
        (["predict", "--batch-size", "-3", "x.png"], "--batch-size"),
        (["predict", "--batch-size", "two", "x.png"], "--batch-size"),
        (["predict", "--threshold", "nan", "x.png"], "--threshold"),
        (["predict", "--threshold", "inf", "x.png"], "--threshold"),
        (["predict", "--threshold", "-1", "x.png"], "--threshold"),  # image scores are in [0, 2]
        (["predict", "--threshold", "2.5", "x.png"], "--threshold"),
        (["explain", "--threshold", "-0.1", "x.png"], "--threshold"),
        (["serve", "--threshold", "3"], "--threshold"),
        (["predict", "--image-size", "100000", "x.png"], "--image-size"),
        (
            [
                "build-bank",
                "--image-size",
                "8",
                "--dataset",
                "folder",
                "--data-root",
                ".",
                "--output",
                "b.safetensors",
            ],
            "--image-size",
        ),
        (["predict", "--retrieval-temperature", "0", "x.png"], "--retrieval-temperature"),
        (["predict", "--retrieval-temperature", "nan", "x.png"], "--retrieval-temperature"),
        (["predict", "--device", "gpu", "x.png"], "--device"),
        (["predict", "--dtype", "int8", "x.png"], "--dtype"),
        (["predict", "--clip", "random-smal", "x.png"], "--clip"),
        (["predict", "--model", "m", "--clip", "random-tiny", "x.png"], "--clip"),
        (["predict", "--seed", "-1", "x.png"], "--seed"),
        (["calibrate", "--target-fpr", "0", "--images", "x"], "--target-fpr"),
        (["calibrate", "--target-fpr", "1.5", "--images", "x"], "--target-fpr"),
        (["explain", "--top-k", "0", "x.png"], "--top-k"),
        (["serve", "--port", "70000"], "--port"),
        (["evaluate", "--heatmaps", "-1", "--dataset", "folder", "--data-root", "."], "--heatmaps"),
        (["bank", "merge", "a", "--output", "b", "--dedup", "1.5"], "--dedup"),
        (
            [
                "train",
                "--variant",
                "ft",
                "--clip",
                "random-tiny",
                "--aux-dataset",
                "folder",
                "--aux-root",
                ".",
                "--output-dir",
                "o",
                "--learning-rate",
                "-1",
            ],
            "--learning-rate",
        ),
    ],
)
def test_out_of_bounds_values_are_parse_errors_that_name_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit.value.code == 2 and f"argument {option}" in err
    assert len(err.split("error:", 1)[1].strip()) > 10  # a real message, not an empty `error:` line


def test_image_thresholds_take_the_whole_score_range_and_name_it(capsys):
    """Every --threshold takes image scores' range [0, 2], ends included, and the refusal states that range."""
    parser = build_parser()
    commands = dict(_commands(parser))
    for path in [("predict",), ("explain",), ("serve",)]:
        action = next(action for action in commands[path]._actions if "--threshold" in action.option_strings)
        assert [action.type(text) for text in ("0", "1.25", "2")] == [0.0, 1.25, 2.0], path
    with pytest.raises(SystemExit):
        main(["predict", "--threshold", "2.0001", "x.png"])
    assert "in [0, 2]" in capsys.readouterr().err


def test_an_error_without_a_message_still_says_something():
    assert common.cli_message(MemoryError()).startswith("MemoryError")
    assert "--trust-bank" in common.cli_message(ValueError("Rebuild the bank, or pass strict=False if harmless."))


# ---------------------------------------------------------------------- local paths: at once, before the Hub
def test_a_missing_local_model_is_reported_at_once_without_any_hub_attempt(tmp_path):
    """Offline and with an unreachable endpoint: `--model ./modle` says the folder is missing (and suggests the
    near name), it does not retry the Hub for 25 s and does not advise `mrad pull`."""
    (tmp_path / "model").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "part.png")
    code = "import sys; from mrad_hf.cli.main import main; code = main(sys.argv[1:]); print('heavy', 'torch' in sys.modules); sys.exit(code)"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    for argv, expected in [
        (["predict", "--model", "./modle", "part.png"], "--model './modle': no such file or folder"),
        (["predict", "--model", "runs/final/", "part.png"], "--model 'runs/final/': no such file or folder"),
        (["predict", "--clip", "./clip-vit-l14", "part.png"], "--clip './clip-vit-l14': no such file or folder"),
        (
            ["predict", "--clip", "random-tiny", "--bank", "banks/visa.safetensors", "part.png"],
            "--bank 'banks/visa.safetensors': no such file",
        ),
    ]:
        result = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
        )
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "mrad pull" not in result.stderr, result.stderr
        assert "heavy False" in result.stdout  # refused before torch, let alone a download
    result = subprocess.run(
        [sys.executable, "-c", code, "predict", "--model", "./modle", "part.png"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert "Did you mean './model'?" in result.stderr


def test_an_existing_local_folder_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    import mrad_hf.hub.api as hub

    assert common.check_local_path("--model", str(tmp_path)) == str(tmp_path)
    assert common.check_local_path("--model", "mrad-clip") == "mrad-clip"  # a Hub short name passes through
    assert common.check_local_path("--model", "my-org/mrad-tf-visa") == "my-org/mrad-tf-visa"
    monkeypatch.setattr(hub, "load_model", lambda *a, **k: pytest.fail("the Hub was asked for a local path"))
    with pytest.raises(common.CLIError, match="no such file or folder"):
        common.load_detector(str(tmp_path / "missing" / "model"), None)


# ---------------------------------------------------------------------- --device and --dtype reach the model
def _parse(*argv):
    return build_parser().parse_args(list(argv))


def test_device_and_dtype_reach_the_model(monkeypatch):
    args = _parse(
        "predict", "--clip", "random-tiny", "--device", "cpu", "--dtype", "bfloat16", "--image-size", "56", "x.png"
    )
    detector = common.detector_from_args(args)
    assert next(detector.clip.parameters()).dtype == torch.bfloat16
    assert {p.device.type for p in detector.parameters()} == {"cpu"}
    assert not detector.training
    # the memory and the scores stay float32 (one fp32 rule)
    assert all(
        b.dtype == torch.float32 for name, b in detector.named_buffers() if "memory" in name and b.is_floating_point()
    )

    float32 = common.detector_from_args(
        _parse("predict", "--clip", "random-tiny", "--device", "cpu", "--image-size", "56", "x.png")
    )
    assert next(float32.clip.parameters()).dtype == torch.float32

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.resolve_device("auto") == "cpu"
    from mrad_hf.runtime import resolve_dtype  # the one rule for "auto"

    assert common.resolve_dtype("auto", "cpu") == str(resolve_dtype("auto", "cpu")).replace("torch.", "")
    assert common.resolve_dtype("float16", "cpu") == "float16" and common.resolve_dtype(None, "cpu") == "float32"
    with pytest.raises(common.CLIError, match="--device cuda: no CUDA device"):
        common.detector_from_args(_parse("predict", "--clip", "random-tiny", "--device", "cuda", "x.png"))


def test_each_launched_process_takes_its_own_gpu(monkeypatch):
    """Under torchrun / accelerate launch, "auto" and "cuda" mean cuda:LOCAL_RANK (recorded: no GPU here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert common.resolve_device("auto") == common.resolve_device("cuda") == "cuda:2"
    assert common.resolve_device("cuda:1") == "cuda:1" and common.resolve_device("cpu") == "cpu"
    monkeypatch.delenv("LOCAL_RANK")
    assert common.resolve_device("auto") == "cuda"


def test_device_moves_the_model_where_it_is_asked(monkeypatch):
    """The model is moved with `.to(device)` after loading (recorded here, since the build machines have no GPU)."""
    moved = []
    from mrad_hf.models.mrad.modeling_mrad import MRADForAnomalyDetection

    original = MRADForAnomalyDetection.to
    monkeypatch.setattr(
        MRADForAnomalyDetection, "to", lambda self, *a, **k: moved.append(a) or original(self, *a, **k)
    )
    monkeypatch.setattr(common, "resolve_device", lambda device: "cpu" if device == "auto" else device)
    common.detector_from_args(_parse("predict", "--clip", "random-tiny", "--image-size", "56", "x.png"))
    assert moved[-1] == ("cpu",)


# ---------------------------------------------------------------------- batched predict
@pytest.fixture
def model_with_bank(tmp_path):
    model = make_tiny_model()
    build_memory_bank(model, make_samples(6, seed=3), source="test", progress=False)
    path = tmp_path / "with_bank"
    model.save_pretrained(path)
    return path


def test_batched_predict_equals_one_by_one(model_with_bank, tmp_path):
    queries = tmp_path / "queries"
    queries.mkdir()
    for index, sample in enumerate(make_samples(7, seed=9)):
        Image.fromarray(sample["image"]).save(queries / f"q{index}.png")
    Image.fromarray(make_samples(1, seed=4, height=70, width=150)[0]["image"]).save(queries / "q9_other_size.png")
    (queries / "q5_broken.png").write_bytes(b"not an image")
    runs = {}
    for batch_size, workers in ((1, "0"), (3, "2"), (16, "0")):  # batch 3 decodes in 2 DataLoader worker processes
        out = tmp_path / f"out{batch_size}"
        assert (
            main(
                [
                    "predict",
                    "--model",
                    str(model_with_bank),
                    str(queries),
                    "--output-dir",
                    str(out),
                    "--batch-size",
                    str(batch_size),
                    "--num-workers",
                    workers,
                    "--device",
                    "cpu",
                    "--threshold",
                    "0.5",
                ]
            )
            == 0
        )
        runs[batch_size] = json.loads((out / "scores.json").read_text())
    one = runs[1]
    assert one["scored"] == 8 and one["failed"] == 1 and one["failures"][0]["path"].endswith("q5_broken.png")
    for batch_size in (3, 16):
        batched = runs[batch_size]
        assert [r["path"] for r in batched["results"]] == [r["path"] for r in one["results"]]
        assert [r["score"] for r in batched["results"]] == pytest.approx(
            [r["score"] for r in one["results"]], abs=1e-6
        )
        assert [r["label"] for r in batched["results"]] == [r["label"] for r in one["results"]]
        assert [r["heatmap"].rsplit("/", 1)[1] for r in batched["results"]] == [
            r["heatmap"].rsplit("/", 1)[1] for r in one["results"]
        ]
    # and equal to the model's own forward on each image
    from mrad_hf import MRADForAnomalyDetection, MRADImageProcessor

    model = MRADForAnomalyDetection.from_pretrained(model_with_bank)
    processor = MRADImageProcessor.from_config(model.config)
    expected = [float(model(**processor([processor.load(r["path"])])).anomaly_score[0]) for r in one["results"]]
    assert [r["score"] for r in one["results"]] == pytest.approx(expected, abs=1e-6)


def test_bank_mismatch_advice_is_a_cli_flag(model_with_bank, tmp_path, capsys):
    """A bank from another backbone: the error says --trust-bank (not strict=False); --trust-bank attaches it with a
    one-line warning."""
    other = make_tiny_model(seed=1)
    bank = build_memory_bank(other, make_samples(4, seed=5), progress=False)
    bank_path = save_bank(bank, tmp_path / "other.safetensors")
    image = tmp_path / "part.png"
    Image.fromarray(make_samples(1, seed=6)[0]["image"]).save(image)
    argv = [
        "predict",
        "--model",
        str(model_with_bank),
        "--bank",
        str(bank_path),
        str(image),
        "--output-dir",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # (transformers' weight-loading bar comes before it)
    assert (
        err.startswith("mrad predict: error: The memory bank does not match")
        and "--trust-bank" in err
        and "strict=False" not in err
    )
    assert main(argv + ["--trust-bank"]) == 0
    captured = capsys.readouterr()
    assert "WARNING: The memory bank does not match this model" in captured.err and "Traceback" not in captured.err
    assert json.loads((tmp_path / "o" / "scores.json").read_text())["scored"] == 1


# ---------------------------------------------------------------------- messages: through tqdm, rank 0
def test_log_goes_through_tqdm_and_only_from_rank_zero(monkeypatch, capsys):
    from tqdm import tqdm

    written = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, message, file=None, **kwargs: written.append(message)))
    with tqdm(total=2, disable=True):
        common._log("scored part.png")
    assert written == ["scored part.png"]

    monkeypatch.setenv("RANK", "1")
    common._log("from rank 1")
    common._show_warning(UserWarning("rank 1 warning"), UserWarning, "f.py", 1)
    assert written == ["scored part.png"]
    common._log("every rank", all_ranks=True)
    assert written[-1] == "every rank"
    monkeypatch.setenv("RANK", "0")
    common._show_warning(UserWarning("pass strict=False to keep going"), UserWarning, "f.py", 1)
    assert written[-1] == "WARNING: pass --trust-bank to keep going"


def test_trust_bank_attaches_a_bank_without_a_fingerprint_and_says_what_was_not_checked(tmp_path, capsys):
    """A bank with its backbone fingerprint removed is refused with CLI advice; `--trust-bank` attaches it, warning."""
    from conftest import make_samples, make_tiny_model

    model = make_tiny_model()
    model.save_pretrained(tmp_path / "model")
    bank = build_memory_bank(model, make_samples(4), progress=False, attach=False)
    bank.metadata.pop("backbone")
    save_bank(bank, tmp_path / "bank.safetensors")
    assert load_bank(tmp_path / "bank.safetensors").metadata.get("backbone") is None
    image = tmp_path / "part.png"
    Image.fromarray(make_samples(1)[0]["image"]).save(image)
    argv = ["predict", "--model", str(tmp_path / "model"), "--bank", str(tmp_path / "bank.safetensors"), str(image)]
    assert main([*argv, "--output-dir", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert "--trust-bank" in error and "trust_bank=True" not in error
    assert main([*argv, "--trust-bank", "--output-dir", str(tmp_path / "trusted")]) == 0
    printed = capsys.readouterr()
    assert "not checked" in printed.out + printed.err


def test_org_slash_name_under_a_local_folder_is_a_missing_path_not_a_hub_id(tmp_path, monkeypatch, capsys):
    """`--model models/parts-calibrated` (a folder the user meant to make in ./models) fails at once as a path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any Hub attempt would fail slowly, not with this text
    (tmp_path / "models" / "parts").mkdir(parents=True)
    (tmp_path / "part.png").write_bytes(b"")
    assert main(["predict", "--model", "models/parts-calibrated", "part.png"]) == 2
    error = capsys.readouterr().err
    assert "no such file or folder" in error and "not tried on the Hub" in error


def test_export_refuses_a_wrong_precision_or_output_before_loading_the_model(tmp_path, capsys):
    """A bfloat16 ONNX export or a foreign --output whose files an export would overwrite is refused at once: no
    model load, no 'Exporting'."""
    model = tmp_path / "model"
    detector = make_tiny_model()
    build_memory_bank(detector, make_samples(4, seed=3), progress=False)
    detector.save_pretrained(model)
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "model.onnx").write_bytes(b"someone else's graph")
    capsys.readouterr()
    cases = (
        (["--format", "onnx", "--precision", "bfloat16", "--output", str(tmp_path / "x")], "needs --format openvino"),
        (["--format", "onnx", "--output", str(foreign)], str(foreign)),
    )
    for options, expected in cases:
        assert main(["export", "--model", str(model), *options]) == 2
        captured = capsys.readouterr()
        assert expected in captured.err and captured.err.startswith("mrad export: error:")
        assert "Loaded MRAD model" not in captured.out and "Exporting" not in captured.out
    assert (foreign / "model.onnx").read_bytes() == b"someone else's graph" and not (tmp_path / "x").exists()
