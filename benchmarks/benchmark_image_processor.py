# SPDX-License-Identifier: Apache-2.0
"""CPU milliseconds per image of `MRADImageProcessor` (decode + 518x518 bicubic stretch + normalise), one thread.

CPU time of this process (`time.process_time`), best of `--repeats` passes: on a shared machine wall time measures
the neighbours; CPU time of a single-threaded run does not (much).

Same images every run: 8 RGB PNG files of MVTec/VisA-like sizes (1024x1024 and 1500x1000) written with a fixed seed,
scored from the file path (decoding included) and from an already decoded PIL image. Prints a Markdown table and
writes it (and a JSON copy) to `benchmarks/results/image-processor-<label>.{md,json}`.

    OMP_NUM_THREADS=1 python benchmarks/benchmark_image_processor.py --label after
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil


def _images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate([(1024, 1024), (1000, 1500)] * 4):
        base = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)  # smooth content, like photos
        image = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
        paths.append(folder / f"{index:02d}.png")
        image.save(paths[-1])
    return paths


def _time(function, inputs, repeats: int) -> float:
    function(inputs[0])  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.process_time()
        for item in inputs:
            function(item)
        runs.append((time.process_time() - start) / len(inputs) * 1000)
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="current", help="name of this run in the output file names")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the images; the best is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from mrad_hf import MRADImageProcessor

    processor = MRADImageProcessor()  # the reference 518x518 setting
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = _images(Path(folder))
        decoded = [Image.open(path).convert("RGB") for path in paths]
        rows.append(("file path (decode included)", _time(lambda p: processor(str(p)), paths, args.repeats)))
        rows.append(("decoded PIL image", _time(lambda im: processor(im), decoded, args.repeats)))
        rows.append(
            (
                "batch of 8 PIL images, per image",
                _time(lambda batch: processor(batch), [decoded], args.repeats) / len(decoded),
            )
        )
        clip = CLIPImageProcessorPil(
            size={"height": 518, "width": 518}, do_center_crop=False, resample=Image.Resampling.BICUBIC
        )
        rows.append(
            (
                "CLIPImageProcessorPil alone, decoded PIL image",
                _time(lambda im: clip(im, return_tensors="pt"), decoded, args.repeats),
            )
        )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    table = [
        f"# MRADImageProcessor ms/image ({args.label}); {cpu}; torch {torch.__version__}; 1 thread",
        "",
        "| input | CPU ms / image (best of repeats) |",
        "|---|---:|",
        *[f"| {name} | {value:.1f} |" for name, value in rows],
    ]
    print("\n".join(table))
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"image-processor-{args.label}.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    (out / f"image-processor-{args.label}.json").write_text(
        json.dumps({"cpu": cpu, "rows": dict(rows)}, indent=2) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    main()
