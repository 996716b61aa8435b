# SPDX-License-Identifier: Apache-2.0
"""Finding and classifying the files of a user's folder: what is an image, what is a mask, what was not read.

MRAD (arXiv 2602.00522, Sec. 4.1) reads benchmark test splits and your own folders from disk; every entry point
(the dataset loaders, ``mrad predict`` / ``explain`` / ``calibrate`` folder inputs, ``mrad bank add --images``)
lists files through this module, so they agree on one rule. :func:`classify_file` says whether a file is an image,
a mask (stem ending in ``_mask``, or inside a ``ground_truth`` / ``masks`` / ``gt`` folder) or not read (an
extension the decoder does not read, :data:`IMAGE_EXTENSIONS`). :func:`scan_folder` lists a folder by that rule and
records every entry it did not read with its reason (:class:`IgnoredFile`, reported in one
:class:`IgnoredFilesWarning` line by :func:`ignored_summary`).

Mask pairing. Masks are matched to images by file stem, ignoring case, extension and a trailing ``_mask`` /
``_label`` / ``_gt`` / ``_segmentation``. If *no* name in a folder matches and the image and mask counts are equal,
images and masks are paired in sorted order, as the official MRAD json generators do, with a warning. A partial
match raises :class:`~mrad_hf.data.layouts.DatasetLayoutError`. :func:`pair_image_files` pairs named image files
and folders with their masks by the folder loader's rules. Nothing here decodes a file.

Paths read from a file's content (a split csv's rows, a bank's image ids) go through :func:`path_in_root`, the one
containment rule: relative, no ``..``, inside the root the user named once symlinks are resolved.
"""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..models.mrad.image_processing_mrad import SUPPORTED_IMAGE_EXTENSIONS as _DECODER_EXTENSIONS
from .layouts import DatasetLayoutError, LayoutDoc

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_DIR_NAMES",
    "MASK_STEM_SUFFIX",
    "FolderScan",
    "IgnoredFile",
    "IgnoredFilesWarning",
    "PathOutsideRoot",
    "classify_file",
    "ignored_summary",
    "is_absolute_text",
    "pair_image_files",
    "path_in_root",
    "scan_folder",
]

#: one decoder, one list of formats: every extension the image processor's decoder reads
IMAGE_EXTENSIONS: frozenset[str] = frozenset(extension.lower() for extension in _DECODER_EXTENSIONS)
"""Image file extensions the loaders and the CLI pick up (compared case-insensitively): what the decoder reads."""

MASK_DIR_NAMES: tuple[str, ...] = ("ground_truth", "masks", "gt")
"""Folder names (any case) whose files are ground-truth masks, never images (see :func:`classify_file`)."""

MASK_STEM_SUFFIX = "_mask"
"""A file whose stem ends with this (any case) is a mask, never an image (see :func:`classify_file`)."""

_MASK_SUFFIXES: tuple[str, ...] = ("_mask", "_label", "_gt", "_segmentation")

_MASK_WITHOUT_IMAGE = "mask without a matching anomalous image"


def _require_dir(path: Path, doc: LayoutDoc) -> Path:
    if not path.is_dir():
        raise doc.error(f"folder {path}/ not found.", missing=path)
    return path


def _require_file(path: Path, doc: LayoutDoc) -> Path:
    if not path.is_file():
        raise doc.error(f"file {path} not found.", missing=path)
    return path


class PathOutsideRoot(ValueError):
    """A path read from a file's content (a split csv's row, a bank's image id) that would open a file outside the
    root the user named. ``kind``: ``"absolute"``, ``"parent"`` (a ``..`` part), ``"symlink"`` or ``"unusable"``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def is_absolute_text(text: str) -> bool:
    """Whether a path read from a file is absolute on any platform (``/x``, ``\\x``, ``~/x``, ``C:...``)."""
    return text.startswith(("/", "\\", "~")) or (len(text) > 1 and text[1] == ":") or os.path.isabs(text)


def path_in_root(root: str | os.PathLike[str], relative: str) -> Path:
    """``root / relative`` for a path read from a file's content, or :class:`PathOutsideRoot`.

    The one containment rule for such paths: nothing a file says opens a file outside the root the user named. The
    path must be relative, have no ``..`` part and stay inside ``root`` once symlinks are resolved (a symlinked parent
    folder included). The lexical path is returned, so that ids stay relative to ``root``. Nothing is opened.
    """
    text = os.fspath(relative)
    if is_absolute_text(text):
        raise PathOutsideRoot("an absolute path", "absolute")
    if ".." in text.replace("\\", "/").split("/"):
        raise PathOutsideRoot("a '..' part leaves the root", "parent")
    candidate = Path(root) / text
    try:
        inside = candidate.resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError, ValueError) as error:  # a NUL byte, a symlink loop
        raise PathOutsideRoot(f"not a usable path ({error})", "unusable") from None
    if not inside:
        raise PathOutsideRoot("a symlink leads out of the root", "symlink")
    return candidate


def _is_visible(name: str) -> bool:
    return not name.startswith(".")


def _list_images(directory: Path) -> list[Path]:
    """Image files directly inside ``directory``, sorted by name; hidden files are skipped."""
    with os.scandir(directory) as entries:
        images = [
            Path(entry.path)
            for entry in entries
            if entry.is_file() and _is_visible(entry.name) and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
        ]
    return sorted(images, key=lambda path: path.name)


def _list_subdirs(directory: Path, exclude: Iterable[str] = ()) -> list[str]:
    """Names of the visible sub-folders of ``directory``, sorted, minus ``exclude``."""
    excluded = set(exclude)
    with os.scandir(directory) as entries:
        names = [e.name for e in entries if e.is_dir() and _is_visible(e.name) and e.name not in excluded]
    return sorted(names)


def classify_file(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> str | None:
    """The one rule every entry point uses for a file in a user's folder: ``"image"``, ``"mask"`` or ``None``.

    * ``None`` (not read): the extension is not one of :data:`IMAGE_EXTENSIONS` (any case).
    * ``"mask"``: the stem ends with ``_mask`` (any case), or a folder between ``root`` and the file is named
      ``ground_truth``, ``masks`` or ``gt`` (any case, :data:`MASK_DIR_NAMES`). A mask is never scored.
    * ``"image"``: anything else.

    The generic folder loader, ``mrad predict`` / ``explain`` / ``calibrate`` folder inputs and ``mrad bank add
    --images`` all call this, so they agree on what is an image and what is a mask.
    """
    path = Path(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return None
    if root is not None:
        try:
            folders = Path(os.path.relpath(path, root)).parts[:-1]
        except ValueError:  # another drive on Windows
            folders = ()
        folders = tuple(part for part in folders if part not in ("..", "."))
    else:
        folders = ()
    if path.stem.casefold().endswith(MASK_STEM_SUFFIX) or any(part.casefold() in MASK_DIR_NAMES for part in folders):
        return "mask"
    return "image"


class IgnoredFile(NamedTuple):
    """A file or folder a loader saw and did not read, and why."""

    path: Path
    reason: str


class IgnoredFilesWarning(UserWarning):
    """Files in a folder that were not read (unsupported extension, symlink loop, FIFO, unreadable, ...)."""


@dataclass
class FolderScan:
    """What :func:`scan_folder` found: image files, mask files and the ignored entries with their reason."""

    images: list[Path]
    masks: list[Path]
    ignored: list[IgnoredFile]

    def summary(self, where: str | os.PathLike[str]) -> str | None:
        """One line: how many entries were ignored and why, with an example each; ``None`` if nothing was."""
        return ignored_summary(self.ignored, where)


def ignored_summary(ignored: Sequence[IgnoredFile], where: str | os.PathLike[str]) -> str | None:
    """``"Ignored 3 file(s) under X: 2 unsupported extension (e.g. notes.txt), 1 symlink loop (e.g. a/loop)"``."""
    if not ignored:
        return None
    examples: dict[str, Path] = {}
    counts: dict[str, int] = {}
    for item in ignored:
        counts[item.reason] = counts.get(item.reason, 0) + 1
        examples.setdefault(item.reason, item.path)
    parts = ", ".join(f"{count} {reason} (e.g. {examples[reason]})" for reason, count in counts.items())
    return f"Ignored {len(ignored)} file(s) under {where}: {parts}."


_UNSUPPORTED = "unsupported extension"
_SYMLINK_LOOP = "symlink loop"
_SPECIAL_FILE = "not a regular file (FIFO, socket or device)"


def _entry_kind(entry: os.DirEntry[str]) -> str:
    """``"dir"``, ``"file"`` or the reason the entry cannot be read."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file" if os.access(entry.path, os.R_OK) else "unreadable (permission denied)"
        if entry.is_symlink():
            os.stat(entry.path)  # raises for a loop or a dangling link
        return _SPECIAL_FILE
    except OSError as error:
        if error.errno == errno.ELOOP:
            return _SYMLINK_LOOP
        if isinstance(error, FileNotFoundError):
            return "broken symlink"
        return f"unreadable ({error.strerror or error})"


def scan_folder(
    folder: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None, recursive: bool = True
) -> FolderScan:
    """Image and mask files under ``folder`` (sorted), classified by :func:`classify_file`, and what was ignored.

    Hidden entries (``.name``) are skipped silently. Everything else that is not read is listed in
    ``ignored`` with its reason: unsupported extension, symlink loop (a folder link back to one of its own
    parents, or a self-referencing link), broken symlink, FIFO / socket / device, unreadable file or folder,
    and, when ``recursive=False``, sub-folders (``"sub-folder not read"``).

    Args:
        folder: The folder to list.
        root: Where :func:`classify_file` starts looking for mask folder names (default: ``folder``).
        recursive: Descend into sub-folders.
    """
    start = Path(folder)
    base = start if root is None else Path(root)
    images: list[Path] = []
    masks: list[Path] = []
    ignored: list[IgnoredFile] = []
    pending: list[tuple[Path, frozenset[str]]] = [(start, frozenset({os.path.realpath(start)}))]
    while pending:
        directory, ancestors = pending.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            ignored.append(IgnoredFile(directory, f"unreadable folder ({error.strerror or error})"))
            continue
        subfolders = []
        for entry in entries:
            if not _is_visible(entry.name):
                continue
            path = Path(entry.path)
            kind = _entry_kind(entry)
            if kind == "dir":
                real = os.path.realpath(path)
                if real in ancestors:
                    ignored.append(IgnoredFile(path, _SYMLINK_LOOP))
                elif recursive:
                    subfolders.append((path, ancestors | {real}))
                else:
                    ignored.append(IgnoredFile(path, "sub-folder not read"))
            elif kind != "file":
                ignored.append(IgnoredFile(path, kind))
            else:
                role = classify_file(path, base)
                if role is None:
                    ignored.append(IgnoredFile(path, _UNSUPPORTED))
                else:
                    (images if role == "image" else masks).append(path)
        pending.extend(reversed(subfolders))
    return FolderScan(sorted(images), sorted(masks), ignored)


def _warn_ignored(ignored: Sequence[IgnoredFile], where: Path, stacklevel: int = 3) -> None:
    summary = ignored_summary(ignored, where)
    if summary:
        warnings.warn(summary, IgnoredFilesWarning, stacklevel=stacklevel)


def _has_mask_suffix(path: Path) -> bool:
    return path.stem.casefold().endswith(_MASK_SUFFIXES)


def _mask_key(stem: str) -> str:
    """The image stem a mask file name refers to: ``"000_mask"`` -> ``"000"``."""
    key = stem.casefold()
    for suffix in _MASK_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def _index_masks(masks: Iterable[Path], doc: LayoutDoc) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for mask in masks:
        key = _mask_key(mask.stem)
        if key in index:
            raise doc.error(f"two masks refer to the same image: {index[key]} and {mask}.", missing=mask)
        index[key] = mask
    return index


def _pair_masks(images: Sequence[Path], mask_dir: Path, doc: LayoutDoc) -> list[Path]:
    """Pairs every image with its mask in ``mask_dir``.

    Pairs by name first. If no name matches and the counts are equal, it pairs in sorted order, as the
    official MRAD json generators do, and warns.

    Raises:
        DatasetLayoutError: If the folder is missing or some images have no mask.
    """
    masks = _list_images(_require_dir(mask_dir, doc))
    index = _index_masks(masks, doc)
    matched = [index.get(image.stem.casefold()) for image in images]
    if all(mask is not None for mask in matched):
        return [mask for mask in matched if mask is not None]
    if not any(matched) and len(masks) == len(images):
        warnings.warn(
            f"{doc.name}: mask names in {mask_dir} do not match the image names; pairing images and masks "
            "in sorted order, as the official MRAD json generator does.",
            stacklevel=5,
        )
        return masks
    unmatched = next(image for image, mask in zip(images, matched, strict=True) if mask is None)
    expected = mask_dir / f"{unmatched.stem}_mask.png"
    raise doc.error(
        f"no mask for {unmatched} in {mask_dir}/ (looked for {unmatched.stem}.<ext> or "
        f"{unmatched.stem}_mask.<ext>; {len(images)} images, {len(masks)} masks).",
        missing=expected,
    )


def pair_image_files(
    inputs: Sequence[str | os.PathLike[str]], masks: Sequence[str | os.PathLike[str]] | None = None
) -> tuple[list[tuple[Path, Path | None]], list[IgnoredFile]]:
    """Images named by ``inputs`` (files and/or folders), each with its mask, by the folder loader's rules.

    Files are classified by :func:`classify_file`, so ``bad/*.png`` that also matches ``bad/001_mask.png``
    gives one image with its mask, not two images. A mask is found, in this order, in ``masks`` (files
    and/or folders, matched by stem; if no stem matches and the counts are equal, in sorted order, with a
    warning), beside the image (``<stem>_mask.<ext>`` in the image's folder, listed or not), or among the
    masks found in the input folders (``masks/``, ``ground_truth/``, matched by stem). An image without a
    mask gets ``None``.

    Returns:
        ``[(image, mask or None)]`` in the order found, and the entries that were not read.

    Raises:
        DatasetLayoutError: For a path that does not exist, a mask name claimed by two images, or explicit
            masks that only partly match the images.
    """
    images: list[Path] = []
    pooled: list[Path] = []
    ignored: list[IgnoredFile] = []

    def collect(items: Sequence[str | os.PathLike[str]], into_masks: bool) -> None:
        for item in items:
            path = Path(item)
            if path.is_dir():
                scan = scan_folder(path)
                ignored.extend(scan.ignored)
                if into_masks:
                    pooled_masks.extend(scan.images + scan.masks)
                else:
                    images.extend(scan.images)
                    pooled.extend(scan.masks)
            elif path.is_file():
                role = classify_file(path)
                if role is None:
                    ignored.append(IgnoredFile(path, _UNSUPPORTED))
                elif into_masks:
                    pooled_masks.append(path)
                else:
                    (images if role == "image" else pooled).append(path)
            else:
                raise DatasetLayoutError(f"'{path}' is neither an image file nor a folder; check the path.", path)

    pooled_masks: list[Path] = []
    collect(inputs, into_masks=False)
    if masks:
        collect(masks, into_masks=True)
    images = list(dict.fromkeys(images))
    explicit: list[Path | None] = [None] * len(images)
    if masks:
        index = _index_masks(pooled_masks, _PAIRING_DOC)
        explicit = [index.get(image.stem.casefold()) for image in images]
        if not any(explicit) and len(pooled_masks) == len(images):
            warnings.warn(
                "mask names do not match the image names; pairing images and masks in sorted order.", stacklevel=2
            )
            explicit = list(sorted(pooled_masks))
            images = sorted(images)
        elif not all(explicit):
            missing = next(image for image, mask in zip(images, explicit, strict=True) if mask is None)
            raise _PAIRING_DOC.error(
                f"no mask among the given masks for {missing} (looked for {missing.stem}[_mask].<ext>).", missing
            )
    beside_by_folder: dict[Path, dict[str, Path]] = {}
    for folder in {image.parent for image in images}:
        found = scan_folder(folder, recursive=False).masks
        beside_by_folder[folder] = _index_masks(found, _PAIRING_DOC)
    image_folders = set(beside_by_folder)  # a mask beside images belongs to its folder's images only
    pool = _index_masks([mask for mask in dict.fromkeys(pooled) if mask.parent not in image_folders], _PAIRING_DOC)
    pool_users: dict[str, list[Path]] = {}
    pairs: list[tuple[Path, Path | None]] = []
    for image, given in zip(images, explicit, strict=True):
        key = image.stem.casefold()
        mask = given or beside_by_folder[image.parent].get(key)
        if mask is None and key in pool:
            mask = pool[key]
            pool_users.setdefault(key, []).append(image)
        pairs.append((image, mask))
    for key, users in pool_users.items():
        if len(users) > 1:
            claimed = ", ".join(map(str, users))
            raise _PAIRING_DOC.error(f"the mask {pool[key]} matches {len(users)} images ({claimed}).", pool[key])
    used = {mask for _, mask in pairs}
    ignored += [IgnoredFile(mask, _MASK_WITHOUT_IMAGE) for mask in dict.fromkeys(pooled) if mask not in used]
    return pairs, ignored


_PAIRING_DOC = LayoutDoc(
    "images",
    """
<folder>/<stem>.png          an image
<folder>/<stem>_mask.png     its mask, beside it (or pass the masks with --masks, matched by stem)
""",
    "give each anomalous image its mask as <stem>_mask.png beside it, or pass --masks with the same stems.",
)
