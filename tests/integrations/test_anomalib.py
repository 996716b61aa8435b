# SPDX-License-Identifier: Apache-2.0
"""`MRADAnomalib` with REAL anomalib: `Engine().test` / `Engine().predict` on anomalib's own `Folder` datamodule
(a small synthetic-defect folder), its evaluator, post-processor and visualiser, a tiny random CLIP. anomalib's
image and pixel AUROC equal mrad-hf's metrics on the very maps and scores anomalib evaluated (for a zero-shot model
anomalib validates first, here on the test set itself, and its post-processor min-max normalises what it scores).

Needs `pip install "mrad-hf[anomalib]"` with a torchvision that imports beside the installed torch. It cannot in CI
(torch 2.13.0 CPU: PyPI's torchvision 0.28.0 links the CUDA libraries, `import torchvision` fails with "operator
torchvision::nms does not exist"), so there this module is skipped and tests/integrations/test_anomalib_adapter.py
checks the adapter against a labelled fake of the same API. Run it where anomalib imports, e.g. torch 2.14.1 +
torchvision 0.29.1: `python -m pytest tests/integrations/test_anomalib.py`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

anomalib = pytest.importorskip(
    "anomalib", reason="anomalib (the [anomalib] extra) is not importable here; see the module docstring"
)

from anomalib.data import Folder  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
from conftest import make_tiny_model  # noqa: E402

from mrad_hf.data.synthetic import load_texture, make_synthetic_benchmark  # noqa: E402
from mrad_hf.evaluation.metrics import image_auroc, pixel_auroc  # noqa: E402
from mrad_hf.integrations.anomalib import MRADAnomalib  # noqa: E402
from mrad_hf.memory import build_memory_bank  # noqa: E402


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory) -> Path:
    """good/ (normal), defect/ + masks/ (same file names), from one synthetic texture."""
    bench = make_synthetic_benchmark(
        tmp_path_factory.mktemp("bench"),
        categories=["brick"],
        defect_kinds=["blob"],
        n_train_good=3,
        n_test_good=4,
        n_test_per_defect=4,
        image_size=96,
    )
    root = tmp_path_factory.mktemp("folder")
    shutil.copytree(bench / "brick" / "train" / "good", root / "train_good")
    shutil.copytree(bench / "brick" / "test" / "good", root / "good")
    shutil.copytree(bench / "brick" / "test" / "blob", root / "defect")
    (root / "masks").mkdir()
    for mask in sorted((bench / "brick" / "ground_truth" / "blob").glob("*_mask.png")):
        shutil.copy(mask, root / "masks" / mask.name.replace("_mask", ""))
    return root


def _datamodule(root: Path) -> Folder:
    datamodule = Folder(
        name="synthetic-brick",
        root=root,
        normal_dir="train_good",
        normal_test_dir="good",
        abnormal_dir="defect",
        mask_dir="masks",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        val_split_mode="same_as_test",
    )
    datamodule.setup()
    return datamodule


def _engine(tmp_path: Path) -> Engine:
    return Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path, enable_progress_bar=False)


def test_engine_test_metrics_equal_mrad_metrics_on_the_same_outputs(folder_dataset, tmp_path):
    model = make_tiny_model()
    rows = [{"image": load_texture("brick")[:96, :96], "label": 0, "mask": None, "id": "texture"}]
    build_memory_bank(
        model,
        rows
        + [{"image": np.asarray(load_texture("brick")[100:300, 100:300]), "label": 0, "mask": None, "id": "crop"}],
        batch_size=2,
        source="unit-test",
        progress=False,
    )
    module = MRADAnomalib(model)

    [metrics] = _engine(tmp_path / "test").test(model=module, datamodule=_datamodule(folder_dataset))
    batches = _engine(tmp_path / "predict").predict(model=module, datamodule=_datamodule(folder_dataset))
    scores = torch.cat([b.pred_score for b in batches]).numpy()
    labels = torch.cat([b.gt_label for b in batches]).numpy()
    maps = torch.cat([b.anomaly_map.reshape(len(b.pred_score), *b.anomaly_map.shape[-2:]) for b in batches]).numpy()
    masks = torch.cat([b.gt_mask.reshape(len(b.pred_score), *b.gt_mask.shape[-2:]) for b in batches]).numpy() > 0.5
    assert len(scores) == 8 and labels.sum() == 4 and maps.shape[-2:] == (model.config.image_size,) * 2
    assert metrics["image_AUROC"] == pytest.approx(image_auroc(labels, scores), abs=1e-6)
    assert metrics["pixel_AUROC"] == pytest.approx(pixel_auroc(masks, maps), abs=1e-5)
    assert any((tmp_path / "test").rglob("*.png")), "anomalib's visualiser wrote no image"


def test_threshold_gives_anomalib_labels_and_masks(folder_dataset, tmp_path, model_with_bank):
    module = MRADAnomalib(model_with_bank, threshold=0.5, pixel_threshold=0.4)
    batches = _engine(tmp_path).predict(model=module, datamodule=_datamodule(folder_dataset))
    raw = torch.cat([module.score(batch.image)["pred_score"] for batch in batches])
    torch.testing.assert_close(
        torch.cat([batch.pred_score for batch in batches]), raw
    )  # MRAD's scale, not renormalised
    for batch in batches:
        assert batch.pred_label.tolist() == (batch.pred_score > 0.5).tolist()
        assert torch.equal(batch.pred_mask.reshape(batch.anomaly_map.shape), batch.anomaly_map > 0.4)
