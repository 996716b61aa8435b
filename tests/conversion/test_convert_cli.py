# SPDX-License-Identifier: Apache-2.0
"""`mrad convert clip|bank|checkpoint` (issue 13 §1): the converters ship in the package, `python -m` keeps working,
and `mrad convert bank --model` takes a CLIP folder or an MRAD folder for the backbone fingerprint (any widths)."""

from __future__ import annotations

import subprocess
import sys

import torch
from test_convert_official_bank import write_pair
from test_convert_openai_clip import openai_state_dict

from mrad_hf.cli.main import main as mrad
from mrad_hf.memory import load_bank


def test_mrad_convert_clip_and_python_m_write_the_same_model(tmp_path, capsys):
    torch.save(openai_state_dict(), tmp_path / "ViT-tiny.pt")
    assert mrad(["convert", "clip", str(tmp_path / "ViT-tiny.pt"), str(tmp_path / "a")]) == 0
    assert "width 128, patch 14, image 56, projection 32" in capsys.readouterr().out
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mrad_hf.conversion.convert_openai_clip",
            str(tmp_path / "ViT-tiny.pt"),
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_mrad_convert_bank_takes_a_clip_or_an_mrad_folder(tmp_path, tiny_model, capsys):
    write_pair(tmp_path, tiny_model)  # 24 / 48-d keys: the tiny backbone's widths, not ViT-L/14's
    tiny_model.clip.save_pretrained(tmp_path / "clip")
    tiny_model.save_pretrained(tmp_path / "mrad")
    for name in ("clip", "mrad"):
        args = [
            "convert",
            "bank",
            "--cache-dir",
            str(tmp_path),
            "--dataset",
            "visa",
            "--output",
            str(tmp_path / f"{name}.safetensors"),
        ]
        assert mrad(args + ["--model", str(tmp_path / name)]) == 0, capsys.readouterr().err
        assert load_bank(tmp_path / f"{name}.safetensors").metadata["backbone"] == tiny_model.backbone_fingerprint()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}')
    assert (
        mrad(
            [
                "convert",
                "bank",
                "--cache-dir",
                str(tmp_path),
                "--dataset",
                "visa",
                "--output",
                str(tmp_path / "x.safetensors"),
                "--model",
                str(tmp_path / "other"),
            ]
        )
        == 2
    )
    assert (
        "is a 'bert' folder; --model takes an MRAD model folder or a transformers CLIP folder"
        in capsys.readouterr().err
    )


def test_mrad_convert_checkpoint_refuses_a_torchscript_archive_by_name(tmp_path, tiny_model, capsys):
    import hostile_archives

    hostile_archives.script_archive(hostile_archives.Loops(), tmp_path / "test_on_mvtec.pth")
    tiny_model.clip.save_pretrained(tmp_path / "clip")
    assert (
        mrad(
            [
                "convert",
                "checkpoint",
                str(tmp_path / "test_on_mvtec.pth"),
                str(tmp_path / "out"),
                "--clip",
                str(tmp_path / "clip"),
            ]
        )
        == 2
    )
    assert "is a TorchScript archive (it carries code), not a plain pickled state dict" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
