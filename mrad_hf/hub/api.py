# SPDX-License-Identifier: Apache-2.0
"""MRAD artefacts on the Hugging Face Hub: short model names, push and pull of models and memory banks, cards.

* **Short names.** `load_model("mrad-clip")` and the `mrad` CLI (`--model mrad-clip`; also `"mrad-tf"`, `"mrad-ft"`,
  and the explicit auxiliary settings `"mrad-clip-visa"`, `"mrad-clip-mvtec"`, ...) resolve it to a repo in the
  default namespace `DEFAULT_HUB_NAMESPACE` ("mrad-hf"); set `MRAD_HUB_NAMESPACE` to use your own
  organisation. A local folder with that name always wins. The suffix names the **auxiliary** data (memory
  and training): `mrad-clip-visa` is the official `test_on_mvtec.pth` setting (trained on VisA, for MVTec AD
  and the other datasets), `mrad-clip-mvtec` is `test_on_visa.pth`. The bare names are the paper's default
  setting, VisA. `"mrad-bank-visa"` / `"mrad-bank-mvtec"` name the converted official banks. transformers' own
  entry points (`MRADForAnomalyDetection.from_pretrained`, `AutoModel.from_pretrained`, `pipeline(model=...)`) take
  full ids or folders only: pass them `resolve_model_id("mrad-clip")`.
* **Models** are pushed as the full `save_pretrained` folder (weights with the attached bank, config with
  `auto_map` and `custom_pipelines`, `preprocessor_config.json`, the model and pipeline code) plus a model
  card rendered from `mrad_hf/hub/templates/` (`push_model`). Pull with `from_pretrained(repo_id, revision=...)` or
  `pull_model` (a `snapshot_download`, so the model later loads offline with `HF_HUB_OFFLINE=1`).
* **Memory banks** are artefacts of their own: a bank repo holds `memory_bank.safetensors`, its metadata as
  `memory_bank.json` and a README card (`push_memory_bank`); `load_memory_bank(repo_or_path, revision=...)`
  uses `hf_hub_download`, so a bank downloaded once is reused offline from the cache.
* **Errors.** When a download is impossible, `HubDownloadError` (an `OSError`) says which repo, revision
  and offline setting were tried and how to work offline (pre-download with `mrad pull` /
  `hf download`, then `HF_HUB_OFFLINE=1`, or pass a local folder).

Cards: `render_model_card` / `render_bank_card` fill the Jinja templates in `mrad_hf/hub/templates/` (transformers /
huggingface_hub conventions, `model-index` from `mrad evaluate`'s `results.json`); `mrad_hf.hub.cards`
is the command-line front end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..memory.files import load_bank, save_bank, save_model
from ..models.mrad.memory_bank_mrad import MODEL_BANK_FILENAME, MemoryBank

__all__ = [
    "BANK_FILENAME",
    "BANK_METADATA_FILENAME",
    "DEFAULT_HUB_NAMESPACE",
    "NAMESPACE_ENV",
    "SHORT_NAMES",
    "HubDownloadError",
    "explain_download_error",
    "hub_namespace",
    "resolve_model_id",
    "load_model",
    "load_detector_bundle",
    "pull_model",
    "push_model",
    "write_endpoint_handler",
    "write_model_repo",
    "write_bank_repo",
    "push_memory_bank",
    "load_memory_bank",
    "pull_memory_bank",
    "render_model_card",
    "render_bank_card",
    "eval_results_from_json",
]

DEFAULT_HUB_NAMESPACE = "mrad-hf"
NAMESPACE_ENV = "MRAD_HUB_NAMESPACE"
BANK_FILENAME = "memory_bank.safetensors"
BANK_METADATA_FILENAME = MODEL_BANK_FILENAME  # "memory_bank.json": the same sidecar as in a saved model folder

#: short name -> repo name inside the namespace. The suffix is the auxiliary data (memory / training set).
SHORT_NAMES: dict[str, str] = {
    **{f"mrad-{v}": f"mrad-{v}-visa" for v in ("tf", "ft", "clip")},
    **{f"mrad-{v}-{a}": f"mrad-{v}-{a}" for v in ("tf", "ft", "clip") for a in ("visa", "mvtec")},
    "mrad-bank-visa": "mrad-bank-visa",
    "mrad-bank-mvtec": "mrad-bank-mvtec",
}

CARDS_DIR_ENV = "MRAD_HUB_CARDS_DIR"
#: the Inference Endpoints custom handler `push_model` writes into model repos as `handler.py` (package data)
ENDPOINT_HANDLER_FILE = Path(__file__).resolve().parent / "templates" / "handler.py"


class HubDownloadError(OSError):
    """A model or bank could not be obtained from the Hub or the cache; the message says how to work offline."""


# ---------------------------------------------------------------------- resolution
def hub_namespace() -> str:
    """The namespace short names resolve to: `$MRAD_HUB_NAMESPACE`, else `DEFAULT_HUB_NAMESPACE`."""
    return os.environ.get(NAMESPACE_ENV, "").strip().strip("/") or DEFAULT_HUB_NAMESPACE


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _is_local(name: str) -> bool:
    return os.path.isdir(name) or os.path.isfile(name)


def resolve_model_id(
    name: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    filename: str = "config.json",
) -> str:
    """Map a short name (`"mrad-clip"`) to `<namespace>/<repo>`; local paths and other ids pass through.

    A local file or folder of that name wins over the Hub. When offline (`HF_HUB_OFFLINE=1` or
    `local_files_only=True`) a Hub id whose files are not in the cache raises `HubDownloadError` here, with
    the offline recipe, instead of a generic "not found" later (`filename` is the file probed in the cache).
    """
    name = os.fspath(name)
    if _is_local(name):
        return name
    repo_id = _repo_for(name)
    if (local_files_only or _offline()) and not _in_cache(repo_id, filename, revision, cache_dir):
        reason = f"'{filename}' of this revision is not in the local cache"
        raise HubDownloadError(_download_help(name, repo_id, revision, reason=reason, cache_dir=cache_dir))
    return repo_id


def _repo_for(name: str) -> str:
    """The Hub id a name stands for: `<namespace>/<repo>` for short names, the name itself otherwise."""
    return f"{hub_namespace()}/{SHORT_NAMES[name]}" if name in SHORT_NAMES else name


def _in_cache(repo_id: str, filename: str, revision: str | None, cache_dir) -> bool:
    from huggingface_hub import try_to_load_from_cache

    if repo_id.count("/") > 1:  # not a Hub id (e.g. a missing local path): let the caller's error speak
        return True
    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    except ValueError:  # malformed id: let the caller's own error speak
        return True
    return isinstance(found, str)


def _download_help(name: str, repo_id: str, revision: str | None, reason: str, cache_dir=None) -> str:
    from huggingface_hub import constants

    alias = (
        f" ('{name}' is a short name for it; set {NAMESPACE_ENV} to use another organisation)"
        if name in SHORT_NAMES
        else ""
    )
    return (
        f"Could not get '{repo_id}'{alias} at revision '{revision or 'main'}' from {constants.ENDPOINT} "
        f"(offline mode: {'on' if _offline() else 'off'}, cache: {cache_dir or constants.HF_HUB_CACHE}; no local folder '{name}' exists): {reason}. "
        f"To work offline: download it once while online with `mrad pull {name}"
        f"{f' --revision {revision}' if revision else ''}` (or `hf download {repo_id}`), then set HF_HUB_OFFLINE=1; "
        "or pass a local folder saved with save_pretrained."
        + (
            f" Note: the short-name repos under {DEFAULT_HUB_NAMESPACE}/ are not published yet (README, 'Published "
            "models'): publish them under your organisation with `mrad release` and "
            f"{NAMESPACE_ENV}, or build a model with `mrad build-bank ... --save-model`."
            if name in SHORT_NAMES and hub_namespace() == DEFAULT_HUB_NAMESPACE
            else ""
        )
    )


def explain_download_error(
    name: str | os.PathLike, error: Exception, *, revision: str | None = None, cache_dir=None
) -> Exception:
    """The `HubDownloadError` (with what was tried and the offline recipe) for a failed download of `name`.

    Returns `error` itself when `name` is a local path or the error is already explained, so callers can always
    `raise explain_download_error(name, error, revision=...) from error` around a `from_pretrained` call.
    """
    name = os.fspath(name)
    if isinstance(error, HubDownloadError) or _is_local(name):
        return error
    reason = f"{type(error).__name__}: {error}"
    return HubDownloadError(_download_help(name, _repo_for(name), revision, reason=reason, cache_dir=cache_dir))


# ---------------------------------------------------------------------- models
def load_model(name: str | os.PathLike, **kwargs):
    """`MRADForAnomalyDetection.from_pretrained` that also takes the short names (`"mrad-tf"`, `SHORT_NAMES`); a local
    folder of that name wins. Any download failure becomes a `HubDownloadError` that says what was tried and how to work
    offline. transformers' `from_pretrained` / `AutoModel` / `pipeline` take full ids (`resolve_model_id` maps one).

    A config.json whose sizes do not fit the weights (an edited `image_bank_size`, vision `hidden_size`, ...) is one
    `ValueError` naming the folder, instead of transformers' LOAD REPORT and its advice to pass a Python argument.
    """
    from transformers.modeling_utils import logger as loading_logger

    from ..models.mrad.modeling_mrad import MRADForAnomalyDetection

    name = resolve_model_id(
        name,
        revision=kwargs.get("revision"),
        cache_dir=kwargs.get("cache_dir"),
        local_files_only=kwargs.get("local_files_only", False),
    )
    held, mismatch = _HeldLoadReports(), None
    loading_logger.addFilter(held)
    try:
        return MRADForAnomalyDetection.from_pretrained(name, **kwargs)
    except OSError as error:
        raise explain_download_error(
            name, error, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir")
        ) from error
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        mismatch = error
    finally:
        loading_logger.removeFilter(held)
        for record in held.records if mismatch is None else ():  # the report of any other outcome is shown as is
            loading_logger.handle(record)
    raise ValueError(
        f"Model '{name}': its config.json does not match its model.safetensors (tensor shapes differ{held.mismatched()})"
        ": config.json was edited or comes from another save. Restore config.json, or re-save the model."
    ) from mismatch


class _HeldLoadReports(logging.Filter):
    """Holds back transformers' LOAD REPORT while `load_model` runs: a size mismatch becomes one error instead."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" not in str(record.msg):
            return True
        self.records.append(record)
        return False

    def mismatched(self) -> str:
        """': key [36, 128] saved vs [30, 128] configured; ...' for (up to three of) the report's MISMATCH rows."""
        rows = sorted(
            re.findall(
                r"^(\S+)\s*\|.*?MISMATCH.*?ckpt: torch\.Size\((\[.*?\])\) vs model:\s*torch\.Size\((\[.*?\])\)",
                "\n".join(record.getMessage() for record in self.records),
                flags=re.MULTILINE,
            )
        )
        shown = [f"{key} {saved} saved vs {expected} configured" for key, saved, expected in rows[:3]]
        more = [f"{len(rows) - 3} more"] if len(rows) > 3 else []
        return ": " + "; ".join(shown + more) if shown else ""


#: The preprocessing settings a model's bank was built with (the config's processor): a saved processor that
#: differs in any of them would score images the bank never saw (edited file, or one from another model).
_PREPROCESSING_FIELDS = (
    "do_resize size resample do_center_crop do_convert_rgb do_rescale rescale_factor do_normalize image_mean image_std"
).split()


def load_detector_bundle(name: str | os.PathLike, *, backend: str | None = None, **kwargs):
    """The one way to load a model folder / Hub id / short name: `(model, image_processor)`, the processor being the
    one saved beside the weights (`preprocessor_config.json`, as `pipeline(model=folder)` reads it; the config's
    defaults when the folder has none). The pipeline, the CLI and the app all score through this pair, so one
    folder gives one score everywhere. `kwargs` go to `from_pretrained`; `backend` ("pil" default, "torchvision")
    picks `MRADImageProcessor` or `MRADImageProcessorFast`.

    Safe by construction: the file is read as JSON and MRAD's own classes are built from it, so a folder's code
    (`auto_map`) never runs and never prompts. Raises `ValueError` when the saved processor is not MRAD's or its
    resize / rescale / normalise settings differ from the config's processor (the one the bank was built with).
    """
    from transformers.utils import cached_file

    from ..models.mrad.image_processing_mrad import MRADImageProcessor, MRADImageProcessorFast

    model = load_model(name, **kwargs)
    hub = {key: kwargs[key] for key in ("revision", "cache_dir", "local_files_only", "token") if key in kwargs}
    source = resolve_model_id(
        name,
        revision=hub.get("revision"),
        cache_dir=hub.get("cache_dir"),
        local_files_only=hub.get("local_files_only", False),
    )
    saved = cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False, **hub)
    if saved is None:
        return model, MRADImageProcessor.from_config(model.config)
    kind = _read_json_object(saved).get("image_processor_type")
    if kind not in ("MRADImageProcessor", "MRADImageProcessorFast"):
        raise ValueError(
            f"{saved} names image_processor_type {kind!r}, not MRAD's image processor ('MRADImageProcessor'); re-save "
            "the model with save_pretrained (it writes the matching preprocessor_config.json) or delete the file."
        )
    processor_class = MRADImageProcessorFast if backend == "torchvision" else MRADImageProcessor
    processor = processor_class.from_pretrained(source, **hub)
    loaded, expected = (_plain(p.to_dict()) for p in (processor, processor_class.from_config(model.config)))
    edited = [
        f"{key} {loaded.get(key)} in the file vs {expected.get(key)} from config.json"
        for key in _PREPROCESSING_FIELDS
        if loaded.get(key) != expected.get(key)
    ]
    if edited:
        raise ValueError(
            f"{saved} and the model's config.json (which its memory bank was built with) disagree on preprocessing: "
            f"{'; '.join(edited)}. Restore the edited file, or re-save the model with save_pretrained (it writes the "
            "processor config.json describes)."
        )
    return model, processor


def _read_json_object(path: str) -> dict[str, Any]:
    """A JSON object file; any other content (unreadable, not an object, nested too deeply) names the file."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}); restore it or re-save the model.") from error
    if not isinstance(content, dict):
        raise ValueError(
            f"{path} holds a JSON {type(content).__name__}, not an object; restore it or re-save the model."
        )
    return content


def _plain(value):
    """JSON's view of a value (tuples as lists, enums as numbers), so that two processors' settings compare."""
    return json.loads(json.dumps(value, default=str))


def pull_model(
    name: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
) -> str:
    """Download every file of a model repo into the cache (or `local_dir`); returns the local folder."""
    return _snapshot(
        name, "model", revision=revision, cache_dir=cache_dir, token=token, local_dir=local_dir, endpoint=endpoint
    )


def _snapshot(name: str, repo_type: str, **kwargs) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(_repo_for(name), repo_type=repo_type, **kwargs)
    except Exception as error:  # network, auth, missing repo or revision: all end here with the recipe
        raise explain_download_error(
            name, error, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir")
        ) from error


def _api(token, endpoint):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token)


def _upload(api, folder: str, repo_id: str, *, revision, private, commit_message, create_pr):
    """Create the repo (and the branch) if needed, then commit the folder; returns the `CommitInfo`."""
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main" and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision, create_pr=create_pr
    )


def push_model(
    model,
    repo_id: str,
    *,
    results: Sequence[str | os.PathLike | Mapping] | str | os.PathLike | Mapping | None = None,
    base_model: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    endpoint_handler: bool = True,
):
    """Push a whole MRAD model: every file `save_pretrained` writes, a model card rendered from `mrad_hf/hub/templates/`
    and `handler.py`, the Inference Endpoints custom handler (`templates/handler.py`; it needs no mrad_hf).

    Args:
        model: an `MRADForAnomalyDetection` (its attached memory bank travels in `model.safetensors`).
        repo_id: `"<org>/<name>"`; created if missing (public unless `private=True`).
        results: `results.json` file(s) written by `mrad evaluate` (or their loaded dicts) for the card's
            `model-index`; runs on a random backbone are refused.
        base_model: the CLIP checkpoint id for the card (default: `openai/clip-vit-large-patch14-336`).
        revision: a branch to push to (created from main if missing).
        endpoint_handler: also write `handler.py` (default True).
    Returns:
        huggingface_hub's `CommitInfo` (`.oid` is the commit sha, usable as `revision=`).
    """
    if model.memory.image_keys.shape[0] == 0:
        warnings.warn(
            f"Pushing {repo_id} without a memory bank: it cannot score images until users attach one "
            "(model.set_memory_bank). Build or attach the bank before pushing if that is not intended.",
            stacklevel=2,
        )
    api = _api(token, endpoint)
    with tempfile.TemporaryDirectory(prefix="mrad-push-") as folder:
        write_model_repo(
            model, folder, repo_id=repo_id, results=results, base_model=base_model, endpoint_handler=endpoint_handler
        )
        return _upload(
            api,
            folder,
            repo_id,
            revision=revision,
            private=private,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload {_variant_title(_variant(model.config))} model",
        )


def write_model_repo(
    model,
    folder: str | os.PathLike,
    *,
    repo_id: str,
    results=None,
    base_model: str | None = None,
    endpoint_handler: bool = True,
) -> Path:
    """Write exactly what `push_model` uploads into `folder`: `save_pretrained` files, README.md card, `handler.py`."""
    from types import (
        SimpleNamespace,  # the card reads the variant (config) and the bank's provenance (memory_bank.json)
    )

    card_config = SimpleNamespace(
        variant=model.config.variant,
        image_size=model.config.image_size,
        memory_bank_metadata=model.memory_bank_metadata,
    )
    card = render_model_card(card_config, repo_id=repo_id, results=results, base_model=base_model)
    save_model(model, folder)
    card.save(os.path.join(folder, "README.md"))
    if endpoint_handler:
        write_endpoint_handler(folder)
    return Path(folder)


def write_endpoint_handler(folder: str | os.PathLike) -> Path:
    """Copy the Inference Endpoints handler into a model folder as `handler.py`; returns its path."""
    target = Path(folder) / "handler.py"
    target.write_bytes(ENDPOINT_HANDLER_FILE.read_bytes())
    return target


# ---------------------------------------------------------------------- memory banks
def push_memory_bank(
    bank: MemoryBank | str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
):
    """Push a memory bank on its own: `memory_bank.safetensors`, `memory_bank.json` (its metadata), README card."""
    if not isinstance(bank, MemoryBank):
        bank = load_bank(bank)
    api = _api(token, endpoint)
    with tempfile.TemporaryDirectory(prefix="mrad-bank-push-") as folder:
        write_bank_repo(bank, folder, repo_id=repo_id)
        return _upload(
            api,
            folder,
            repo_id,
            revision=revision,
            private=private,
            create_pr=create_pr,
            commit_message=commit_message
            or f"Upload MRAD memory bank ({bank.metadata.get('source') or 'unknown source'})",
        )


def write_bank_repo(bank: MemoryBank, folder: str | os.PathLike, *, repo_id: str) -> Path:
    """Write exactly what `push_memory_bank` uploads into `folder`: the bank, `memory_bank.json`, README.md card."""
    save_bank(bank, os.path.join(folder, BANK_FILENAME))
    Path(folder, BANK_METADATA_FILENAME).write_text(
        json.dumps(bank.metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    render_bank_card(bank, repo_id=repo_id).save(os.path.join(folder, "README.md"))
    return Path(folder)


def load_memory_bank(
    repo_id_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    endpoint: str | None = None,
    filename: str = BANK_FILENAME,
) -> MemoryBank:
    """A `MemoryBank` from a local file / folder or a Hub bank repo (`hf_hub_download`, reused offline from the cache)."""
    from huggingface_hub import hf_hub_download

    name = os.fspath(repo_id_or_path)
    if _is_local(name):
        return load_bank(name)
    repo_id = resolve_model_id(
        name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, filename=filename
    )
    try:
        path = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            endpoint=endpoint,
        )
    except Exception as error:
        raise explain_download_error(name, error, revision=revision, cache_dir=cache_dir) from error
    return load_bank(path)


def pull_memory_bank(
    name: str, *, revision: str | None = None, cache_dir=None, token=None, local_dir=None, endpoint=None
) -> str:
    """Download a bank repo (bank, metadata, card) into the cache or `local_dir`; returns the local folder."""
    return _snapshot(
        name, "model", revision=revision, cache_dir=cache_dir, token=token, local_dir=local_dir, endpoint=endpoint
    )


# ---------------------------------------------------------------------- cards
_VARIANTS = {
    "tf": (
        "MRAD-TF",
        "train-free: frozen CLIP features are matched against the two-level memory; no trained parameters.",
    ),
    "ft": (
        "MRAD-FT",
        "the train-free retrieval plus two trained linear query/key projections (image and patch level), "
        "trained one epoch on the auxiliary data.",
    ),
    "clip": (
        "MRAD-CLIP",
        "MRAD-FT plus learned text prompts whose CLIP text-image similarity is combined with the "
        "retrieval, trained six epochs on the auxiliary data.",
    ),
}
_DATASETS = {  # loader name -> (display name, licence id, licence text)
    "visa": ("VisA", "cc-by-4.0", "VisA (Zou et al., ECCV 2022) is CC BY 4.0"),
    "mvtec": (
        "MVTec AD",
        "cc-by-nc-sa-4.0",
        "MVTec AD (Bergmann et al., CVPR 2019 / IJCV 2021) is CC BY-NC-SA 4.0: non-commercial use only",
    ),
}
_METRIC_NAMES = {
    "image_auroc": "Image AUROC",
    "image_ap": "Image AP",
    "image_f1_max": "Image F1-max",
    "pixel_auroc": "Pixel AUROC",
    "pixel_ap": "Pixel AP",
    "pixel_f1_max": "Pixel F1-max",
    "aupro": "Pixel AUPRO",
}
_BASE_MODEL = "openai/clip-vit-large-patch14-336"
_TAGS = ["anomaly-detection", "zero-shot-anomaly-detection", "mrad", "clip", "industrial-inspection"]


def _cards_dir() -> Path:
    """The card templates: package data (`mrad_hf/hub/templates/`), or a folder named by MRAD_HUB_CARDS_DIR."""
    override = os.environ.get(CARDS_DIR_ENV)
    if override:
        if not Path(override, "model_card_template.md").is_file():
            raise FileNotFoundError(
                f"{CARDS_DIR_ENV}={override!r} has no model_card_template.md; unset it to use the packaged templates."
            )
        return Path(override)
    return Path(__file__).resolve().parent / "templates"


def _variant(config) -> str:
    return str(getattr(config, "variant", None) or "tf")


def _variant_title(variant: str) -> str:
    return _VARIANTS.get(variant, (f"MRAD-{variant.upper()}", ""))[0]


def _load_results(results) -> list[dict[str, Any]]:
    if results is None:
        return []
    if isinstance(results, (str, os.PathLike, Mapping)):
        results = [results]
    loaded = []
    for item in results:
        if isinstance(item, Mapping):
            loaded.append(dict(item))
            continue
        path = Path(item)
        try:
            loaded.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Cannot read the evaluation results '{path}' ({error}); pass the results.json written by `mrad evaluate`."
            ) from error
    return loaded


def eval_results_from_json(results, *, allow_random_backbone: bool = False) -> list:
    """`huggingface_hub.EvalResult`s (one per metric and dataset) from `mrad evaluate`'s `results.json` content.

    Values are the mean over categories, in percent with two decimals (the papers' unit). A run on a randomly
    initialised backbone (`run.pretrained == false`) is refused unless `allow_random_backbone=True`: its numbers
    say nothing about MRAD and must not end up in a model-index.
    """
    from huggingface_hub import EvalResult

    entries = []
    for index, result in enumerate(_load_results(results)):
        if "mean" not in result or "dataset" not in result:
            raise ValueError(
                f"Evaluation results #{index} lack 'dataset' / 'mean': not a results.json from `mrad evaluate`."
            )
        if result.get("run", {}).get("pretrained") is False and not allow_random_backbone:
            raise ValueError(
                f"Evaluation results #{index} ({result['dataset']}) come from a randomly initialised backbone; their numbers "
                "are meaningless for a model card. Evaluate with the pretrained CLIP (or pass allow_random_backbone=True)."
            )
        dataset = str(result["dataset"])
        display = _DATASETS.get(dataset, (dataset,))[0]
        for key, value in result["mean"].items():
            if value is None:
                continue
            entries.append(
                EvalResult(
                    task_type="image-segmentation",
                    task_name="Zero-shot anomaly detection",
                    dataset_type=dataset,
                    dataset_name=display,
                    dataset_split="test",
                    metric_type=key,
                    metric_name=_METRIC_NAMES.get(key, key),
                    metric_value=round(100 * float(value), 2),
                )
            )
    return entries


def _licence(source: str | None) -> tuple[str, list[str]]:
    """(the card's `license` id, the licence notes): a bank derived from MVTec AD inherits its NC-SA terms."""
    notes = ["Code: Apache-2.0 (mrad-hf). CLIP weights: MIT (OpenAI)."]
    notes += [text for _, _, text in _DATASETS.values()]
    licence = _DATASETS[source][1] if source in _DATASETS else "other"
    return licence, notes


def _bank_source(config) -> str | None:
    return (getattr(config, "memory_bank_metadata", None) or {}).get("source")


def render_model_card(
    config,
    *,
    repo_id: str,
    results=None,
    base_model: str | None = None,
    allow_random_backbone: bool = False,
    template_path=None,
):
    """The `huggingface_hub.ModelCard` of an MRAD model repo (metadata + usage + limits + model-index)."""
    from huggingface_hub import ModelCard, ModelCardData

    variant = _variant(config)
    source = _bank_source(config)
    licence, notes = _licence(source)
    eval_results = eval_results_from_json(results, allow_random_backbone=allow_random_backbone)
    title, summary = _VARIANTS.get(variant, (_variant_title(variant), ""))
    aux_name = _DATASETS.get(source, (source or "unknown data",))[0]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="other",  # no Hub task has this output; "image-segmentation" made the Hub offer a snippet that fails
        license=licence,
        base_model=base_model or _BASE_MODEL,
        datasets=[source] if source else None,
        tags=[*_TAGS, f"mrad-{variant}"],
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
        metrics=sorted({e.metric_type for e in eval_results}) or None,
    )
    counts = (getattr(config, "memory_bank_metadata", None) or {}).get("counts") or {}
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or _cards_dir() / "model_card_template.md"),
        repo_id=repo_id,
        title=title,
        variant=variant,
        variant_summary=summary,
        auxiliary=aux_name,
        source=source,
        base_model=card_data.base_model,
        image_size=int(getattr(config, "image_size", 518)),
        counts=counts,
        results=_results_table(eval_results),
        licence_notes=notes,
        licence=licence,
    )


def _results_table(eval_results) -> list[dict[str, Any]]:
    """One row per dataset for the card's Markdown table, metrics in `_METRIC_NAMES` order ("–" when absent)."""
    rows: dict[str, dict[str, float]] = {}
    for entry in eval_results:
        rows.setdefault(entry.dataset_name, {})[entry.metric_type] = entry.metric_value
    return [
        {"dataset": name, "cells": ["–" if values.get(key) is None else f"{values[key]:.1f}" for key in _METRIC_NAMES]}
        for name, values in rows.items()
    ]


def render_bank_card(bank: MemoryBank, *, repo_id: str, base_model: str | None = None, template_path=None):
    """The card of a memory-bank repo: provenance, counts, backbone, licence of the data it was built from."""
    from huggingface_hub import ModelCard, ModelCardData

    metadata = bank.metadata
    source = metadata.get("source")
    licence, notes = _licence(source)
    card_data = ModelCardData(
        library_name="mrad-hf",
        license=licence,
        datasets=[source] if source else None,
        tags=["anomaly-detection", "zero-shot-anomaly-detection", "mrad", "memory-bank"],
        base_model=base_model or _BASE_MODEL,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or _cards_dir() / "bank_card_template.md"),
        repo_id=repo_id,
        source=source,
        auxiliary=_DATASETS.get(source, (source or "unknown data",))[0],
        counts=bank.counts(),
        image_dim=int(bank.image_keys.shape[1]),
        patch_dim=int(bank.patch_keys.shape[1]),
        backbone=metadata.get("backbone"),
        features=metadata.get("features"),
        provenance=metadata.get("conversion"),
        format_version=metadata.get("format_version"),
        licence_notes=notes,
        licence=licence,
    )
