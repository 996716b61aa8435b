# SPDX-License-Identifier: Apache-2.0
"""`mrad release` end to end against the loopback Hub (tests/hub/fake_hub_server.py), on random files in exactly
the official formats (OpenAI CLIP state dict, official bank caches, official MRAD-CLIP checkpoints; writers from
tests/conversion): the dry run lists all eight repos and every file and pushes nothing; the real run pushes them
with the official tensors in place (compared value for value); a second run pushes nothing; a changed input changes
only what derives from it; an evaluation (zero-shot protocol) runs on an MVTec-layout folder and stays out of the
card because the CLIP file is not OpenAI's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conversion import test_convert_official_checkpoint as official_checkpoints
from conversion.test_convert_official_bank import official_cache
from conversion.test_convert_openai_clip import EMBED, TEXT_WIDTH, VISION_WIDTH, openai_state_dict
from fake_hub_server import FakeHub
from safetensors.torch import load_file

from mrad_hf.cli.main import main
from mrad_hf.hub.release import OFFICIAL_SHA256, ReleaseFiles, build_release, compare_with_hub

NAMES = sorted(f"mrad-{kind}-{aux}" for kind in ("tf", "ft", "clip", "bank") for aux in ("visa", "mvtec"))


@pytest.fixture(scope="module")
def fake_hub():
    hub = FakeHub.start()
    yield hub
    hub.stop()


@pytest.fixture
def online(monkeypatch, fake_hub):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "test-token")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def write_official_files(folder: Path, monkeypatch, seed: int = 0) -> dict:
    """Random files under the official names, shaped for the tiny OpenAI-format CLIP of tests/conversion."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(openai_state_dict(seed), folder / "ViT-L-14-336px.pt")
    monkeypatch.setattr(official_checkpoints, "IMAGE_DIM", EMBED)  # the writer's dims are module constants
    monkeypatch.setattr(official_checkpoints, "PATCH_DIM", VISION_WIDTH)
    monkeypatch.setattr(official_checkpoints, "TEXT_DIM", TEXT_WIDTH)
    written = {}
    for offset, (aux, checkpoint) in enumerate((("visa", "test_on_mvtec.pth"), ("mvtec", "test_on_visa.pth"))):
        written[f"cache_model_{aux}.pt"] = official_cache(6 + offset, EMBED, seed + 10 * offset)
        written[f"cache_patch_model_{aux}.pt"] = official_cache(
            9 + offset, VISION_WIDTH, seed + 10 * offset + 1, anomalous_every=2
        )
        written[checkpoint] = official_checkpoints.official_clip_checkpoint(seed + offset)
    for name, payload in written.items():
        torch.save(payload, folder / name)
    return written


def _run(args, fake_hub, capsys) -> str:
    assert main(["release", *args, "--endpoint", fake_hub.url, "--image-size", "112"]) == 0
    return capsys.readouterr().out


def _commits(fake_hub) -> int:
    return sum(method == "POST" and "/commit/" in path for method, path, _ in fake_hub.requests)


def test_dry_run_then_release_then_nothing_to_push(tmp_path, fake_hub, online, monkeypatch, capsys):
    monkeypatch.setenv("MRAD_HUB_NAMESPACE", "mirror-org")
    official = tmp_path / "official"
    written = write_official_files(official, monkeypatch)
    args = ["--official-dir", str(official), "--work-dir", str(tmp_path / "work")]

    plan = _run([*args, "--dry-run"], fake_hub, capsys)
    for name in NAMES:
        assert f"mirror-org/{name} ({'bank' if 'bank' in name else 'model'}): new" in plan
    for path in (
        "model.safetensors",
        "config.json",
        "handler.py",
        "README.md",
        "release.json",
        "memory_bank.safetensors",
        "memory_bank.json",
    ):
        assert f"+ {path}" in plan
    assert "Dry run: nothing pushed" in plan and "= " not in plan
    assert not any(ns == "mirror-org" for _, repo_id in fake_hub.repos for ns in [repo_id.split("/")[0]])

    before = _commits(fake_hub)
    out = _run(args, fake_hub, capsys)
    assert "Release done: 8 repo(s) updated" in out and _commits(fake_hub) - before == 8
    work = tmp_path / "work" / "repos"
    for name in NAMES:  # every local file is on the Hub, byte for byte
        remote = fake_hub.files(f"mirror-org/{name}")
        local = {str(p.relative_to(work / name)): p.read_bytes() for p in (work / name).rglob("*") if p.is_file()}
        assert {path: remote[path] for path in local} == local

    # the official tensors are where the short names promise them
    clip_visa = load_file(str(work / "mrad-clip-visa" / "model.safetensors"))
    ft_visa = load_file(str(work / "mrad-ft-visa" / "model.safetensors"))
    clip_mvtec = load_file(str(work / "mrad-clip-mvtec" / "model.safetensors"))
    trained_on_visa, trained_on_mvtec = written["test_on_mvtec.pth"], written["test_on_visa.pth"]
    torch.testing.assert_close(
        clip_visa["image_projection.query.weight"], trained_on_visa["image_proj"]["mlp1.weight"], rtol=0, atol=0
    )
    torch.testing.assert_close(
        ft_visa["patch_projection.key.weight"], trained_on_visa["patch_proj"]["fc.1.weight"], rtol=0, atol=0
    )
    torch.testing.assert_close(
        clip_mvtec["image_projection.query.weight"], trained_on_mvtec["image_proj"]["mlp1.weight"], rtol=0, atol=0
    )
    assert not any(key.startswith("prompt_learner") for key in ft_visa) and any(
        key.startswith("prompt_learner") for key in clip_visa
    )
    for name, aux in (("mrad-tf-visa", "visa"), ("mrad-clip-mvtec", "mvtec")):
        tensors = load_file(str(work / name / "model.safetensors"))
        bank_keys = [key for key in tensors if key.endswith("image_keys")]
        torch.testing.assert_close(tensors[bank_keys[0]], written[f"cache_model_{aux}.pt"]["keys"], rtol=0, atol=0)
    assert json.loads((work / "mrad-bank-mvtec" / "memory_bank.json").read_text())["source"] == "mvtec"
    config = json.loads((work / "mrad-ft-mvtec" / "config.json").read_text())
    assert config["variant"] == "ft"
    record = json.loads((work / "mrad-clip-visa" / "release.json").read_text())["release"]
    assert {item["file"] for item in record["inputs"]} == {
        "ViT-L-14-336px.pt",
        "cache_model_visa.pt",
        "cache_patch_model_visa.pt",
        "test_on_mvtec.pth",
    }
    assert all(
        item["official"] is False for item in record["inputs"]
    )  # random files: their sha256 differ from the release's

    before = _commits(fake_hub)
    out = _run(args, fake_hub, capsys)
    assert "Release done: 0 repo(s) updated, 8 already up to date" in out and _commits(fake_hub) == before
    assert out.count(": unchanged, 0 of") == 8

    # new results for one card: exactly that README is pushed again
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"dataset": "mvtec", "mean": {"image_auroc": 0.9}, "run": {"pretrained": True}}))
    out = _run([*args, "--results", f"mrad-clip-visa={results}"], fake_hub, capsys)
    assert "Release done: 1 repo(s) updated" in out and _commits(fake_hub) == before + 1
    assert "mirror-org/mrad-clip-visa (model): changed, 1 of" in out and "  + README.md" in out


def test_evaluation_follows_the_zero_shot_protocol_and_stays_out_of_unofficial_cards(
    tmp_path, monkeypatch, online, fake_hub
):
    from mrad_hf.data.loaders import MVTEC_CATEGORIES
    from mrad_hf.data.synthetic import make_synthetic_benchmark

    official = tmp_path / "official"
    write_official_files(official, monkeypatch, seed=3)
    synthetic = make_synthetic_benchmark(
        tmp_path / "synthetic", categories=["brick"], n_train_good=1, n_test_good=1, n_test_per_defect=1, image_size=64
    )
    mvtec = tmp_path / "mvtec"
    for category in MVTEC_CATEGORIES:  # an MVTec AD layout with every category (the loader requires them all)
        shutil.copytree(synthetic / "brick", mvtec / category)
    logs = []
    repos = build_release(
        ReleaseFiles.from_folder(official, auxiliaries=["visa"]),
        tmp_path / "work",
        namespace="eval-org",
        image_size=112,
        auxiliaries=["visa"],
        variants=["tf"],
        data_roots={"mvtec": mvtec},
        log=logs.append,
    )
    assert [repo.name for repo in repos] == ["mrad-bank-visa", "mrad-tf-visa"]
    results = json.loads((tmp_path / "work" / "evaluation" / "mrad-tf-visa" / "mvtec" / "results.json").read_text())
    assert results["dataset"] == "mvtec" and results["run"] == {
        "model": "eval-org/mrad-tf-visa",
        "pretrained": False,
        "bank": "visa",
    }
    assert len(results["per_category"]) == len(MVTEC_CATEGORIES) and 0.0 <= results["mean"]["image_auroc"] <= 1.0
    card = (tmp_path / "work" / "repos" / "mrad-tf-visa" / "README.md").read_text()
    assert "model-index" not in card and any("not OpenAI's file" in line for line in logs)
    assert any("not in the card" in note for note in repos[1].notes)
    assert json.loads((tmp_path / "work" / "repos" / "mrad-tf-visa" / "release.json").read_text())["release"][
        "evaluated_on"
    ] == ["mvtec"]
    compare_with_hub(repos, endpoint=fake_hub.url)
    assert [repo.status for repo in repos] == ["new", "new"]


def test_missing_official_files_are_listed_in_one_error(tmp_path, capsys):
    (tmp_path / "ViT-L-14-336px.pt").write_bytes(b"x")
    assert main(["release", "--official-dir", str(tmp_path), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "cache_model_visa.pt" in error and "test_on_visa.pth" in error and "Missing official release files" in error
    assert set(OFFICIAL_SHA256) == {
        "ViT-L-14-336px.pt",
        "test_on_mvtec.pth",
        "test_on_visa.pth",
        "cache_model_mvtec.pt",
        "cache_model_visa.pt",
        "cache_patch_model_mvtec.pt",
        "cache_patch_model_visa.pt",
    }
