# SPDX-License-Identifier: Apache-2.0
"""Run by `torchrun --nproc_per_node 2` from tests/evaluation/test_scoring.py: score 7 images in batches of 2."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest
os.environ.setdefault("ACCELERATE_USE_CPU", "1")

import torch  # noqa: E402
from conftest import make_samples, make_tiny_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mrad_hf.evaluation.scoring import score_items  # noqa: E402
from mrad_hf.memory import build_memory_bank


def run(output: str, accelerate: bool = True) -> None:
    model = make_tiny_model()
    build_memory_bank(model, make_samples(6), batch_size=3, progress=False)
    accelerator = None
    if accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
    results = score_items(model, make_samples(7, seed=4), batch_size=2, accelerator=accelerator)
    if accelerator is None or accelerator.is_main_process:
        tensors = {
            "scores": torch.tensor([r.score for r in results]),
            "maps": torch.stack([r.anomaly_map for r in results]),
        }
        save_file(tensors, output, metadata={"ids": json.dumps([r.id for r in results])})


if __name__ == "__main__":
    run(sys.argv[1])
