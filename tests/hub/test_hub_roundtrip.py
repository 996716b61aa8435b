# SPDX-License-Identifier: Apache-2.0
"""Hub round trip with the real `huggingface_hub` client against the loopback fake Hub (tests/hub/fake_hub_server.py).

Push a model (with its card) and, separately, two memory banks (main and a `v2` branch); pull both with
`mrad pull` into a fresh cache in a subprocess; reload in another subprocess with `HF_HUB_OFFLINE=1` by short
name; maps and scores equal the pushed model's. The fake Hub takes files inline (no LFS / Xet transfer), so
those transfer paths of the real Hub are not exercised here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_samples
from fake_hub_server import FakeHub

from mrad_hf import MRADImageProcessor
from mrad_hf.hub.api import (
    HubDownloadError,
    load_memory_bank,
    load_model,
    pull_model,
    push_memory_bank,
    push_model,
    resolve_model_id,
)
from mrad_hf.memory import build_memory_bank, save_bank

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fake_hub():
    hub = FakeHub.start()
    yield hub
    hub.stop()


@pytest.fixture
def online(monkeypatch):
    """Lift the suite-wide HF_HUB_OFFLINE=1 for this process's huggingface_hub (the fake Hub is on loopback)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _run(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "MRAD_"))}
    full_env.update(env, PYTHONPATH=str(REPO_ROOT), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return result


def _outputs(model, pixel_values):
    with torch.no_grad():
        out = model(pixel_values=pixel_values)
    return out.anomaly_map.numpy(), out.anomaly_score.numpy()


def test_push_pull_offline_reload_round_trip(fake_hub, online, model_with_bank, tmp_path):
    pixel_values = MRADImageProcessor.from_config(model_with_bank.config)(
        [s["image"] for s in make_samples(3, seed=7)]
    )["pixel_values"]
    expected_map, expected_score = _outputs(model_with_bank, pixel_values)
    other_bank = build_memory_bank(
        model_with_bank, make_samples(4, seed=3), source="visa", progress=False, attach=False
    )

    hub = {"endpoint": fake_hub.url, "token": "test-token"}
    model_commit = push_model(model_with_bank, "tester/mrad-tf-visa", **hub)
    own_bank = model_with_bank.get_memory_bank()
    push_memory_bank(own_bank, "tester/bank-tiny", **hub)
    v2_commit = push_memory_bank(other_bank, "tester/bank-tiny", revision="v2", **hub)

    model_files = fake_hub.files("tester/mrad-tf-visa")
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "modeling_mrad.py",
        "configuration_mrad.py",
        "pipeline_anomaly_detection.py",
    ):
        assert name in model_files, f"{name} missing from the pushed model repo: {sorted(model_files)}"
    assert json.loads(model_files["config.json"])["custom_pipelines"]["anomaly-detection"]["pt"] == ["AutoModel"]
    assert b"pipeline_tag: other" in model_files["README.md"]
    assert sorted(fake_hub.files("tester/bank-tiny", "v2")) == [
        ".gitattributes",
        "README.md",
        "memory_bank.json",
        "memory_bank.safetensors",
    ]
    assert json.loads(fake_hub.files("tester/bank-tiny", "v2")["memory_bank.json"])["counts"] == other_bank.counts()
    assert model_commit.oid == fake_hub.repos[("model", "tester/mrad-tf-visa")].refs["main"]

    with torch.no_grad():  # what the offline process must reproduce with the v2 bank attached
        model_with_bank.set_memory_bank(other_bank)
        v2_map, v2_score = _outputs(model_with_bank, pixel_values)
    assert not np.allclose(v2_score, expected_score)  # the two banks are really different
    np.save(tmp_path / "pixels.npy", pixel_values.numpy())

    home = tmp_path / "fresh-hf-home"
    online_env = {
        "HF_ENDPOINT": fake_hub.url,
        "HF_HOME": str(home),
        "HF_TOKEN": "test-token",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "MRAD_HUB_NAMESPACE": "tester",
    }
    _run(
        """
        from mrad_hf.cli.main import main
        assert main(["pull", "mrad-tf"]) == 0                               # short name -> tester/mrad-tf-visa
        assert main(["pull", "--bank", "tester/bank-tiny", "--revision", "v2"]) == 0
    """,
        online_env,
        tmp_path,
    )
    assert (home / "hub" / "models--tester--mrad-tf-visa").is_dir() and (
        home / "hub" / "models--tester--bank-tiny"
    ).is_dir()

    served = len(fake_hub.requests)
    offline_env = {
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "MRAD_HUB_NAMESPACE": "tester",
    }
    _run(
        f"""
        import numpy as np, torch
        from mrad_hf import MRADForAnomalyDetection
        from mrad_hf.hub.api import load_memory_bank, load_model
        pixels = torch.from_numpy(np.load("pixels.npy"))
        model = load_model("mrad-tf").eval()   # offline, from the cache
        with torch.no_grad():
            own = model(pixel_values=pixels)
            model.set_memory_bank(load_memory_bank("tester/bank-tiny", revision="v2"))
            v2 = model(pixel_values=pixels)
            model.set_memory_bank(load_memory_bank("tester/bank-tiny", revision="{v2_commit.oid}"))  # by commit sha
            by_sha = model(pixel_values=pixels)
        np.savez("offline.npz", map=own.anomaly_map.numpy(), score=own.anomaly_score.numpy(),
                 v2_map=v2.anomaly_map.numpy(), v2_score=v2.anomaly_score.numpy(), sha_score=by_sha.anomaly_score.numpy())
    """,
        offline_env,
        tmp_path,
    )
    assert len(fake_hub.requests) == served, "the offline process must not contact the Hub"

    offline = np.load(tmp_path / "offline.npz")
    np.testing.assert_allclose(offline["map"], expected_map, rtol=0, atol=1e-6)
    np.testing.assert_allclose(offline["score"], expected_score, rtol=0, atol=1e-6)
    np.testing.assert_allclose(offline["v2_map"], v2_map, rtol=0, atol=1e-6)
    np.testing.assert_allclose(offline["v2_score"], v2_score, rtol=0, atol=1e-6)
    np.testing.assert_allclose(offline["sha_score"], v2_score, rtol=0, atol=1e-6)


def test_bank_revisions_in_process(fake_hub, online, model_with_bank, tmp_path):
    """load_memory_bank honours revision= (branch, tag, commit) and then works offline from that cache."""
    from huggingface_hub import HfApi, constants

    bank = model_with_bank.get_memory_bank()
    smaller = build_memory_bank(model_with_bank, make_samples(2, seed=5), source="mvtec", progress=False, attach=False)
    first = push_memory_bank(bank, "tester/bank-revisions", endpoint=fake_hub.url, token="t")
    push_memory_bank(smaller, "tester/bank-revisions", endpoint=fake_hub.url, token="t")  # main moves on
    HfApi(endpoint=fake_hub.url, token="t").create_tag("tester/bank-revisions", tag="v1", revision=first.oid)

    cache = tmp_path / "cache"
    kwargs = {"cache_dir": cache, "endpoint": fake_hub.url}
    latest = load_memory_bank("tester/bank-revisions", **kwargs)
    tagged = load_memory_bank("tester/bank-revisions", revision="v1", **kwargs)
    assert torch.equal(latest.image_keys, smaller.image_keys) and latest.metadata["source"] == "mvtec"
    assert torch.equal(tagged.image_keys, bank.image_keys) and torch.equal(tagged.patch_values, bank.patch_values)

    constants.HF_HUB_OFFLINE = True  # restored by the `online` fixture's monkeypatch
    again = load_memory_bank("tester/bank-revisions", revision="v1", cache_dir=cache)
    assert torch.equal(again.patch_keys, bank.patch_keys)
    with pytest.raises(HubDownloadError, match="revision 'v9'.*offline mode: on.*mrad pull"):
        load_memory_bank("tester/bank-revisions", revision="v9", cache_dir=cache)


def test_missing_repo_error_says_what_was_tried(fake_hub, online):
    with pytest.raises(HubDownloadError) as error:
        pull_model("tester/does-not-exist", revision="v3", endpoint=fake_hub.url, token="t")
    message = str(error.value)
    assert "'tester/does-not-exist'" in message and "revision 'v3'" in message and "offline mode: off" in message
    assert "RepositoryNotFoundError" in message and "HF_HUB_OFFLINE=1" in message and "local folder" in message


def test_short_names_namespace_and_local_folder_precedence(monkeypatch, tmp_path, model_with_bank):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("MRAD_HUB_NAMESPACE", raising=False)
    assert resolve_model_id("mrad-clip") == "mrad-hf/mrad-clip-visa"
    assert resolve_model_id("mrad-ft-mvtec") == "mrad-hf/mrad-ft-mvtec"
    assert resolve_model_id("someone/other-model") == "someone/other-model"
    monkeypatch.setenv("MRAD_HUB_NAMESPACE", "my-org")
    assert resolve_model_id("mrad-tf") == "my-org/mrad-tf-visa"

    model_with_bank.save_pretrained(tmp_path / "mrad-tf")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_id("mrad-tf") == "mrad-tf"  # a local folder of that name wins

    loaded = load_model("mrad-tf")
    assert torch.equal(loaded.memory.image_keys, model_with_bank.memory.image_keys)


def test_offline_short_name_not_cached_is_actionable(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("MRAD_HUB_NAMESPACE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubDownloadError) as error:
        load_model("mrad-clip", revision="v1")
    message = str(error.value)
    for expected in (
        "'mrad-hf/mrad-clip-visa'",
        "short name",
        "MRAD_HUB_NAMESPACE",
        "revision 'v1'",
        "offline mode: on",
        "mrad pull mrad-clip --revision v1",
        "hf download",
        "local folder",
        "repos under mrad-hf/ are not published yet",  # the README says so; the message must not promise them
    ):
        assert expected in message, (expected, message)
    assert isinstance(error.value, OSError)
    monkeypatch.setenv("MRAD_HUB_NAMESPACE", "my-org")  # a mirror of one's own: no such note
    with pytest.raises(HubDownloadError, match="my-org/mrad-clip-visa") as error:
        load_model("mrad-clip")
    assert "not published" not in str(error.value)


def test_plain_push_to_hub_ships_processor_pipeline_code_and_keeps_the_card(
    fake_hub, online, monkeypatch, model_with_bank
):
    """`PreTrainedModel.push_to_hub` goes through our `save_pretrained` (processor config, pipeline code); after a
    `push_model`, a plain push updates the weights and keeps the rendered card."""
    from huggingface_hub import constants
    from transformers.utils import hub as transformers_hub

    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(
        transformers_hub, "_hf_api", None
    )  # transformers caches one HfApi (and its endpoint) per process
    push_model(model_with_bank, "tester/plain-push", endpoint=fake_hub.url, token="t")
    card = fake_hub.files("tester/plain-push")["README.md"]
    model_with_bank.push_to_hub("tester/plain-push", token="t", commit_message="plain push")
    files = fake_hub.files("tester/plain-push")
    assert {
        "preprocessor_config.json",
        "pipeline_anomaly_detection.py",
        "modeling_mrad.py",
        "model.safetensors",
    } <= set(files)
    assert b"pipeline_tag: other" in files["README.md"] and b"# MRAD-TF" in files["README.md"]
    assert files["README.md"].split(b"\n---\n", 1)[1] == card.split(b"\n---\n", 1)[1]  # the card's text is untouched


def test_mrad_push_cli_and_load_model_error(fake_hub, online, monkeypatch, model_with_bank, tmp_path, capsys):
    from huggingface_hub import constants

    from mrad_hf.cli.main import main
    from mrad_hf.hub.api import load_model

    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    model_with_bank.save_pretrained(tmp_path / "model")
    save_bank(model_with_bank.get_memory_bank(), tmp_path / "bank.safetensors")
    assert main(["push", str(tmp_path / "model"), "tester/cli-model"]) == 0
    assert main(["push", "--bank", str(tmp_path / "bank.safetensors"), "tester/cli-bank", "--revision", "v1"]) == 0
    out = capsys.readouterr().out
    assert "Pushed model" in out and f"at commit {fake_hub.repos[('model', 'tester/cli-bank')].refs['v1']}" in out
    assert b"# MRAD-TF" in fake_hub.files("tester/cli-model")["README.md"]
    assert "memory_bank.json" in fake_hub.files("tester/cli-bank", "v1") and "memory_bank.json" not in fake_hub.files(
        "tester/cli-bank"
    )

    assert torch.equal(
        load_model("tester/cli-model", cache_dir=tmp_path / "c").memory.patch_keys, model_with_bank.memory.patch_keys
    )
    with pytest.raises(
        HubDownloadError,
        match=r"(?s)'tester/absent' at revision 'main'.*offline mode: off, cache: .*/c;.*mrad pull tester/absent",
    ):
        load_model("tester/absent", cache_dir=tmp_path / "c")
    assert main(["pull", "tester/absent"]) == 2 and "Could not get 'tester/absent'" in capsys.readouterr().err
