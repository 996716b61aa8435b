# SPDX-License-Identifier: Apache-2.0
"""The benchmark folder layouts the loaders read, as data: one :class:`DatasetLayout` row per dataset.

MRAD (arXiv 2602.00522, Sec. 4.1) evaluates zero-shot on the test split of each benchmark below, laid out as the
official ``generate_dataset_json/*.py`` scripts expect, plus the accepted variants. A row names the dataset, the
tree and the fix shown in its errors, its categories (``None``: found on disk) and splits, its aliases, its
licence, and its row strategy: a small frozen dataclass (:class:`ClassFolders`, :class:`SplitCsv`, ...) that
says where images, masks and labels are. :func:`mrad_hf.data.loaders.load_dataset_layout` is the one loader that
runs a row; ``load_mvtec``, ``load_visa``, ... are that loader bound to one row. Nothing here touches the disk.

Each row's tree (``<root>`` is the folder passed as ``root``) is shown in its errors and in the docstring of its
``load_<dataset>``. The datasets: MVTec AD, VisA, MPDD, BTAD, KSDD2, DAGM, DTD-Synthetic, HeadCT, BrainMRI, Br35H,
ISIC 2016, CVC-ClinicDB, CVC-ColonDB, Kvasir-SEG and EndoTect, plus the generic ``folder`` format and any
``mvtec-layout`` folder for your own data.

Splits: ``train`` and ``test`` for mvtec, visa, mpdd, btad, ksdd2, dagm, dtd and mvtec-layout; ``test`` only for
the others. MRAD uses ``test`` everywhere. Licences are as far as known here: check each source before you
redistribute anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..models.mrad.image_processing_mrad import SUPPORTED_IMAGE_EXTENSIONS

__all__ = [
    "BR35H_CATEGORIES",
    "BRAINMRI_CATEGORIES",
    "BTAD_CATEGORIES",
    "CLINICDB_CATEGORIES",
    "COLONDB_CATEGORIES",
    "DAGM_CATEGORIES",
    "DTD_CATEGORIES",
    "ENDO_CATEGORIES",
    "HEADCT_CATEGORIES",
    "ISIC_CATEGORIES",
    "KSDD2_CATEGORIES",
    "KVASIR_CATEGORIES",
    "LAYOUTS",
    "MPDD_CATEGORIES",
    "MVTEC_CATEGORIES",
    "TRAIN_TEST",
    "VISA_CATEGORIES",
    "ClassFolders",
    "DatasetLayout",
    "DatasetLayoutError",
    "ImageMaskFolders",
    "LabelFolder",
    "LayoutDoc",
    "MasksBeside",
    "NamedClasses",
    "SharedMaskFolder",
    "SplitCsv",
    "UserFolders",
]


class DatasetLayoutError(ValueError):
    """A dataset folder does not have the expected layout.

    Attributes:
        missing: The file or folder that was missing or wrong, when one can be named.
    """

    def __init__(self, message: str, missing: Path | None = None) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class LayoutDoc:
    """What error messages say about one dataset: its name, expected tree and how to fix it."""

    name: str
    tree: str
    hint: str
    key: str = ""  # the DATASET_LOADERS name, written into every row's ``dataset`` column

    def error(self, problem: str, missing: Path | None = None) -> DatasetLayoutError:
        tree = "\n".join(f"    {line}" for line in self.tree.strip("\n").splitlines())
        message = f"{self.name}: {problem}\nExpected layout:\n{tree}\nWhat to do: {self.hint}"
        return DatasetLayoutError(message, missing)


# --------------------------------------------------------------------------------------------------
# Row strategies: where the images, masks and labels of one layout are (loaders._ROW_BUILDERS runs them)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassFolders:
    """MVTec AD style: ``<category>/<split>/{<normal>,<defect>}/*``, masks in ``<category>/<ground_truth>/<defect>/``.

    Every class folder other than ``normal`` is a defect and its name the ``defect_type``. ``ground_truth=None``:
    image-level labels only. Categories ``None`` in the layout: every sub-folder of the root with a ``test/``.
    """

    normal: str = "good"
    ground_truth: str | None = "ground_truth"


@dataclass(frozen=True)
class SplitCsv:
    """A csv of ``object, split, label, image, mask`` rows (paths relative to the root, label normal / anomaly).

    A path that is absolute or leaves the root (``..``, a symlink) is refused (``files.path_in_root``). Anomalous rows
    get ``defect_type="defect"``. Without the csv, a root with ``<root>/<category>/test/`` is read
    as ``converted`` (anomalib's converted VisA) with the splits ``train`` and ``test``.
    """

    csv: str = "split_csv/1cls.csv"
    columns: tuple[str, ...] = ("object", "split", "label", "image", "mask")
    converted: ClassFolders = ClassFolders()


@dataclass(frozen=True)
class MasksBeside:
    """``<split>/<id>.png`` with ``<id>_GT.png`` beside it; an all-black mask is a normal image (raw KSDD2).

    The label is read from the mask pixels (the only strategy that decodes while it builds). A root with
    ``<root>/<category>/``, or without ``<root>/<split>/``, is read as ``converted``.
    """

    converted: ClassFolders = ClassFolders()


@dataclass(frozen=True)
class LabelFolder:
    """``<category>/<split folder>/<id>`` with the masks of anomalous images in ``<split folder>/<label>/`` (DAGM).

    An image is anomalous exactly when it has a mask (``defect_type="defect"``); a mask without an image is an error.
    """

    split_dirs: tuple[tuple[str, str], ...] = (("test", "Test"), ("train", "Train"))
    label: str = "Label"


@dataclass(frozen=True)
class NamedClasses:
    """``[<nested>/]{<normal>, <other classes>}/*``, image labels only; ``<nested>/`` is used when it exists."""

    normal: str = "no"
    classes: tuple[str, ...] = ("no", "yes")
    rename: tuple[tuple[str, str], ...] = (("yes", "tumor"),)  # folder name -> defect_type
    nested: str | None = None


@dataclass(frozen=True)
class ImageMaskFolders:
    """Every image in the first existing ``(images, masks)`` folder pair is anomalous; masks are matched by name."""

    pairs: tuple[tuple[str, str], ...] = (("images", "masks"), ("Original", "Ground Truth"))


@dataclass(frozen=True)
class SharedMaskFolder:
    """``<classes>/<class>/*`` (``good`` = normal, any other folder a defect) with all masks in one ``masks`` folder.

    ``classes=None``: the classes are the root's own sub-folders except ``masks``, which must exist (EndoTect).
    Otherwise they are in ``<root>/<category>/<classes>/`` with the masks in ``<root>/<category>/<masks>/`` (MRAD's
    ISIC layout); without ``<root>/<category>/`` the root is read as ``otherwise``.
    """

    masks: str = "masks"
    classes: str | None = None
    otherwise: ImageMaskFolders | None = None


@dataclass(frozen=True)
class UserFolders:
    """The documented folder format for your own data (see ``load_folder``): categories found on disk."""


RowStrategy = (
    ClassFolders
    | SplitCsv
    | MasksBeside
    | LabelFolder
    | NamedClasses
    | ImageMaskFolders
    | SharedMaskFolder
    | UserFolders
)


@dataclass(frozen=True)
class DatasetLayout(LayoutDoc):
    """One supported dataset: how errors describe it, what it holds, and the strategy that lists its rows."""

    categories: tuple[str, ...] | None = None  # None: found on disk by the strategy
    splits: tuple[str, ...] | None = ("test",)  # None: the strategy checks the split (VisA's csv lists its own)
    rows: RowStrategy = ClassFolders()
    aliases: tuple[str, ...] = ()  # other names load_benchmark accepts (lower case)
    notes: str = ""  # what the loader's docstring adds to the tree
    licence: str = ""


# --------------------------------------------------------------------------------------------------
# Categories
# --------------------------------------------------------------------------------------------------

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
VISA_CATEGORIES: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip
MPDD_CATEGORIES: tuple[str, ...] = (
    "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes",
)  # fmt: skip
BTAD_CATEGORIES: tuple[str, ...] = ("01", "02", "03")
KSDD2_CATEGORIES: tuple[str, ...] = ("electrical commutators",)
DAGM_CATEGORIES: tuple[str, ...] = tuple(f"Class{index}" for index in range(1, 11))
DTD_CATEGORIES: tuple[str, ...] = (
    "Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099", "Woven_068",
    "Woven_125", "Marbled_078", "Perforated_037", "Mesh_114", "Fibrous_183", "Matted_069",
)  # fmt: skip
HEADCT_CATEGORIES = BRAINMRI_CATEGORIES = BR35H_CATEGORIES = ("brain",)
ISIC_CATEGORIES: tuple[str, ...] = ("skin",)
CLINICDB_CATEGORIES = COLONDB_CATEGORIES = KVASIR_CATEGORIES = ENDO_CATEGORIES = ("colon",)

TRAIN_TEST = ("train", "test")
_ISIC_GT = "ISBI2016_ISIC_Part1_Test_GroundTruth"
_ISIC_DATA = "ISBI2016_ISIC_Part1_Test_Data"
_CC_BY_NC_SA = "CC BY-NC-SA 4.0"
_KAGGLE = "a Kaggle upload with per-upload terms; not verified here"


def _mvtec_tree(categories: tuple[str, ...], normal: str, defect: str, mask: str | None, train: bool = True) -> str:
    lines = ["<root>/", f"  <category>/          one of {', '.join(categories)}"]
    if train:
        lines.append(f"    train/{normal}/*.png")
    lines += [f"    test/{normal}/*.png", f"    test/{defect}/*.png"]
    if mask is not None:
        lines.append(f"    ground_truth/{defect}/{mask}")
    return "\n".join(lines)


_MVTEC_TREE = dict(normal="good", defect="<defect>", mask="<id>_mask.png")


def _colon(name: str, key: str, source: str, licence: str, notes: str = "") -> DatasetLayout:
    tree = """
<root>/
  images/*.png     every image shows a polyp (anomalous)
  masks/*.png      same file names as images/
or the original CVC folders:
  Original/*.tif, Ground Truth/*.tif
"""
    hint = f"pass the folder that contains images/ and masks/ as root ({source})."
    return DatasetLayout(name, tree, hint, key, ("colon",), rows=ImageMaskFolders(), notes=notes, licence=licence)


# --------------------------------------------------------------------------------------------------
# The registry (DATASET_LOADERS keeps this order)
# --------------------------------------------------------------------------------------------------

LAYOUTS: tuple[DatasetLayout, ...] = (
    DatasetLayout(
        "MVTec AD",
        _mvtec_tree((*MVTEC_CATEGORIES[:3], "..."), **_MVTEC_TREE),
        "extract mvtec_anomaly_detection.tar.xz and pass the folder that contains bottle/, cable/, ... as root.",
        "mvtec",
        MVTEC_CATEGORIES,
        TRAIN_TEST,
        aliases=("mvtec_ad", "mvtec-ad"),
        notes="``train`` holds ``train/good`` only.",
        licence=f"{_CC_BY_NC_SA} (Bergmann et al., IJCV 2021)",
    ),
    DatasetLayout(
        "VisA",
        """
<root>/                          (the VisA_20220922 folder)
  split_csv/1cls.csv             columns: object,split,label,image,mask
  candle/Data/Images/Normal/*.JPG
  candle/Data/Images/Anomaly/*.JPG
  candle/Data/Masks/Anomaly/*.png
  ...                            (12 objects; csv paths are relative to <root>)
or anomalib's converted visa_pytorch folder:
  candle/{train/good, test/{good,bad}, ground_truth/bad/*.png}
""",
        "extract VisA_20220922.tar and pass the folder that contains split_csv/ as root; split_csv/1cls.csv "
        "is also in the amazon-science/spot-diff repository.",
        "visa",
        VISA_CATEGORIES,
        None,
        SplitCsv(),
        notes="The official ``split_csv/1cls.csv`` is the split MRAD uses. **VisA masks are not binary** (0 plus "
        "small defect ids): binarise with ``mask > 0`` (``binarize_mask`` / ``with_binary_masks``). The converted "
        'layout\'s anomalous rows get ``defect_type="bad"``.',
        licence="CC BY 4.0 (amazon-science/spot-diff)",
    ),
    DatasetLayout(
        "MPDD",
        _mvtec_tree((*MPDD_CATEGORIES[:2], "..."), **_MVTEC_TREE),
        "download MPDD (github.com/stepanje/MPDD) and pass the folder that contains bracket_black/, ... as root.",
        "mpdd",
        MPDD_CATEGORIES,
        TRAIN_TEST,
        licence=f"{_CC_BY_NC_SA} (stepanje/MPDD; not verified here)",
    ),
    DatasetLayout(
        "BTAD",
        _mvtec_tree(BTAD_CATEGORIES, "ok", "ko", "<id>.png   (01, 02: .png; 03: .bmp)"),
        "extract BTech_Dataset_transformed.zip and pass the folder that contains 01/, 02/, 03/ as root.",
        "btad",
        BTAD_CATEGORIES,
        TRAIN_TEST,
        ClassFolders(normal="ok"),
        notes='``ok`` rows get ``defect_type="good"``; ``ko`` rows keep ``"ko"``. The extensions differ per category '
        "(01: bmp / png masks, 02: png / png, 03: bmp / bmp), so masks are matched by stem.",
        licence=f"{_CC_BY_NC_SA} (as stated by anomalib)",
    ),
    DatasetLayout(
        "KSDD2",
        _mvtec_tree(KSDD2_CATEGORIES, "good", "<defect>", "<id>[_mask].png")
        + "\nor the raw KolektorSDD2 archive:\n<root>/\n  train/<id>.png, train/<id>_GT.png\n"
        "  test/<id>.png, test/<id>_GT.png",
        "pass the folder that contains 'electrical commutators/' (MRAD's layout) or the raw KolektorSDD2 "
        "folder that contains train/ and test/ as root.",
        "ksdd2",
        KSDD2_CATEGORIES,
        TRAIN_TEST,
        MasksBeside(),
        aliases=("sdd",),
        notes="The reference calls it ``SDD``. Raw archive: normal images have an all-black ``_GT``, so the label "
        'comes from the mask pixels; normal rows get ``mask=None``, anomalous ones ``defect_type="defect"``.',
        licence=f"{_CC_BY_NC_SA} (ViCoS, University of Ljubljana; not verified here)",
    ),
    DatasetLayout(
        "DAGM",
        """
<root>/                          (e.g. DAGM_KaggleUpload)
  Class1/ ... Class10/
    Test/<id>.PNG
    Test/Label/<id>_label.PNG    one per defective image (Labels.txt is ignored)
    Train/<id>.PNG
    Train/Label/<id>_label.PNG
""",
        "pass the folder that contains Class1/ ... Class10/ as root (the Kaggle upload of DAGM 2007).",
        "dagm",
        DAGM_CATEGORIES,
        ("test", "train"),
        LabelFolder(),
        notes='An image is anomalous exactly when it has a label mask, as in the MRAD generator (``"defect"``).',
        licence="free for non-commercial research (HCI Heidelberg terms)",
    ),
    DatasetLayout(
        "DTD-Synthetic",
        _mvtec_tree((*DTD_CATEGORIES[:2], "..."), **_MVTEC_TREE),
        "download DTD-Synthetic (Aota et al., WACV 2023) and pass the folder that contains Woven_001/, ... as root.",
        "dtd",
        DTD_CATEGORIES,
        TRAIN_TEST,
        aliases=("dtd-synthetic", "dtd_synthetic"),
        licence="derived from DTD (research use), released by Aota et al. (WACV 2023); not verified here",
    ),
    DatasetLayout(
        "HeadCT",
        _mvtec_tree(HEADCT_CATEGORIES, "good", "<anomaly>", None, train=False) + "\n(image-level labels only)",
        "arrange the Kaggle 'Head CT - hemorrhage' images as brain/test/good/ (normal) and "
        "brain/test/<anomaly>/ (hemorrhage), as in the AnomalyCLIP/MRAD data release, and pass the folder "
        "that contains brain/ as root.",
        "headct",
        HEADCT_CATEGORIES,
        rows=ClassFolders(ground_truth=None),
        notes="Every folder under ``brain/test`` other than ``good`` is anomalous; ``mask`` is always ``None``.",
        licence=_KAGGLE,
    ),
    DatasetLayout(
        "BrainMRI",
        """
<root>/
  brain_tumor_dataset/no/*.jpg   normal
  brain_tumor_dataset/yes/*.jpg  tumour (image-level labels only)
or, without the brain_tumor_dataset/ level:
  no/*.jpg, yes/*.jpg
""",
        "extract the Kaggle 'Brain MRI Images for Brain Tumor Detection' archive and pass its folder as root.",
        "brainmri",
        BRAINMRI_CATEGORIES,
        rows=NamedClasses(nested="brain_tumor_dataset"),
        notes="``brain_tumor_dataset/`` (read by the MRAD generator) wins over top-level ``no/`` and ``yes/``; "
        '``yes`` rows get ``defect_type="tumor"``.',
        licence=_KAGGLE,
    ),
    DatasetLayout(
        "Br35H",
        """
<root>/
  no/*.jpg    normal
  yes/*.jpg   tumour (image-level labels only; pred/ and other folders are ignored)
""",
        "extract the Kaggle 'Br35H :: Brain Tumor Detection 2020' archive and pass the folder that contains no/ "
        "and yes/ as root.",
        "br35h",
        BR35H_CATEGORIES,
        rows=NamedClasses(),
        aliases=("br35",),
        notes="Only ``no`` and ``yes`` are read, so the unlabelled ``pred/`` folder of the Kaggle archive is ignored.",
        licence=_KAGGLE,
    ),
    DatasetLayout(
        "ISIC",
        f"""
<root>/
  skin/test/<specie>/*.jpg                      (good/ = normal, any other folder = lesion)
  skin/{_ISIC_GT}/<id>_Segmentation.png
or the raw ISBI 2016 Part 1 test archives:
  {_ISIC_DATA}/<id>.jpg
  {_ISIC_GT}/<id>_Segmentation.png
""",
        "pass the folder that contains skin/ (MRAD's layout) or the two extracted ISBI2016_ISIC_Part1_Test_* "
        "folders as root.",
        "isic",
        ISIC_CATEGORIES,
        rows=SharedMaskFolder(_ISIC_GT, "test", ImageMaskFolders(((_ISIC_DATA, _ISIC_GT),))),
        aliases=("isbi",),
        notes='In the raw archives every image is anomalous (``"defect"``); masks ``<id>_Segmentation.png`` are '
        "matched to ``<id>.jpg`` by name.",
        licence="ISIC Archive terms (CC-0 / CC BY-NC per image); not verified here",
    ),
    _colon(
        "CVC-ClinicDB",
        "clinicdb",
        "e.g. the PraNet TestDataset/CVC-ClinicDB folder",
        "research use only, cite Bernal et al.",
    ),  # fmt: skip
    _colon(
        "CVC-ColonDB",
        "colondb",
        "e.g. the PraNet TestDataset/CVC-ColonDB folder",
        "research use only, cite Bernal et al.",
    ),  # fmt: skip
    _colon(
        "Kvasir",
        "kvasir",
        "the extracted Kvasir-SEG folder or PraNet TestDataset/Kvasir",
        "research and education use, cite Jha et al. (2020)",
        "Kvasir-SEG masks are JPEGs, so they are not exactly binary: binarise with ``> 0`` like the reference.",
    ),
    DatasetLayout(
        "EndoTect",
        """
<root>/                          (EndoTect_2020_Segmentation_Test_Dataset)
  masks/*                        one mask per anomalous image, matched by file name
  <image folder>/*               e.g. images/; every folder except masks/ and good/ is anomalous
  good/*                         optional normal images
""",
        "pass the folder that contains masks/ and the image folder(s) as root.",
        "endo",
        ENDO_CATEGORIES,
        rows=SharedMaskFolder(),
        aliases=("endotect",),
        licence="challenge terms, cite Hicks et al. (2021)",
    ),
    DatasetLayout(
        "folder",
        """
<root>/                          one object; root's folder name is the category
  good/*.png                     normal images (or normal/, nominal/, ok/)
  <defect>/*.png                 anomalous images, one folder per defect kind
  <defect>/<stem>_mask.png       optional mask beside its image, or
  masks/<defect>/<stem>.png      a mirror of the defect folders (ground_truth/ works too), or
  masks/<stem>.png               one flat mask folder (stems unique across defects)
or, with several categories:
<root>/<category>/{good, <defect>, masks}/...
""",
        "arrange the images as above (any of "
        + " ".join(sorted({extension.lower() for extension in SUPPORTED_IMAGE_EXTENSIONS}))
        + ", any case) and pass <root>, or name the folders yourself with --normal-dir / --abnormal-dir / --mask-dir.",
        "folder",
        rows=UserFolders(),
    ),
    DatasetLayout(
        "MVTec-layout dataset",
        _mvtec_tree(("<any name>", "..."), **_MVTEC_TREE),
        "pass the folder that contains the category folders (each with test/ and ground_truth/) as root.",
        "mvtec-layout",
        splits=TRAIN_TEST,
        notes="For the synthetic benchmark (``mrad make-synthetic``) and data arranged like MVTec AD: every "
        "sub-folder of ``root`` that has a ``test/`` folder is a category.",
    ),
)
