# SPDX-License-Identifier: Apache-2.0
"""Training MRAD-FT and MRAD-CLIP with Accelerate, as the reference `train.py` does (paper Sec. 3.4-3.5).

The reference schedule, per variant (`MRADTrainingArguments` holds every knob, reference defaults):

* **MRAD-FT**: 1 epoch of the "ft" stage: both query/key projection pairs, Adam (lr 4e-4, betas 0.5/0.999),
  cosine annealing to 1e-6 over all steps, batch 8, seed 111. Loss: focal + dice on the upsampled pixel
  retrieval + cross-entropy of the image retrieval / 0.07, with similarity dropout.
* **MRAD-CLIP**: epoch 1 = the "ft" stage at a constant lr, then 5 epochs of the "prompt" stage: the prompt
  learner and the region biases (a second Adam, constant lr), projections frozen. Loss: focal + dice + dice on
  the text map.

The auxiliary data are both the memory and the training set (the reference trains on the auxiliary dataset's
test split and builds the banks from it); similarity dropout keeps an image from retrieving itself.

Accelerate gives: any number of processes (`accelerate launch`, `torchrun`), mixed precision on GPU,
gradient accumulation and trackers. A checkpoint is written at the end of every epoch and a run resumes from the
latest one: trained heads, bank, optimizer and scheduler states and every process's RNG states, as safetensors +
JSON (Accelerate's `save_state` pickles optimizer and RNG states, which this package does not load). The frozen
CLIP is not copied into checkpoints. The global
batch is `batch_size` whatever the number of processes (`split_batches=True`), so a 2-process run takes the
same optimisation steps as a 1-process run. Bank building is sharded across processes batch by batch and gathered
in the original order (`build_memory_bank(MRADForAnomalyDetection, accelerator=...)`), so it gives the same bank as
one process.

A checkpoint or final model is written into a temporary folder and renamed when complete, so an interrupted run
never leaves a folder that would load. The run folder carries a fingerprint (`tools.run_folder`): a rerun resumes
only a run with the same model, bank, data and settings, anything else is refused with the differing fields.
`seed` seeds everything random: torch (CPU and CUDA), numpy, Python's `random`, the shuffle order (Accelerate's
seedable sampler, `data_seed=seed`) and DataLoader workers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.reading import undecoded_images
from ..memory.building import build_memory_bank
from ..memory.files import MODEL_FOLDER, atomic_directory
from ..memory.samples import iter_samples, progress_bar
from ..models.mrad.configuration_mrad import MRADConfig
from ..models.mrad.image_processing_mrad import MRADImageProcessor
from ..models.mrad.modeling_mrad import MRADForAnomalyDetection
from ..tools import run_folder

__all__ = [
    "MRADTrainingArguments",
    "MRADTrainingResult",
    "MRADTrainDataset",
    "training_stages",
    "count_trainable_parameters",
    "set_training_stage",
    "trainable_parameters",
    "train_mrad",
]

CHECKPOINT_STATE = "trainer_state.json"
#: MRADTrainingArguments fields that do not change a number (left out of the run fingerprint).
_NOT_FINGERPRINTED = ("output_dir", "log_with", "resume", "overwrite", "resume_anyway", "num_workers")


@dataclass
class MRADTrainingArguments:
    """Knobs of a training run; the defaults are the reference's.

    Args:
        output_dir: where checkpoints (`checkpoints/epoch-<n>/`) and the final model (`final/`) go.
        ft_epochs: epochs of the "ft" stage (1).
        prompt_epochs: epochs of MRAD-CLIP's "prompt" stage (5); ignored for MRAD-FT.
        batch_size: global batch size (8), split across processes.
        learning_rate, betas: Adam (4e-4, (0.5, 0.999)) for both stages.
        min_learning_rate: cosine annealing floor (1e-6).
        cosine_schedule: anneal the "ft" stage's lr; None = the reference's choice (MRAD-FT only, not MRAD-CLIP).
        seed: 111.
        gradient_accumulation_steps: optimiser step every k batches (1).
        mixed_precision: "no", "bf16" or "fp16" (Accelerate autocast; fp16 needs a GPU).
        log_with: Accelerate tracker names or instances (e.g. "tensorboard"), or None.
        resume: continue from the latest complete checkpoint in `output_dir` if there is one, and only when the folder's
            run fingerprint (`output_dir/run.json`: model weights, bank, training data, every setting below that
            changes a number) equals this run's; a folder of a different run is refused. False = start over.
        overwrite: the folder holds a different run: delete its checkpoints and final model and start over.
        resume_anyway: the folder holds a different run: resume from its checkpoints all the same (recorded).
        max_steps_per_epoch: cap batches per epoch (for smoke tests); None = the whole data.
        bank_batch_size: images per forward pass while building the memory.
        num_workers: DataLoader workers.
    """

    output_dir: str
    ft_epochs: int = 1
    prompt_epochs: int = 5
    batch_size: int = 8
    learning_rate: float = 4e-4
    betas: tuple[float, float] = (0.5, 0.999)
    min_learning_rate: float = 1e-6
    cosine_schedule: bool | None = None
    seed: int = 111
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    log_with: Any = None
    resume: bool = True
    overwrite: bool = False
    resume_anyway: bool = False
    max_steps_per_epoch: int | None = None
    bank_batch_size: int = 8
    num_workers: int = 0


@dataclass
class MRADTrainingResult:
    """What `train_mrad` returns: per-epoch records ({epoch, stage, loss, steps, lr}), per-step losses, the final folder."""

    history: list[dict[str, Any]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    final_model_dir: str | None = None


def training_stages(variant: str, ft_epochs: int = 1, prompt_epochs: int = 5) -> list[str]:
    """The stage of every epoch: MRAD-FT ["ft"]; MRAD-CLIP ["ft", "prompt" x 5] (the reference's 6 epochs)."""
    if variant == "ft":
        return ["ft"] * ft_epochs
    if variant == "clip":
        return ["ft"] * ft_epochs + ["prompt"] * prompt_epochs
    raise ValueError(f"Only the trained variants 'ft' and 'clip' are trained, got {variant!r}.")


def count_trainable_parameters(config: MRADConfig, stage: str) -> int:
    """Parameters a stage trains, from the config alone (no backbone is built; heads are made on the meta device).

    ViT-L/14@336: "ft" 2,755,584; "prompt" 1,224,192 (12 x 2 context vectors, 8 x 4 deep prompts, two 768 x 768
    bias layers), as the reference.
    """
    with torch.device("meta"):
        heads = MRADForAnomalyDetection._make_heads(config)
    names = STAGE_MODULES[stage]
    missing = [name for name in names if name not in heads]
    if missing:
        raise ValueError(f"Variant {config.variant!r} has no {', '.join(missing)} (stage {stage!r}).")
    return sum(parameter.numel() for name in names for parameter in heads[name].parameters())


#: The modules each training stage updates, as the reference: "ft" both projection pairs, "prompt" the prompt learner
#: and the region biases (the projections then stay frozen).
STAGE_MODULES = {"ft": ("image_projection", "patch_projection"), "prompt": ("prompt_learner", "region_bias")}


def trainable_parameters(model: MRADForAnomalyDetection, stage: str) -> list[torch.nn.Parameter]:
    """The parameters a training stage of `model` updates (`STAGE_MODULES`)."""
    names = STAGE_MODULES.get(stage, ())
    if not names or not all(hasattr(model, name) for name in names):
        raise ValueError(f"No stage {stage!r} for variant {model.config.variant!r}")
    return [parameter for name in names for parameter in getattr(model, name).parameters()]


def set_training_stage(model: MRADForAnomalyDetection, stage: str | None) -> list[torch.nn.Parameter]:
    """Freeze everything except the stage's parameters (None freezes all); returns the trainable ones."""
    model.requires_grad_(False)
    parameters = [] if stage is None else trainable_parameters(model, stage)
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


class MRADTrainDataset(Dataset):
    """Auxiliary samples (dicts with image, label, optional mask; a list or a `datasets.Dataset`) as model inputs."""

    def __init__(self, samples, processor: MRADImageProcessor):
        self.samples = samples
        self.processor = processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label, mask, _ = next(iter_samples([self.samples[index]]))
        inputs = self.processor([image], masks=[mask])
        return {
            "pixel_values": inputs["pixel_values"][0],
            "masks": inputs["masks"][0].float(),
            "labels": torch.tensor(label, dtype=torch.long),
        }


# ---------------------------------------------------------------------- checkpoints
def _latest_checkpoint(output_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint: `checkpoints/epoch-<n>/` with its trainer_state.json (written last)."""
    root = output_dir / "checkpoints"
    found = []
    for folder in root.glob("epoch-*") if root.is_dir() else []:
        state_file = folder / CHECKPOINT_STATE
        if state_file.is_file():
            try:
                state = json.loads(state_file.read_text(encoding="utf-8"))
                found.append((int(state["epochs_done"]), folder, state))
            except (ValueError, KeyError):
                continue
    if not found:
        return None
    _, folder, state = max(found, key=lambda item: item[0])
    return folder, state


def _trainable_state(model: MRADForAnomalyDetection) -> dict[str, torch.Tensor]:
    """The model's state without the frozen CLIP (hundreds of MB for ViT-L): trained heads and the memory bank."""
    return {
        key: value.detach().cpu().contiguous()
        for key, value in model.state_dict().items()
        if not key.startswith("clip.")
    }


def _optimizer_tensors(optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state dict split into tensors (safetensors) and plain data (JSON)."""
    state = optimizer.state_dict()
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        plain["state"][str(index)] = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain["state"][str(index)][name] = value
    return tensors, plain


def _load_optimizer(optimizer, tensors: dict[str, torch.Tensor], plain: dict[str, Any], prefix: str) -> None:
    state: dict[int, dict[str, Any]] = {}
    for index, values in plain["state"].items():
        state[int(index)] = dict(values)
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import random

    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, python_state, gauss = random.getstate()
    plain = {
        "numpy": [kind, int(position), int(has_gauss), float(cached)],
        "python": [version, list(python_state), gauss],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    kind, position, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached))
    version, python_state, gauss = plain["python"]
    random.setstate((version, tuple(python_state), gauss))


def _save_checkpoint(
    accelerator,
    model,
    optimizers: dict[str, Any],
    scheduler,
    output_dir: Path,
    epochs_done: int,
    result: MRADTrainingResult,
) -> None:
    """Write checkpoints/epoch-<n>/ (safetensors + JSON only), into a temporary folder renamed when complete.

    Holds the trained heads and the bank (not the frozen CLIP), each optimizer's state, the scheduler, every
    process's RNG states and the history. We do not use `Accelerator.save_state`, which pickles optimizer and RNG
    states; this package loads only safetensors and JSON.
    """
    from safetensors.torch import save_file

    folder = output_dir / "checkpoints" / f"epoch-{epochs_done}"
    partial = folder.with_name(f".{folder.name}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng_tensors, rng_plain = _rng_state()
    save_file(rng_tensors, str(partial / f"rng_state_{accelerator.process_index}.safetensors"))
    (partial / f"rng_state_{accelerator.process_index}.json").write_text(json.dumps(rng_plain), encoding="utf-8")
    if accelerator.is_main_process:
        save_file(_trainable_state(model), str(partial / "trainable_state.safetensors"))
        tensors, plain = {}, {}
        for name, optimizer in optimizers.items():
            optimizer_tensors, plain[name] = _optimizer_tensors(optimizer, name)
            tensors.update(optimizer_tensors)
        save_file(tensors or {"empty": torch.zeros(0)}, str(partial / "optimizers.safetensors"))
        state = {
            "epochs_done": epochs_done,
            "history": result.history,
            "step_losses": result.step_losses,
            "memory_bank_metadata": model.memory_bank_metadata,
            "optimizers": plain,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / CHECKPOINT_STATE).write_text(
            json.dumps(state, indent=2), encoding="utf-8"
        )  # written last: marks complete
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
    accelerator.wait_for_everyone()


def _restore_memory_bank(model: MRADForAnomalyDetection, folder: Path, state: dict[str, Any]) -> None:
    """Attach the bank saved with a checkpoint (the one the run trained against) instead of rebuilding it."""
    from safetensors import safe_open

    from ..models.mrad.memory_bank_mrad import MemoryBank

    with safe_open(str(folder / "trainable_state.safetensors"), framework="pt") as handle:
        tensors = {
            name.removeprefix("memory."): handle.get_tensor(name)
            for name in handle.keys()
            if name.startswith("memory.")
        }
    model.set_memory_bank(MemoryBank(**tensors, metadata=dict(state.get("memory_bank_metadata") or {})))


def _load_checkpoint(
    accelerator, model, optimizers: dict[str, Any], scheduler, folder: Path, state: dict[str, Any]
) -> None:
    """Trained heads, optimizers, scheduler and this process's RNG states (the bank: `_restore_memory_bank`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(
        str(folder / "trainable_state.safetensors"), framework="pt"
    ) as handle:  # the bank is already restored
        trained = {name: handle.get_tensor(name) for name in handle.keys() if not name.startswith("memory.")}
    missing, unexpected = model.load_state_dict(trained, strict=False)
    missing = [key for key in missing if not key.startswith(("clip.", "memory."))]
    if missing or unexpected:
        raise RuntimeError(
            f"Checkpoint {folder} does not match this model (missing {missing}, unexpected {unexpected}); "
            "resume with the same --variant and backbone, or start a new --output-dir."
        )
    optimizer_tensors = load_file(str(folder / "optimizers.safetensors"))
    for name, optimizer in optimizers.items():
        if name in state["optimizers"]:  # an optimizer that has not stepped yet has no saved state
            _load_optimizer(optimizer, optimizer_tensors, state["optimizers"][name], name)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    rank_file = folder / f"rng_state_{accelerator.process_index}.safetensors"
    if rank_file.is_file():
        _set_rng_state(
            load_file(str(rank_file)), json.loads(rank_file.with_suffix(".json").read_text(encoding="utf-8"))
        )


# ---------------------------------------------------------------------- the loop
def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: numpy and `random` from the worker's torch seed (itself from the loader's seeded generator)."""
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def train_mrad(
    model: MRADForAnomalyDetection,
    train_samples,
    args: MRADTrainingArguments,
    *,
    accelerator=None,
    bank_source: str | None = None,
    progress: bool = True,
) -> MRADTrainingResult:
    """Train a MRAD-FT or MRAD-CLIP model on labelled auxiliary samples and save it with `save_pretrained`.

    Args:
        model: from `MRADForAnomalyDetection.from_clip(..., variant="ft" | "clip")`. If it has no memory bank, one is
            built from `train_samples` (sharded across processes), as the reference does.
        train_samples: dicts with `image`, `label`, `mask` (a list or a `datasets.Dataset`).
        args: `MRADTrainingArguments`.
        accelerator: an `accelerate.Accelerator`; one is created from `args` if None.

    Returns:
        `MRADTrainingResult`; the trained model is saved to `args.output_dir/final` (loadable by `AutoModel` and the
        `anomaly-detection` pipeline).
    """
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    config = model.config
    stages = training_stages(config.variant, args.ft_epochs, args.prompt_epochs)
    if len(train_samples) == 0:
        raise ValueError("No training samples: pass the labelled auxiliary dataset (images, labels and masks).")
    if accelerator is None:
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # lets `torchrun` / `accelerate launch` CPU processes form a gloo group
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=args.log_with,
            project_dir=args.output_dir,
            # batch_size is the global batch; the shuffle order is a function of (seed, epoch) whatever the process count
            dataloader_config=DataLoaderConfiguration(
                split_batches=True, use_seedable_sampler=True, data_seed=args.seed
            ),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)],
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"{launched} processes were launched but Accelerate sees {accelerator.num_processes}; on CPU set ACCELERATE_USE_CPU=1 "
            "or create the Accelerator with cpu=True, otherwise every process would train alone on the same files."
        )
    output_dir = Path(args.output_dir)
    set_seed(args.seed)
    train_samples = undecoded_images(
        train_samples
    )  # files read by MRAD's decoder: a corrupt one is named, not a raw OSError

    settings = {key: value for key, value in asdict(args).items() if key not in _NOT_FINGERPRINTED}
    config_fields = {
        key: value
        for key, value in config.to_dict().items()
        if not key.startswith(("memory_bank", "clip_config", "transformers"))
    }
    fingerprint = run_folder.run_fingerprint(
        command="train",
        model=model,
        dataset=run_folder.dataset_identity(train_samples, name=bank_source),
        settings=settings,
        extra={"config": config_fields},
    )
    options = dict(
        artefacts=("checkpoints", "final"),
        overwrite=args.overwrite or not args.resume,
        resume_anyway=args.resume_anyway,
    )
    run = run_folder.open_run_folder(
        output_dir, fingerprint, write=False, **options
    )  # every process decides (or refuses) alike
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run = run_folder.open_run_folder(output_dir, fingerprint, **options)
    accelerator.wait_for_everyone()
    latest = _latest_checkpoint(output_dir) if run.resumed else None
    if latest is not None:
        _restore_memory_bank(model, *latest)
    elif model.memory.image_keys.shape[0] == 0:
        build_memory_bank(
            model,
            train_samples,
            batch_size=args.bank_batch_size,
            source=bank_source,
            progress=progress and accelerator.is_local_main_process,
            accelerator=accelerator,
        )

    processor = MRADImageProcessor.from_config(config)
    loader = DataLoader(
        MRADTrainDataset(train_samples, processor),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed),
        worker_init_fn=_seed_worker,
    )
    steps_per_epoch = len(loader) if args.max_steps_per_epoch is None else min(len(loader), args.max_steps_per_epoch)
    optimizer_steps_per_epoch = math.ceil(steps_per_epoch / args.gradient_accumulation_steps)

    for parameter in trainable_parameters(model, "ft"):
        parameter.requires_grad_(True)
    ft_optimizer = torch.optim.Adam(trainable_parameters(model, "ft"), lr=args.learning_rate, betas=tuple(args.betas))
    objects: list[Any] = [model, ft_optimizer]
    cosine = (config.variant == "ft") if args.cosine_schedule is None else args.cosine_schedule
    scheduler = None
    if cosine:
        total = optimizer_steps_per_epoch * stages.count("ft")
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            ft_optimizer, T_max=max(total, 1), eta_min=args.min_learning_rate
        )
        objects.append(scheduler)
    prompt_optimizer = None
    if "prompt" in stages:
        for parameter in trainable_parameters(model, "prompt"):
            parameter.requires_grad_(True)
        prompt_optimizer = torch.optim.Adam(
            trainable_parameters(model, "prompt"), lr=args.learning_rate, betas=tuple(args.betas)
        )
        objects.append(prompt_optimizer)
    objects.append(loader)
    prepared = accelerator.prepare(*objects)
    model_wrapped, ft_optimizer = prepared[0], prepared[1]
    loader = prepared[-1]
    index = 2
    if scheduler is not None:
        scheduler = prepared[index]
        index += 1
    if prompt_optimizer is not None:
        prompt_optimizer = prepared[index]
    unwrapped = accelerator.unwrap_model(model_wrapped)
    optimizers = {"ft": ft_optimizer} | ({"prompt": prompt_optimizer} if prompt_optimizer is not None else {})

    result = MRADTrainingResult()
    start_epoch = 0
    if latest is not None:
        folder, state = latest
        _load_checkpoint(accelerator, unwrapped, optimizers, scheduler, folder, state)
        start_epoch = int(state["epochs_done"])
        result.history = list(state.get("history", []))
        result.step_losses = list(state.get("step_losses", []))
        if accelerator.is_main_process and progress:
            print(f"Resuming from {folder} ({start_epoch} of {len(stages)} epochs done)", flush=True)
    if args.log_with:
        accelerator.init_trackers(
            "mrad", config={key: str(value) for key, value in asdict(args).items()} | {"variant": config.variant}
        )

    for epoch in range(start_epoch, len(stages)):
        stage = stages[epoch]
        optimizer = ft_optimizer if stage == "ft" else prompt_optimizer
        set_training_stage(unwrapped, stage)
        model_wrapped.train()
        losses = []
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)  # the order of epoch n does not depend on having run epochs 0..n-1 in this process
        bar = progress_bar(
            steps_per_epoch,
            f"Epoch {epoch + 1}/{len(stages)} [{stage}]",
            progress and accelerator.is_local_main_process,
            unit="step",
        )
        for step, batch in enumerate(loader):
            if step >= steps_per_epoch:
                break
            with accelerator.accumulate(model_wrapped):
                with accelerator.autocast():
                    output = model_wrapped(
                        pixel_values=batch["pixel_values"],
                        labels=batch["labels"],
                        masks=batch["masks"],
                        loss_stage=stage,
                    )
                accelerator.backward(output.loss)
                optimizer.step()
                if stage == "ft" and scheduler is not None and accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            loss = accelerator.reduce(output.loss.detach().float(), reduction="mean").item()
            losses.append(loss)
            result.step_losses.append(loss)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
            if args.log_with:
                accelerator.log(
                    {f"{stage}/loss": loss, "lr": optimizer.param_groups[0]["lr"]}, step=len(result.step_losses)
                )
        bar.close()
        record = {
            "epoch": epoch + 1,
            "stage": stage,
            "loss": sum(losses) / max(len(losses), 1),
            "steps": len(losses),
            "lr": optimizer.param_groups[0]["lr"],
        }
        result.history.append(record)
        if accelerator.is_main_process and progress:
            print(
                f"epoch {epoch + 1}/{len(stages)} [{stage}] loss {record['loss']:.4f} lr {record['lr']:.2e}",
                flush=True,
            )
        if args.log_with:
            accelerator.log({f"{stage}/epoch_loss": record["loss"]}, step=len(result.step_losses))
        _save_checkpoint(accelerator, unwrapped, optimizers, scheduler, output_dir, epoch + 1, result)

    set_training_stage(unwrapped, None)
    unwrapped.eval()
    accelerator.wait_for_everyone()
    final = output_dir / "final"
    if accelerator.is_main_process:
        with atomic_directory(final, MODEL_FOLDER) as folder:
            unwrapped.save_pretrained(folder)
            (folder / "training_history.json").write_text(json.dumps(result.history, indent=2), encoding="utf-8")
    accelerator.wait_for_everyone()
    result.final_model_dir = str(final)
    if accelerator.is_main_process:
        run.finish()
    if args.log_with:
        accelerator.end_training()
    return result
