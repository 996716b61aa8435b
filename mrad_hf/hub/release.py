# SPDX-License-Identifier: Apache-2.0
"""The release that makes the short names real: official MRAD files in, the eight Hub repos they name out.

Given the files a user downloaded from the official release (OpenAI's `ViT-L-14-336px.pt`, the official
`cache_model_{visa,mvtec}.pt` + `cache_patch_model_{visa,mvtec}.pt` banks and the `test_on_{mvtec,visa}.pth`
MRAD-CLIP checkpoints), `build_release` converts everything with the public `mrad_hf.conversion` functions and
writes one folder per repo (exactly what `push_model` / `push_memory_bank` upload, plus `release.json`, the inputs'
sha256 and how the repo was derived); `publish_release` compares each folder with the Hub and uploads only the files
that differ, so a second run pushes nothing. The repos (namespace `$MRAD_HUB_NAMESPACE`, default "mrad-hf"):

    mrad-tf-{a}     frozen CLIP + the official bank of auxiliary dataset a (visa | mvtec)
    mrad-ft-{a}     + the image/patch projections of the MRAD-CLIP checkpoint trained on a, as the official
                    `test.py --model_type mrad-ft` uses them (the official release has no separate MRAD-FT weights)
    mrad-clip-{a}   the MRAD-CLIP checkpoint trained on a: test_on_mvtec.pth for a = visa, test_on_visa.pth for mvtec
    mrad-bank-{a}   the official bank of a on its own

Evaluation (optional, `data_roots={"mvtec": ..., "visa": ...}`) follows the zero-shot protocol: a model with
auxiliary data a is scored on the other dataset, with `evaluation.runner.evaluate_dataset`; its `results.json` fills
the card's model-index only when the CLIP file is OpenAI's (sha256 checked), since numbers of other weights say
nothing about MRAD. `mrad release` is the command-line front end.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .api import SHORT_NAMES, hub_namespace, write_bank_repo, write_model_repo

__all__ = [
    "AUXILIARIES",
    "OFFICIAL_SHA256",
    "RELEASE_VARIANTS",
    "ReleaseFiles",
    "ReleaseRepo",
    "build_release",
    "canonical_safetensors",
    "compare_with_hub",
    "format_plan",
    "publish_release",
    "release",
]

AUXILIARIES = ("visa", "mvtec")
RELEASE_VARIANTS = ("tf", "ft", "clip")
OTHER = {"visa": "mvtec", "mvtec": "visa"}
#: the MRAD-CLIP checkpoint trained on auxiliary data a is the one the official code tests on the other dataset
CHECKPOINT_NAME = {"visa": "test_on_mvtec.pth", "mvtec": "test_on_visa.pth"}
CLIP_NAME = "ViT-L-14-336px.pt"
#: sha256 of the official files: OpenAI's (in its download URL) and the MRAD release's (as pinned by third parties)
OFFICIAL_SHA256 = {
    "ViT-L-14-336px.pt": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
    "test_on_mvtec.pth": "2af68c308183678bcdbe216dd62151d02294bfe726fd51ad4205f663a1a02535",
    "test_on_visa.pth": "8b46b1358218e8b43872a9d00d13206b8a213315350b57031f6da682694ca524",
    "cache_model_mvtec.pt": "886431afb17a35d9c72aaeecf46655bd8d126236350566842aa828d6c45fd19e",
    "cache_model_visa.pt": "66dfa8b32ad2c151ea3677a41f830cef0fd406234c7778644fd10bc819d1214b",
    "cache_patch_model_mvtec.pt": "f5b1b081c10f6fa7a9fe0cf034be2425de45043f932e6665546b3d16123fbef3",
    "cache_patch_model_visa.pt": "822bccd1c590b515ef49102afa631b1682131a299442fb18065c76f44138f600",
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ReleaseFiles:
    """The official inputs: the CLIP file plus, per auxiliary dataset, its two bank files and its checkpoint."""

    clip: Path
    image_caches: dict[str, Path] = field(default_factory=dict)
    patch_caches: dict[str, Path] = field(default_factory=dict)
    checkpoints: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, auxiliaries: Sequence[str] = AUXILIARIES) -> ReleaseFiles:
        """Find the files under their official names in `folder` (missing ones are listed in one error)."""
        folder = Path(folder)
        files = cls(clip=folder / CLIP_NAME)
        for aux in auxiliaries:
            files.image_caches[aux] = folder / f"cache_model_{aux}.pt"
            files.patch_caches[aux] = folder / f"cache_patch_model_{aux}.pt"
            files.checkpoints[aux] = folder / CHECKPOINT_NAME[aux]
        files.check()
        return files

    def all_files(self) -> list[Path]:
        return [self.clip, *self.image_caches.values(), *self.patch_caches.values(), *self.checkpoints.values()]

    def check(self) -> None:
        missing = [str(path) for path in self.all_files() if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Missing official release files: {', '.join(missing)}. Download OpenAI's {CLIP_NAME} and the MRAD release "
                "(cache_model_*.pt, cache_patch_model_*.pt, test_on_*.pth; links in the official README) into one folder."
            )


@dataclass
class ReleaseRepo:
    """One repo of the release: its folder as built, and after `compare_with_hub` what differs on the Hub."""

    name: str
    repo_id: str
    kind: str  # "model" | "bank"
    folder: Path
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 of the local file
    status: str = "not compared"  # "new" | "changed" | "unchanged" | "unknown: <reason>"
    changed: list[str] = field(default_factory=list)  # files to upload
    remote_only: list[str] = field(default_factory=list)  # on the Hub but not in the release (kept)
    notes: list[str] = field(default_factory=list)


def _version() -> str:
    try:
        return version("mrad-hf")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH
        return "source"


def _input_record(path: Path, sha: str) -> dict[str, Any]:
    official = OFFICIAL_SHA256.get(path.name)
    return {"file": path.name, "sha256": sha, "official": None if official is None else sha == official}


def _write_release_json(
    folder: Path, derivation: str, inputs: list[dict[str, Any]], evaluations: list[str] | None = None
) -> None:
    record = {
        "release": {
            "mrad_hf": _version(),
            "derivation": derivation,
            "inputs": inputs,
            "evaluated_on": evaluations or [],
        }
    }
    (folder / "release.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _log_default(message: str) -> None:
    print(message, flush=True)


def build_release(
    files: ReleaseFiles,
    work_dir: str | os.PathLike,
    *,
    namespace: str | None = None,
    image_size: int = 518,
    variants: Sequence[str] = RELEASE_VARIANTS,
    auxiliaries: Sequence[str] = AUXILIARIES,
    data_roots: Mapping[str, str | os.PathLike] | None = None,
    results: Mapping[str, Sequence[str | os.PathLike]] | None = None,
    batch_size: int = 8,
    log: Callable[[str], None] = _log_default,
) -> list[ReleaseRepo]:
    """Convert the official files and write one folder per repo under `work_dir/repos/` (nothing is uploaded).

    Args:
        files: the official inputs (`ReleaseFiles.from_folder`).
        work_dir: scratch space: `repos/<name>/` (the folders to push) and `evaluation/<name>/<dataset>/`.
        namespace: Hub namespace (default `$MRAD_HUB_NAMESPACE`, else "mrad-hf").
        image_size: network input size (518, as the official code).
        data_roots: `{"mvtec": folder, "visa": folder}`: evaluate each model on the dataset it was not built from.
        results: `{"mrad-clip-visa": [results.json, ...]}`: evaluation results (from `mrad evaluate`) for the cards.
    """
    from ..conversion.convert_official_bank import convert_official_bank
    from ..conversion.convert_official_checkpoint import convert_official_checkpoint
    from ..conversion.convert_openai_clip import convert_openai_clip
    from ..models.mrad.modeling_mrad import MRADForAnomalyDetection

    unknown = sorted(set(variants) - set(RELEASE_VARIANTS)) + sorted(set(auxiliaries) - set(AUXILIARIES))
    if unknown:
        raise ValueError(
            f"Unknown variants / auxiliary datasets {unknown}; choose from {RELEASE_VARIANTS} and {AUXILIARIES}."
        )
    files.check()
    namespace = (namespace or hub_namespace()).strip("/")
    work_dir = Path(work_dir)
    data_roots, results = dict(data_roots or {}), {k: list(v) for k, v in (results or {}).items()}
    unknown_results = sorted(set(results) - set(SHORT_NAMES.values()))
    if unknown_results:
        raise ValueError(f"Results given for unknown repos {unknown_results}; name them like 'mrad-clip-visa'.")
    log(f"Hashing {len(files.all_files())} input files")
    digests = {path: _sha256(path) for path in files.all_files()}
    official_clip = digests[files.clip] == OFFICIAL_SHA256[CLIP_NAME]
    if not official_clip:
        log(
            f"note: {files.clip.name} is not OpenAI's file (sha256 differs): evaluation results will not enter the cards."
        )

    log(f"Converting {files.clip.name}")
    clip = convert_openai_clip(files.clip)
    repos: list[ReleaseRepo] = []

    def new_repo(name: str, kind: str) -> ReleaseRepo:
        folder = work_dir / "repos" / name
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return ReleaseRepo(name=name, repo_id=f"{namespace}/{name}", kind=kind, folder=folder)

    for aux in auxiliaries:
        image_cache, patch_cache, checkpoint = files.image_caches[aux], files.patch_caches[aux], files.checkpoints[aux]
        tf_model = MRADForAnomalyDetection.from_clip(clip, variant="tf", image_size=image_size)
        log(f"Converting the {aux} bank ({image_cache.name}, {patch_cache.name})")
        bank = convert_official_bank(image_cache, patch_cache, model=tf_model, source=aux)
        bank_inputs = [_input_record(p, digests[p]) for p in (files.clip, image_cache, patch_cache)]

        repo = new_repo(f"mrad-bank-{aux}", "bank")
        write_bank_repo(bank, repo.folder, repo_id=repo.repo_id)
        _write_release_json(
            repo.folder, f"official {aux} memory bank, keys checked against {files.clip.name}", bank_inputs
        )
        repos.append(repo)

        for variant in variants:
            name = f"mrad-{variant}-{aux}"
            log(f"Building {name}")
            if variant == "tf":
                model, inputs = tf_model, bank_inputs
                model.set_memory_bank(bank)
                derivation = f"MRAD-TF: {files.clip.name} + the official {aux} bank"
            else:
                source = checkpoint
                if variant == "ft":
                    source = _projection_heads_only(checkpoint, work_dir / "tmp")
                model = convert_official_checkpoint(source, clip=clip, bank=bank, image_size=image_size)
                inputs = [*bank_inputs, _input_record(checkpoint, digests[checkpoint])]
                derivation = (
                    f"MRAD-CLIP: {checkpoint.name} (trained on {aux}) + the official {aux} bank"
                    if variant == "clip"
                    else f"MRAD-FT: the image/patch projections of {checkpoint.name} (as the official test.py --model_type mrad-ft "
                    f"uses them) + the official {aux} bank"
                )
            repo = new_repo(name, "model")
            card_results = list(results.get(name, []))
            evaluations = []
            target = OTHER[aux]
            if target in data_roots:
                evaluated = _evaluate(
                    model,
                    target,
                    data_roots[target],
                    work_dir / "evaluation" / name / target,
                    repo.repo_id,
                    official_clip,
                    aux,
                    batch_size,
                    log,
                )
                evaluations.append(target)
                if official_clip:
                    card_results.append(evaluated)
                else:
                    repo.notes.append(
                        f"evaluated on {target} ({evaluated}); not in the card: the CLIP file is not OpenAI's"
                    )
            write_model_repo(model, repo.folder, repo_id=repo.repo_id, results=card_results or None)
            _write_release_json(repo.folder, derivation, inputs, evaluations)
            repos.append(repo)
    for repo in repos:
        for path in repo.folder.rglob("*.safetensors"):
            canonical_safetensors(path)
        repo.files = {
            str(p.relative_to(repo.folder)): _sha256(p) for p in sorted(repo.folder.rglob("*")) if p.is_file()
        }
    return repos


def canonical_safetensors(path: str | os.PathLike) -> None:
    """Rewrite a safetensors header as sorted, compact JSON (tensor bytes untouched), in place.

    safetensors writes its `__metadata__` entries in hash-map order, which varies from run to run when there are
    several (a bank has two), so identical banks could differ byte for byte and be pushed again; the canonical
    header makes the bytes, and so the Hub's sha256, a function of the content.
    """
    import shutil
    import struct

    path = Path(path)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
        header = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # keep the data 8-byte aligned, as safetensors does
        if header == raw:
            return
        staging = path.with_name(f".{path.name}.canonical")
        with open(staging, "wb") as out:
            out.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(handle, out, 1 << 24)
    os.replace(staging, path)


def _projection_heads_only(checkpoint: Path, scratch: Path) -> Path:
    """The official checkpoint restricted to {image_proj, patch_proj}: what `test.py --model_type mrad-ft` loads."""
    import torch

    from ..conversion.common import load_torch_file, require_mapping

    raw = require_mapping(
        load_torch_file(checkpoint, "Official MRAD checkpoint"), checkpoint, "Official MRAD checkpoint"
    )
    missing = [key for key in ("image_proj", "patch_proj") if key not in raw]
    if missing:
        raise ValueError(f"'{checkpoint}' has no {missing}: not an official MRAD-FT / MRAD-CLIP checkpoint.")
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"{checkpoint.stem}.projections.pth"
    torch.save({"image_proj": raw["image_proj"], "patch_proj": raw["patch_proj"]}, path)
    return path


def _evaluate(
    model, dataset: str, root, output_dir: Path, repo_id: str, pretrained: bool, aux: str, batch_size: int, log
) -> Path:
    from ..data.loaders import load_benchmark
    from ..evaluation.runner import evaluate_dataset

    log(f"Evaluating {repo_id} on {dataset} ({root})")
    rows = load_benchmark(dataset, root)
    run_info = {"model": repo_id, "pretrained": pretrained, "bank": aux}
    evaluate_dataset(
        model, rows, output_dir, name=dataset, batch_size=batch_size, run_info=run_info, progress=False, resume=False
    )
    return output_dir / "results.json"


# ---------------------------------------------------------------------- the Hub side
def _api(token, endpoint):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token)


def compare_with_hub(repos: Sequence[ReleaseRepo], *, token=None, endpoint: str | None = None) -> list[ReleaseRepo]:
    """Fill `status`, `changed` and `remote_only` of each repo from its `main` on the Hub (read-only calls)."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    api = _api(token, endpoint)
    for repo in repos:
        try:
            remote = {
                entry.path: entry
                for entry in api.list_repo_tree(repo.repo_id, recursive=True)
                if hasattr(entry, "size") and not hasattr(entry, "tree_id")
            }
        except (RepositoryNotFoundError, RevisionNotFoundError):
            repo.status, repo.changed, repo.remote_only = "new", sorted(repo.files), []
            continue
        except Exception as error:  # offline, auth, ...: the plan still lists every file
            repo.status, repo.changed = (
                f"unknown: {type(error).__name__}: {error}".splitlines()[0][:200],
                sorted(repo.files),
            )
            continue
        repo.changed = [path for path in sorted(repo.files) if not _same_as_remote(api, repo, path, remote.get(path))]
        repo.remote_only = sorted(set(remote) - set(repo.files) - {".gitattributes"})
        repo.status = "changed" if repo.changed else "unchanged"
    return list(repos)


def _same_as_remote(api, repo: ReleaseRepo, path: str, entry) -> bool:
    """Whether the Hub's file equals the local one: by LFS sha256, else (small files) by content."""
    if entry is None:
        return False
    local = repo.folder / path
    if entry.size != local.stat().st_size:
        return False
    lfs = getattr(entry, "lfs", None)
    if lfs is not None:
        return (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) == repo.files[path]
    with tempfile.TemporaryDirectory(prefix="mrad-release-compare-") as scratch:
        downloaded = api.hf_hub_download(repo.repo_id, path, cache_dir=scratch)
        return Path(downloaded).read_bytes() == local.read_bytes()


def publish_release(
    repos: Sequence[ReleaseRepo],
    *,
    token=None,
    endpoint: str | None = None,
    private: bool | None = None,
    log: Callable[[str], None] = _log_default,
) -> dict[str, str | None]:
    """Upload, per repo, only the files `compare_with_hub` found different; returns {repo_id: commit sha or None}."""
    api = _api(token, endpoint)
    commits: dict[str, str | None] = {}
    for repo in repos:
        if repo.status.startswith("unknown"):
            raise RuntimeError(f"Cannot publish {repo.repo_id}: the Hub could not be read ({repo.status}).")
        if not repo.changed:
            commits[repo.repo_id] = None
            continue
        api.create_repo(repo.repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=str(repo.folder),
            allow_patterns=repo.changed,
            commit_message=f"mrad release {_version()}: {len(repo.changed)} file(s)",
        )
        commits[repo.repo_id] = info.oid
        log(f"Pushed {repo.repo_id}: {len(repo.changed)} file(s) at {info.oid}")
    return commits


def format_plan(repos: Sequence[ReleaseRepo]) -> str:
    """Every repo and file of the release, marked `+` (to upload) or `=` (already on the Hub)."""
    lines = []
    for repo in repos:
        lines.append(
            f"{repo.repo_id} ({repo.kind}): {repo.status}, {len(repo.changed)} of {len(repo.files)} file(s) to upload"
        )
        for path, sha in sorted(repo.files.items()):
            size = (repo.folder / path).stat().st_size
            lines.append(f"  {'+' if path in repo.changed else '='} {path}  {size} B  sha256:{sha[:12]}")
        lines += [f"  ! on the Hub only (kept): {path}" for path in repo.remote_only]
        lines += [f"  note: {note}" for note in repo.notes]
    return "\n".join(lines)


def release(
    files: ReleaseFiles,
    work_dir: str | os.PathLike,
    *,
    dry_run: bool = False,
    token=None,
    endpoint: str | None = None,
    private: bool | None = None,
    log: Callable[[str], None] = _log_default,
    **build_options,
) -> tuple[list[ReleaseRepo], dict[str, str | None]]:
    """Build, compare with the Hub, print the plan, and (unless `dry_run`) upload what differs."""
    repos = build_release(files, work_dir, log=log, **build_options)
    compare_with_hub(repos, token=token, endpoint=endpoint)
    log(format_plan(repos))
    if dry_run:
        log(
            f"Dry run: nothing pushed ({sum(len(r.changed) for r in repos)} file(s) in {sum(bool(r.changed) for r in repos)} repo(s) would be)."
        )
        return repos, {}
    commits = publish_release(repos, token=token, endpoint=endpoint, private=private, log=log)
    pushed = [repo for repo, sha in commits.items() if sha]
    log(f"Release done: {len(pushed)} repo(s) updated, {len(commits) - len(pushed)} already up to date.")
    return repos, commits
