# SPDX-License-Identifier: Apache-2.0
"""PyTorch versus the exported graph on ONNX Runtime and OpenVINO: seconds per image and agreement (issue 15).

    python benchmarks/benchmark_export.py                                   # random ViT-L/14@336 at 518 px
    python benchmarks/benchmark_export.py --backbone random-small --image-size 224 --name cpu-quick-export

One randomly initialised CLIP (no pretrained weights offline; speed and agreement do not depend on the values) with
a random bank of the reference's VisA size is exported once with `mrad_hf.export.export_model` (ONNX; OpenVINO reads
the same ONNX file, and the IR is converted from it) into `--work-dir` (reused when it is already there). Then, on
the same random pixels, per batch size, interleaved (one warm-up call each first, on the smallest batch):

* `pytorch fp32`: `MRADForAnomalyDetection` (the package's default path; the reference for every diff);
* `pytorch fp32 batch-wise`: the export module `MRADExportModule` run eagerly (the model's own forward, as the graph traces it; it differs from `pytorch fp32` only with `batch_invariant=True`);
* `onnxruntime fp32`: `ExportedDetector(..., backend="onnxruntime")`;
* `openvino fp32`: `ExportedDetector(..., backend="openvino")` on the IR, `inference_precision="f32"`;
* `openvino int8 weights` / `openvino int8 ptq` (`--int8`, needs `pip install nncf`): NNCF weight-only int8, and
  post-training int8 quantisation (TRANSFORMER preset) calibrated on `--calibration-images` random images;
* `openvino bf16`: the same IR with `inference_precision="bf16"` (`--bf16`; the row says which precision OpenVINO's
  CPU plugin actually compiled, read back from the compiled model: on CPUs without bf16 units it may fall back).

The table gives seconds per image (one timed call per batch size: few images, a shared machine), the max |diff| of
map and score against `pytorch fp32`, the load average before and after, the CPU model and flags. Results: stdout and
`benchmarks/results/<name>.md` + `.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_inference import machine_info, make_model, random_bank  # noqa: E402

REFERENCE_BANK = {"image": 2162, "patch": 3000}  # about the size of the reference's VisA banks


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = (
                    "avx2",
                    "fma",
                    "avx512f",
                    "avx512_bf16",
                    "avx512_vnni",
                    "avx_vnni",
                    "amx_bf16",
                    "amx_int8",
                    "amx_tile",
                )
                return [flag for flag in wanted if flag in flags]
    except OSError:
        pass
    return []


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _int8_models(
    work: Path, size: int, calibration_images: int, threads: int, configurations: dict, compiled_precision: dict
) -> dict:
    """OpenVINO int8 variants of the IR through NNCF (cached in `work`): weight-only int8, and full post-training
    quantisation calibrated on random pixels (a benchmark choice: a deployment calibrates on its own normal images)."""
    import nncf
    import openvino as ov

    core = ov.Core()
    setup = {}
    variants = {
        "openvino int8 weights": (
            work / "openvino-int8-weights" / "model.xml",
            lambda model: nncf.compress_weights(model),
        ),
        "openvino int8 ptq": (
            work / "openvino-int8-ptq" / "model.xml",
            lambda model: nncf.quantize(
                model,
                nncf.Dataset(
                    [
                        torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(100 + i)).numpy()
                        for i in range(calibration_images)
                    ]
                ),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=calibration_images,
            ),
        ),
    }
    for name, (path, make) in variants.items():
        if not path.is_file():
            begin = time.time()
            path.parent.mkdir(parents=True, exist_ok=True)
            ov.save_model(
                make(core.read_model(str(work / "openvino" / "model.xml"))), str(path), compress_to_fp16=False
            )
            setup[f"{name} (nncf)"] = round(time.time() - begin, 1)
        begin = time.time()
        compiled = core.compile_model(
            core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
        )
        setup[name] = round(time.time() - begin, 1)
        compiled_precision[name] = "f32 + int8"
        request = compiled.create_infer_request()

        def run(pixels, request=request, compiled=compiled):
            results = request.infer({"pixel_values": pixels.numpy()})
            return torch.from_numpy(np.array(results[compiled.output("anomaly_map")])), torch.from_numpy(
                np.array(results[compiled.output("anomaly_score")])
            )

        configurations[name] = run
    return setup


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="random-vit-l14-336")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 3])
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="threads for every runtime (default: torch's)"
    )
    parser.add_argument("--bf16", action="store_true", help="also time OpenVINO with inference_precision='bf16'")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also time OpenVINO int8 through NNCF (pip install nncf): weight-only and post-training quantisation",
    )
    parser.add_argument(
        "--calibration-images", type=int, default=4, help="random images for --int8's quantisation statistics"
    )
    parser.add_argument("--skip", nargs="*", default=[], help="configurations to leave out (by name)")
    parser.add_argument(
        "--work-dir", default="outputs/benchmark_export", help="where the exports are written (reused)"
    )
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default="cpu-export")
    parser.add_argument("--note", default="")
    parser.add_argument("--export-only", action="store_true", help="write the exports into --work-dir and stop")
    args = parser.parse_args(argv)

    from mrad_hf.export import ExportedDetector, MRADExportModule, export_model

    torch.set_num_threads(args.threads)
    started = time.time()
    load_before = _load()
    info = machine_info(torch.device("cpu"))
    info["cpu_flags"] = _cpu_flags()
    print(
        f"CPU: {info['cpu_model']} ({os.cpu_count()} cores; flags {' '.join(info['cpu_flags'])}); "
        f"threads {args.threads}; load {load_before}",
        flush=True,
    )

    model = make_model(args.backbone, args.image_size, torch.device("cpu"))
    random_bank(model, REFERENCE_BANK)
    work = Path(args.work_dir) / f"{args.backbone}-{args.image_size}"
    export_seconds = {}
    for fmt in ("onnx", "openvino"):
        folder = work / fmt
        if not (folder / "export_config.json").is_file():
            print(f"Exporting {fmt} to {folder} ...", flush=True)
            begin = time.time()
            export_model(model, folder, format=fmt, verify_batch_sizes=())  # verified below, on the benchmark's images
            export_seconds[fmt] = round(time.time() - begin, 1)
            print(f"  {export_seconds[fmt]} s", flush=True)

    if args.export_only:
        print(f"Exports in {work}: {export_seconds or 'already there'}", flush=True)
        return 0
    module = MRADExportModule(model).eval()

    def run_module(pixels):
        anomaly_map, anomaly_score = module(pixels)
        return anomaly_map, anomaly_score

    configurations = {
        "pytorch fp32": lambda pixels: (lambda out: (out.anomaly_map, out.anomaly_score))(model(pixel_values=pixels)),
        "pytorch fp32 batch-wise": run_module,
    }
    runtimes = {
        "onnxruntime fp32": dict(folder=work / "onnx", backend="onnxruntime"),
        "openvino fp32": dict(folder=work / "openvino", backend="openvino", inference_precision="f32"),
    }
    if args.bf16:
        runtimes["openvino bf16"] = dict(folder=work / "openvino", backend="openvino", inference_precision="bf16")
    compiled_precision = {}
    setup_seconds = {}
    for name, options in runtimes.items():
        if name in args.skip:
            continue
        begin = time.time()
        detector = ExportedDetector(options.pop("folder"), threads=args.threads, **options)
        setup_seconds[name] = round(time.time() - begin, 1)
        if detector.backend == "openvino":
            precision = detector.compiled_model.get_property("INFERENCE_PRECISION_HINT")
            compiled_precision[name] = getattr(precision, "get_type_name", lambda: str(precision))()
        configurations[name] = (
            lambda d: lambda pixels: (lambda out: (out.anomaly_map, out.anomaly_score))(d(pixel_values=pixels))
        )(detector)
    if args.int8:
        setup_seconds.update(
            _int8_models(
                work, args.image_size, args.calibration_images, args.threads, configurations, compiled_precision
            )
        )
    configurations = {name: fn for name, fn in configurations.items() if name not in args.skip}

    def write_results(final: bool) -> None:
        load_after = _load()
        record = {
            "command": "python benchmarks/benchmark_export.py "
            + shlex.join(argv if argv is not None else sys.argv[1:]),
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
            "minutes": round((time.time() - started) / 60, 1),
            "complete": final,
            "load_before": load_before,
            "load_after": load_after,
            "machine": info,
            "backbone": args.backbone,
            "image_size": size,
            "bank": REFERENCE_BANK,
            "threads": args.threads,
            "export_seconds": export_seconds,
            "runtime_setup_seconds": setup_seconds,
            "openvino_compiled_precision": compiled_precision,
            "versions": json.loads((work / "onnx" / "export_config.json").read_text())["versions"],
            "note": args.note,
            "rows": rows,
        }
        lines = [
            f"# MRAD export benchmark ({args.name})" + ("" if final else " (PARTIAL: the run did not finish)"),
            "",
            f"Command: `{record['command']}`  ",
            f"Started {record['started_utc']} UTC, took {record['minutes']} min. "
            f"Load average (1/5/15 min) before {load_before}, after "
            f"{load_after} (the machine is shared; {os.cpu_count()} cores).",
            "",
            f"Machine: {info['cpu_model']}, {os.cpu_count()} cores, flags {', '.join(info['cpu_flags'])}; "
            f"{platform.platform()}; "
            f"{args.threads} threads for every runtime. Versions: "
            + ", ".join(f"{key} {value}" for key, value in record["versions"].items())
            + ".",
            "",
            f"Model: random `{args.backbone}` MRAD-TF at {size} px, random bank of {REFERENCE_BANK['image']} image + "
            f"{REFERENCE_BANK['patch']} patch keys. Diffs are against `pytorch fp32` on the same pixels. "
            "One timed call per "
            "batch size after one warm-up call per configuration.",
            "",
            "| configuration | batch | s/img | max abs diff map | max abs diff score | load (1 min) |",
            "|---|---|---|---|---|---|",
        ]
        for row in rows:
            name = row["configuration"] + (
                f" (compiled: {row['compiled_precision']})" if "compiled_precision" in row else ""
            )
            lines.append(
                f"| {name} | {row['batch']} | {row['s_per_image']:.2f} | {row['max_abs_diff_map']:.1e} "
                f"| {row['max_abs_diff_score']:.1e} | {row['load_1min']} |"
            )
        if export_seconds or setup_seconds:
            lines += [
                "",
                f"Export time (s): {export_seconds or 'reused'}; "
                f"runtime set-up (session / compile, s): {setup_seconds}.",
            ]
        if args.note:
            lines += ["", args.note]
        text = "\n".join(lines) + "\n"
        if final:
            print("\n" + text)
        output = Path(args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / f"{args.name}.md").write_text(text, encoding="utf-8")
        (output / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    generator = torch.Generator().manual_seed(0)
    size = args.image_size
    rows = []
    with torch.no_grad():
        warm = torch.randn(1, 3, size, size, generator=generator)
        for name, fn in configurations.items():
            begin = time.time()
            fn(warm)
            print(f"warm-up {name}: {time.time() - begin:.1f} s", flush=True)
        for batch in args.batch_sizes:
            pixels = torch.randn(batch, 3, size, size, generator=generator)
            reference = None
            for name, fn in configurations.items():
                load = _load()
                begin = time.perf_counter()
                anomaly_map, anomaly_score = fn(pixels)
                seconds = time.perf_counter() - begin
                if reference is None:
                    reference = (anomaly_map, anomaly_score)
                row = {
                    "configuration": name,
                    "batch": batch,
                    "s_per_image": seconds / batch,
                    "max_abs_diff_map": _max_abs(anomaly_map, reference[0]),
                    "max_abs_diff_score": _max_abs(anomaly_score, reference[1]),
                    "load_1min": load[0],
                }
                if name in compiled_precision:
                    row["compiled_precision"] = compiled_precision[name]
                rows.append(row)
                print(
                    f"{name:26s} batch {batch}: {row['s_per_image']:7.2f} s/img  "
                    f"max|diff| map {row['max_abs_diff_map']:.1e} "
                    f"score {row['max_abs_diff_score']:.1e}  (load {load[0]})",
                    flush=True,
                )
                write_results(final=False)  # a partial table survives an interrupted run

    write_results(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
