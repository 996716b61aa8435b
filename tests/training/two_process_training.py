# SPDX-License-Identifier: Apache-2.0
"""Run by `torchrun --nproc_per_node 2` from tests/test_training.py: one MRAD-FT epoch on the tiny model."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest
os.environ.setdefault("ACCELERATE_USE_CPU", "1")

from conftest import make_samples, make_tiny_trained_model  # noqa: E402

from mrad_hf.training.trainer import MRADTrainingArguments, train_mrad  # noqa: E402


def run(output_dir: str) -> None:
    model = make_tiny_trained_model("ft")
    train_mrad(
        model,
        make_samples(16),
        MRADTrainingArguments(output_dir=output_dir, batch_size=8, resume=False),
        progress=False,
    )


if __name__ == "__main__":
    run(sys.argv[1])
