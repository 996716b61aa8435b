# SPDX-License-Identifier: Apache-2.0
"""Freezes what every dataset layout loads: rows, ids, masks, categories, splits, warnings and error texts.

Each case below builds a tiny tree for one layout of ``DATASET_LOADERS`` (and its accepted variants) and runs a
few calls on it: the default split, another split, a category subset, an unknown split or category, a missing
root and a missing sub-folder. The outcome of every call (the rows without the decoded images, or the exception
type and message, plus the warnings) is compared with ``layout_registry_expected.json``, recorded from the
loaders before they became rows of one registry. Paths are written relative to the fixture root (``<tmp>``).

Regenerate the file only for an intended change: ``python tests/data/test_layout_registry.py`` (then review the
diff: every changed line is a change users see).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from datasets import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_loaders import make_mvtec_style, write_image, write_mask  # noqa: E402

from mrad_hf.data.loaders import DATASET_LOADERS, LOADER_FEATURES, load_benchmark  # noqa: E402

EXPECTED = Path(__file__).with_name("layout_registry_expected.json")
ROW_COLUMNS = ("id", "label", "category", "defect_type", "path", "mask_path", "dataset")


def _relative(text: Any, root: Path) -> Any:
    return text.replace(str(root), "<tmp>") if isinstance(text, str) else text


def outcome(call: Callable[[], Any], root: Path) -> dict[str, Any]:
    """Rows (or the error) and the warnings of one call, with ``root`` written as ``<tmp>``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dataset = call()
        except Exception as error:  # noqa: BLE001 - the type and text are what is frozen
            result: dict[str, Any] = {"error": type(error).__name__, "message": _relative(str(error), root)}
            missing = getattr(error, "missing", None)
            if missing is not None:
                result["missing"] = _relative(str(missing), root)
        else:
            assert dataset.features == LOADER_FEATURES
            undecoded = dataset.cast_column("image", Image(decode=False)).cast_column("mask", Image(decode=False))
            rows = undecoded.to_list()
            for row in rows:  # the Image columns hold the same files as path / mask_path
                assert row["image"]["path"] == row["path"]
                assert (row["mask"] or {}).get("path") == row["mask_path"]
            result = {"rows": [[_relative(row[name], root) for name in ROW_COLUMNS] for row in rows]}
    result["warnings"] = [f"{w.category.__name__}: {_relative(str(w.message), root)}" for w in caught]
    return result


# --------------------------------------------------------------------------------------------------
# Trees: one builder per layout variant
# --------------------------------------------------------------------------------------------------


def mvtec_tree(root: Path) -> None:
    make_mvtec_style(root, "bottle", {"broken_large": ["000", "001"], "contamination": ["002"]})
    make_mvtec_style(root, "cable", {"cut": ["000"]}, normal_ids=("000", "001"), mask_name="m_{stem}.png")


def mvtec_style(category: str, **options: Any) -> Callable[[Path], None]:
    return lambda root: make_mvtec_style(root, category, {"defect_a": ["000", "001"]}, **options)


def btad_tree(root: Path) -> None:
    make_mvtec_style(root, "01", {"ko": ["0000", "0001"]}, normal="ok", image_ext=".bmp", mask_name="{stem}.png")
    make_mvtec_style(root, "02", {"ko": ["0000"]}, normal="ok", mask_name="{stem}.png")
    make_mvtec_style(root, "03", {"ko": ["0000"]}, normal="ok", image_ext=".bmp", mask_name="{stem}.bmp")


def headct_tree(root: Path) -> None:
    write_image(root / "brain" / "test" / "good" / "000.png")
    write_image(root / "brain" / "test" / "hemorrhage" / "100.png")
    write_image(root / "brain" / "test" / "hemorrhage" / "101.png")


def visa_csv_tree(root: Path) -> None:
    lines = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        base = f"{obj}/Data"
        lines += [
            f"{obj},train,normal,{base}/Images/Normal/0000.JPG,",
            f"{obj},test,normal,{base}/Images/Normal/0001.JPG,",
            f"{obj},test,anomaly,{base}/Images/Anomaly/000.JPG,{base}/Masks/Anomaly/000.png",
        ]
        for name in ("Normal/0000.JPG", "Normal/0001.JPG", "Anomaly/000.JPG"):
            write_image(root / base / "Images" / name)
        write_mask(root / base / "Masks" / "Anomaly" / "000.png", value=2)
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")


def visa_pytorch_tree(root: Path) -> None:
    for obj in ("candle", "pcb1"):
        make_mvtec_style(root, obj, {"bad": ["000"]}, mask_name="{stem}.png")


def ksdd2_raw_tree(root: Path) -> None:
    for split, stems in (("train", ("10", "11")), ("test", ("20", "21", "22"))):
        for index, stem in enumerate(stems):
            write_image(root / split / f"{stem}.png")
            write_mask(root / split / f"{stem}_GT.png", value=255 if index == 0 else 0)


def dagm_tree(root: Path) -> None:
    for category in ("Class1", "Class2"):
        for split in ("Test", "Train"):
            for stem in ("0001", "0002", "0003"):
                write_image(root / category / split / f"{stem}.PNG", mode="L")
            write_mask(root / category / split / "Label" / "0002_label.PNG")


def no_yes(prefix: str = "", extra: str | None = None) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        base = root / prefix if prefix else root
        write_image(base / "no" / "n1.jpg")
        write_image(base / "no" / "n2.jpg")
        write_image(base / "yes" / "y1.jpg")
        if extra:
            write_image(root / extra / "p1.jpg")

    return build


ISIC_GT = "ISBI2016_ISIC_Part1_Test_GroundTruth"


def isic_mrad_tree(root: Path) -> None:
    write_image(root / "skin" / "test" / "malignant" / "ISIC_001.jpg")
    write_image(root / "skin" / "test" / "benign" / "ISIC_002.jpg")
    write_mask(root / "skin" / ISIC_GT / "ISIC_001_Segmentation.png")
    write_mask(root / "skin" / ISIC_GT / "ISIC_002_Segmentation.png")


def isic_raw_tree(root: Path) -> None:
    for stem in ("ISIC_001", "ISIC_002"):
        write_image(root / "ISBI2016_ISIC_Part1_Test_Data" / f"{stem}.jpg")
        write_mask(root / ISIC_GT / f"{stem}_Segmentation.png")


def image_mask_tree(images: str, masks: str, image_ext: str, mask_ext: str) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        for stem in ("1", "2"):
            write_image(root / images / f"{stem}{image_ext}")
            write_mask(root / masks / f"{stem}{mask_ext}")

    return build


def endo_tree(root: Path) -> None:
    write_image(root / "images" / "a.jpg")
    write_image(root / "images" / "b.jpg")
    write_image(root / "good" / "n.jpg")
    write_mask(root / "masks" / "a.png")
    write_mask(root / "masks" / "b.png")


def folder_flat_tree(root: Path) -> None:
    write_image(root / "good" / "000.png")
    write_image(root / "ok" / "001.png")
    write_image(root / "scratch" / "000.png")
    write_mask(root / "scratch" / "000_mask.png")
    write_image(root / "crack" / "000.png")
    write_image(root / "crack" / "001.png")
    write_mask(root / "masks" / "crack" / "000.png")
    write_mask(root / "masks" / "crack" / "009.png")  # no image: reported as ignored
    (root / "crack" / "notes.txt").write_text("not an image")


def folder_categories_tree(root: Path) -> None:
    for category in ("pcb", "screw"):
        write_image(root / category / "good" / "000.png")
        write_image(root / category / "bent" / "000.png")
        write_mask(root / category / "ground_truth" / "bent" / "000.png")
    write_image(root / "screw" / "normal" / "001.png")


def explicit_folders_tree(root: Path) -> None:
    write_image(root / "line" / "good" / "000.png")
    write_image(root / "line" / "dent" / "000.png")
    write_image(root / "line" / "dent" / "001.png")
    write_mask(root / "line" / "masks" / "000.png")


def remove(*parts: str) -> Callable[[Path], None]:
    return lambda root: shutil.rmtree(root.joinpath(*parts))


def folder(**kwargs: Any) -> Callable[[Path], Any]:
    return lambda root: load_benchmark("folder", root, **kwargs)


# --------------------------------------------------------------------------------------------------
# Cases: (name given to load_benchmark, tree builder, {call label: (kwargs or callable, tree change)})
# --------------------------------------------------------------------------------------------------

Call = dict[str, Any]
MISSING_ROOT: Call = {"root": "not_there"}

CASES: dict[str, tuple[str, Callable[[Path], None], dict[str, Call]]] = {
    "mvtec": (
        "mvtec",
        mvtec_tree,
        {
            "test": {"categories": ["cable", "bottle"]},
            "train": {"categories": "bottle", "split": "train"},
            "all categories": {},
            "unknown category": {"categories": ["bottel", "cabel"]},
            "unknown split": {"categories": ["bottle"], "split": "val"},
            "missing root": MISSING_ROOT,
            "missing ground truth": {"categories": ["bottle"], "change": remove("bottle", "ground_truth")},
            "missing test": {"categories": ["bottle"], "change": remove("bottle", "test")},
            "alias": {"name": "MVTec_AD", "categories": ["bottle"]},
        },
    ),
    "mvtec-layout": (
        "mvtec-layout",
        mvtec_tree,
        {
            "test": {},
            "subset": {"categories": ["cable"], "split": "train"},
            "unknown category": {"categories": ["zipper"]},
            "unknown split": {"split": "val"},
            "missing root": MISSING_ROOT,
            "no category": {"root": "bottle/ground_truth"},
        },
    ),
    "mpdd": (
        "mpdd",
        mvtec_style("bracket_black"),
        {
            "test": {"categories": ["bracket_black"]},
            "train": {"categories": ["bracket_black"], "split": "train"},
            "all": {},
            "missing root": MISSING_ROOT,
        },
    ),  # fmt: skip
    "btad": (
        "btad",
        btad_tree,
        {
            "test": {},
            "train": {"split": "train"},
            "subset": {"categories": ["03", "01"]},
            "missing root": MISSING_ROOT,
            "missing category": {"change": remove("02")},
        },
    ),
    "dtd": (
        "DTD-Synthetic",
        mvtec_style("Woven_001", image_ext=".jpg"),
        {
            "test": {"categories": ["Woven_001"]},
            "train": {"categories": ["Woven_001"], "split": "train"},
            "missing root": MISSING_ROOT,
        },
    ),  # fmt: skip
    "headct": (
        "headct",
        headct_tree,
        {
            "test": {},
            "category": {"categories": ["brain"]},
            "train": {"split": "train"},
            "unknown category": {"categories": ["head"]},
            "missing root": MISSING_ROOT,
            "missing test": {"change": remove("brain", "test")},
        },
    ),
    "visa csv": (
        "visa",
        visa_csv_tree,
        {
            "test": {"categories": ["candle", "pcb1"]},
            "train": {"categories": ["pcb1", "candle"], "split": "train"},
            "all categories": {},
            "subset": {"categories": ["pcb1"]},
            "absent category": {"categories": ["candle", "fryum"]},
            "unknown split": {"split": "val"},
            "unknown category": {"categories": ["pcb9"]},
            "missing root": MISSING_ROOT,
            "missing csv": {"categories": ["candle"], "change": remove("split_csv")},
            "missing image": {"categories": ["pcb1"], "change": remove("pcb1", "Data", "Images", "Anomaly")},
        },
    ),
    "visa pytorch": (
        "visa",
        visa_pytorch_tree,
        {
            "test": {"categories": ["candle", "pcb1"]},
            "train": {"categories": ["pcb1"], "split": "train"},
            "unknown split": {"categories": ["pcb1"], "split": "val"},
            "missing ground truth": {"categories": ["pcb1"], "change": remove("pcb1", "ground_truth")},
        },
    ),
    "ksdd2 mvtec": (
        "SDD",
        mvtec_style("electrical commutators"),
        {
            "test": {},
            "train": {"split": "train"},
            "unknown split": {"split": "val"},
            "missing root": MISSING_ROOT,
            "missing ground truth": {"change": remove("electrical commutators", "ground_truth")},
        },
    ),
    "ksdd2 raw": (
        "ksdd2",
        ksdd2_raw_tree,
        {
            "test": {},
            "train": {"split": "train"},
            "category": {"categories": "electrical commutators"},
            "unknown category": {"categories": ["commutators"]},
            "unknown split": {"split": "val"},
            "missing ground truth": {"change": lambda root: (root / "test" / "21_GT.png").unlink()},
        },
    ),
    "dagm": (
        "dagm",
        dagm_tree,
        {
            "test": {"categories": ["Class2", "Class1"]},
            "train": {"categories": ["Class1"], "split": "train"},
            "all": {},
            "unknown split": {"categories": ["Class1"], "split": "val"},
            "missing root": MISSING_ROOT,
            "missing label": {"categories": ["Class1"], "change": remove("Class1", "Test", "Label")},
            "missing train": {"categories": ["Class1"], "split": "train", "change": remove("Class1", "Train")},
        },
    ),
    "brainmri nested": (
        "brainmri",
        no_yes("brain_tumor_dataset"),
        {"test": {}, "train": {"split": "train"}, "missing yes": {"change": remove("brain_tumor_dataset", "yes")}},
    ),
    "brainmri flat": ("brainmri", no_yes(), {"test": {"categories": ["brain"]}, "missing root": MISSING_ROOT}),
    "br35h": (
        "Br35",
        no_yes(extra="pred"),
        {
            "test": {},
            "unknown category": {"categories": ["skull"]},
            "missing root": MISSING_ROOT,
            "missing no": {"change": remove("no")},
        },
    ),
    "isic mrad": (
        "isic",
        isic_mrad_tree,
        {"test": {}, "missing masks": {"change": remove("skin", ISIC_GT)}, "train": {"split": "train"}},
    ),
    "isic raw": (
        "ISBI",
        isic_raw_tree,
        {"test": {}, "missing root": MISSING_ROOT, "missing masks": {"change": remove(ISIC_GT)}},
    ),
    "clinicdb": (
        "clinicdb",
        image_mask_tree("images", "masks", ".png", ".png"),
        {
            "test": {},
            "missing root": MISSING_ROOT,
            "missing masks": {"change": remove("masks")},
            "no images": {"change": lambda root: [path.unlink() for path in (root / "images").iterdir()]},
        },
    ),
    "clinicdb original": (
        "clinicdb",
        image_mask_tree("Original", "Ground Truth", ".tif", ".tif"),
        {"test": {}, "missing images": {"change": remove("Original")}},
    ),
    "colondb": (
        "colondb",
        image_mask_tree("images", "masks", ".png", ".png"),
        {"test": {}, "missing root": MISSING_ROOT},
    ),  # fmt: skip
    "kvasir": (
        "kvasir",
        image_mask_tree("images", "masks", ".jpg", ".jpg"),
        {"test": {}, "train": {"split": "train"}, "missing root": MISSING_ROOT},
    ),
    "kvasir unmatched": ("kvasir", image_mask_tree("images", "masks", ".jpg", "_x.jpg"), {"sorted order": {}}),
    "endo": (
        "EndoTect",
        endo_tree,
        {"test": {}, "missing root": MISSING_ROOT, "missing masks": {"change": remove("masks")}},
    ),
    "folder flat": (
        "folder",
        folder_flat_tree,
        {
            "test": {},
            "normal_dir": {"call": lambda root: DATASET_LOADERS["folder"](root, normal_dir="ok")},
            "train": {"split": "train"},
            "missing root": MISSING_ROOT,
            "empty": {"root": "empty", "change": lambda root: (root / "empty").mkdir()},
        },
    ),
    "folder categories": (
        "folder",
        folder_categories_tree,
        {"test": {}, "subset": {"categories": ["screw"]}, "unknown category": {"categories": ["nut"]}},
    ),
    "folders explicit": (
        "folder",
        explicit_folders_tree,
        {
            "pooled masks": {
                "call": folder(normal_dirs=["line/good"], abnormal_dirs=["line/dent"], mask_dirs=["line/masks"])
            },  # fmt: skip
            "glob": {
                "call": lambda root: load_benchmark("folder", root, normal_dirs=["*/good"], abnormal_dirs=["*/dent"])
            },  # fmt: skip
            "category": {"call": folder(normal_dirs=["line/good"], abnormal_dirs=["line/dent"], categories=["x"])},
            "no match": {"call": folder(normal_dirs=["line/nothing"])},
            "not folder": {"call": lambda root: load_benchmark("mvtec", root, normal_dirs=["line/good"])},
        },
    ),
}


def run_case(case: str, root: Path) -> dict[str, Any]:
    """Builds the case's tree once per call (so changes do not leak) and records every call's outcome."""
    name, build, calls = CASES[case]
    results = {}
    for label, call in calls.items():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        build(root)
        if "change" in call:
            call["change"](root)
        options = {key: value for key, value in call.items() if key in ("categories", "split")}
        target = root / call["root"] if "root" in call else root
        if "call" in call:
            action = lambda: call["call"](root)  # noqa: B023 - called right away
        else:
            action = lambda: load_benchmark(call.get("name", name), target, **options)  # noqa: B023
        results[label] = outcome(action, root)
    return results


def test_every_registered_layout_has_a_case() -> None:
    covered = {load_name for load_name, _, _ in CASES.values()}
    keys = {name.lower().replace("_ad", "").replace("-synthetic", "") for name in covered}
    aliases = {"sdd": "ksdd2", "br35": "br35h", "isbi": "isic", "endotect": "endo"}
    assert {aliases.get(key, key) for key in keys} >= set(DATASET_LOADERS)


@pytest.mark.parametrize("case", list(CASES))
def test_layout_output_is_frozen(tmp_path: Path, case: str) -> None:
    expected = json.loads(EXPECTED.read_text(encoding="utf-8"))
    assert run_case(case, tmp_path / "root") == expected[case]


if __name__ == "__main__":  # regenerate the expected outcomes (review the diff before committing it)
    with tempfile.TemporaryDirectory() as folder_name:
        recorded = {case: run_case(case, Path(folder_name) / "root") for case in CASES}
    text = json.dumps(recorded, indent=1, ensure_ascii=False)
    text = re.sub(
        r"\[\n\s+([^\[\]{}]*?)\n\s*\]", lambda m: "[" + re.sub(r",\n\s+", ", ", m[1]) + "]", text
    )  # a row a line
    EXPECTED.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {EXPECTED} ({len(recorded)} cases)")


# --------------------------------------------------------------------------------------------------
# The registry itself: one row per loader, one generic loader behind them
# --------------------------------------------------------------------------------------------------


def test_dataset_loaders_are_the_registry_rows_in_order() -> None:
    from mrad_hf.data import loaders
    from mrad_hf.data.layouts import LAYOUTS

    assert list(DATASET_LOADERS) == [layout.key for layout in LAYOUTS]
    assert DATASET_LOADERS["folder"] is loaders.load_folder
    assert (
        DATASET_LOADERS["dtd"] is loaders.load_dtd_synthetic
        and loaders.load_dtd_synthetic.__name__ == "load_dtd_synthetic"
    )
    assert DATASET_LOADERS["mvtec-layout"].__qualname__ == "load_mvtec_layout"
    visa = next(layout for layout in LAYOUTS if layout.key == "visa")
    doc = loaders.load_visa.__doc__
    assert "split_csv/1cls.csv             columns: object,split,label,image,mask" in doc
    assert "VisA masks are not binary" in doc and visa.licence in doc


def test_bound_loaders_run_the_generic_loader(tmp_path: Path) -> None:
    from mrad_hf.data.loaders import load_dataset_layout, load_mvtec

    mvtec_tree(tmp_path)
    generic = outcome(lambda: load_dataset_layout(" MVTec_AD", tmp_path, ["bottle"], "train"), tmp_path)
    assert generic == outcome(lambda: load_mvtec(tmp_path, ["bottle"], "train"), tmp_path)
    assert [row[0] for row in generic["rows"]] == ["bottle/train/good/000.png", "bottle/train/good/001.png"]
    with pytest.raises(ValueError, match=r"unknown dataset 'mvtech'; known datasets: mvtec, visa, mpdd"):
        load_dataset_layout("mvtech", tmp_path)
    with pytest.raises(TypeError, match="normal_dir"):  # strategy options belong to the strategies that take them
        load_dataset_layout("mvtec", tmp_path, ["bottle"], normal_dir="ok")
