# SPDX-License-Identifier: Apache-2.0
"""Run by `torchrun --nproc_per_node 2` from tests/cli/test_cli_distributed.py: `mrad predict` and `mrad evaluate`
on the inputs the test prepared (folder in MRAD_TWO_PROCESS_INPUTS), results under the folder given as argv[1]."""

import os
import sys
from pathlib import Path

os.environ.setdefault("ACCELERATE_USE_CPU", "1")

from mrad_hf.cli.main import main  # noqa: E402


def run(output: str) -> None:
    inputs = Path(os.environ["MRAD_TWO_PROCESS_INPUTS"])
    model, common = str(inputs / "model"), ["--batch-size", "2", "--device", "cpu"]
    predict = ["predict", "--model", model, str(inputs / "queries"), "--output-dir", f"{output}/predict", *common]
    assert main([*predict, "--threshold", "0.5"]) == 0
    evaluate = ["evaluate", "--model", model, "--dataset", "mvtec-layout", "--data-root", str(inputs / "benchmark")]
    assert main([*evaluate, "--output-dir", f"{output}/evaluate", "--heatmaps", "1", *common]) == 0


if __name__ == "__main__":
    assert os.environ.get("WORLD_SIZE") == "2", "the launcher did not start two processes"
    run(sys.argv[1])
