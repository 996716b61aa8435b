# SPDX-License-Identifier: Apache-2.0
"""Export round trips (issue 15): ONNX and OpenVINO graphs of MRAD-TF, MRAD-FT and MRAD-CLIP with a dynamic batch axis,
whose maps and scores equal the PyTorch model within 1e-4 at batch 1, 3 and 8 under ONNX Runtime and OpenVINO.

Tiny random CLIPs (3 vision blocks: a plain block, a dual-path block and the class-only last block), one export per
variant for the whole module. Retrieval is sharpened (temperature 0.01) so that the maps have contrast and a wrong
graph (no blur, wrong channel, wrong bank) would differ by far more than the tolerance.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_IMAGE_SIZE, TINY_PROMPT_TOKEN_IDS, make_samples, tiny_clip_config

from mrad_hf.memory import build_memory_bank

# every test exports ONNX (torch.onnx's exporter needs onnx + onnxscript); each runtime is needed only where it runs
pytest.importorskip("onnx", reason="onnx is not installed: pip install 'mrad-hf[onnx]'")
pytest.importorskip(
    "onnxscript", reason="onnxscript (torch.onnx's exporter) is not installed: pip install 'mrad-hf[onnx]'"
)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_onnxruntime = pytest.mark.skipif(
    not _installed("onnxruntime"), reason="ONNX Runtime is not installed: pip install 'mrad-hf[onnx]'"
)
needs_openvino = pytest.mark.skipif(
    not _installed("openvino"), reason="OpenVINO is not installed: pip install 'mrad-hf[openvino]'"
)

from mrad_hf import MRADForAnomalyDetection  # noqa: E402
from mrad_hf.cli.main import main  # noqa: E402
from mrad_hf.export import (  # noqa: E402
    ExportedDetector,
    ExportError,
    MRADExportModule,
    OnnxRuntimeDetector,
    OpenVINODetector,
    export_model,
)
from mrad_hf.export.exporters import _verify  # noqa: E402

VARIANTS = ("tf", "ft", "clip")
INPUT = "pixel_values"
BATCH_SIZES = (1, 3, 8)
TOLERANCE = 1e-4


def tiny_variant(variant: str, seed: int = 0) -> MRADForAnomalyDetection:
    clip_config = tiny_clip_config(num_hidden_layers=3)
    clip_config.text_config.max_position_embeddings = 24
    clip_config.text_config.num_hidden_layers = 3
    overrides = dict(image_size=TINY_IMAGE_SIZE, retrieval_temperature=0.01, variant=variant)
    if variant == "clip":
        overrides.update(prompt_token_ids=TINY_PROMPT_TOKEN_IDS, deep_prompt_depth=3)
    torch.manual_seed(seed)
    model = MRADForAnomalyDetection.from_clip(clip_config, **overrides).eval()
    build_memory_bank(model, make_samples(6, seed=seed), batch_size=4, progress=False)
    return model


def pixels(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models():
    return {variant: tiny_variant(variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def onnx_exports(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return {
        variant: export_model(model, root / variant, format="onnx", verify_batch_sizes=())
        for variant, model in models.items()
    }


def assert_equal_outputs(got, expected):
    assert expected.anomaly_map.std() > 5e-3, "the test maps have no contrast: the comparison would prove nothing"
    assert (
        got.anomaly_map.shape == expected.anomaly_map.shape and got.anomaly_score.shape == expected.anomaly_score.shape
    )
    assert got.anomaly_map.dtype == torch.float32
    torch.testing.assert_close(got.anomaly_map, expected.anomaly_map, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(got.anomaly_score, expected.anomaly_score, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_forward_itself_exports_with_a_dynamic_batch(models, variant):
    """torch.export of the model's own forward (the export module only selects its outputs) keeps the batch free."""
    model = models[variant]
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(
            MRADExportModule(model), (pixels(2, seed=0),), dynamic_shapes={"pixel_values": {0: batch}}
        )
        (pixel_values,) = [node for node in program.graph.nodes if node.op == "placeholder" and node.name == INPUT]
        assert isinstance(pixel_values.meta["val"].shape[0], torch.SymInt)
        for size in (1, 5):  # a graph specialised to the example's batch of 2 would refuse these
            x = pixels(size, seed=30 + size)
            anomaly_map, anomaly_score = program.module()(x)
            expected = model(pixel_values=x)
            torch.testing.assert_close(anomaly_map, expected.anomaly_map, atol=1e-5, rtol=0)
            torch.testing.assert_close(anomaly_score, expected.anomaly_score, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_module_is_the_model_forward_and_batch_wise(models, variant):
    model = models[variant]
    x = pixels(3, seed=1)
    with torch.no_grad():
        expected = model(pixel_values=x)
        anomaly_map, anomaly_score = MRADExportModule(model)(x)
        model.config.batch_invariant = True  # exported batch-wise through a copy; the model itself is left as it is
        try:
            invariant = model(pixel_values=x)
            module = MRADExportModule(model)
            batch_wise_map, batch_wise_score = module(x)
            assert model.config.batch_invariant and not module.config.batch_invariant
        finally:
            model.config.batch_invariant = False
    assert torch.equal(anomaly_map, expected.anomaly_map) and torch.equal(anomaly_score, expected.anomaly_score)
    assert torch.equal(batch_wise_map, anomaly_map) and torch.equal(batch_wise_score, anomaly_score)
    torch.testing.assert_close(invariant.anomaly_map, anomaly_map, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "backend", (pytest.param("onnxruntime", marks=needs_onnxruntime), pytest.param("openvino", marks=needs_openvino))
)
def test_onnx_export_round_trips_at_batch_1_3_8(models, onnx_exports, variant, backend):
    model = models[variant]
    detector = ExportedDetector(onnx_exports[variant], backend=backend, threads=1)
    for batch in BATCH_SIZES:
        x = pixels(batch, seed=10 + batch)
        with torch.no_grad():
            expected = model(pixel_values=x)
        assert_equal_outputs(detector(pixel_values=x), expected)


def test_onnx_graph_has_a_symbolic_batch_axis_and_embeds_the_bank(models, onnx_exports):
    import onnx

    graph = onnx.load(str(onnx_exports["tf"] / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["pixel_values"]  # the bank and the weights are initializers, not inputs
    assert [o.name for o in graph.output] == ["anomaly_map", "anomaly_score"]
    batch_dims = [value.type.tensor_type.shape.dim[0] for value in (*graph.input, *graph.output)]
    assert all(dim.dim_param and not dim.dim_value for dim in batch_dims)
    record = json.loads((onnx_exports["tf"] / "export_config.json").read_text())
    memory = models["tf"].memory
    assert record["memory_bank"]["image_entries"] == memory.image_keys.shape[0] == 6
    assert record["memory_bank"]["patch_entries"] == memory.patch_keys.shape[0]
    assert record["outputs"] == {
        "anomaly_map": ["batch", TINY_IMAGE_SIZE, TINY_IMAGE_SIZE],
        "anomaly_score": ["batch"],
    }


@needs_onnxruntime
def test_detector_predict_takes_the_processor_inputs(models, onnx_exports):
    images = [sample["image"] for sample in make_samples(3, seed=5)]
    detector = OnnxRuntimeDetector(onnx_exports["clip"], threads=1)
    inputs = detector.processor(images)
    with torch.no_grad():
        expected = models["clip"](**inputs)
    assert_equal_outputs(detector(**inputs), expected)
    predicted = detector.predict(images, batch_size=2)  # batches of 2 and 1
    torch.testing.assert_close(predicted.anomaly_map, expected.anomaly_map, atol=TOLERANCE, rtol=0)


@needs_openvino
def test_cli_exports_openvino_ir_in_float32_that_round_trips(models, tmp_path, capsys):
    import openvino as ov

    model_dir = tmp_path / "model"
    models["ft"].save_pretrained(model_dir)
    output = tmp_path / "ov"
    assert (
        main(["export", "--model", str(model_dir), "--format", "openvino", "--output", str(output), "--threads", "1"])
        == 0
    )
    assert "batch 3: max |diff| vs PyTorch" in capsys.readouterr().out
    record = json.loads((output / "export_config.json").read_text())
    assert record["format"] == "openvino" and record["file"] == "model.xml" and record["inference_precision"] == "f32"
    assert set(record["verification"]) >= {"batch_1", "batch_3"}
    assert record["verification"]["batch_3"]["max_abs_diff_map"] <= TOLERANCE
    ir = ov.Core().read_model(str(output / "model.xml"))
    assert ir.input("pixel_values").get_partial_shape()[0].is_dynamic
    constant_types = {
        op.get_output_element_type(0).get_type_name() for op in ir.get_ops() if op.get_type_name() == "Constant"
    }
    assert "f16" not in constant_types  # weights kept in float32 (OpenVINO's save_model default would round them)
    detector = OpenVINODetector(output, threads=1)
    for batch in BATCH_SIZES:
        x = pixels(batch, seed=20 + batch)
        with torch.no_grad():
            expected = models["ft"](pixel_values=x)
        assert_equal_outputs(detector(pixel_values=x), expected)
    with pytest.raises(ExportError, match="ONNX Runtime runs ONNX exports"):
        OnnxRuntimeDetector(output)


@needs_onnxruntime
def test_export_refuses_what_it_cannot_do_faithfully(models, onnx_exports, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.onnx").write_text("the user's graph")  # not an export folder: its files are never overwritten
    with pytest.raises(ExportError, match="is not an MRAD export folder but holds model.onnx"):
        export_model(models["tf"], mine, format="onnx")
    assert (mine / "model.onnx").read_text() == "the user's graph"
    earlier = tmp_path / "earlier"  # an earlier export with the user's notes: re-exporting keeps the notes
    shutil.copytree(onnx_exports["tf"], earlier)
    (earlier / "deploy_notes.txt").write_text("keep me")
    export_model(models["tf"], earlier, format="onnx", verify_batch_sizes=())
    assert (earlier / "deploy_notes.txt").read_text() == "keep me" and (earlier / "model.onnx").is_file()
    with pytest.raises(ExportError, match="needs --format openvino"):
        export_model(models["tf"], tmp_path / "bf16", format="onnx", precision="bfloat16")
    with pytest.raises(ExportError, match="Unknown export format"):
        export_model(models["tf"], tmp_path / "x", format="tflite")
    empty = MRADForAnomalyDetection.from_clip(tiny_clip_config(num_hidden_layers=3), image_size=TINY_IMAGE_SIZE)
    with pytest.raises(ValueError, match="no memory bank"):
        export_model(empty, tmp_path / "empty", format="onnx")
    assert not (tmp_path / "bf16").exists() and not (tmp_path / "empty").exists()
    with pytest.raises(ExportError, match="differs from the PyTorch model"):  # the check that guards every export
        _verify(models["ft"], onnx_exports["tf"], (1,), 1e-4, 1)  # another model's graph
    with pytest.raises(ExportError, match="not an MRAD export"):
        ExportedDetector(tmp_path)
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 112, 112\)"):
        OnnxRuntimeDetector(onnx_exports["tf"])(pixel_values=np.zeros((1, 3, 56, 56), np.float32))


def test_cli_export_error_is_one_line(models, tmp_path, capsys):
    assert (
        main(["export", "--model", str(tmp_path / "missing"), "--format", "onnx", "--output", str(tmp_path / "o")])
        == 2
    )
    model_dir = tmp_path / "model"
    models["tf"].save_pretrained(model_dir)
    assert (
        main(
            [
                "export",
                "--model",
                str(model_dir),
                "--format",
                "onnx",
                "--precision",
                "bfloat16",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    errors = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("mrad")
    ]  # not save_pretrained's bars
    assert len(errors) == 2 and all(line.startswith("mrad export: error:") for line in errors)
    assert "needs --format openvino" in errors[1]
    assert not (tmp_path / "o").exists()
