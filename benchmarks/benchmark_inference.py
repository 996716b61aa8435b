# SPDX-License-Identifier: Apache-2.0
"""Speed, memory and agreement of MRAD-TF inference: the reference-style path versus ours (issue 8).

    python benchmarks/benchmark_inference.py --quick                  # small backbone, a few minutes
    python benchmarks/benchmark_inference.py                          # random ViT-L/14@336 at 518 px (long)
    python benchmarks/benchmark_inference.py --stages features retrieval --batch-sizes 1 8

Both paths use the same randomly initialised CLIP weights (no pretrained weights exist offline; speed and
numerical agreement do not depend on the values). Per stage and batch size it reports images/s (median and
best of the repetitions), peak memory and the max absolute difference of the outputs:

* (a) reference-style: `benchmarks/reference_style.py`, the official code's way (fp32, one image at a time,
  separate explicit attentions, scipy `gaussian_filter` on numpy, `torch.topk`). It has no batching, so at
  batch size B it is timed on `--reference-images` images of the same batch and its images/s is per image.
* (b) ours: `MRADForAnomalyDetection` (`features_mrad.dual_path_vision_features`, `retrieval`,
  `postprocessing`), whole batches.

Stages: `features` and `end-to-end` come from one pass (ours: `model(pixel_values)` with the feature call
timed inside it; reference: `reference_end_to_end` with its feature part timed), `retrieval` and
`postprocessing` are timed on their own on stored inputs, `scaling` times retrieval against banks of 1e3..1e6
keys (exact dense, exact chunked, FAISS), `dtype` measures the opt-in bf16/fp16 CLIP tower (speed, map
deviation, AUROC on the synthetic benchmark), `peak` measures the machine's fp32/bf16 GEMM throughput.
Achieved GFLOP/s use the analytic count of `dual_path_flops` (about 1.26 TFLOP per ViT-L/14 image at 518 px).

Timing on a shared machine: one warm-up per path, then `--repeats` repetitions (fewer at large batches,
`--repeats-large`), reference and ours interleaved (alternating which goes first); median and minimum are
reported with the load average before and after. Memory: peak RSS growth over the stage (sampled every 5 ms),
tracemalloc peak (Python/numpy allocations, e.g. scipy's) and torch CUDA peak when on a GPU.
Results: a Markdown table on stdout and `<output-dir>/<name>.md` + `.json` (written atomically).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_style import reference_end_to_end, reference_postprocess, reference_retrieve  # noqa: E402

from mrad_hf.memory import build_memory_bank

STAGES = ("peak", "official", "features", "end-to-end", "retrieval", "postprocessing", "scaling", "dtype", "compile")
REFERENCE_BANK = {"image": 2162, "patch": 3000}  # about the size of the reference's VisA banks
STANDARD_NOTES = [
    "GFLOP/s divide the analytic cost of the reference computation (`dual_path_flops`) by the time, for both paths; "
    "ours skips about 3% of it (the last block's original path runs for the class token only), so its figure is an "
    "effective throughput. Layer norms, softmax and GELU are not counted.",
    "Timings are wall-clock on a machine shared with other jobs (see the load averages): compare the interleaved "
    "reference/ours pairs rather than absolute numbers. Repetitions at batch >= --large-batch are fewer (often 1), "
    "so median = best there.",
    "Peak RSS is the growth of the process's resident memory during the timed call (sampled every 5 ms, glibc "
    "returning large blocks to the OS); tracemalloc counts Python/numpy allocations only (scipy's buffers).",
]


# ---------------------------------------------------------------------- measurement helpers
def dual_path_flops(
    hidden: int,
    intermediate: int,
    layers: int,
    patch: int,
    image_size: int,
    projection: int = 768,
    vv_start_layer: int = 1,
) -> float:
    """Multiply-add FLOPs (2 per MAC) of one image through the original path plus the V-V attentions.

    Per block over L tokens of width W: q/k/v projections 6 L W^2, attention 4 L^2 W, out_proj 2 L W^2,
    MLP 4 L W I; each V-V block adds one more attention (4 L^2 W) and out_proj (2 L W^2). Plus the patch
    embedding and the class projection. Layer norms, softmax and GELU are not counted (a few per cent).
    """
    grid = image_size // patch
    tokens = grid * grid + 1
    block = (
        6 * tokens * hidden**2 + 4 * tokens**2 * hidden + 2 * tokens * hidden**2 + 4 * tokens * hidden * intermediate
    )
    vv = 4 * tokens**2 * hidden + 2 * tokens * hidden**2
    embed = 2 * grid * grid * 3 * patch * patch * hidden + 2 * hidden * projection
    return float(layers * block + (layers - vv_start_layer) * vv + embed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak RSS growth (sampled), tracemalloc peak and CUDA peak over a `with` block, in MiB."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.rss_mb = self.tracemalloc_mb = self.cuda_mb = None

    def _rss(self) -> int:
        return self._process.memory_info().rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        import psutil  # a dependency of accelerate

        gc.collect()
        self._process = psutil.Process()
        self._base = self._peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        tracemalloc.start()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        self._peak = max(self._peak, self._rss())
        self._stop.set()
        self._thread.join()
        self.tracemalloc_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        self.rss_mb = (self._peak - self._base) / 2**20
        if self.device.type == "cuda":
            self.cuda_mb = (torch.cuda.max_memory_allocated(self.device) - self._cuda_base) / 2**20
        return False

    def as_dict(self) -> dict:
        return {"rss_peak_mb": self.rss_mb, "tracemalloc_peak_mb": self.tracemalloc_mb, "cuda_peak_mb": self.cuda_mb}


def timed(fn, device: torch.device):
    """(result, seconds, PeakMemory) of one call."""
    with PeakMemory(device) as memory:
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        seconds = time.perf_counter() - start
    return result, seconds, memory


def summarise(
    times: list[float], images: int, memories: list[PeakMemory], flops_per_image: float | None = None
) -> dict:
    median, best = statistics.median(times), min(times)
    row = {
        "images": images,
        "repeats": len(times),
        "times_s": times,
        "median_s": median,
        "min_s": best,
        "images_per_s_median": images / median,
        "images_per_s_best": images / best,
    }
    for key in ("rss_peak_mb", "tracemalloc_peak_mb", "cuda_peak_mb"):
        values = [m.as_dict()[key] for m in memories if m.as_dict()[key] is not None]
        row[key] = max(values) if values else None
    if flops_per_image:
        row["gflops_per_s_median"] = flops_per_image * images / median / 1e9
        row["gflops_per_s_best"] = flops_per_image * images / best / 1e9
    return row


def max_abs(a, b) -> float:
    a = torch.as_tensor(a).double().cpu()
    b = torch.as_tensor(b).double().cpu()
    return float((a - b).abs().max())


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": platform.processor() or "unknown",
        "cpu_flags_bf16_matrix": [],
        "device": str(device),
    }
    from mrad_hf.models.mrad.features_mrad import linear_backend
    from mrad_hf.runtime import cpu_features, resolve_dtype

    info["cpu_flags"] = cpu_features()["flags"]
    info["linear_backend_auto_fp32"] = linear_backend(device, torch.float32)
    info["dtype_auto"] = str(resolve_dtype("auto", device)).replace("torch.", "")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            text = handle.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["cpu_flags_bf16_matrix"] = sorted(
                    f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512f", "avx_vnni")
                )
                break
    except OSError:
        pass
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------- models and inputs
def make_model(backbone: str, image_size: int, device: torch.device, seed: int = 0):
    from transformers import CLIPConfig

    from mrad_hf import MRADForAnomalyDetection
    from mrad_hf.cli.common import RANDOM_BACKBONES

    torch.manual_seed(seed)
    model = MRADForAnomalyDetection.from_clip(CLIPConfig(**RANDOM_BACKBONES[backbone]), image_size=image_size).eval()
    return model.to(device)


def random_bank(model, sizes: dict, seed: int = 0):
    from mrad_hf.models.mrad.memory_bank_mrad import MemoryBank
    from mrad_hf.models.mrad.retrieval_mrad import l2_normalize, one_hot_labels

    generator = torch.Generator().manual_seed(seed)
    config = model.config
    image_keys = l2_normalize(torch.randn(sizes["image"], config.image_key_dim, generator=generator))
    patch_keys = l2_normalize(torch.randn(sizes["patch"], config.patch_key_dim, generator=generator))
    bank = MemoryBank(
        image_keys=image_keys,
        image_values=one_hot_labels(torch.randint(0, 2, (sizes["image"],), generator=generator)),
        patch_keys=patch_keys,
        patch_values=one_hot_labels(torch.randint(0, 2, (sizes["patch"],), generator=generator)),
        patch_sources=torch.arange(sizes["patch"]) % sizes["image"],
    )
    model.set_memory_bank(bank, strict=False)
    return bank


def _backbone_shapes(backbone: str) -> tuple:
    """(hidden, intermediate, layers, patch) of a random backbone of `mrad_hf.cli.RANDOM_BACKBONES`."""
    from mrad_hf.cli.common import RANDOM_BACKBONES

    vision = RANDOM_BACKBONES[backbone]["vision_config"]
    return vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"], vision["patch_size"]


def _flops_for(model) -> float:
    vision = model.config.clip_config.vision_config
    return dual_path_flops(
        vision.hidden_size,
        vision.intermediate_size,
        vision.num_hidden_layers,
        vision.patch_size,
        model.config.image_size,
        model.config.clip_config.projection_dim,
        model.config.vv_start_layer,
    )


def _repeats_for(batch: int, args) -> int:
    return args.repeats if batch < args.large_batch else args.repeats_large


def _bank_tuple(model, device):
    memory = model.memory
    return tuple(
        t.to(device) for t in (memory.image_keys, memory.image_values, memory.patch_keys, memory.patch_values)
    )


def _our_retrieval(model, features):
    image_queries, patch_queries = model.retrieval_queries(features)
    return model.retrieve("image", image_queries), model.retrieve("patch", patch_queries)


# ---------------------------------------------------------------------- stages
def stage_peak(args, device) -> dict:
    """Best-of-n GEMM throughput of an MLP-shaped product (2 * 1370 tokens x 1024 x 4096) per dtype."""
    import torch.nn.functional as F

    rows = {}
    m, k, n = 2 * 1370, 1024, 4096
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(m, k, device=device).to(dtype)
        w = torch.randn(n, k, device=device).to(dtype)
        try:
            F.linear(x, w)
        except RuntimeError as error:  # a dtype without a kernel on this device
            rows[str(dtype).replace("torch.", "")] = {"error": str(error)}
            continue
        repeats = 5 if dtype == torch.float32 or device.type == "cuda" else 2
        times = [timed(lambda: F.linear(x, w), device)[1] for _ in range(repeats)]
        rows[str(dtype).replace("torch.", "")] = {
            "gflops_per_s": 2 * m * k * n / min(times) / 1e9,
            "shape": [m, k, n],
            "repeats": repeats,
        }
        print(f"  GEMM {dtype}: {rows[str(dtype).replace('torch.', '')]['gflops_per_s']:.1f} GFLOP/s", flush=True)
        if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(
                w, None
            )  # oneDNN with a pre-packed weight (features_mrad)
            onednn = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")  # noqa: E731
            onednn()
            times = [timed(onednn, device)[1] for _ in range(repeats)]
            rows["float32-onednn"] = {
                "gflops_per_s": 2 * m * k * n / min(times) / 1e9,
                "shape": [m, k, n],
                "repeats": repeats,
            }
            print(
                f"  GEMM float32 oneDNN pre-packed: {rows['float32-onednn']['gflops_per_s']:.1f} GFLOP/s", flush=True
            )
    return rows


def stage_model(model, args, device, results) -> None:
    """`features` and `end-to-end`: one pass per repetition, reference and ours interleaved."""
    size = model.config.image_size
    flops = _flops_for(model)
    bank = _bank_tuple(model, device)
    pixels_all = torch.randn(max(args.batch_sizes), 3, size, size, generator=torch.Generator().manual_seed(1)).to(
        device
    )
    feature_times: list[float] = []
    original = model.extract_features

    def timed_features(pixel_values):
        _sync(device)
        start = time.perf_counter()
        out = original(pixel_values)
        _sync(device)
        feature_times.append(time.perf_counter() - start)
        timed_features.last = out
        return out

    model.extract_features = timed_features  # instance attribute: forward's self.extract_features finds it
    ref_timings: dict[str, float] = {}

    def run_ours(pixels):
        with torch.no_grad():
            return model(pixels)

    def run_reference(pixels):
        ref_timings.clear()
        return reference_end_to_end(model.clip, pixels, bank, size, model.config.vv_start_layer, timings=ref_timings)

    try:
        warm = args.warmup_size
        print(f"  warm-up (one {warm}-px image per path)", flush=True)
        if warm == size:
            run_ours(pixels_all[:1])
            run_reference(pixels_all[:1])
        else:  # a smaller image warms the same kernels and allocator paths at a fraction of the cost
            from mrad_hf.models.mrad.features_mrad import dual_path_vision_features

            small = pixels_all[:1, :, :warm, :warm]
            with torch.no_grad():
                dual_path_vision_features(
                    model.clip.vision_model,
                    model.clip.visual_projection,
                    small,
                    vv_start_layer=model.config.vv_start_layer,
                )
            reference_end_to_end(model.clip, small, bank, warm, model.config.vv_start_layer)
        for batch in args.batch_sizes:
            pixels = pixels_all[:batch]
            ref_pixels = pixels[: min(batch, args.reference_images)]
            runs = {"reference": ([], [], []), "ours": ([], [], [])}  # (e2e times, feature times, memories)
            diffs = {}
            for repeat in range(_repeats_for(batch, args)):
                order = ("reference", "ours") if repeat % 2 == 0 else ("ours", "reference")
                for path in order:
                    if path == "ours":
                        feature_times.clear()
                        output, seconds, memory = timed(lambda: run_ours(pixels), device)
                        runs["ours"][1].append(feature_times[-1])
                        ours_out, ours_features = output, timed_features.last
                    else:
                        output, seconds, memory = timed(lambda: run_reference(ref_pixels), device)
                        runs["reference"][1].append(ref_timings["features"])
                        ref_out = output
                    runs[path][0].append(seconds)
                    runs[path][2].append(memory)
                    print(f"  batch {batch:3d} repeat {repeat} {path:9s}: {seconds:8.2f} s", flush=True)
            count = ref_pixels.shape[0]
            ref_maps, ref_scores, ref_class, ref_patches = ref_out
            diffs = {
                "class_embeds": max_abs(ours_features.class_embeds[:count], ref_class),
                "patch_tokens": max_abs(ours_features.patch_tokens[:count], ref_patches),
                "anomaly_map": max_abs(ours_out.anomaly_map[:count], ref_maps),
                "anomaly_score": max_abs(ours_out.anomaly_score[:count], ref_scores),
                "compared_images": count,
            }
            for path, (e2e, feats, memories) in runs.items():
                images = batch if path == "ours" else count
                results["rows"].append(
                    {
                        "stage": "end-to-end",
                        "path": path,
                        "batch_size": batch,
                        **summarise(e2e, images, memories, flops),
                    }
                )
                results["rows"].append(
                    {"stage": "features", "path": path, "batch_size": batch, **summarise(feats, images, [], flops)}
                )
            results["diffs"].append({"stage": "features+end-to-end", "batch_size": batch, **diffs})
            checkpoint(results, args)
    finally:
        del model.extract_features


def stage_retrieval_and_post(model, args, device, results, stages) -> None:
    """`retrieval` and `postprocessing` on stored random features (their cost does not depend on the values)."""
    from mrad_hf.models.mrad.features_mrad import MRADVisionFeatures

    config = model.config
    grid = config.image_size // config.clip_config.vision_config.patch_size
    bank = _bank_tuple(model, device)
    generator = torch.Generator().manual_seed(2)
    largest = max(args.batch_sizes)
    class_all = torch.randn(largest, config.image_key_dim, generator=generator).to(device)
    patches_all = torch.randn(largest, grid * grid, config.patch_key_dim, generator=generator).to(device)
    for batch in args.batch_sizes:
        features = MRADVisionFeatures(class_embeds=class_all[:batch], patch_tokens=patches_all[:batch], grid_size=grid)
        ref_count = min(batch, args.reference_images_light)
        repeats = args.repeats_light
        if "retrieval" in stages:
            with torch.no_grad():
                _our_retrieval(model, features)  # warm-up
            runs = {"reference": ([], []), "ours": ([], [])}
            for repeat in range(repeats):
                out_ref, t_ref, m_ref = timed(
                    lambda: reference_retrieve(class_all[:ref_count], patches_all[:ref_count], *bank), device
                )
                with torch.no_grad():
                    out_ours, t_ours, m_ours = timed(lambda: _our_retrieval(model, features), device)
                runs["reference"][0].append(t_ref), runs["reference"][1].append(m_ref)
                runs["ours"][0].append(t_ours), runs["ours"][1].append(m_ours)
            for path, (times, memories) in runs.items():
                results["rows"].append(
                    {
                        "stage": "retrieval",
                        "path": path,
                        "batch_size": batch,
                        **summarise(times, batch if path == "ours" else ref_count, memories),
                    }
                )
            results["diffs"].append(
                {
                    "stage": "retrieval",
                    "batch_size": batch,
                    "compared_images": ref_count,
                    "image_probabilities": max_abs(out_ours[0][:ref_count], out_ref[0]),
                    "patch_probabilities": max_abs(out_ours[1][:ref_count], out_ref[1]),
                }
            )
            print(f"  retrieval batch {batch}: ours {statistics.median(runs['ours'][0]) * 1e3:.1f} ms", flush=True)
        if "postprocessing" in stages:
            with torch.no_grad():
                image_probs, patch_probs = _our_retrieval(model, features)
            model.maps_and_scores(patch_probs, image_probs[:, 1], grid)  # warm-up
            runs = {"reference": ([], []), "ours": ([], [])}
            for repeat in range(repeats):
                out_ref, t_ref, m_ref = timed(
                    lambda: reference_postprocess(
                        patch_probs[:ref_count], image_probs[:ref_count, 1], config.image_size
                    ),
                    device,
                )
                out_ours, t_ours, m_ours = timed(
                    lambda: model.maps_and_scores(patch_probs, image_probs[:, 1], grid), device
                )
                runs["reference"][0].append(t_ref), runs["reference"][1].append(m_ref)
                runs["ours"][0].append(t_ours), runs["ours"][1].append(m_ours)
            for path, (times, memories) in runs.items():
                results["rows"].append(
                    {
                        "stage": "postprocessing",
                        "path": path,
                        "batch_size": batch,
                        **summarise(times, batch if path == "ours" else ref_count, memories),
                    }
                )
            results["diffs"].append(
                {
                    "stage": "postprocessing",
                    "batch_size": batch,
                    "compared_images": ref_count,
                    "anomaly_map": max_abs(out_ours[0][:ref_count], out_ref[0]),
                    "anomaly_score": max_abs(out_ours[1][:ref_count], out_ref[1]),
                }
            )
            print(
                f"  post-processing batch {batch}: ours {statistics.median(runs['ours'][0]) * 1e3:.1f} ms", flush=True
            )


def _random_unit(rows: int, dim: int, seed: int, device, block: int = 65536) -> torch.Tensor:
    """(rows, dim) L2-normalised random rows, generated in blocks (no full-size temporaries)."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(rows, dim)
    for start in range(0, rows, block):
        chunk = torch.randn(min(block, rows - start), dim, generator=generator)
        out[start : start + chunk.shape[0]] = chunk / chunk.norm(dim=-1, keepdim=True)
    return out.to(device)


def stage_scaling(args, device, results) -> None:
    """Retrieval of one image's patch queries against banks of growing size: exact dense, exact chunked, FAISS."""
    from mrad_hf.models.mrad.retrieval_mrad import soft_retrieve

    dim, num_queries = args.scaling_dim, args.scaling_queries
    queries = _random_unit(num_queries, dim, 3, device)
    for size in args.bank_sizes:
        keys = _random_unit(size, dim, 4, device)
        values = (
            torch.nn.functional.one_hot(torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(5)), 2)
            .float()
            .to(device)
        )
        repeats = 1 if size >= 10**6 else 2
        exact = None
        methods = [
            (
                "exact chunked",
                lambda keys=keys, values=values: soft_retrieve(queries, keys, values, chunk_size=args.chunk_size),
            )
        ]
        dense_bytes = num_queries * size * 4
        if dense_bytes <= args.dense_limit_gb * 2**30:
            methods.insert(0, ("exact dense", lambda keys=keys, values=values: soft_retrieve(queries, keys, values)))
        for name, fn in methods:
            times, memories = [], []
            for _ in range(repeats):
                out, seconds, memory = timed(fn, device)
                times.append(seconds), memories.append(memory)
            is_baseline = exact is None  # the first exact method is what the others are compared with
            exact = out if exact is None else exact
            row = {
                "stage": "scaling",
                "method": name,
                "bank_size": size,
                "dim": dim,
                "queries": num_queries,
                **summarise(times, 1, memories),
            }
            row["max_abs_diff_vs_exact"] = None if is_baseline else max_abs(out, exact)
            results["scaling"].append(row)
            print(
                f"  bank {size:>8d} {name:14s}: {statistics.median(times):8.3f} s  peak RSS +{row['rss_peak_mb']:.0f} MiB",
                flush=True,
            )
        if len(methods) == 1:
            results["scaling"].append(
                {
                    "stage": "scaling",
                    "method": "exact dense",
                    "bank_size": size,
                    "skipped": f"dense logits would need {dense_bytes / 2**30:.1f} GiB (> --dense-limit-gb {args.dense_limit_gb})",
                }
            )
        _scaling_faiss(queries, keys, values, exact, size, args, device, results)
        del keys, values
        gc.collect()


def _scaling_faiss(queries, keys, values, exact, size, args, device, results) -> None:
    try:
        from retrieval_index import FaissRetrievalIndex, import_faiss

        import_faiss()
    except ImportError as error:
        results["scaling"].append({"stage": "scaling", "method": "faiss", "bank_size": size, "skipped": str(error)})
        return
    kinds = [("faiss ivf (APPROX.)", dict(index="ivf", nprobe=args.faiss_nprobe))]
    if size <= args.faiss_flat_max:
        kinds.insert(0, ("faiss flat top-k (APPROX.)", dict(index="flat")))
    for name, options in kinds:
        start = time.perf_counter()
        index = FaissRetrievalIndex(keys, values, top_k=args.faiss_top_k, **options)
        build = time.perf_counter() - start
        times, memories = [], []
        for _ in range(1 if size >= 10**6 else 2):
            (out, bound), seconds, memory = timed(
                lambda index=index: index.retrieve(queries, return_bound=True), device
            )
            times.append(seconds), memories.append(memory)
        row = {
            "stage": "scaling",
            "method": name,
            "bank_size": size,
            "dim": keys.shape[1],
            "queries": queries.shape[0],
            "top_k": index.top_k,
            **summarise(times, 1, memories),
        }
        row.update(
            build_s=build,
            index=repr(index),
            max_abs_diff_vs_exact=max_abs(out, exact),
            truncation_bound_max=float(bound.max()),
        )
        results["scaling"].append(row)
        print(
            f"  bank {size:>8d} {name:14s}: {statistics.median(times):8.3f} s (build {build:.1f} s)  |diff| {row['max_abs_diff_vs_exact']:.2e}",
            flush=True,
        )
        del index


def stage_dtype(args, device, results) -> None:
    """bf16/fp16 CLIP tower: feature speed on the benchmark backbone, and accuracy on the synthetic benchmark."""
    from mrad_hf.evaluation.metrics import image_auroc, pixel_auroc
    from mrad_hf.runtime import set_backbone_dtype

    flops = None
    # speed: one batch of the benchmark backbone through the feature path, per dtype
    size = args.dtype_speed_size
    model = make_model(args.backbone, size, device)
    random_bank(model, REFERENCE_BANK)
    flops = _flops_for(model)
    pixels = torch.randn(args.dtype_batch, 3, size, size, generator=torch.Generator().manual_seed(6)).to(device)
    reference = reference_output = None
    for dtype in args.dtypes:
        set_backbone_dtype(model, dtype)
        with torch.no_grad():
            if args.dtype_warmup:
                model.extract_features(pixels[:1])
            times, memories = [], []
            for _ in range(args.dtype_repeats):
                features, seconds, memory = timed(lambda model=model: model.extract_features(pixels), device)
                times.append(seconds), memories.append(memory)
            output = model(pixels)
        patches = features.patch_tokens.float()
        reference = patches if reference is None else reference
        reference_output = output if reference_output is None else reference_output
        row = {
            "stage": "dtype-speed",
            "dtype": dtype,
            "backbone": args.backbone,
            "image_size": size,
            "batch_size": args.dtype_batch,
            **summarise(times, args.dtype_batch, memories, flops),
        }
        row["patch_tokens_max_abs_diff_vs_float32"] = max_abs(patches, reference)
        row["anomaly_map_max_abs_diff_vs_float32"] = max_abs(output.anomaly_map, reference_output.anomaly_map)
        row["anomaly_score_max_abs_diff_vs_float32"] = max_abs(output.anomaly_score, reference_output.anomaly_score)
        results["dtype"].append(row)
        print(f"  features {dtype}: {statistics.median(times):.2f} s for {args.dtype_batch} image(s)", flush=True)
    del model
    gc.collect()
    # accuracy: bank + scores on the synthetic benchmark with a small random backbone, per dtype
    from mrad_hf.data.loaders import load_mvtec_layout
    from mrad_hf.data.synthetic import make_synthetic_benchmark

    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic_benchmark(Path(tmp) / "data", image_size=256, seed=0)
        dataset = load_mvtec_layout(Path(tmp) / "data")
        memory_rows = dataset.select(range(0, len(dataset), 2))
        test_rows = dataset.select(range(1, len(dataset), 2))
        masks = np.stack(
            [
                np.zeros((256, 256), bool) if row["mask"] is None else np.asarray(row["mask"].convert("L")) > 0
                for row in test_rows
            ]
        )
        labels = [int(row["label"]) for row in test_rows]
        baseline = None
        for dtype in args.dtypes:
            torch.manual_seed(0)
            model = make_model(args.dtype_backbone, args.dtype_image_size, device)
            model.config.retrieval_temperature = (
                0.01  # as the offline demo with random weights (see cli.RANDOM_DEMO_TEMPERATURE)
            )
            set_backbone_dtype(model, dtype)
            build_memory_bank(model, memory_rows, batch_size=8, progress=False)
            from mrad_hf.models.mrad.image_processing_mrad import MRADImageProcessor

            processor = MRADImageProcessor.from_config(model.config)
            maps, scores = [], []
            for start in range(0, len(test_rows), 8):
                batch = test_rows.select(range(start, min(start + 8, len(test_rows))))
                inputs = processor([row["image"] for row in batch], return_tensors="pt")
                with torch.no_grad():
                    out = model(inputs["pixel_values"].to(device=device, dtype=model.dtype))
                maps.append(
                    torch.nn.functional.interpolate(out.anomaly_map[:, None].float(), size=256, mode="bilinear")[
                        :, 0
                    ].cpu()
                )
                scores.append(out.anomaly_score.float().cpu())
            maps, scores = torch.cat(maps), torch.cat(scores)
            baseline = (maps, scores) if baseline is None else baseline
            row = {
                "stage": "dtype-accuracy",
                "dtype": dtype,
                "backbone": args.dtype_backbone,
                "image_size": args.dtype_image_size,
                "test_images": len(test_rows),
                "memory_images": len(memory_rows),
                "retrieval_temperature": 0.01,
                "image_auroc": image_auroc(labels, scores.numpy()),
                "pixel_auroc": pixel_auroc(masks, maps.numpy()),
                "max_abs_map_diff_vs_float32": max_abs(maps, baseline[0]),
                "max_abs_score_diff_vs_float32": max_abs(scores, baseline[1]),
                "memory_dtype": str(model.memory.image_keys.dtype),
                "output_dtype": str(out.anomaly_map.dtype),
            }
            results["dtype"].append(row)
            print(
                f"  synthetic {dtype}: image AUROC {row['image_auroc']:.4f} pixel AUROC {row['pixel_auroc']:.4f} max |map diff| {row['max_abs_map_diff_vs_float32']:.2e}",
                flush=True,
            )
            del model
            gc.collect()


def stage_compile(args, device, results) -> None:
    """Eager versus `torch.compile` of our feature pass (default inductor backend), one batch, interleaved."""
    model = make_model(args.compile_backbone, args.compile_size, device)
    pixels = torch.randn(
        args.compile_batch, 3, args.compile_size, args.compile_size, generator=torch.Generator().manual_seed(7)
    ).to(device)
    compiled = torch.compile(model.extract_features, dynamic=False)
    with torch.no_grad():
        try:
            _, compile_s, _ = timed(lambda: compiled(pixels), device)
        except Exception as error:  # no compiler toolchain, unsupported backend, ...
            results["compile"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            print(f"  torch.compile failed: {results['compile']['error']}", flush=True)
            return
        model.extract_features(pixels)
        times = {"eager": [], "compiled": []}
        for _ in range(args.compile_repeats):
            eager_out, seconds, _ = timed(lambda: model.extract_features(pixels), device)
            times["eager"].append(seconds)
            compiled_out, seconds, _ = timed(lambda: compiled(pixels), device)
            times["compiled"].append(seconds)
    results["compile"] = {
        "backbone": args.compile_backbone,
        "image_size": args.compile_size,
        "batch_size": args.compile_batch,
        "first_call_s": compile_s,
        "eager_median_s": statistics.median(times["eager"]),
        "compiled_median_s": statistics.median(times["compiled"]),
        "eager_min_s": min(times["eager"]),
        "compiled_min_s": min(times["compiled"]),
        "repeats": args.compile_repeats,
        "patch_tokens_max_abs_diff": max_abs(compiled_out.patch_tokens, eager_out.patch_tokens),
    }
    c = results["compile"]
    print(
        f"  eager {c['eager_median_s']:.3f} s, compiled {c['compiled_median_s']:.3f} s (first call {compile_s:.1f} s)",
        flush=True,
    )


# ---------------------------------------------------------------------- the official code as the baseline (issue 15)
OFFICIAL_CONFIGS = ("fp32", "fp32-onednn", "fp32-aten", "fp32-invariant", "bf16", "auto")


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _official_config(name: str, base, device):
    """(model, environment backend) of one of our configurations; bf16 works on a copy (the cast is one-way)."""
    import copy

    from mrad_hf.runtime import resolve_dtype, set_backbone_dtype

    backend = {"fp32-onednn": "onednn", "fp32-aten": "aten"}.get(name, "auto")
    if name in ("bf16", "auto"):
        dtype = torch.bfloat16 if name == "bf16" else resolve_dtype("auto", device)
        if dtype == torch.float32:
            return base, backend, "float32"
        model = copy.deepcopy(base)
        set_backbone_dtype(model, dtype)
        return model, backend, str(dtype).replace("torch.", "")
    if name == "fp32-invariant":
        model = copy.copy(base)  # shares the modules; only the config differs
        model.config = copy.deepcopy(base.config)
        model.config.batch_invariant = True
        return model, backend, "float32"
    return base, backend, "float32"


def stage_official(args, device, results) -> None:
    """The official MRAD code (its own MRAD-TF path) versus our configurations, interleaved, same weights/images."""
    from official_baseline import official_and_ours, official_mrad_tf

    from mrad_hf.models.mrad.features_mrad import dual_path_vision_features, linear_backend

    print(
        f"  building the official AnomalyCLIP ViT-L/14@336 from {args.official} and converting its weights", flush=True
    )
    official, official_model, ours = official_and_ours(args.official, seed=0, image_size=args.image_size)
    random_bank(ours, REFERENCE_BANK)
    bank = _bank_tuple(ours, device)
    size = args.image_size
    flops = _flops_for(ours)
    batches = sorted(set(args.official_batches))
    pixels_all = torch.randn(max(batches), 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    configs = []
    for name in args.official_configs:
        model, backend, dtype = _official_config(name, ours, device)
        configs.append((name, model, backend, dtype))
    previous_backend = os.environ.get("MRAD_LINEAR_BACKEND")

    def use_backend(backend):
        os.environ["MRAD_LINEAR_BACKEND"] = backend

    # warm-up of ours on a small image (the official code is not warmed: a smaller first forward would overwrite its
    # positional table with a resized one, which its later 518-px forwards would resize again)
    with torch.no_grad():
        for name, model, backend, dtype in configs:
            use_backend(backend)
            small = pixels_all[:1, :, :224, :224].to(model.clip.vision_model.embeddings.patch_embedding.weight.dtype)
            dual_path_vision_features(model.clip.vision_model, model.clip.visual_projection, small)
    timings = {"official": []}
    faults = {"official": []}
    outputs = {}
    official_out = []
    for round_index in range(args.official_rounds):
        order = [("official", None, None, None, 1)] + [
            (n, m, b, d, batch) for (n, m, b, d) in configs for batch in batches
        ]
        if round_index % 2:
            order = order[::-1]
        for name, model, backend, dtype, batch in order:
            if name == "official":
                images = pixels_all[: args.official_images]
                faults_before = _minor_faults()
                start = time.perf_counter()
                official_out = [
                    official_mrad_tf(official, official_model, images[i : i + 1], bank, size)
                    for i in range(images.shape[0])
                ]
                seconds = (time.perf_counter() - start) / images.shape[0]
                timings["official"].append(seconds)
                faults["official"].append((_minor_faults() - faults_before) / images.shape[0])
                print(f"  round {round_index} official        batch 1: {seconds:8.2f} s/img", flush=True)
                continue
            use_backend(backend)
            key = f"{name}|{batch}"
            pixels = pixels_all[:batch]
            with torch.no_grad():
                faults_before = _minor_faults()
                out, elapsed, memory = timed(lambda: model(pixels), device)
            timings.setdefault(key, []).append(elapsed / batch)
            faults.setdefault(key, []).append((_minor_faults() - faults_before) / batch)
            outputs[key] = (out, memory)
            print(f"  round {round_index} {name:15s} batch {batch}: {elapsed / batch:8.2f} s/img", flush=True)
    if previous_backend is None:
        os.environ.pop("MRAD_LINEAR_BACKEND", None)
    else:
        os.environ["MRAD_LINEAR_BACKEND"] = previous_backend
    official_maps = torch.stack([m for m, _ in official_out])
    official_scores = torch.cat([sc.reshape(1) for _, sc in official_out])
    count = official_maps.shape[0]
    rows = [
        {
            "configuration": f"official MRAD ({(official.commit or 'checkout')[:7]}), fp32",
            "batch_size": 1,
            "dtype": "float32",
            "s_per_image": timings["official"],
            "median_s_per_image": statistics.median(timings["official"]),
            "minor_faults_per_image": statistics.median(faults["official"]),
            "linear_backend": "aten (nn.MultiheadAttention)",
        }
    ]
    for name, model, backend, dtype in configs:
        for batch in batches:
            key = f"{name}|{batch}"
            out, memory = outputs[key]
            os.environ["MRAD_LINEAR_BACKEND"] = backend
            chosen = linear_backend(device, model.clip.vision_model.embeddings.patch_embedding.weight.dtype)
            os.environ.pop("MRAD_LINEAR_BACKEND", None) if previous_backend is None else os.environ.__setitem__(
                "MRAD_LINEAR_BACKEND", previous_backend
            )
            paired = [o / t for o, t in zip(timings["official"], timings[key])]
            rows.append(
                {
                    "configuration": f"mrad-hf {name}",
                    "batch_size": batch,
                    "dtype": dtype,
                    "linear_backend": chosen,
                    "batch_invariant": bool(model.config.batch_invariant),
                    "s_per_image": timings[key],
                    "median_s_per_image": statistics.median(timings[key]),
                    "paired_speedup_median": statistics.median(paired),
                    "paired_speedups": paired,
                    "max_abs_map_diff_vs_official": max_abs(out.anomaly_map[:count], official_maps),
                    "max_abs_score_diff_vs_official": max_abs(out.anomaly_score[:count], official_scores),
                    "minor_faults_per_image": statistics.median(faults[key]),
                    "cuda_peak_mb": memory.cuda_mb,
                }
            )
    for row in rows:
        row["gflops_per_s"] = flops / row["median_s_per_image"] / 1e9
    results["official"] = {
        "checkout": official.path,
        "commit": official.commit,
        "compared_images": count,
        "rounds": args.official_rounds,
        "rows": rows,
    }
    checkpoint(results, args)


def _official_markdown(results: dict) -> list[str]:
    official = results.get("official")
    if not official:
        return []
    fp32_peaks = [
        v.get("gflops_per_s")
        for k, v in (results.get("peak") or {}).items()
        if k.startswith("float32") and v.get("gflops_per_s")
    ]
    peak = max(fp32_peaks) if fp32_peaks else None
    info = results["machine"]
    lines = [
        "## Against the official MRAD code (MRAD-TF, same random ViT-L/14@336 weights, same images)",
        "",
        f"Official code: `{official['checkout']}` at {official['commit']}, run through `benchmarks/official_baseline.py` (its own "
        f"`encode_image`, `compute_patch_socre`, `compute_socre`, scipy blur), one image at a time; {official['rounds']} interleaved "
        f"round(s); its maps and scores compared on {official['compared_images']} image(s). CPU: {info['cpu_model']}, "
        f"{info['cpu_capability']}, flags {', '.join(info.get('cpu_flags', info['cpu_flags_bf16_matrix'])) or '-'}; "
        f"load average before {results['run']['loadavg_before']}, after {results['run'].get('loadavg_after')}.",
        "",
        "| configuration | batch | dtype | linears | s/img (median) | paired speed-up vs official | max abs map diff | max abs score diff | GFLOP/s | % of measured fp32 GEMM peak | minor page faults / img |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in official["rows"]:
        speedup = row.get("paired_speedup_median")
        fraction = 100 * row["gflops_per_s"] / peak if peak else None
        lines.append(
            f"| {row['configuration']}{' (batch_invariant)' if row.get('batch_invariant') else ''} | {row['batch_size']} | {row['dtype']} | "
            f"{row['linear_backend']} | {_fmt(row['median_s_per_image'], 2)} | {_fmt(speedup)}{'x' if speedup else ''} | "
            f"{_fmt(row.get('max_abs_map_diff_vs_official'))} | {_fmt(row.get('max_abs_score_diff_vs_official'))} | "
            f"{_fmt(row['gflops_per_s'], 1)} | {_fmt(fraction, 0)} | {_fmt(row['minor_faults_per_image'], 0)} |"
        )
    peak_text = ", ".join(
        f"{k} {_fmt(v['gflops_per_s'], 1)}"
        for k, v in (results.get("peak") or {}).items()
        if isinstance(v, dict) and "gflops_per_s" in v
    )
    lines += ["", f"Measured GEMM peaks (GFLOP/s): {peak_text or 'not measured'}.", ""]
    return lines


# ---------------------------------------------------------------------- report
def _fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10**-digits or abs(value) >= 1e5):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: dict) -> str:
    info, run = results["machine"], results["run"]
    lines = [
        f"# MRAD-TF inference benchmark ({run['name']})"
        + (" - PARTIAL (run interrupted or still running)" if run.get("partial") else ""),
        "",
        f"Command: `{run['command']}`  ",
        f"Started {run['started']} UTC, took {_fmt(run.get('wall_minutes'), 1)} min. "
        f"Load average (1/5/15 min) before {run['loadavg_before']}, after {run.get('loadavg_after')} "
        f"(the machine is shared; {info['cpu_count']} cores).",
        "",
        f"Machine: {info['cpu_model']}, {info['cpu_count']} cores, torch {info['torch']} ({info['torch_threads']} threads, "
        f"{info['cpu_capability']}), bf16 matrix flags: {', '.join(info['cpu_flags_bf16_matrix']) or 'none'}"
        + (f", GPU {info['gpu']}" if info.get("gpu") else "")
        + f". Device: {info['device']}.",
        "",
        f"Backbone: random `{run['backbone']}` at {run['image_size']} px, {run['flops_per_image'] / 1e12:.3f} TFLOP per image "
        f"(analytic, `dual_path_flops`); bank {REFERENCE_BANK['image']} image keys + {REFERENCE_BANK['patch']} patch keys (random).",
        "",
    ]
    if results.get("peak"):
        peak = ", ".join(f"{k} {_fmt(v.get('gflops_per_s'), 1)} GFLOP/s" for k, v in results["peak"].items())
        lines += [f"Measured GEMM peak (best of n, {results['peak'].get('float32', {}).get('shape')}): {peak}.", ""]
    lines += _official_markdown(results)
    if results["rows"]:
        fp32_peak = (results.get("peak") or {}).get("float32", {}).get("gflops_per_s")
        lines += [
            "## Throughput per stage",
            "",
            "images/s: median (best) over the repetitions. The reference runs one image at a time, so at batch B it is "
            "timed on its first image(s) and its images/s is per image. `features` is timed inside the `end-to-end` pass.",
            "",
            "| stage | batch | path | repeats | images/s median (best) | s/image median | speed-up (median) | GFLOP/s median | % of fp32 GEMM peak | peak RSS +MiB | tracemalloc MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in results["rows"]:
            ref = next(
                (
                    r
                    for r in results["rows"]
                    if r["stage"] == row["stage"] and r["batch_size"] == row["batch_size"] and r["path"] == "reference"
                ),
                None,
            )
            speedup = (
                row["images_per_s_median"] / ref["images_per_s_median"] if ref and row["path"] == "ours" else None
            )
            gflops = row.get("gflops_per_s_median")
            fraction = 100 * gflops / fp32_peak if gflops and fp32_peak else None
            lines.append(
                f"| {row['stage']} | {row['batch_size']} | {row['path']} | {row['repeats']} | "
                f"{_fmt(row['images_per_s_median'], 3)} ({_fmt(row['images_per_s_best'], 3)}) | {_fmt(1 / row['images_per_s_median'], 3)} | {_fmt(speedup)}{'x' if speedup else ''} | "
                f"{_fmt(gflops, 1)} | {_fmt(fraction, 0)} | {_fmt(row['rss_peak_mb'], 0)} | {_fmt(row['tracemalloc_peak_mb'], 1)} |"
            )
        lines.append("")
    if results["diffs"]:
        lines += [
            "## Agreement (max absolute difference, ours vs reference-style, fp32)",
            "",
            "| stage | batch | compared images | outputs |",
            "|---|---|---|---|",
        ]
        for diff in results["diffs"]:
            outputs = ", ".join(
                f"{k} {_fmt(v)}" for k, v in diff.items() if k not in ("stage", "batch_size", "compared_images")
            )
            lines.append(f"| {diff['stage']} | {diff['batch_size']} | {diff['compared_images']} | {outputs} |")
        lines.append("")
    if results["scaling"]:
        lines += [
            "## Retrieval versus bank size",
            "",
            f"One image's {results['scaling'][0].get('queries', '')} patch queries against N random unit keys. Peak RSS growth excludes the bank itself. "
            "FAISS rows are APPROXIMATE (softmax over the top-k keys only; `truncation bound` = worst-case |error| of the flat index).",
            "",
            "| N keys | method | seconds median | peak RSS +MiB | max abs diff vs exact | truncation bound | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in results["scaling"]:
            if "skipped" in row:
                lines.append(
                    f"| {row['bank_size']:.0e} | {row['method']} | - | - | - | - | skipped: {row['skipped'][:90]} |"
                )
                continue
            note = f"build {row['build_s']:.1f} s, {row['index']}" if "build_s" in row else ""
            lines.append(
                f"| {row['bank_size']:.0e} | {row['method']} | {_fmt(row['median_s'], 3)} | {_fmt(row['rss_peak_mb'], 0)} | "
                f"{_fmt(row['max_abs_diff_vs_exact'])} | {_fmt(row.get('truncation_bound_max'))} | {note} |"
            )
        lines.append("")
    if results["dtype"]:
        lines += ["## Half-precision CLIP tower (opt-in; memory, retrieval and scoring stay fp32)", ""]
        speed = [r for r in results["dtype"] if r["stage"] == "dtype-speed"]
        if speed:
            base = speed[0]["median_s"]
            lines += [f"Feature pass of random `{speed[0]['backbone']}` at {speed[0]['image_size']} px:", ""]
            lines += [
                "| dtype | batch | feature pass s (median) | speed-up vs float32 | GFLOP/s | patch-token max abs diff vs fp32 | map max abs diff vs fp32 | score max abs diff vs fp32 |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for row in speed:
                lines.append(
                    f"| {row['dtype']} | {row['batch_size']} | {_fmt(row['median_s'])} | {_fmt(base / row['median_s'])}x | "
                    f"{_fmt(row.get('gflops_per_s_median'), 1)} | {_fmt(row['patch_tokens_max_abs_diff_vs_float32'])} | "
                    f"{_fmt(row.get('anomaly_map_max_abs_diff_vs_float32'))} | {_fmt(row.get('anomaly_score_max_abs_diff_vs_float32'))} |"
                )
            lines.append("")
        accuracy = [r for r in results["dtype"] if r["stage"] == "dtype-accuracy"]
        if accuracy:
            first = accuracy[0]
            lines += [
                f"Synthetic benchmark (`make_synthetic_benchmark`, held-out images, {first['test_images']} scored, memory from "
                f"{first['memory_images']}), random `{first['backbone']}` at {first['image_size']} px, temperature {first['retrieval_temperature']}:",
                "",
                "| dtype | image AUROC | pixel AUROC | max abs map diff vs fp32 | max abs score diff vs fp32 | memory dtype | output dtype |",
                "|---|---|---|---|---|---|---|",
            ]
            for row in accuracy:
                lines.append(
                    f"| {row['dtype']} | {row['image_auroc']:.4f} | {row['pixel_auroc']:.4f} | {_fmt(row['max_abs_map_diff_vs_float32'])} | "
                    f"{_fmt(row['max_abs_score_diff_vs_float32'])} | {row['memory_dtype']} | {row['output_dtype']} |"
                )
            lines.append("")
    if results.get("compile"):
        c = results["compile"]
        if "error" in c:
            lines += ["## torch.compile", "", f"Not measured: {c['error']}", ""]
        else:
            lines += [
                "## torch.compile (feature pass, default inductor backend)",
                "",
                f"Random `{c['backbone']}` at {c['image_size']} px, batch {c['batch_size']}, {c['repeats']} interleaved repeats: eager "
                f"{c['eager_median_s']:.3f} s (best {c['eager_min_s']:.3f}), compiled {c['compiled_median_s']:.3f} s (best {c['compiled_min_s']:.3f}), "
                f"speed-up {c['eager_median_s'] / c['compiled_median_s']:.2f}x; first call (compilation) {c['first_call_s']:.1f} s; "
                f"max abs patch-token difference {c['patch_tokens_max_abs_diff']:.1e}.",
                "",
            ]
    notes = list(results.get("notes") or []) + STANDARD_NOTES
    lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def save(results: dict, output_dir: Path, name: str) -> tuple[Path, Path]:
    from mrad_hf.memory.files import atomic_write

    output_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = output_dir / f"{name}.md", output_dir / f"{name}.json"
    text = markdown(results)

    def write_md(tmp):
        Path(tmp).write_text(text, encoding="utf-8")

    def write_json(tmp):
        Path(tmp).write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")

    atomic_write(md_path, write_md)
    atomic_write(json_path, write_json)
    return md_path, json_path


def checkpoint(results: dict, args) -> None:
    """Save what is measured so far (marked partial), so an interrupted long run still leaves its results."""
    results["run"]["partial"] = True
    save(results, Path(args.output_dir), args.name)


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--quick", action="store_true", help="small random backbone at 224 px, small banks: a few minutes"
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=None,
        help="what to measure (default: all; official only with --official)",
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default 1 8 32 (quick: 1 8)")
    parser.add_argument(
        "--backbone", help="a key of mrad_hf.cli.RANDOM_BACKBONES (default random-vit-l14-336; quick: random-small)"
    )
    parser.add_argument("--image-size", type=int, help="default 518 (quick: 224)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions per batch size below --large-batch")
    parser.add_argument(
        "--repeats-large",
        type=int,
        default=1,
        help="timed repetitions at batch >= --large-batch (ViT-L batch 32 takes minutes)",
    )
    parser.add_argument("--large-batch", type=int, default=8)
    parser.add_argument(
        "--repeats-light", type=int, default=5, help="repetitions of the cheap retrieval / post-processing stages"
    )
    parser.add_argument(
        "--warmup-size", type=int, help="input size of the untimed warm-up pass (default: --image-size; full run: 224)"
    )
    parser.add_argument(
        "--reference-images", type=int, default=1, help="images the reference runs per repetition of the model stages"
    )
    parser.add_argument(
        "--reference-images-light",
        type=int,
        default=8,
        help="images the reference runs in the retrieval / post-processing stages",
    )
    parser.add_argument(
        "--bank-sizes", nargs="+", type=int, help="scaling: keys (default 1e3 1e4 1e5 1e6; quick 1e3 1e4 1e5)"
    )
    parser.add_argument(
        "--scaling-dim", type=int, help="scaling: key width (default 1024 = ViT-L patch keys; quick 256)"
    )
    parser.add_argument(
        "--scaling-queries", type=int, default=1369, help="scaling: queries (one 518-px image's patches)"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=8192, help="scaling: keys per chunk of the exact streamed retrieval"
    )
    parser.add_argument(
        "--dense-limit-gb", type=float, default=2.0, help="scaling: skip the dense path when its logits exceed this"
    )
    parser.add_argument("--faiss-top-k", type=int, default=256)
    parser.add_argument("--faiss-nprobe", type=int, default=16)
    parser.add_argument(
        "--faiss-flat-max", type=int, default=10**5, help="scaling: largest bank for the exhaustive FAISS index"
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=("float32", "bfloat16", "float16"),
        help="dtype stage (first is the baseline)",
    )
    parser.add_argument("--dtype-batch", type=int, default=1)
    parser.add_argument(
        "--dtype-speed-size",
        type=int,
        help="input size of the dtype speed check (default: --image-size; full run: 224, since bf16 without matrix units is slow)",
    )
    parser.add_argument("--dtype-repeats", type=int, default=1)
    parser.add_argument("--dtype-warmup", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--dtype-backbone", default="random-small", help="backbone of the synthetic-benchmark accuracy check"
    )
    parser.add_argument("--dtype-image-size", type=int, default=224)
    parser.add_argument("--compile-backbone", default="random-small", help="backbone of the torch.compile check")
    parser.add_argument("--compile-size", type=int, default=224)
    parser.add_argument("--compile-batch", type=int, default=4)
    parser.add_argument("--compile-repeats", type=int, default=5)
    parser.add_argument(
        "--official",
        default=os.environ.get("MRAD_OFFICIAL_CHECKOUT"),
        help="official stage: a checkout of github.com/CROVO1026/MRAD (never vendored; e.g. /work/scratch/MRAD)",
    )
    parser.add_argument(
        "--official-configs",
        nargs="+",
        default=["fp32", "auto"],
        choices=OFFICIAL_CONFIGS,
        help="official stage: our configurations (auto = resolve_dtype('auto'))",
    )
    parser.add_argument("--official-batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument(
        "--official-rounds",
        type=int,
        default=1,
        help="official stage: interleaved rounds (the order flips every round)",
    )
    parser.add_argument(
        "--official-images", type=int, default=1, help="official stage: images the official code scores per round"
    )
    parser.add_argument(
        "--malloc",
        choices=("tuned", "glibc", "rss"),
        default="tuned",
        help="tuned: runtime.tune_malloc_for_inference (what mrad_hf applies); glibc: untouched defaults; "
        "rss: a fixed 1 MiB mmap threshold so that RSS growth tracks live tensors (memory stages; many page faults)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice, one per core)")
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", help="results file stem (default: <device>-<quick|full>)")
    parser.add_argument("--render", metavar="JSON", help="only re-render the Markdown of a saved results JSON")
    parser.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    return parser


def resolve_defaults(args) -> None:
    quick = args.quick
    args.stages_given = args.stages is not None
    args.stages = args.stages or list(STAGES)
    args.batch_sizes = args.batch_sizes or ([1, 8] if quick else [1, 8, 32])
    args.backbone = args.backbone or ("random-small" if quick else "random-vit-l14-336")
    args.image_size = args.image_size or (224 if quick else 518)
    args.bank_sizes = args.bank_sizes or ([10**3, 10**4, 10**5] if quick else [10**3, 10**4, 10**5, 10**6])
    args.scaling_dim = args.scaling_dim or (256 if quick else 1024)
    if quick and args.scaling_queries == 1369:
        args.scaling_queries = 256
    args.warmup_size = args.warmup_size or (args.image_size if quick else 224)
    args.dtype_speed_size = args.dtype_speed_size or (args.image_size if quick else 224)
    args.name = args.name or f"{args.device.split(':')[0]}-{'quick' if quick else 'full'}"


def _reexec_with_fixed_mmap_threshold() -> None:
    """`--malloc rss`: make glibc return large freed blocks to the OS, so that RSS growth tracks live tensors (set
    before start-up). It maps and unmaps every large activation, so it costs page faults and time: not for speed."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or not sys.platform.startswith("linux"):
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_TRIM_THRESHOLD_="1048576")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:  # re-write the Markdown of a saved run (no measurement)
        results = json.loads(Path(args.render).read_text(encoding="utf-8"))
        md_path, _ = save(results, Path(args.render).parent, Path(args.render).stem)
        print(markdown(results))
        print(f"Re-rendered {md_path}")
        return 0
    if argv is None and args.malloc == "rss":
        _reexec_with_fixed_mmap_threshold()
    if args.malloc == "tuned":
        from mrad_hf.runtime import tune_malloc_for_inference

        tune_malloc_for_inference()
    resolve_defaults(args)
    if "official" in args.stages and not args.official:
        if args.stages_given:
            raise SystemExit("--stages official needs --official PATH (a checkout of github.com/CROVO1026/MRAD).")
        args.stages = [stage for stage in args.stages if stage != "official"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.time()
    results = {
        "run": {
            "name": args.name,
            "command": "python benchmarks/benchmark_inference.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()],
            "backbone": args.backbone,
            "image_size": args.image_size,
            "batch_sizes": args.batch_sizes,
            "stages": args.stages,
            "repeats": args.repeats,
            "repeats_large": args.repeats_large,
            "large_batch": args.large_batch,
            "malloc": args.malloc,
        },
        "machine": machine_info(device),
        "peak": None,
        "compile": None,
        "official": None,
        "rows": [],
        "diffs": [],
        "scaling": [],
        "dtype": [],
        "notes": list(args.note),
    }
    print(
        f"MRAD benchmark on {results['machine']['cpu_model']} ({device}), load {results['run']['loadavg_before']}",
        flush=True,
    )
    stages = set(args.stages)
    results["run"]["flops_per_image"] = dual_path_flops(*_backbone_shapes(args.backbone), args.image_size)
    if "peak" in stages:
        print("[peak] GEMM throughput", flush=True)
        results["peak"] = stage_peak(args, device)
        checkpoint(results, args)
    if "official" in stages:
        print("[official] the official MRAD code versus ours", flush=True)
        stage_official(args, device, results)
    model = None
    if stages & {"features", "end-to-end", "retrieval", "postprocessing"}:
        print(f"[model] random {args.backbone} at {args.image_size} px", flush=True)
        model = make_model(args.backbone, args.image_size, device)
        random_bank(model, REFERENCE_BANK)
    if stages & {"features", "end-to-end"}:
        print("[features + end-to-end]", flush=True)
        stage_model(model, args, device, results)
    if stages & {"retrieval", "postprocessing"}:
        print("[retrieval / post-processing]", flush=True)
        stage_retrieval_and_post(model, args, device, results, stages)
        checkpoint(results, args)
    del model
    gc.collect()
    if "scaling" in stages:
        print("[scaling] retrieval versus bank size", flush=True)
        stage_scaling(args, device, results)
        checkpoint(results, args)
    if "dtype" in stages:
        print("[dtype] half-precision CLIP tower", flush=True)
        stage_dtype(args, device, results)
        checkpoint(results, args)
    if "compile" in stages:
        print("[compile] torch.compile of the feature pass", flush=True)
        stage_compile(args, device, results)
    results["run"]["partial"] = False
    results["run"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    results["run"]["wall_minutes"] = (time.time() - started) / 60
    md_path, json_path = save(results, Path(args.output_dir), args.name)
    print()
    print(markdown(results))
    print(f"Saved {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
