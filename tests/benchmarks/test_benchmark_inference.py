# SPDX-License-Identifier: Apache-2.0
"""The inference benchmark's pieces that need no official checkout and no ViT-L: its refusal, its table, its configs."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from benchmark_inference import _official_config, build_parser, markdown  # noqa: E402
from official_baseline import load_official  # noqa: E402


def test_official_baseline_refuses_a_folder_that_is_not_the_official_checkout(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkout of github.com/CROVO1026/MRAD"):
        load_official(tmp_path)


def test_official_stage_needs_a_checkout_when_asked_for():
    from benchmark_inference import main

    with pytest.raises(SystemExit, match="--official PATH"):
        main(["--stages", "official"])


def test_configurations_leave_the_base_model_untouched():
    base = make_tiny_model()
    invariant, backend, dtype = _official_config("fp32-invariant", base, torch.device("cpu"))
    assert invariant.config.batch_invariant is True and base.config.batch_invariant is False and dtype == "float32"
    half, _, half_dtype = _official_config("bf16", base, torch.device("cpu"))
    assert half_dtype == "bfloat16" and half is not base
    assert base.clip.visual_projection.weight.dtype == torch.float32
    assert _official_config("fp32-onednn", base, torch.device("cpu"))[1] == "onednn"


def test_the_official_table_reports_speed_up_diffs_and_share_of_peak():
    args = build_parser().parse_args([])
    assert args.malloc == "tuned" and args.official_batches == [1, 8]
    results = {
        "run": {
            "name": "t",
            "command": "c",
            "started": "s",
            "loadavg_before": [1.0, 1.0, 1.0],
            "loadavg_after": [2.0, 2.0, 2.0],
            "backbone": "random-vit-l14-336",
            "image_size": 518,
            "flops_per_image": 1.2565e12,
            "partial": False,
        },
        "machine": {
            "cpu_model": "AMD EPYC",
            "cpu_count": 2,
            "torch": "2",
            "torch_threads": 2,
            "cpu_capability": "AVX2",
            "cpu_flags_bf16_matrix": [],
            "cpu_flags": ["avx2", "fma"],
            "device": "cpu",
        },
        "peak": {"float32": {"gflops_per_s": 100.0, "shape": [1, 2, 3]}, "float32-onednn": {"gflops_per_s": 80.0}},
        "official": {
            "checkout": "/x",
            "commit": "1cc1c6b",
            "compared_images": 1,
            "rounds": 1,
            "rows": [
                {
                    "configuration": "official MRAD (1cc1c6b), fp32",
                    "batch_size": 1,
                    "dtype": "float32",
                    "linear_backend": "aten",
                    "median_s_per_image": 30.0,
                    "minor_faults_per_image": 10.0,
                    "gflops_per_s": 41.9,
                },
                {
                    "configuration": "mrad-hf fp32",
                    "batch_size": 8,
                    "dtype": "float32",
                    "linear_backend": "aten",
                    "median_s_per_image": 15.0,
                    "paired_speedup_median": 2.0,
                    "max_abs_map_diff_vs_official": 3e-7,
                    "max_abs_score_diff_vs_official": 0.0,
                    "minor_faults_per_image": 5.0,
                    "gflops_per_s": 83.8,
                },
            ],
        },
        "rows": [],
        "diffs": [],
        "scaling": [],
        "dtype": [],
        "compile": None,
        "notes": [],
    }
    text = markdown(results)
    assert "| mrad-hf fp32 | 8 | float32 | aten | 15.00 | 2.00x | 3.0e-07 | 0.00 | 83.8 | 84 | 5 |" in text
    assert "AVX2, flags avx2, fma" in text and "float32-onednn 80.0" in text
