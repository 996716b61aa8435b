# SPDX-License-Identifier: Apache-2.0
"""Interleaved A/B of the vision tower's linears: `F.linear` (MKL, "aten") versus oneDNN pre-packed ("onednn").

    python benchmarks/linear_backend_ab.py 518 1 4     # image size, batch, rounds (the order flips every round)

Random ViT-L/14@336, fp32 feature pass, s/img per round and the paired aten/onednn ratio (> 1: oneDNN faster).
"""

import os
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from benchmark_inference import make_model

from mrad_hf.runtime import tune_malloc_for_inference

tune_malloc_for_inference()
S, B, R = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
m = make_model("random-vit-l14-336", S, torch.device("cpu"))
x = torch.randn(B, 3, S, S)
res = {"aten": [], "onednn": []}
with torch.no_grad():
    for be in res:
        os.environ["MRAD_LINEAR_BACKEND"] = be
        m.extract_features(x[:1])
    for r in range(R):
        for be in ["aten", "onednn"] if r % 2 == 0 else ["onednn", "aten"]:
            os.environ["MRAD_LINEAR_BACKEND"] = be
            t = time.perf_counter()
            m.extract_features(x)
            res[be].append((time.perf_counter() - t) / B)
print(
    {k: [round(v, 2) for v in vs] for k, vs in res.items()},
    "paired aten/onednn:",
    [round(a / o, 2) for a, o in zip(res["aten"], res["onednn"])],
    os.getloadavg(),
)
