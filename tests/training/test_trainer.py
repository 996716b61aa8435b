# SPDX-License-Identifier: Apache-2.0
"""Training with Accelerate: stages and schedules, loss goes down, exact resume after a kill, safe checkpoints,
no half-written final model, and a 2-process run equal to the 1-process run."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_samples, make_tiny_trained_model, run_two_processes_and_one
from safetensors.torch import load_file
from transformers import AutoModel, pipeline

import mrad_hf.training.trainer as training
from mrad_hf import MRADImageProcessor
from mrad_hf.training.trainer import MRADTrainingArguments, train_mrad, training_stages

pytestmark = pytest.mark.usefixtures("reset_accelerate")


def _reset():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_training_stages():
    assert training_stages("ft") == ["ft"]
    assert training_stages("clip") == ["ft"] + ["prompt"] * 5
    with pytest.raises(ValueError, match="Only the trained variants"):
        training_stages("tf")


def test_ft_loss_goes_down_cosine_lr_and_the_model_reloads(tmp_path):
    samples = make_samples(16, seed=2)
    model = make_tiny_trained_model("ft")
    args = MRADTrainingArguments(output_dir=str(tmp_path), ft_epochs=4, batch_size=4, learning_rate=1e-2, resume=False)
    result = train_mrad(model, samples, args, progress=False)
    losses = [record["loss"] for record in result.history]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses  # measured 2.292 -> 2.271
    assert losses[-1] < losses[0] - 0.01, losses
    assert result.history[-1]["lr"] == pytest.approx(1e-6)  # cosine annealing reaches eta_min after the last step
    final = Path(result.final_model_dir)
    assert json.loads((final / "training_history.json").read_text()) == result.history
    reloaded = AutoModel.from_pretrained(final).eval()
    pixel_values = MRADImageProcessor.from_config(model.config)([samples[1]["image"]])["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(pixel_values=pixel_values).anomaly_score, model.eval()(pixel_values=pixel_values).anomaly_score
        )
    assert (
        abs(
            pipeline("anomaly-detection", model=str(final))(samples[1]["image"])["score"]
            - reloaded(pixel_values=pixel_values).anomaly_score.item()
        )
        < 1e-6
    )


def test_clip_ft_stage_has_constant_lr_and_prompt_loss_goes_down(tmp_path):
    model = make_tiny_trained_model("clip")
    frozen_projection = model.patch_projection.query.weight.detach().clone()
    args = MRADTrainingArguments(output_dir=str(tmp_path), ft_epochs=1, prompt_epochs=3, batch_size=4, resume=False)
    history = train_mrad(model, make_samples(12, seed=4), args, progress=False).history
    assert [record["stage"] for record in history] == ["ft", "prompt", "prompt", "prompt"]
    assert all(record["lr"] == 4e-4 for record in history)  # no cosine schedule for MRAD-CLIP
    assert history[-1]["loss"] < history[1]["loss"]
    assert not torch.equal(model.patch_projection.query.weight, frozen_projection)  # trained in the ft epoch ...
    checkpoint = load_file(str(tmp_path / "checkpoints" / "epoch-1" / "trainable_state.safetensors"))
    torch.testing.assert_close(
        model.patch_projection.query.weight, checkpoint["patch_projection.query.weight"]
    )  # ... then frozen


def test_checkpoints_are_safetensors_and_json_without_the_backbone(tmp_path):
    args = MRADTrainingArguments(output_dir=str(tmp_path), batch_size=8, resume=False)
    train_mrad(make_tiny_trained_model("ft"), make_samples(8), args, progress=False)
    folder = tmp_path / "checkpoints" / "epoch-1"
    assert {path.suffix for path in folder.iterdir()} == {".safetensors", ".json"}
    assert not any(key.startswith("clip.") for key in load_file(str(folder / "trainable_state.safetensors")))


def test_resume_after_a_kill_gives_the_same_model_bit_for_bit(tmp_path, monkeypatch):
    samples = make_samples(12, seed=5)
    args = dict(ft_epochs=1, prompt_epochs=2, batch_size=4)
    straight = train_mrad(
        make_tiny_trained_model("clip"),
        samples,
        MRADTrainingArguments(output_dir=str(tmp_path / "a"), resume=False, **args),
        progress=False,
    )
    _reset()
    save = training._save_checkpoint

    def save_then_die(accelerator, model, optimizers, scheduler, output_dir, epochs_done, result):
        save(accelerator, model, optimizers, scheduler, output_dir, epochs_done, result)
        if epochs_done == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(training, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_mrad(
            make_tiny_trained_model("clip"),
            samples,
            MRADTrainingArguments(output_dir=str(tmp_path / "b"), resume=False, **args),
            progress=False,
        )
    assert not (tmp_path / "b" / "final").exists()
    monkeypatch.setattr(training, "_save_checkpoint", save)
    _reset()
    resumed = train_mrad(
        make_tiny_trained_model("clip"),
        samples,
        MRADTrainingArguments(output_dir=str(tmp_path / "b"), resume=True, **args),
        progress=False,
    )
    assert resumed.step_losses == straight.step_losses
    a, b = (load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in ("a", "b"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_failed_final_save_leaves_no_model_folder(tmp_path, monkeypatch):
    from mrad_hf import MRADForAnomalyDetection

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(MRADForAnomalyDetection, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        train_mrad(
            make_tiny_trained_model("ft"),
            make_samples(8),
            MRADTrainingArguments(output_dir=str(tmp_path), resume=False),
            progress=False,
        )
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".incomplete",
        "checkpoints",
        "run.json",
    ]  # no final/, no partial folder; marked unfinished


def test_two_processes_give_the_one_process_bank_and_model(tmp_path):
    script = Path(__file__).with_name("two_process_training.py")
    run_two_processes_and_one(script, tmp_path / "two", tmp_path / "one")
    one, two = (load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in ("one", "two"))
    for key in ("memory.image_keys", "memory.patch_keys", "memory.patch_values", "memory.patch_sources"):
        assert torch.equal(one[key], two[key]), key  # the sharded bank is the same bank
    one_state, two_state = (
        json.loads((tmp_path / name / "checkpoints" / "epoch-1" / "trainer_state.json").read_text())
        for name in ("one", "two")
    )
    assert len(one_state["step_losses"]) == len(two_state["step_losses"]) == 2  # the same global batches of 8
    assert one_state["step_losses"] == pytest.approx(two_state["step_losses"], abs=1e-5)
    for key in one:
        if key.startswith(("image_projection", "patch_projection")) and not key.endswith("key.bias"):
            torch.testing.assert_close(one[key], two[key], atol=1e-6, rtol=0)
    # key biases shift every logit of a query equally: softmax ignores them, their gradient is float noise that Adam
    # normalises to +-lr, so they differ -- and change nothing. The models' outputs agree:
    models = []
    for name in ("one", "two"):
        models.append(AutoModel.from_pretrained(tmp_path / name / "final").eval())
    pixel_values = MRADImageProcessor.from_config(models[0].config)([s["image"] for s in make_samples(3, seed=9)])[
        "pixel_values"
    ]
    with torch.no_grad():
        first, second = (m(pixel_values=pixel_values) for m in models)
    torch.testing.assert_close(first.anomaly_score, second.anomaly_score, atol=1e-5, rtol=0)
    torch.testing.assert_close(first.anomaly_map, second.anomaly_map, atol=1e-5, rtol=0)


def test_an_accelerate_tracker_receives_losses_and_bf16_autocast_runs_on_cpu(tmp_path):
    from accelerate.tracking import GeneralTracker

    class RecordingTracker(GeneralTracker):
        name = "recording"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()
            self.logged, self.configuration = [], None

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.configuration = values

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

    tracker = RecordingTracker()
    args = MRADTrainingArguments(
        output_dir=str(tmp_path), batch_size=4, mixed_precision="bf16", log_with=[tracker], resume=False
    )
    result = train_mrad(make_tiny_trained_model("ft"), make_samples(8), args, progress=False)
    step_losses = [values["ft/loss"] for _, values in tracker.logged if "ft/loss" in values]
    assert step_losses == result.step_losses and len(step_losses) == 2
    assert tracker.configuration["variant"] == "ft" and tracker.configuration["mixed_precision"] == "bf16"
    assert all(torch.isfinite(torch.tensor(step_losses)))
