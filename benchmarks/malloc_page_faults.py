# SPDX-License-Identifier: Apache-2.0
"""Minor page faults and time per image of the fp32 feature pass: glibc defaults versus `tune_malloc_for_inference`.

    python benchmarks/malloc_page_faults.py glibc 518 1,2
    python benchmarks/malloc_page_faults.py tuned 518 1,2

Run the two modes in separate processes (the allocator setting is process-wide). Random ViT-L/14@336 at the given
size; per batch size two passes, the second (steady state) is reported. Prints one JSON line.
"""

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    mode, size, batches = sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
    if mode == "tuned":
        from mrad_hf.runtime import tune_malloc_for_inference

        assert tune_malloc_for_inference()
    from benchmark_inference import make_model

    model = make_model("random-vit-l14-336", size, torch.device("cpu"))
    pixels = torch.randn(max(batches), 3, size, size)
    out = {"mode": mode, "size": size}
    with torch.no_grad():
        for batch in batches:
            for _ in range(2):
                faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                model.extract_features(pixels[:batch])
                out[f"b{batch}"] = {
                    "s_per_img": (time.perf_counter() - start) / batch,
                    "minor_faults_per_img": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / batch,
                }
    out["load"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
