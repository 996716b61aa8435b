# SPDX-License-Identifier: Apache-2.0
"""Packaging a user installs (issue 14 §4): the wheel carries the card templates, the Inference Endpoints handler,
the converters and the demo textures, and works from a fresh venv outside the source tree; scikit-image is no
longer needed at run time and the synthetic benchmark is byte for byte what it was when it read scikit-image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import torch
from conversion.test_convert_official_bank import official_cache
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]

#: sha256 of the colourised textures (`synthetic._colourised_texture`) and of a small benchmark (every file but
#: README.txt, path + content), recorded from the scikit-image-based generator before the textures were packaged.
TEXTURE_SHA256 = {
    "brick": "79be79eb755e4239e0298a978a5f5b5aa1b4e21f67f5aac9406d8fb17811db3c",
    "grass": "e9f14ae4edd2efca4f3f06769add76029dd34b55d21569a3fa82719fb1ceec15",
    "gravel": "6487975ab70d93aab2000dfde16222e7b4acfe47870ac67e4fcdbe5f3f48cc53",
}
SMALL_BENCHMARK = dict(n_train_good=2, n_test_good=1, n_test_per_defect=1, image_size=64, seed=0)
SMALL_BENCHMARK_SHA256 = "0813a765486044eea0d0b2598da20e4f5c6565c48d101a19409ebae773d71e2e"  # 34 files


def _tree_digest(root: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "README.txt")
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return len(files), digest.hexdigest()


def test_packaged_textures_are_scikit_images_pixels():
    import skimage.data  # a dev (test) dependency only: the reference the packaged PNGs were made from

    from mrad_hf.data.synthetic import _TEXTURES_DIR, _colourised_texture

    for name, expected in TEXTURE_SHA256.items():
        with Image.open(_TEXTURES_DIR / f"{name}.png") as image:
            assert image.mode == "L"
            np.testing.assert_array_equal(np.asarray(image), getattr(skimage.data, name)())
        assert hashlib.sha256(_colourised_texture(name).tobytes()).hexdigest() == expected
    assert "CC0 1.0" in (_TEXTURES_DIR / "ATTRIBUTION.md").read_text(encoding="utf-8")


def test_synthetic_benchmark_is_unchanged_byte_for_byte(tmp_path):
    from mrad_hf.data.synthetic import make_synthetic_benchmark

    root = make_synthetic_benchmark(tmp_path / "bench", **SMALL_BENCHMARK)
    assert _tree_digest(root) == (34, SMALL_BENCHMARK_SHA256)
    assert "scikit-image" not in json.dumps(json.loads((root / "manifest.json").read_text()))


def test_scikit_image_is_not_a_runtime_dependency():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not any(dep.lower().startswith(("scikit-image", "skimage")) for dep in project["dependencies"])
    imports = [p for p in (REPO_ROOT / "mrad_hf").rglob("*.py") if "import skimage" in p.read_text(encoding="utf-8")]
    assert imports == []


def test_wheel_installs_into_a_fresh_venv_and_works_outside_the_source_tree(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves no build/ or *.egg-info in the checkout
    shutil.copytree(REPO_ROOT / "mrad_hf", source / "mrad_hf", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO_ROOT / name, source / name)
    # no PYTHONPATH: a source tree on it would make pip think mrad-hf is already installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("MRAD_")}
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(wheels),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = wheels.glob("mrad_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "mrad_hf/hub/templates/model_card_template.md",
        "mrad_hf/hub/templates/bank_card_template.md",
        "mrad_hf/hub/templates/handler.py",
        "mrad_hf/conversion/convert_official_bank.py",
        "mrad_hf/conversion/convert_openai_clip.py",
        "mrad_hf/conversion/convert_official_checkpoint.py",
        "mrad_hf/data/textures/brick.png",
        "mrad_hf/data/textures/grass.png",
        "mrad_hf/data/textures/gravel.png",
        "mrad_hf/data/textures/ATTRIBUTION.md",
        "mrad_hf/integrations/inference_endpoints.py",
    ):
        assert required in names, f"{required} is not in the wheel"
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert install.returncode == 0, install.stderr
    # torch, transformers, ... come from this interpreter's site-packages, without its .pth files (so an editable
    # mrad_hf there is not seen): the only mrad_hf the fresh venv can import is the installed wheel.
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    image_cache, patch_cache = official_cache(5, 768, seed=1), official_cache(7, 1024, seed=2, anomalous_every=2)
    torch.save(image_cache, work / "cache_model_visa.pt")
    torch.save(patch_cache, work / "cache_patch_model_visa.pt")
    script = """
        import hashlib, json, pathlib, torch
        import mrad_hf
        from mrad_hf.conversion.convert_official_bank import convert_official_bank
        from mrad_hf.data.synthetic import load_texture
        from mrad_hf.hub.api import ENDPOINT_HANDLER_FILE, render_model_card
        from mrad_hf.hub.cards import card_config
        from mrad_hf.memory import load_bank

        card = render_model_card(card_config("clip", "visa"), repo_id="someone/mrad-clip-visa")
        card.save("README.md")
        convert_official_bank("cache_model_visa.pt", "cache_patch_model_visa.pt", "bank.safetensors")
        bank = load_bank("bank.safetensors")
        print(json.dumps({
            "mrad_hf": mrad_hf.__file__, "card": card.data.to_dict(), "card_text": card.text[:400],
            "bank_counts": bank.counts(), "image_keys": bank.image_keys.tolist(), "patch_values": bank.patch_values.tolist(),
            "handler": ENDPOINT_HANDLER_FILE.is_file(), "brick": hashlib.sha256(load_texture("brick").tobytes()).hexdigest(),
        }))
    """
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [str(python), "-c", textwrap.dedent(script)], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["mrad_hf"]).is_relative_to(venv), report["mrad_hf"]
    assert (
        report["card"]["pipeline_tag"]
        and "mrad-clip" in report["card"]["tags"]
        and report["card"]["license"] == "cc-by-4.0"
    )
    assert "MRAD-CLIP" in (work / "README.md").read_text(encoding="utf-8")
    assert report["bank_counts"]["image_entries"] == 5 and report["bank_counts"]["patch_entries"] == 7
    np.testing.assert_array_equal(np.asarray(report["image_keys"], dtype=np.float32), image_cache["keys"].numpy())
    np.testing.assert_array_equal(np.asarray(report["patch_values"], dtype=np.float32), patch_cache["values"].numpy())
    assert report["handler"] and report["brick"] == TEXTURE_SHA256["brick"]
    help_text = subprocess.run(
        [str(venv / "bin" / "mrad"), "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert help_text.returncode == 0 and "push" in help_text.stdout
