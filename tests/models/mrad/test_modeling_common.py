# SPDX-License-Identifier: Apache-2.0
"""The `PreTrainedModel` contract for MRAD-TF, MRAD-FT and MRAD-CLIP, in the spirit of transformers' ModelTesterMixin.

Every test runs for the three variants on tiny random CLIPs (tests/conftest.py): save/load round trip, dtype loading
(bfloat16 / float16, save after a cast, reload), `device_map="auto"`, `attn_implementation`, a `transformers.Trainer`
step against a manual reference step, gradient checkpointing, remote code in a fresh process without mrad_hf, task
inference of `pipeline(model=folder)`, and the size of the remote-code unit a saved model carries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import make_samples, make_tiny_model, make_tiny_trained_model
from transformers import AutoModel

from mrad_hf import MRADForAnomalyDetection, MRADImageProcessor
from mrad_hf.memory import build_memory_bank
from mrad_hf.training.trainer import set_training_stage

VARIANTS = ("tf", "ft", "clip")
OUTPUT_FIELDS = ("anomaly_map", "anomaly_score", "image_probabilities", "patch_probabilities", "text_probabilities")
#: The budget of the remote-code unit (issue 14 §2): Python files a saved model carries, and their lines.
REMOTE_CODE_MAX_FILES, REMOTE_CODE_MAX_LINES = 10, 2000
#: Today's size plus a small margin: the unit must not grow back (2,945 lines at the start of 2026-12-03).
REMOTE_CODE_GUARD_LINES = 2350


def _model(variant: str):
    model = make_tiny_model() if variant == "tf" else make_tiny_trained_model(variant)
    build_memory_bank(model, make_samples(6), batch_size=3, source="common", progress=False)
    return model


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def saved(variant, tmp_path_factory):
    """(variant, folder, pixel_values, fp32 outputs) of a saved model with a bank."""
    model = _model(variant)
    folder = tmp_path_factory.mktemp(f"mrad-{variant}")
    model.save_pretrained(folder)
    processor = MRADImageProcessor.from_config(model.config)
    pixels = processor([s["image"] for s in make_samples(3, seed=7)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels)
    return variant, folder, pixels, expected


def _outputs(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels)


def _assert_outputs_close(actual, expected, atol):
    for name in OUTPUT_FIELDS:
        if getattr(expected, name) is None:
            assert getattr(actual, name) is None, name
            continue
        torch.testing.assert_close(getattr(actual, name).float(), getattr(expected, name), atol=atol, rtol=0, msg=name)


def _assert_bank_is_float32(model):
    dtypes = {name: buffer.dtype for name, buffer in model.memory.named_buffers()}
    assert dtypes == {
        "image_keys": torch.float32,
        "image_values": torch.float32,
        "patch_keys": torch.float32,
        "patch_values": torch.float32,
        "patch_sources": torch.int64,
    }
    for name in ("image_projection", "patch_projection", "prompt_learner", "region_bias"):
        if hasattr(model, name):
            assert {p.dtype for p in getattr(model, name).parameters()} == {torch.float32}, name


def test_save_load_round_trip_gives_equal_outputs(saved):
    variant, folder, pixels, expected = saved
    for loader in (MRADForAnomalyDetection, AutoModel):
        reloaded = loader.from_pretrained(folder)
        assert reloaded.config.variant == variant and not reloaded.training
        _assert_outputs_close(_outputs(reloaded, pixels), expected, atol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 0.02), (torch.float16, 0.005)])
def test_dtype_loading_keeps_the_bank_float32_and_the_outputs_close(saved, dtype, atol, tmp_path):
    variant, folder, pixels, expected = saved
    reference = MRADForAnomalyDetection.from_pretrained(folder)
    model = MRADForAnomalyDetection.from_pretrained(folder, dtype=dtype)  # refused with a checksum error before
    assert model.clip.vision_model.embeddings.patch_embedding.weight.dtype == dtype
    _assert_bank_is_float32(model)
    assert torch.equal(model.memory.patch_keys, reference.memory.patch_keys)
    _assert_outputs_close(_outputs(model, pixels), expected, atol=atol)
    assert _outputs(model, pixels).anomaly_score.dtype == torch.float32  # retrieval and scores are float32
    # the fingerprint does not depend on the dtype: same architecture, weights signature within its tolerance
    cast, full = model.backbone_fingerprint(), reference.backbone_fingerprint()
    assert {k: v for k, v in cast.items() if k != "weights_signature"} == {
        k: v for k, v in full.items() if k != "weights_signature"
    }
    assert cast["weights_signature"] == pytest.approx(full["weights_signature"], abs=0.01)
    # save after the cast, reload in float32 and in the cast dtype: the bank still attaches and is bit-identical
    model.save_pretrained(tmp_path / "cast")
    for reload_dtype in (torch.float32, dtype):
        again = MRADForAnomalyDetection.from_pretrained(tmp_path / "cast", dtype=reload_dtype)
        _assert_bank_is_float32(again)
        assert torch.equal(again.memory.image_keys, reference.memory.image_keys)
        _assert_outputs_close(_outputs(again, pixels), expected, atol=atol)


def test_a_plain_cast_of_the_whole_model_keeps_memory_and_heads_float32(saved):
    _, folder, pixels, expected = saved
    model = MRADForAnomalyDetection.from_pretrained(folder).to(torch.bfloat16)
    _assert_bank_is_float32(model)
    model.half()
    _assert_bank_is_float32(model)
    _assert_outputs_close(_outputs(model, pixels), expected, atol=0.02)


def test_pipeline_dtype_really_runs_in_that_dtype(saved):
    from transformers import pipeline

    _, folder, _, _ = saved
    detector = pipeline("anomaly-detection", model=str(folder), dtype=torch.bfloat16, device="cpu")
    assert detector.model.clip.visual_projection.weight.dtype == torch.bfloat16
    _assert_bank_is_float32(detector.model)
    image = make_samples(1, seed=7)[0]["image"]
    full = pipeline("anomaly-detection", model=str(folder), device="cpu")(image)["score"]
    assert detector(image)["score"] == pytest.approx(full, abs=0.02)


def test_device_map_auto_on_cpu(saved):
    variant, folder, pixels, expected = saved
    model = MRADForAnomalyDetection.from_pretrained(folder, device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    _assert_outputs_close(_outputs(model, pixels), expected, atol=1e-6)


def test_eager_and_sdpa_attention_give_equal_outputs(saved):
    # TODO(speed helper, issue 14 §1): once both MRAD attentions route through ALL_ATTENTION_FUNCTIONS, this also
    # covers the V-V path; today `attn_implementation` switches the CLIP towers (the text tower of MRAD-CLIP and the
    # stock CLIP layers) and the dual-path vision attention always runs SDPA.
    _, folder, pixels, expected = saved
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = MRADForAnomalyDetection.from_pretrained(folder, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
        outputs[implementation] = _outputs(model, pixels)
    _assert_outputs_close(outputs["eager"], outputs["sdpa"], atol=1e-5)
    _assert_outputs_close(outputs["sdpa"], expected, atol=1e-6)


def test_forward_accepts_unknown_keywords_as_transformers_models_do(saved):
    _, folder, pixels, expected = saved
    model = MRADForAnomalyDetection.from_pretrained(folder)
    with torch.no_grad():
        outputs = model(
            pixel_values=pixels,
            num_items_in_batch=torch.tensor(3),
            output_hidden_states=True,
            original_sizes=[(9, 9)] * 3,
        )
    _assert_outputs_close(outputs, expected, atol=0)  # MRAD offers no hidden states; the keyword changes nothing
    assert model.supports_gradient_checkpointing


def _training_batch(model, count=4):
    from mrad_hf.training.trainer import MRADTrainDataset

    samples = make_samples(count, seed=3)
    dataset = MRADTrainDataset(samples, MRADImageProcessor.from_config(model.config))
    return dataset, {
        key: torch.stack([dataset[i][key] for i in range(count)]) for key in ("pixel_values", "masks", "labels")
    }


def test_a_transformers_trainer_step_equals_a_manual_reference_step(saved, tmp_path):
    from transformers import Trainer, TrainingArguments

    variant, folder, _, _ = saved
    if variant == "tf":
        model = MRADForAnomalyDetection.from_pretrained(folder)
        _, batch = _training_batch(model)
        with pytest.raises(ValueError, match="MRAD-TF has nothing to train"):
            model(**batch)
        return
    stage = "prompt" if variant == "clip" else "ft"
    # manual step: the reference optimiser (Adam, lr 4e-4, betas 0.5/0.999) on the stage's parameters
    manual = MRADForAnomalyDetection.from_pretrained(folder).train()
    dataset, batch = _training_batch(manual)
    optimizer = torch.optim.Adam(set_training_stage(manual, stage), lr=4e-4, betas=(0.5, 0.999))
    manual_loss = manual(**batch, loss_stage=stage).loss
    manual_loss.backward()
    optimizer.step()

    model = MRADForAnomalyDetection.from_pretrained(folder)
    set_training_stage(model, stage)
    model.config.use_cache = False
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(dataset),
        max_steps=1,
        learning_rate=4e-4,
        adam_beta1=0.5,
        adam_beta2=0.999,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )

    class StageTrainer(Trainer):  # the stage is a model keyword, as in `train_mrad`
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs, loss_stage=stage, num_items_in_batch=num_items_in_batch)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    trainer = StageTrainer(model=model, args=args, train_dataset=dataset)
    result = trainer.train()
    assert result.training_loss == pytest.approx(manual_loss.item(), rel=1e-5)
    moved = 0
    for (name, trained), (_, reference) in zip(model.named_parameters(), manual.named_parameters()):
        if reference.grad is None:
            assert torch.equal(trained, reference), name  # frozen: untouched by both
            continue
        # Adam's first step is ~lr * sign(grad): entries whose gradient is rounding noise (the key bias, to which the
        # softmax is invariant) move by +-lr in either direction, so compare the entries with a real gradient
        real = reference.grad.abs() > 1e-6
        torch.testing.assert_close(trained[real], reference[real], atol=1e-5, rtol=0, msg=name)
        moved += int(real.sum())
    assert moved > 0
    changed = [name for name, p in model.named_parameters() if p.requires_grad]
    assert changed and all(
        name.split(".")[0] in ("prompt_learner", "region_bias", "image_projection", "patch_projection")
        for name in changed
    )


def test_gradient_checkpointing_keeps_loss_and_gradients(saved):
    variant, folder, _, _ = saved
    if variant == "tf":
        return  # nothing to train (covered above)
    stage = "prompt" if variant == "clip" else "ft"
    grads = []
    for checkpointing in (False, True):
        model = MRADForAnomalyDetection.from_pretrained(folder)
        if checkpointing:
            model.gradient_checkpointing_enable()
        parameters = set_training_stage(model, stage)
        model.train()
        _, batch = _training_batch(model)
        model(**batch, loss_stage=stage).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in parameters]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def _saved_remote_code(folder):
    files = sorted(folder.glob("*.py"))
    return [path.name for path in files], sum(len(path.read_text().splitlines()) for path in files)


def test_remote_code_unit_has_at_most_ten_files(saved):
    """What `save_pretrained` actually writes: model, processor and pipeline code, no hub/CLI/tool modules."""
    names, _ = _saved_remote_code(saved[1])
    assert len(names) <= REMOTE_CODE_MAX_FILES, names
    assert not {"api.py", "trainer.py", "common.py"} & set(names)


def test_remote_code_unit_does_not_grow_back(saved):
    names, lines = _saved_remote_code(saved[1])
    assert lines <= REMOTE_CODE_GUARD_LINES, f"{lines} lines in {names}"


@pytest.mark.xfail(
    strict=True,
    reason="issue 14 §2 target not reached: 10 files, 2,337 lines (from 3,717); what is left runs on load, forward, "
    "preprocessing or the pipeline: the bank integrity checks (~330 lines) and the robust image decoder (~200) included",
)
def test_remote_code_unit_meets_the_issue_budget(saved):
    names, lines = _saved_remote_code(saved[1])
    assert len(names) <= REMOTE_CODE_MAX_FILES and lines <= REMOTE_CODE_MAX_LINES, f"{lines} lines in {names}"


def test_pipeline_with_mrad_hf_installed_infers_the_task_and_runs_the_installed_code(saved):
    from transformers import pipeline

    _, folder, pixels, expected = saved
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"]["anomaly-detection"]["pt"] == [
        "AutoModel"
    ]  # listed for hosts without mrad_hf (next test)
    image = make_samples(1, seed=7)[0]["image"]
    scores = []
    for call in ({"task": "anomaly-detection"}, {}, {"trust_remote_code": True}):  # no remote code needed
        detector = pipeline(model=str(folder), device="cpu", **call)
        assert type(detector).__module__.startswith("mrad_hf.") and type(detector.model).__module__.startswith(
            "mrad_hf."
        ), call
        scores.append(detector(image)["score"])
    assert scores[0] == scores[1] == scores[2]
    torch.testing.assert_close(torch.tensor(scores[0]), expected.anomaly_score[0], atol=1e-6, rtol=0)


def test_remote_code_and_task_inference_in_a_fresh_process_without_mrad_hf(tmp_path):
    folders, expected = {}, {}
    pixels = None
    for variant in VARIANTS:
        model = _model(variant)
        folders[variant] = tmp_path / variant
        model.save_pretrained(folders[variant])
        image = make_samples(1, seed=9)[0]["image"]
        pixels = MRADImageProcessor.from_config(model.config)([image], return_tensors="pt")["pixel_values"]
        expected[variant] = _outputs(model, pixels).anomaly_score.item()
    np.save(tmp_path / "image.npy", make_samples(1, seed=9)[0]["image"])
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["mrad_hf"] = None  # the package is not importable in this process
        import numpy as np, torch
        from transformers import AutoModel, pipeline
        folders = {json.dumps({k: str(v) for k, v in folders.items()})}
        image = np.load({str(tmp_path / "image.npy")!r}, allow_pickle=False)
        pixels = torch.from_numpy(np.load({str(tmp_path / "pixels.npy")!r}, allow_pickle=False))
        result = {{}}
        for variant, folder in folders.items():
            model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16)
            assert "transformers_modules" in type(model).__module__
            assert model.memory.patch_keys.dtype == torch.float32 and model.memory.patch_sources.dtype == torch.int64
            detector = pipeline(model=folder, trust_remote_code=True, device="cpu")  # no task: from config.json
            result[variant] = [detector(image)["score"], model(pixel_values=pixels).anomaly_score.item()]
        print(json.dumps(result))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    for variant in VARIANTS:
        assert result[variant][0] == pytest.approx(expected[variant], abs=1e-5), variant
        assert result[variant][1] == pytest.approx(expected[variant], abs=0.02), variant  # bfloat16 tower


def test_cli_build_bank_in_bfloat16_then_predict_from_the_saved_model(tmp_path, capsys):
    """Issue 14 §1: `mrad build-bank --dtype bfloat16 --save-model DIR` then `mrad predict --model DIR` (refused before
    with a checksum error)."""
    from PIL import Image
    from reliability._files import write_folder_dataset

    from mrad_hf.cli.main import main

    make_tiny_model().save_pretrained(tmp_path / "tiny")
    data = write_folder_dataset(tmp_path / "widget", make_samples(6, seed=21))
    assert (
        main(
            [
                "build-bank",
                "--model",
                str(tmp_path / "tiny"),
                "--dataset",
                "folder",
                "--data-root",
                str(data),
                "--dtype",
                "bfloat16",
                "--output",
                str(tmp_path / "bank.safetensors"),
                "--save-model",
                str(tmp_path / "with_bank"),
            ]
        )
        == 0
    )
    saved = MRADForAnomalyDetection.from_pretrained(tmp_path / "with_bank")
    assert saved.clip.visual_projection.weight.dtype == torch.bfloat16
    _assert_bank_is_float32(saved)
    queries = tmp_path / "queries"
    queries.mkdir()
    Image.fromarray(make_samples(1, seed=22)[0]["image"]).save(queries / "q0.png")
    capsys.readouterr()
    assert (
        main(["predict", "--model", str(tmp_path / "with_bank"), str(queries), "--output-dir", str(tmp_path / "out")])
        == 0
    ), capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["scored"] == 1
