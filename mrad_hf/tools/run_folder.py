# SPDX-License-Identifier: Apache-2.0
"""Run folders that are never reused for a different run, never lose what was computed, never mix two runs.

What `mrad evaluate`, `mrad train` and `mrad predict` share (issue 13 §4-5):

* `run_fingerprint`: what makes a run's numbers what they are: the model weights digest, the memory bank digest,
  the dataset identity (name, root, number of items, digest of the item paths and labels) and every setting that
  changes a number. It is recorded in `<output>/run.json`.
* `open_run_folder`: a new folder starts a run; a folder whose `run.json` has the same fingerprint is resumed; any
  other folder that holds results is refused with the differing fields and the two ways out, `--overwrite` (remove
  this command's outputs and start over) and `--resume-anyway` (keep them; the differences are recorded in
  `run.json`). An `.incomplete` marker is present from the start of a run until `RunFolder.finish`, so a killed run
  is recognised as such on the next start (and resumed only when its fingerprint matches).
* `JsonLinesWriter`: per-item results appended as JSON Lines and flushed one by one, so a crash keeps every finished
  item; a torn last line (a kill in mid-write) is dropped on resume.
* `writer_lock`: an exclusive lock (`fcntl.flock`, released by the kernel when the process dies) that refuses a
  second concurrent writer of the same output.
* `bounded_name`: file names for per-item outputs that keep the defect folder, stay unique (index prefix) and fit
  the 255-byte file-name limit together with the temporary name `atomic_write` uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..memory.files import atomic_write

__all__ = [
    "RUN_FILE",
    "INCOMPLETE_MARKER",
    "RunFolderError",
    "RunFolder",
    "run_fingerprint",
    "weights_digest",
    "bank_digest",
    "dataset_identity",
    "open_run_folder",
    "JsonLinesWriter",
    "read_json_lines",
    "writer_lock",
    "bounded_name",
]

RUN_FILE = "run.json"
INCOMPLETE_MARKER = ".incomplete"
#: Longest per-item file name; `atomic_write`'s temporary name adds ".", "." and "<8 chars>.tmp" (14 bytes) to it.
MAX_NAME_BYTES = 255 - 16


class RunFolderError(ValueError):
    """An output folder that holds another run (or a run being written); the message names the fields and the flags."""


# ---------------------------------------------------------------------- fingerprints
def _digest_tensors(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in items:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def weights_digest(model) -> str:
    """SHA-256 over the model's weights (backbone and heads), names and dtypes included; the memory is `bank_digest`."""
    return _digest_tensors(
        (name, value) for name, value in sorted(model.state_dict().items()) if not name.startswith("memory.")
    )


def bank_digest(model) -> str | None:
    """SHA-256 over the attached memory bank's tensors and metadata, or None when the model has no bank."""
    state = {name: value for name, value in model.state_dict().items() if name.startswith("memory.")}
    if not state or all(value.numel() == 0 for value in state.values()):
        return None
    digest = hashlib.sha256(_digest_tensors(sorted(state.items())).encode())
    digest.update(
        json.dumps(getattr(model.config, "memory_bank_metadata", None) or {}, sort_keys=True, default=str).encode()
    )
    return digest.hexdigest()


def dataset_identity(dataset, *, name: str | None = None, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Name, root, item count and a digest of the items' paths and labels (no image is decoded)."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None:  # a datasets.Dataset: read the columns, not the rows (rows decode images)
        paths = list(dataset["path"]) if "path" in columns else []
        labels = list(dataset["label"]) if "label" in columns else []
    else:
        rows = list(dataset)
        paths = [str(row.get("path", row.get("id", ""))) if isinstance(row, Mapping) else str(row) for row in rows]
        labels = [row.get("label") if isinstance(row, Mapping) else None for row in rows]
    digest = hashlib.sha256(json.dumps([[str(p) for p in paths], [str(v) for v in labels]]).encode()).hexdigest()
    return {
        "name": name,
        "root": os.path.abspath(os.path.expanduser(str(root))) if root is not None else None,
        "items": len(dataset),
        "items_sha256": digest if paths or labels else None,
    }


def run_fingerprint(
    *,
    command: str,
    model=None,
    dataset: dict[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fingerprint of a run (JSON-able). `dataset` is a `dataset_identity`; `settings` every knob that changes a number."""
    fingerprint: dict[str, Any] = {"command": command}
    if model is not None:
        fingerprint["model"] = {"weights_sha256": weights_digest(model), "bank_sha256": bank_digest(model)}
    if dataset is not None:
        fingerprint["dataset"] = dataset
    fingerprint["settings"] = json.loads(json.dumps(dict(settings or {}), sort_keys=True, default=str))
    if extra:
        fingerprint.update(json.loads(json.dumps(dict(extra), sort_keys=True, default=str)))
    return fingerprint


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def differing_fields(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'field: recorded -> current' for every leaf that differs (digests shortened to 12 characters)."""
    old, new = _flatten(recorded), _flatten(current)

    def show(value):
        text = json.dumps(value, default=str)
        return (
            text[:13] + '…"'
            if isinstance(value, str) and len(value) == 64
            else (text if len(text) <= 60 else text[:57] + "...")
        )

    return [
        f"{key}: {show(old.get(key))} -> {show(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


# ---------------------------------------------------------------------- the run folder
class RunFolder:
    """An opened run folder: `state` is "new", "resumed" or "resumed-anyway"; `finish()` marks it complete."""

    def __init__(
        self, path: Path, fingerprint: dict[str, Any], state: str, was_incomplete: bool, differences: list[str]
    ):
        self.path, self.fingerprint, self.state = path, fingerprint, state
        self.was_incomplete, self.differences = was_incomplete, differences

    @property
    def resumed(self) -> bool:
        return self.state != "new"

    def finish(self) -> None:
        """Record the run as complete: `run.json` says so and the incomplete marker goes."""
        _write_run_file(self.path, self.fingerprint, complete=True, differences=self.differences)
        with contextlib.suppress(FileNotFoundError):
            (self.path / INCOMPLETE_MARKER).unlink()


def _write_run_file(path: Path, fingerprint: dict[str, Any], *, complete: bool, differences: list[str]) -> None:
    payload = {"fingerprint": fingerprint, "complete": complete}
    if differences:
        payload["resumed_anyway_despite"] = differences
    atomic_write(path / RUN_FILE, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2), encoding="utf-8"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def open_run_folder(
    output_dir: str | os.PathLike,
    fingerprint: dict[str, Any],
    *,
    artefacts: Iterable[str],
    overwrite: bool = False,
    resume_anyway: bool = False,
    write: bool = True,
) -> RunFolder:
    """Check `output_dir` against `fingerprint` and open it (see the module docstring).

    `artefacts` are the names (files or folders) this command writes inside `output_dir`; only they are removed by
    `overwrite`, so pointing a run at a folder with other files never deletes them. `write=False` only decides
    (for the non-main processes of a distributed run).
    """
    path = Path(output_dir)
    artefacts = list(artefacts)
    run_file, marker = path / RUN_FILE, path / INCOMPLETE_MARKER
    was_incomplete = marker.exists()
    recorded = None
    if run_file.is_file():
        try:
            recorded = json.loads(run_file.read_text(encoding="utf-8")).get("fingerprint")
        except (ValueError, AttributeError):
            recorded = {"unreadable run.json": True}
    present = [name for name in artefacts if (path / name).exists()]
    differences: list[str] = []
    if recorded is None and not present:
        state = "new"
    elif recorded == fingerprint:
        state = "resumed"
    else:
        differences = (
            differing_fields(recorded, fingerprint)
            if recorded is not None
            else ["run.json: missing (results of an unrecorded run)"]
        )
        if overwrite:
            state = "new"
        elif resume_anyway:
            state = "resumed-anyway"
        else:
            listed = "; ".join(differences[:8]) + (
                f"; and {len(differences) - 8} more" if len(differences) > 8 else ""
            )
            raise RunFolderError(
                f"Output folder '{path}' holds {'an unfinished' if was_incomplete else 'a'} run of 'mrad {fingerprint.get('command', '')}' that differs "
                f"from this one ({listed}). Pass --overwrite to delete its results and start over, --resume-anyway to keep them, "
                "or choose another --output-dir."
            )
    if overwrite and write:
        for name in present + [RUN_FILE, INCOMPLETE_MARKER]:
            _remove(path / name)
        state = "new"
    if write:
        path.mkdir(parents=True, exist_ok=True)
        marker.write_text(
            "a run started here and has not finished; the next run with the same settings resumes it\n",
            encoding="utf-8",
        )
        _write_run_file(
            path, fingerprint, complete=False, differences=differences if state == "resumed-anyway" else []
        )
    return RunFolder(path, fingerprint, state, was_incomplete, differences if state == "resumed-anyway" else [])


# ---------------------------------------------------------------------- JSON Lines
class JsonLinesWriter:
    """Append one JSON object per line, flushed at once, so a crash or kill keeps every line written before it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._handle.write(json.dumps(record, default=str) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonLinesWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_json_lines(path: str | os.PathLike, *, repair: bool = True) -> list[dict[str, Any]]:
    """The records of a JSON Lines file; a torn last line (a kill during a write) is dropped, and with `repair` the
    file is truncated to its last complete line so that appends continue cleanly."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    records, good = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except ValueError:
            break
        good += len(line)
    if repair and good != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(good)
    return records


# ---------------------------------------------------------------------- one writer at a time
@contextlib.contextmanager
def writer_lock(target: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Hold an exclusive lock for writing `target` (a file or folder); a second writer is refused at once.

    The lock file `.<name>.lock` sits beside `target` while the lock is held and is removed on release; the lock
    itself is the kernel's (`fcntl.flock`), so a killed writer never leaves a lock that blocks the next run.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.with_name(f".{target.name}.lock")
    try:
        import fcntl
    except ImportError:  # not POSIX: no kernel lock; the single-writer rule is then not enforced
        yield lock_path
        return
    for _ in range(3):
        handle = open(lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderError(
                f"Another mrad process ({holder}) is writing {what} '{target}'. Wait for it to finish, or write to another path."
            ) from None
        try:
            same_file = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:  # not a lock file its previous holder removed meanwhile
            break
        handle.close()
    else:
        raise RunFolderError(
            f"Could not lock {what} '{target}': other writers keep replacing '{lock_path}'. Try again."
        )
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield lock_path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)  # while still holding the lock, so no one else's lock file is removed
        handle.close()


# ---------------------------------------------------------------------- bounded file names
_UNSAFE = re.compile(r"[^\w.+-]+")


def _clip_bytes(text: str, limit: int) -> str:
    encoded = text.encode("utf-8")[:limit]
    return encoded.decode("utf-8", errors="ignore")


def bounded_name(index: int, path: str | os.PathLike, suffix: str = ".png", *, limit: int = MAX_NAME_BYTES) -> str:
    """`<index>_<defect folder>_<stem><suffix>`, unique by its index, at most `limit` bytes (UTF-8).

    The parent folder is kept (for datasets it is the defect type, e.g. `crack`); a name that has to be shortened
    keeps a hash of the full path so that it stays recognisable and distinct.
    """
    path = Path(path)
    folder = _UNSAFE.sub("_", path.parent.name).strip("_")
    stem = _UNSAFE.sub("_", path.stem).strip("_") or "image"
    head = f"{index:05d}_" + (f"{folder}_" if folder else "")
    name = head + stem + suffix
    if len(name.encode("utf-8")) <= limit:
        return name
    tag = "_" + hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:8]
    room = limit - len((tag + suffix).encode("utf-8"))
    return _clip_bytes(head + stem, room) + tag + suffix
