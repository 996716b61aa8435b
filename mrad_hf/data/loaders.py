# SPDX-License-Identifier: Apache-2.0
"""Benchmark loaders: official anomaly-detection folder layouts -> one ``datasets.Dataset``.

MRAD (arXiv 2602.00522) evaluates zero-shot on the **test split** of each benchmark. The same test
split of the auxiliary set (VisA, or MVTec AD when VisA is the target) also fills the memory bank. So
every loader returns one split, by default ``"test"``, as a ``datasets.Dataset`` with these features
(:data:`LOADER_FEATURES`):

============  ====================================  ==================================================
column        feature                               content
============  ====================================  ==================================================
image         ``Image(decode=True)``                the image file, decoded lazily to ``PIL.Image``
mask          ``Image(decode=True)``                the mask file as stored on disk; ``None`` for normal
                                                    images and for image-level-only datasets
label         ``ClassLabel(["normal", "anomaly"])`` 0 = normal, 1 = anomaly
category      ``Value("string")``                   the class name as the MRAD reference spells it
                                                    (per-category tables use it)
defect_type   ``Value("string")``                   ``"good"`` for normal rows; otherwise the defect
                                                    folder name, or ``"defect"`` if the set has none
path          ``Value("string")``                   absolute image path (for reading)
mask_path     ``Value("string")``                   absolute mask path or ``None``
id            ``Value("string")``                   the image path relative to the dataset root, POSIX
                                                    form (banks store it; never an absolute path)
dataset       ``Value("string")``                   the loader name (``"mvtec"``, ``"folder"``, ...)
============  ====================================  ==================================================

Rows are sorted by ``(category, defect_type, path)``. The datasets are built in memory from file
paths with ``Dataset.from_dict(..., features=...)``. Nothing is decoded and nothing is written to the
Hugging Face cache. One exception: the raw KSDD2 layout stores an all-black ``*_GT.png`` for normal
images, so its labels are read from the mask pixels.

**Masks and unreadable files.** The ``mask`` column holds the raw annotation file; it is *not* binarised, and the
loaders decode nothing. :mod:`mrad_hf.data.reading` binarises masks as the reference does (:func:`binarize_mask`,
:func:`with_binary_masks`) and reads rows through MRAD's decoder, reporting or refusing unreadable files
(:func:`iter_readable_rows`, ``--on-error skip|fail``). Which files are images and which are masks, and how masks
are paired with images, is :mod:`mrad_hf.data.files` (:func:`classify_file`, :func:`scan_folder`).

Layouts. Every supported layout is one row of :data:`mrad_hf.data.layouts.LAYOUTS` (data: name, the tree and
fix its errors show, categories, splits, aliases, licence and a row strategy such as MVTec-style class folders,
a split csv or image/mask folder pairs); :func:`load_dataset_layout` is the one loader that runs a row, and
``load_mvtec``, ``load_visa``, ... (:data:`DATASET_LOADERS`) are it bound to one row. The generic folder format
(:func:`load_folder`) and explicit folders (:func:`load_folders`) are for your own data.
"""

from __future__ import annotations

import csv
import glob
import os
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from datasets import ClassLabel, Dataset, Features, Image, Value

__all__ = [
    "BR35H_CATEGORIES",
    "BRAINMRI_CATEGORIES",
    "BTAD_CATEGORIES",
    "CLINICDB_CATEGORIES",
    "COLONDB_CATEGORIES",
    "DAGM_CATEGORIES",
    "DATASET_LOADERS",
    "LAYOUTS",
    "DTD_CATEGORIES",
    "ENDO_CATEGORIES",
    "HEADCT_CATEGORIES",
    "IMAGE_EXTENSIONS",
    "MASK_DIR_NAMES",
    "MASK_STEM_SUFFIX",
    "NORMAL_DIR_NAMES",
    "ISIC_CATEGORIES",
    "KSDD2_CATEGORIES",
    "KVASIR_CATEGORIES",
    "LABEL_NAMES",
    "LOADER_FEATURES",
    "MPDD_CATEGORIES",
    "MVTEC_CATEGORIES",
    "NORMAL_DEFECT_TYPE",
    "UNSPECIFIED_DEFECT_TYPE",
    "VISA_CATEGORIES",
    "DatasetLayout",
    "DatasetLayoutError",
    "DatasetLoader",
    "FolderScan",
    "IgnoredFile",
    "IgnoredFilesWarning",
    "classify_file",
    "file_sha256",
    "ignored_summary",
    "load_folders",
    "pair_image_files",
    "scan_folder",
    "binarize_mask",
    "load_benchmark",
    "load_br35h",
    "load_brainmri",
    "load_btad",
    "load_clinicdb",
    "load_colondb",
    "load_dagm",
    "load_dataset_layout",
    "load_dtd_synthetic",
    "load_endo",
    "load_folder",
    "load_headct",
    "load_isic",
    "load_ksdd2",
    "load_kvasir",
    "load_mpdd",
    "load_mvtec_layout",
    "load_mvtec",
    "load_visa",
    "iter_readable_rows",
    "readable_items",
    "readable_subset",
    "undecoded_images",
    "with_binary_masks",
]

# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------

from ..memory.files import file_sha256  # noqa: E402, F401 - one hash rule for banks and leakage checks
from .files import (  # noqa: E402, F401 - finding and classifying files, re-exported here
    _MASK_WITHOUT_IMAGE,
    IMAGE_EXTENSIONS,
    MASK_DIR_NAMES,
    MASK_STEM_SUFFIX,
    FolderScan,
    IgnoredFile,
    IgnoredFilesWarning,
    PathOutsideRoot,
    _has_mask_suffix,
    _index_masks,
    _list_images,
    _list_subdirs,
    _pair_masks,
    _require_dir,
    _require_file,
    _warn_ignored,
    classify_file,
    ignored_summary,
    pair_image_files,
    path_in_root,
    scan_folder,
)
from .layouts import (  # noqa: E402, F401 - the registry and its categories, re-exported here
    BR35H_CATEGORIES,
    BRAINMRI_CATEGORIES,
    BTAD_CATEGORIES,
    CLINICDB_CATEGORIES,
    COLONDB_CATEGORIES,
    DAGM_CATEGORIES,
    DTD_CATEGORIES,
    ENDO_CATEGORIES,
    HEADCT_CATEGORIES,
    ISIC_CATEGORIES,
    KSDD2_CATEGORIES,
    KVASIR_CATEGORIES,
    LAYOUTS,
    MPDD_CATEGORIES,
    MVTEC_CATEGORIES,
    TRAIN_TEST,
    VISA_CATEGORIES,
    ClassFolders,
    DatasetLayout,
    DatasetLayoutError,
    ImageMaskFolders,
    LabelFolder,
    LayoutDoc,
    MasksBeside,
    NamedClasses,
    SharedMaskFolder,
    SplitCsv,
    UserFolders,
)
from .reading import (  # noqa: E402, F401 - decode-or-record helpers, re-exported here
    binarize_mask,
    iter_readable_rows,
    readable_items,
    readable_subset,
    undecoded_images,
    with_binary_masks,
)

NORMAL_DIR_NAMES: tuple[str, ...] = ("good", "normal", "nominal", "ok")
"""Folder names (any case) that hold normal images in the generic folder layout."""

LABEL_NAMES: tuple[str, str] = ("normal", "anomaly")
NORMAL_DEFECT_TYPE = "good"
UNSPECIFIED_DEFECT_TYPE = "defect"
"""``defect_type`` of anomalous rows in sets that record no defect kind (VisA csv, DAGM, colon sets)."""

LOADER_FEATURES = Features(
    {
        "image": Image(decode=True),
        "mask": Image(decode=True),
        "label": ClassLabel(names=list(LABEL_NAMES)),
        "category": Value("string"),
        "defect_type": Value("string"),
        "path": Value("string"),
        "mask_path": Value("string"),
        "id": Value("string"),
        "dataset": Value("string"),
    }
)


# --------------------------------------------------------------------------------------------------
# Rows and the loader signature
# --------------------------------------------------------------------------------------------------


class _Row(NamedTuple):
    category: str
    defect_type: str
    image: Path
    mask: Path | None

    @property
    def is_anomaly(self) -> bool:
        return self.defect_type != NORMAL_DEFECT_TYPE


class DatasetLoader(Protocol):
    """Signature shared by every entry of :data:`DATASET_LOADERS`."""

    def __call__(
        self, root: str | os.PathLike[str], categories: Sequence[str] | None = None, split: str = "test"
    ) -> Dataset:
        """Loads ``split`` of the dataset under ``root``, restricted to ``categories`` if given."""
        ...


# --------------------------------------------------------------------------------------------------
# Shared helpers: validation, dataset construction
# --------------------------------------------------------------------------------------------------


def _absolute(root: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(root))))


def _check_split(split: str, available: Sequence[str], doc: LayoutDoc) -> None:
    if split not in available:
        raise ValueError(f"{doc.name}: unknown split {split!r}; available splits: {', '.join(available)}.")


def _select_categories(requested: Sequence[str] | str | None, available: Sequence[str], name: str) -> list[str]:
    """Validates ``requested`` against ``available``; ``None`` means all of them."""
    if requested is None:
        return list(available)
    if isinstance(requested, str):
        requested = [requested]
    unknown = [category for category in requested if category not in available]
    if unknown:
        raise ValueError(
            f"{name}: unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}; "
            f"available: {', '.join(available)}."
        )
    return list(dict.fromkeys(requested))


def _row_id(image: Path, root: Path) -> str:
    """The image path relative to the dataset root, in POSIX form (ids never hold absolute paths)."""
    relative = os.path.relpath(image, root)
    return Path(relative).as_posix() if not relative.startswith("..") else image.name


def _build_dataset(rows: Iterable[_Row], doc: LayoutDoc, searched: Path, root: Path | None = None) -> Dataset:
    """Sorts the rows and turns them into a lazily decoded ``datasets.Dataset``.

    ``root`` is the dataset root the ``id`` column is relative to (default: ``searched``).
    """
    ordered = sorted(rows, key=lambda row: (row.category, row.defect_type, str(row.image)))
    if not ordered:
        raise doc.error(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {searched}/.", searched)
    paths = [str(row.image) for row in ordered]
    mask_paths = [None if row.mask is None else str(row.mask) for row in ordered]
    base = root if root is not None else searched
    columns = {
        "image": paths,
        "mask": mask_paths,
        "label": [int(row.is_anomaly) for row in ordered],
        "category": [row.category for row in ordered],
        "defect_type": [row.defect_type for row in ordered],
        "path": paths,
        "mask_path": mask_paths,
        "id": [_row_id(row.image, base) for row in ordered],
        "dataset": [doc.key or doc.name] * len(ordered),
    }
    return Dataset.from_dict(columns, features=LOADER_FEATURES)


def _masks_per_defect(ground_truth: Path) -> Callable[[str], Path]:
    """``defect -> ground_truth/defect``: one mask folder per defect folder (MVTec style)."""
    return lambda defect: ground_truth / defect


def _shared_masks(folder: Path) -> Callable[[str], Path]:
    """``defect -> folder``: one mask folder shared by every defect folder."""
    return lambda _defect: folder


def _class_dir_rows(
    base: Path,
    category: str,
    doc: LayoutDoc,
    *,
    normal_dir: str = NORMAL_DEFECT_TYPE,
    class_dirs: Sequence[str] | None = None,
    exclude: Iterable[str] = (),
    rename: Mapping[str, str] | None = None,
    mask_dir_for: Callable[[str], Path] | None = None,
) -> list[_Row]:
    """Rows from ``base/<class folder>/*``: ``normal_dir`` is normal, every other folder is a defect.

    Args:
        base: The folder holding one sub-folder per class.
        category: The category written into every row.
        doc: Layout description for error messages.
        normal_dir: Name of the folder of normal images.
        class_dirs: Folders to read (all must exist); ``None`` reads every sub-folder except ``exclude``.
        exclude: Sub-folders that are not classes (e.g. ``masks``).
        rename: Folder name -> ``defect_type`` (e.g. ``{"yes": "tumor"}``).
        mask_dir_for: Defect folder name -> folder of its masks; ``None`` for image-level-only sets.
    """
    names = list(class_dirs) if class_dirs is not None else _list_subdirs(_require_dir(base, doc), exclude)
    rows: list[_Row] = []
    for name in names:
        images = _list_images(_require_dir(base / name, doc))
        if name == normal_dir:
            rows.extend(_Row(category, NORMAL_DEFECT_TYPE, image, None) for image in images)
            continue
        defect_type = (rename or {}).get(name, name)
        masks: Sequence[Path | None] = (
            _pair_masks(images, mask_dir_for(name), doc) if mask_dir_for and images else [None] * len(images)
        )
        rows.extend(_Row(category, defect_type, image, mask) for image, mask in zip(images, masks, strict=True))
    return rows


# --------------------------------------------------------------------------------------------------
# Generic folder format
# --------------------------------------------------------------------------------------------------

_FOLDER_DOC: LayoutDoc = next(layout for layout in LAYOUTS if layout.key == "folder")


def _normal_names(normal_dir: str | Sequence[str] | None) -> frozenset[str]:
    if normal_dir is None:
        return frozenset(NORMAL_DIR_NAMES)
    names = [normal_dir] if isinstance(normal_dir, str) else list(normal_dir)
    return frozenset(name.casefold() for name in names)


def _is_mask_dir(name: str) -> bool:
    return name.casefold() in MASK_DIR_NAMES


def _detect_folder_categories(root: Path, normal_names: frozenset[str]) -> dict[str, Path]:
    """``{category: folder}``: flat if ``root`` has image folders of its own, otherwise one level down."""
    children = [name for name in _list_subdirs(root) if not _is_mask_dir(name)]
    if any(name.casefold() in normal_names for name in children) or any(_list_images(root / c) for c in children):
        return {root.name: root}
    categories = {
        child: root / child
        for child in children
        if any(_list_images(root / child / name) for name in _list_subdirs(root / child) if not _is_mask_dir(name))
    }
    if not categories:
        raise _FOLDER_DOC.error(f"no image folders found in {root}/ or one level below it.", root / "good")
    return categories


class _MaskIndex:
    """Masks of one category, by placement: beside the image, mirrored per defect folder, or one flat folder."""

    def __init__(self, mask_roots: Sequence[Path], doc: LayoutDoc, ignored: list[IgnoredFile]) -> None:
        self.doc = doc
        self.mirrored: dict[str, dict[str, Path]] = {}
        flat: list[Path] = []
        for mask_root in mask_roots:
            scan = scan_folder(mask_root, recursive=False)
            flat += scan.images + scan.masks  # every image file in a mask folder is a mask
            ignored += [item for item in scan.ignored if item.reason != "sub-folder not read"]
            for defect in _list_subdirs(mask_root):
                nested = scan_folder(mask_root / defect, recursive=False)
                ignored += nested.ignored
                index = _index_masks(nested.images + nested.masks, doc)
                self.mirrored.setdefault(defect, {}).update(index)
        self.flat = _index_masks(flat, doc)
        self.flat_users: dict[str, list[Path]] = {}
        self.used: set[Path] = set()

    def find(self, image: Path, defect: str, beside: Mapping[str, Path]) -> Path | None:
        key = image.stem.casefold()
        mask = beside.get(key) or self.mirrored.get(defect, {}).get(key)
        if mask is None and key in self.flat:
            mask = self.flat[key]
            self.flat_users.setdefault(key, []).append(image)
        if mask is not None:
            self.used.add(mask)
        return mask

    def finish(self, ignored: list[IgnoredFile]) -> None:
        """Refuses a flat mask claimed by two images; lists the masks no image used."""
        for key, users in self.flat_users.items():
            if len(users) > 1:
                raise self.doc.error(
                    f"the flat mask {self.flat[key]} matches {len(users)} images ({', '.join(map(str, users))}); "
                    "put the masks in one folder per defect (masks/<defect>/<stem>.png) instead.",
                    self.flat[key],
                )
        every = list(self.flat.values()) + [mask for index in self.mirrored.values() for mask in index.values()]
        ignored += [IgnoredFile(mask, _MASK_WITHOUT_IMAGE) for mask in every if mask not in self.used]


def _folder_class_rows(
    folder: Path,
    category: str,
    defect_type: str,
    masks: _MaskIndex | None,
    ignored: list[IgnoredFile],
    *,
    recursive: bool = False,
    mask_defect: str | None = None,
) -> list[_Row]:
    """Rows of one class folder: ``defect_type="good"`` for normal folders (never a mask), else anomalous."""
    scan = scan_folder(folder, recursive=recursive)
    ignored += scan.ignored
    if defect_type == NORMAL_DEFECT_TYPE:
        ignored += [IgnoredFile(mask, "mask in a folder of normal images") for mask in scan.masks]
        return [_Row(category, NORMAL_DEFECT_TYPE, image, None) for image in scan.images]
    beside = _index_masks(scan.masks, _FOLDER_DOC)
    used = set()
    rows = []
    for image in scan.images:
        mask = masks.find(image, mask_defect or folder.name, beside) if masks else beside.get(image.stem.casefold())
        used.add(mask)
        rows.append(_Row(category, defect_type, image, mask))
    ignored += [IgnoredFile(mask, _MASK_WITHOUT_IMAGE) for mask in scan.masks if mask not in used]
    return rows


def _folder_category_rows(
    category_dir: Path, category: str, normal_names: frozenset[str], ignored: list[IgnoredFile]
) -> list[_Row]:
    names = _list_subdirs(category_dir)
    masks = _MaskIndex([category_dir / name for name in names if _is_mask_dir(name)], _FOLDER_DOC, ignored)
    rows: list[_Row] = []
    for name in names:
        if _is_mask_dir(name):
            continue
        defect_type = NORMAL_DEFECT_TYPE if name.casefold() in normal_names else name
        rows += _folder_class_rows(category_dir / name, category, defect_type, masks, ignored)
    masks.finish(ignored)
    return rows


# --------------------------------------------------------------------------------------------------
# Row builders: one per strategy of mrad_hf.data.layouts, run by the one generic loader
# --------------------------------------------------------------------------------------------------

_Listing = tuple[list[_Row], Path, Path]  # rows, the folder named when there are none, the root of the ids


def _class_folder_rows(layout: DatasetLayout, root: Path, folders: Mapping[str, Path], split: str) -> _Listing:
    strategy: ClassFolders = layout.rows
    rows: list[_Row] = []
    for category, folder in folders.items():
        category_dir = _require_dir(folder, layout)
        ground_truth = None if strategy.ground_truth is None else category_dir / strategy.ground_truth
        rows += _class_dir_rows(
            _require_dir(category_dir / split, layout),
            category,
            layout,
            normal_dir=strategy.normal,
            mask_dir_for=None if ground_truth is None else _masks_per_defect(ground_truth),
        )
    return rows, root, root


def _class_folder_categories(layout: DatasetLayout, root: Path) -> dict[str, Path]:
    found = {name: root / name for name in _list_subdirs(root) if (root / name / "test").is_dir()}
    if not found:
        raise layout.error(f"no category folder with a test/ sub-folder under {root}/.", root)
    return found


def _read_csv_rows(path: Path, columns: Sequence[str], doc: LayoutDoc) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` for every data row of the csv at ``path``, which must have ``columns``."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in columns if name not in header]
        if missing:
            raise doc.error(f"{path} lacks the column(s) {', '.join(missing)}; it has {', '.join(header)}.", path)
        return [
            (reader.line_num, {key.strip(): (value or "").strip() for key, value in row.items() if key})
            for row in reader
        ]


def _csv_file(
    root: Path, record: Mapping[str, str], column: str, layout: DatasetLayout, csv_path: Path, line: int
) -> Path:
    """The existing file that ``record[column]`` (line ``line`` of ``csv_path``) names inside ``root``: the one rule
    for paths read from a file, :func:`path_in_root`."""
    try:
        return _require_file(path_in_root(root, record[column]), layout)
    except (PathOutsideRoot, OSError) as error:  # OSError: a name the system refuses (too long)
        problem = f"{csv_path} line {line}: the {column} path {record[column]!r} is not a file inside the dataset root"
        raise layout.error(
            f"{problem} {root}/ ({error}); csv paths must be relative to the root and stay inside it.", csv_path
        ) from None


def _csv_row(root: Path, line: int, record: Mapping[str, str], layout: DatasetLayout, csv_path: Path) -> _Row:
    label = record["label"]
    if label not in LABEL_NAMES:
        raise layout.error(f"unknown label {label!r} in {csv_path} line {line} (expected 'normal' or 'anomaly').")
    image = _csv_file(root, record, "image", layout, csv_path, line)
    if label == "normal":
        return _Row(record["object"], NORMAL_DEFECT_TYPE, image, None)
    if not record["mask"]:
        raise layout.error(f"anomalous image {record['image']} has no mask entry in {csv_path} line {line}.")
    return _Row(
        record["object"], UNSPECIFIED_DEFECT_TYPE, image, _csv_file(root, record, "mask", layout, csv_path, line)
    )


def _split_csv_rows(layout: DatasetLayout, root: Path, folders: Mapping[str, Path], split: str) -> _Listing:
    strategy: SplitCsv = layout.rows
    csv_path = root / strategy.csv
    if not csv_path.is_file() and (next(iter(folders.values())) / "test").is_dir():
        _check_split(split, TRAIN_TEST, layout)
        return _class_folder_rows(replace(layout, rows=strategy.converted), root, folders, split)
    records = _read_csv_rows(_require_file(csv_path, layout), strategy.columns, layout)
    _check_split(split, sorted({record["split"] for _, record in records}), layout)
    selected = [(line, record) for line, record in records if record["split"] == split and record["object"] in folders]
    rows = [_csv_row(root, line, record, layout, csv_path) for line, record in selected]
    found = {row.category for row in rows}
    absent = [category for category in folders if category not in found]
    if absent:
        raise layout.error(f"{csv_path} has no {split!r} rows for {', '.join(absent)}.", csv_path)
    return rows, root, root


def _mask_is_empty(path: Path) -> bool:
    from ..models.mrad.image_processing_mrad import load_mask  # raises MRADInputError naming an unreadable mask

    return not load_mask(path).any()


def _masks_beside_rows(layout: DatasetLayout, root: Path, folders: Mapping[str, Path], split: str) -> _Listing:
    strategy: MasksBeside = layout.rows
    split_dir = root / split
    if (root / layout.categories[0]).is_dir() or not split_dir.is_dir():
        return _class_folder_rows(replace(layout, rows=strategy.converted), root, folders, split)
    (category,) = folders
    files = _list_images(split_dir)
    masks = _index_masks((path for path in files if _has_mask_suffix(path)), layout)
    rows = []
    for image in (path for path in files if not _has_mask_suffix(path)):
        mask = masks.get(image.stem.casefold())
        if mask is None:
            raise layout.error(f"no ground truth for {image}.", split_dir / f"{image.stem}_GT.png")
        normal = _mask_is_empty(mask)
        rows.append(
            _Row(category, NORMAL_DEFECT_TYPE if normal else UNSPECIFIED_DEFECT_TYPE, image, None if normal else mask)
        )
    return rows, split_dir, root


def _label_folder_rows(layout: DatasetLayout, root: Path, folders: Mapping[str, Path], split: str) -> _Listing:
    strategy: LabelFolder = layout.rows
    rows = []
    for category, folder in folders.items():
        split_dir = _require_dir(_require_dir(folder, layout) / dict(strategy.split_dirs)[split], layout)
        masks = _index_masks(_list_images(_require_dir(split_dir / strategy.label, layout)), layout)
        images = _list_images(split_dir)
        orphans = sorted(set(masks) - {image.stem.casefold() for image in images})
        if orphans:
            problem = f"label {masks[orphans[0]]} has no image in {split_dir}/."
            raise layout.error(problem, split_dir / f"{orphans[0]}.PNG")
        for image in images:
            mask = masks.get(image.stem.casefold())
            rows.append(_Row(category, NORMAL_DEFECT_TYPE if mask is None else UNSPECIFIED_DEFECT_TYPE, image, mask))
    return rows, root, root


def _named_class_rows(layout: DatasetLayout, root: Path, folders: Mapping[str, Path], split: str) -> _Listing:
    strategy: NamedClasses = layout.rows
    (category,) = folders
    nested = None if strategy.nested is None else root / strategy.nested
    base = nested if nested is not None and nested.is_dir() else root
    rows = _class_dir_rows(
        base, category, layout, normal_dir=strategy.normal, class_dirs=strategy.classes, rename=dict(strategy.rename)
    )
    return rows, base, base


def _image_mask_rows(layout: DatasetLayout, root: Path, folders: Mapping[str, Path], split: str) -> _Listing:
    strategy: ImageMaskFolders = layout.rows
    (category,) = folders
    existing = [(images, masks) for images, masks in strategy.pairs if (root / images).is_dir()]
    image_dir_name, mask_dir_name = (existing or strategy.pairs)[0]
    images = _list_images(_require_dir(root / image_dir_name, layout))
    masks = _pair_masks(images, root / mask_dir_name, layout) if images else []
    rows = [_Row(category, UNSPECIFIED_DEFECT_TYPE, image, mask) for image, mask in zip(images, masks, strict=True)]
    return rows, root / image_dir_name, root


def _shared_mask_rows(layout: DatasetLayout, root: Path, folders: Mapping[str, Path], split: str) -> _Listing:
    strategy: SharedMaskFolder = layout.rows
    (category,) = folders
    if strategy.classes is None:  # the root holds the classes and the mask folder
        mask_dir = _require_dir(root / strategy.masks, layout)
        rows = _class_dir_rows(root, category, layout, exclude=(strategy.masks,), mask_dir_for=_shared_masks(mask_dir))
        return rows, root, root
    base = root / category
    if not base.is_dir() and strategy.otherwise is not None:
        return _image_mask_rows(replace(layout, rows=strategy.otherwise), root, folders, split)
    classes = _require_dir(base / strategy.classes, layout)
    return _class_dir_rows(classes, category, layout, mask_dir_for=_shared_masks(base / strategy.masks)), classes, root


def _user_folder_rows(
    layout: DatasetLayout,
    root: Path,
    folders: Mapping[str, Path],
    split: str,
    *,
    normal_dir: str | Sequence[str] | None = None,
) -> _Listing:
    normal_names = _normal_names(normal_dir)
    ignored: list[IgnoredFile] = []
    rows = [
        row for name, folder in folders.items() for row in _folder_category_rows(folder, name, normal_names, ignored)
    ]
    _warn_ignored(ignored, root, stacklevel=5)
    return rows, root, root


def _user_folder_categories(
    layout: DatasetLayout, root: Path, *, normal_dir: str | Sequence[str] | None = None
) -> dict[str, Path]:
    return _detect_folder_categories(root, _normal_names(normal_dir))


_ROW_BUILDERS: Mapping[type, Callable[..., _Listing]] = {
    ClassFolders: _class_folder_rows,
    SplitCsv: _split_csv_rows,
    MasksBeside: _masks_beside_rows,
    LabelFolder: _label_folder_rows,
    NamedClasses: _named_class_rows,
    ImageMaskFolders: _image_mask_rows,
    SharedMaskFolder: _shared_mask_rows,
    UserFolders: _user_folder_rows,
}
"""Strategy type -> ``(layout, root, {category: folder}, split, **options) -> (rows, searched, id root)``."""

_CATEGORY_FINDERS: Mapping[type, Callable[..., dict[str, Path]]] = {
    ClassFolders: _class_folder_categories,
    UserFolders: _user_folder_categories,
}
"""For layouts with ``categories=None``: strategy type -> ``(layout, root, **options) -> {category: folder}``."""

_LAYOUTS_BY_KEY: Mapping[str, DatasetLayout] = {layout.key: layout for layout in LAYOUTS}
_ALIASES: Mapping[str, str] = {alias: layout.key for layout in LAYOUTS for alias in layout.aliases}


def _layout_key(name: str, known: Iterable[str]) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in known:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(known)}.")
    return key


def load_dataset_layout(
    name: str,
    root: str | os.PathLike[str],
    categories: Sequence[str] | str | None = None,
    split: str = "test",
    **options: Any,
) -> Dataset:
    """Loads ``split`` of the dataset under ``root`` as its row of :data:`~mrad_hf.data.layouts.LAYOUTS` describes it.

    The one loader behind every ``load_<dataset>``: it checks the split, selects the categories (all of the row's, or
    those found on disk), requires ``root``, lists the rows with the row's strategy and builds the dataset.

    Args:
        name: A layout key or alias (``"mvtec"``, ``"SDD"``, ...; case-insensitive).
        root: The dataset folder.
        categories: A subset of the layout's categories; ``None`` loads (and requires) all of them.
        split: One of the layout's splits (``"test"``, the MRAD protocol, everywhere).
        **options: Strategy options (``normal_dir`` for ``"folder"``).

    Returns:
        The split as a ``datasets.Dataset`` with :data:`LOADER_FEATURES`, sorted by ``(category, defect_type, path)``.

    Raises:
        DatasetLayoutError: If a folder, file or mask is missing (the message shows the expected tree and the fix).
        ValueError: For an unknown dataset, category or split.
    """
    layout = _LAYOUTS_BY_KEY[_layout_key(name, _LAYOUTS_BY_KEY)]
    if layout.splits is not None:
        _check_split(split, layout.splits, layout)
    selected = None if layout.categories is None else _select_categories(categories, layout.categories, layout.name)
    directory = _require_dir(_absolute(root), layout)
    if selected is None:
        found = _CATEGORY_FINDERS[type(layout.rows)](layout, directory, **options)
        folders = {category: found[category] for category in _select_categories(categories, tuple(found), layout.name)}
    else:
        folders = {category: directory / category for category in selected}
    rows, searched, base = _ROW_BUILDERS[type(layout.rows)](layout, directory, folders, split, **options)
    return _build_dataset(rows, layout, searched, base)


def _bound_loader(key: str, function_name: str) -> DatasetLoader:
    """:func:`load_dataset_layout` bound to one row, named and documented from the row's data."""
    layout = _LAYOUTS_BY_KEY[key]

    def load(root: str | os.PathLike[str], categories: Sequence[str] | None = None, split: str = "test") -> Dataset:
        return load_dataset_layout(key, root, categories, split)

    def wrapped(text: str, indent: int) -> str:
        return textwrap.indent(textwrap.fill(text, 116 - indent), " " * indent) + "\n"

    categories = ", ".join(layout.categories) if layout.categories else "the categories found on disk"
    load.__name__ = load.__qualname__ = function_name
    load.__doc__ = "".join(
        [
            f"Loads {layout.name}: :func:`load_dataset_layout` with its ``LAYOUTS`` row ``{key!r}``.\n\n",
            wrapped(layout.notes, 4) + "\n" if layout.notes else "",
            "    Layout under ``root``::\n\n" + textwrap.indent(layout.tree.strip("\n"), " " * 8) + "\n\n    Args:\n",
            "        root: The folder shown as ``<root>``.\n",
            wrapped(f"categories: A subset of {categories}; ``None`` loads all of them.", 8),
            f"        split: One of {', '.join(layout.splits or TRAIN_TEST)}.\n\n    Returns:\n",
            "        The split as a ``datasets.Dataset`` with :data:`LOADER_FEATURES`.\n",
            f"\n    Licence (as far as known here): {layout.licence}.\n" if layout.licence else "",
        ]
    )
    return load


def load_folder(
    root: str | os.PathLike[str],
    categories: Sequence[str] | None = None,
    split: str = "test",
    *,
    normal_dir: str | Sequence[str] | None = None,
) -> Dataset:
    """Loads your own data from a documented folder format (see also ``docs/own-data.md``).

    Layout (any image extension in :data:`IMAGE_EXTENSIONS`, any case)::

        <root>/
          good/*.png                    normal images; normal/, nominal/ and ok/ count as normal too
          <defect>/*.png                anomalous images; the folder name is the defect type
        masks, optional, in any of three placements (the first one found wins):
          <defect>/<stem>_mask.png      beside the image
          masks/<defect>/<stem>.png     a mirror of the defect folders (``<stem>_mask.png`` works too)
          masks/<stem>.png              one flat folder; stems must then be unique across defect folders

    ``ground_truth/`` or ``gt/`` may stand for ``masks/``. A mask folder is never a defect class, and no
    mask is ever read as an image: the rule is :func:`classify_file` (stem ending in ``_mask``, or inside a
    ``ground_truth`` / ``masks`` / ``gt`` folder), which ``mrad predict`` and ``mrad bank add`` use too.
    An anomalous image without a mask gets ``mask=None`` (evaluation leaves it out of the pixel metrics and
    reports how many). Normal images never get a mask. What was not read (unsupported extensions, masks
    without an image, symlink loops, FIFOs, unreadable files, nested folders) is reported in one
    :class:`IgnoredFilesWarning` line.

    Categories: if ``<root>`` has a normal folder or any sub-folder with images in it, it is one category,
    named after ``<root>`` itself; name the folder after the object (``screw``, ``pcb``), since evaluation
    tables are reported per category. Otherwise every sub-folder of ``<root>`` that follows the layout
    above is one category (``<root>/<category>/good/...``).

    Args:
        root: The folder described above.
        categories: Subset of the detected categories; ``None`` loads all.
        split: Only ``"test"`` (the format has no train split).
        normal_dir: Name(s) of the folders of normal images; default :data:`NORMAL_DIR_NAMES`.

    Returns:
        A ``datasets.Dataset`` with :data:`LOADER_FEATURES`.
    """
    return load_dataset_layout("folder", root, categories, split, normal_dir=normal_dir)


# --------------------------------------------------------------------------------------------------
# Explicit folders (anomalib's Folder datamodule: normal_dir, abnormal_dir, mask_dir)
# --------------------------------------------------------------------------------------------------

_FOLDERS_DOC = LayoutDoc(
    "folders",
    """
--normal-dir DIR     normal images (repeatable; globs such as 'lines/*/good' allowed)
--abnormal-dir DIR   anomalous images; the folder name is the defect type (repeatable, globs)
--mask-dir DIR       masks, matched to anomalous images by stem (<stem>.png or <stem>_mask.png);
                     one --mask-dir per --abnormal-dir (same order) pairs them folder by folder
relative folders are read under --data-root when it is given
""",
    "name existing folders (check the spelling and the glob) and give at least one --abnormal-dir and, for "
    "evaluation, one --normal-dir.",
    "folder",
)


def _expand_dirs(patterns: Sequence[str | os.PathLike[str]], base: Path | None, option: str) -> list[Path]:
    """Folders named by ``patterns`` (globs allowed), relative ones under ``base``; each must match a folder."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    folders: list[Path] = []
    for pattern in patterns:
        text = os.path.expanduser(os.fspath(pattern))
        if base is not None and not os.path.isabs(text):
            text = os.path.join(base, text)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        matched = [_absolute(match) for match in matches if os.path.isdir(match)]
        if not matched:
            problem = f"{option} {os.fspath(pattern)!r} matches no folder (looked for {text})."
            raise _FOLDERS_DOC.error(problem, Path(text))
        folders += [folder for folder in matched if folder not in folders]
    return folders


def load_folders(
    normal_dirs: Sequence[str | os.PathLike[str]] = (),
    abnormal_dirs: Sequence[str | os.PathLike[str]] = (),
    mask_dirs: Sequence[str | os.PathLike[str]] = (),
    *,
    root: str | os.PathLike[str] | None = None,
    category: str | None = None,
) -> Dataset:
    """Loads images from explicitly named folders, as anomalib's ``Folder`` datamodule does.

    Every image under a normal folder (recursively) is normal. Every image under an abnormal folder is
    anomalous, with the folder name as ``defect_type``. Masks come from ``mask_dirs`` (matched by stem, with or
    without ``_mask``) or from ``<stem>_mask.png`` files beside the images; with as many mask folders as
    abnormal folders they are paired in order, otherwise the mask folders are pooled. Files are classified by
    :func:`classify_file`, so a mask beside an image is never read as an image.

    Args:
        normal_dirs, abnormal_dirs, mask_dirs: Folders or glob patterns; relative ones are read under ``root``.
        root: The dataset root: relative folders are read under it and the ``id`` column is relative to it
            (default: the folders' common parent).
        category: The ``category`` of every row (default: the name of ``root``, or of the common parent).

    Returns:
        A ``datasets.Dataset`` with :data:`LOADER_FEATURES`.
    """
    base = None if root is None else _require_dir(_absolute(root), _FOLDERS_DOC)
    normals = _expand_dirs(normal_dirs, base, "--normal-dir")
    abnormals = _expand_dirs(abnormal_dirs, base, "--abnormal-dir")
    mask_folders = _expand_dirs(mask_dirs, base, "--mask-dir")
    if not normals and not abnormals:
        raise _FOLDERS_DOC.error("no --normal-dir or --abnormal-dir was given.")
    if mask_folders and not abnormals:
        raise _FOLDERS_DOC.error("--mask-dir needs an --abnormal-dir: masks belong to anomalous images.")
    both = set(normals) & set(abnormals)
    if both:
        raise _FOLDERS_DOC.error(f"{sorted(both)[0]} is given as both a normal and an abnormal folder.")
    folders = normals + abnormals + mask_folders
    dataset_root = base if base is not None else Path(os.path.commonpath([str(folder) for folder in folders]))
    if len(folders) == 1 or dataset_root in folders:
        dataset_root = dataset_root.parent if base is None else dataset_root
    name = category or dataset_root.name or "folders"
    ignored: list[IgnoredFile] = []
    rows: list[_Row] = []
    for folder in normals:
        rows += _folder_class_rows(folder, name, NORMAL_DEFECT_TYPE, None, ignored, recursive=True)
    paired = len(mask_folders) == len(abnormals) > 1
    shared = None if paired or not mask_folders else _MaskIndex(mask_folders, _FOLDERS_DOC, ignored)
    for index, folder in enumerate(abnormals):
        masks = _MaskIndex([mask_folders[index]], _FOLDERS_DOC, ignored) if paired else shared
        defect = folder.name if folder.name != NORMAL_DEFECT_TYPE else UNSPECIFIED_DEFECT_TYPE  # "good" means normal
        rows += _folder_class_rows(folder, name, defect, masks, ignored, recursive=True, mask_defect="")
        if paired and masks is not None:
            masks.finish(ignored)
    if shared is not None:
        shared.finish(ignored)
    seen: dict[Path, str] = {}
    for row in rows:
        if row.image in seen and seen[row.image] != row.defect_type:
            raise _FOLDERS_DOC.error(f"{row.image} is in two of the named folders; name each image once.", row.image)
        seen[row.image] = row.defect_type
    _warn_ignored(ignored, dataset_root)
    unique = list({row.image: row for row in rows}.values())
    return _build_dataset(unique, _FOLDERS_DOC, dataset_root, dataset_root)


_LOADER_NAMES: Mapping[str, str] = {
    "dtd": "load_dtd_synthetic",
    "mvtec-layout": "load_mvtec_layout",
}  # else load_<key>
DATASET_LOADERS: dict[str, DatasetLoader] = {
    layout.key: load_folder
    if layout.key == "folder"
    else _bound_loader(layout.key, _LOADER_NAMES.get(layout.key, f"load_{layout.key}"))
    for layout in LAYOUTS
}
"""Dataset name -> loader, one per :data:`LAYOUTS` row, in order; each takes ``(root, categories, split)``."""

load_mvtec = DATASET_LOADERS["mvtec"]
load_visa = DATASET_LOADERS["visa"]
load_mpdd = DATASET_LOADERS["mpdd"]
load_btad = DATASET_LOADERS["btad"]
load_ksdd2 = DATASET_LOADERS["ksdd2"]
load_dagm = DATASET_LOADERS["dagm"]
load_dtd_synthetic = DATASET_LOADERS["dtd"]
load_headct = DATASET_LOADERS["headct"]
load_brainmri = DATASET_LOADERS["brainmri"]
load_br35h = DATASET_LOADERS["br35h"]
load_isic = DATASET_LOADERS["isic"]
load_clinicdb = DATASET_LOADERS["clinicdb"]
load_colondb = DATASET_LOADERS["colondb"]
load_kvasir = DATASET_LOADERS["kvasir"]
load_endo = DATASET_LOADERS["endo"]
load_mvtec_layout = DATASET_LOADERS["mvtec-layout"]


def load_benchmark(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    normal_dirs: Sequence[str | os.PathLike[str]] = (),
    abnormal_dirs: Sequence[str | os.PathLike[str]] = (),
    mask_dirs: Sequence[str | os.PathLike[str]] = (),
    **kwargs: Any,
) -> Dataset:
    """Loads a benchmark by name (case-insensitive; the MRAD spellings ``SDD``, ``ISBI`` and ``Br35`` work too).

    Args:
        name: A key of :data:`DATASET_LOADERS`.
        root: The dataset folder (optional with explicit folders, which are then read relative to it).
        normal_dirs, abnormal_dirs, mask_dirs: Explicit folders (globs allowed), as anomalib's ``Folder``
            takes them; only with ``name="folder"`` (see :func:`load_folders`).
        **kwargs: Passed on to the loader (``categories``, ``split``, ...).

    Returns:
        The loaded ``datasets.Dataset``.

    Raises:
        ValueError: If ``name`` is unknown; the message lists the known names.
    """
    key = _layout_key(name, DATASET_LOADERS)
    if normal_dirs or abnormal_dirs or mask_dirs:
        if key != "folder":
            raise ValueError(
                f"--normal-dir / --abnormal-dir / --mask-dir name your own folders; use them with --dataset folder, "
                f"not {name!r}."
            )
        categories = kwargs.pop("categories", None)
        _check_split(kwargs.pop("split", "test"), ("test",), _FOLDERS_DOC)
        if kwargs:
            raise TypeError(f"load_benchmark got unexpected arguments for explicit folders: {sorted(kwargs)}")
        category = None
        if categories:
            names = [categories] if isinstance(categories, str) else list(categories)
            if len(names) != 1:
                raise ValueError("explicit folders form one category; pass at most one --categories name.")
            category = names[0]
        return load_folders(normal_dirs, abnormal_dirs, mask_dirs, root=root, category=category)
    if root is None:
        raise ValueError(f"{name}: pass the dataset folder (--data-root), or explicit folders (--normal-dir ...).")
    return DATASET_LOADERS[key](root, **kwargs)
