# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: tiny random CLIP backbones (no pretrained weights exist offline) and small labelled samples."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))  # `import reference_mrad`

import numpy as np
import pytest
import torch
from transformers import CLIPConfig

from mrad_hf.memory import build_memory_bank

TINY_IMAGE_SIZE = 112  # 8 x 8 patches of 14 px; the backbone's native grid is 4 x 4, so positions are interpolated


def tiny_clip_config(**vision_overrides) -> CLIPConfig:
    vision = dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, image_size=56, patch_size=14
    )
    vision.update(vision_overrides)
    return CLIPConfig(
        text_config=dict(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        vision_config=vision,
        projection_dim=24,
    )


def make_tiny_model(seed: int = 0, **config_overrides):
    from mrad_hf import MRADForAnomalyDetection

    torch.manual_seed(seed)
    config_overrides.setdefault("image_size", TINY_IMAGE_SIZE)
    return MRADForAnomalyDetection.from_clip(tiny_clip_config(), **config_overrides).eval()


def make_samples(count: int = 6, seed: int = 0, height: int = 100, width: int = 120):
    """Random RGB images; odd ones are anomalous with a rectangular mask."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mask = None
        if index % 2:
            mask = np.zeros((height, width), dtype=bool)
            top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
            mask[top : top + height // 3, left : left + width // 3] = True
            image[mask] = 255 - image[mask]
        samples.append({"image": image, "label": index % 2, "mask": mask, "id": f"img{index}"})
    return samples


#: Prompt ids for tiny text towers (vocabulary 99): start 0, twelve placeholders 5, words, end 98 (the largest id, so
#: that the reference's argmax finds it). Real backbones use tokenization_mrad.prompt_token_ids.
TINY_PROMPT_TOKEN_IDS = [[0] + [5] * 12 + [7, 8, 98], [0] + [5] * 12 + [9, 7, 8, 98]]


def make_tiny_trained_model(variant: str, seed: int = 0, **config_overrides):
    """A tiny MRAD-FT or MRAD-CLIP model (text tower: 3 layers, 24 positions; deep prompts at text layers 2-3)."""
    from mrad_hf import MRADForAnomalyDetection

    clip_config = tiny_clip_config()
    clip_config.text_config.max_position_embeddings = 24
    clip_config.text_config.num_hidden_layers = 3
    config_overrides.setdefault("image_size", TINY_IMAGE_SIZE)
    if variant == "clip":
        config_overrides.setdefault("prompt_token_ids", TINY_PROMPT_TOKEN_IDS)
        config_overrides.setdefault("deep_prompt_depth", 3)
    torch.manual_seed(seed)
    return MRADForAnomalyDetection.from_clip(clip_config, variant=variant, **config_overrides).eval()


@pytest.fixture
def reset_accelerate():
    """Accelerate's state is a process-wide singleton; reset it around tests that create an Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture
def samples():
    return make_samples()


@pytest.fixture
def model_with_bank(tiny_model, samples):
    build_memory_bank(tiny_model, samples, batch_size=4, source="unit-test", progress=False)
    return tiny_model


def run_two_processes_and_one(script, two_output, one_output, *, launcher: str = "torchrun", **one_kwargs) -> None:
    """`script`'s `run(output)` under `torchrun --nproc_per_node 2` (or `accelerate launch --num_processes 2`) on CPU
    (gloo), then in this process for comparison.

    The workers run one thread each (OMP_NUM_THREADS=1), so the one-process run uses one thread too: the same GEMM
    kernels on both sides, so equal inputs give equal bits.
    """
    import importlib
    import subprocess

    environment = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if launcher == "accelerate":
        # `--multi_gpu` is accelerate's multi-process launcher, CPUs included (with ACCELERATE_USE_CPU=1); its `--cpu`
        # with several processes expects MPI and otherwise starts one process, silently
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    completed = subprocess.run(
        [*command, str(script), str(two_output)], env=environment, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    sys.path.insert(0, str(script.parent))
    run = importlib.import_module(script.stem).run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(str(one_output), **one_kwargs)
    finally:
        torch.set_num_threads(threads)
