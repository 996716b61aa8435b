# SPDX-License-Identifier: Apache-2.0
"""Convert the official MRAD memory banks (`cache_model_*.pt` + `cache_patch_model_*.pt`) to one mrad-hf bank.

The official release stores each memory level as a pickled dict `{"keys": (N, D) float, "values": (N, 2) one-hot}`
(`mrad.py: build_cache_model / build_patch_cache_model`): image keys are L2-normalised projected class tokens
(768-d for ViT-L/14@336), patch keys L2-normalised region prototypes (1024-d). This script checks exactly that
and writes a `MemoryBank` safetensors file whose metadata records the source dataset, the files it came from
(name and SHA-256) and, when `--model` is given, the fingerprint of the backbone the bank belongs to; otherwise
the backbone is marked unknown and only the key widths can be checked when the bank is attached.

    python -m mrad_hf.conversion.convert_official_bank --cache-dir ./cache --dataset visa --output banks/visa.safetensors
    python -m mrad_hf.conversion.convert_official_bank --image-cache cache_model_mvtec.pt --patch-cache cache_patch_model_mvtec.pt \
        --output banks/mvtec.safetensors --model models/mrad-tf      # fingerprint + feature settings of that model

Keys are kept as they are (no re-normalisation), as the official test code uses them. They must therefore be unit
length, as the official code always stores them (`F.normalize` before saving; `test.py` never re-normalises): a file
with other norms was not written by it, and would silently reweight every retrieval softmax, so it is refused.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from mrad_hf.conversion.common import (
    ConversionError,
    check_keys,
    load_torch_file,
    print_error,
    require_mapping,
    sha256_of,
)
from mrad_hf.conversion.options import BANK_DESCRIPTION as DESCRIPTION
from mrad_hf.conversion.options import add_bank_arguments as add_arguments

from ..memory.files import save_bank

__all__ = ["convert_official_bank", "read_official_cache", "VIT_L14_DIMS", "main", "add_arguments", "run"]

#: (image key width, patch key width) of the official release's backbone, CLIP ViT-L/14@336.
VIT_L14_DIMS = (768, 1024)
#: |norm - 1| allowed for an official key: fp16 rounding of a unit vector moves its norm by < 5e-4.
UNIT_NORM_TOLERANCE = 2e-3
_OFFICIAL_NAME = re.compile(r"cache(_patch)?_model_(?P<source>[A-Za-z0-9]+)\.pt$")


def read_official_cache(
    path: str | os.PathLike, *, level: str, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys float32 (N, D), values float32 (N, 2)) from one official cache file, after checking its format; `width`
    (the backbone's key width, when known) must equal D."""
    what = f"Official {level}-level bank"
    cache = require_mapping(load_torch_file(path, what), path, what)
    check_keys(cache.keys(), {"keys", "values"}, f"{what} '{path}'")
    keys, values = cache["keys"], cache["values"]
    for name, tensor in (("keys", keys), ("values", values)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.ndim != 2:
            raise ConversionError(f"{what} '{path}': '{name}' must be a 2-D float tensor, got {_describe(tensor)}.")
    if width is not None and keys.shape[1] != width:
        raise ConversionError(
            f"{what} '{path}': keys are {keys.shape[1]}-d but {width}-d were expected ({level} keys of the backbone). "
            "Pass --model with the model this bank belongs to, or check that the image and patch files are not swapped."
        )
    if values.shape != (keys.shape[0], 2):
        raise ConversionError(
            f"{what} '{path}': values must be ({keys.shape[0]}, 2) one-hot labels, got {tuple(values.shape)}."
        )
    binary = ((values == 0) | (values == 1)).all(dim=1)
    one_hot = binary & (values.sum(dim=1) == 1)
    if not bool(one_hot.all()):
        bad = torch.nonzero(~one_hot).flatten()[:5].tolist()
        raise ConversionError(
            f"{what} '{path}': values are not one-hot (rows {bad} ...); column 0 must mark normal, column 1 anomalous entries."
        )
    if not bool(torch.isfinite(keys).all()):
        raise ConversionError(
            f"{what} '{path}': keys contain NaN or infinite values; the file is corrupt. Re-download it."
        )
    norms = keys.detach().double().norm(dim=1)
    off = torch.nonzero((norms - 1).abs() > UNIT_NORM_TOLERANCE).flatten()
    if len(off):
        raise ConversionError(
            f"{what} '{path}': {len(off)} of {len(norms)} keys are not unit length (rows {off[:5].tolist()} have norms "
            f"{[round(float(norms[i]), 4) for i in off[:5]]}); the official code stores L2-normalised keys and scores with "
            "them as they are, so this file was not written by it or was edited. Re-download the official file."
        )
    return keys.detach().to(torch.float32).contiguous(), values.detach().to(torch.float32).contiguous()


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def _source_from_names(image_cache: Path, patch_cache: Path) -> str | None:
    names = [_OFFICIAL_NAME.search(path.name) for path in (image_cache, patch_cache)]
    sources = {match.group("source").lower() for match in names if match}
    return sources.pop() if len(sources) == 1 else None


def _load_model(model):
    """An MRAD model from an MRAD folder / Hub id, or a new one around a transformers CLIP folder (config.json with
    `"model_type": "clip"`, e.g. from `mrad convert clip`): only its backbone and feature settings are used."""
    if model is None or not isinstance(model, (str, os.PathLike)):
        return model
    import json

    from mrad_hf.models.mrad.modeling_mrad import MRADForAnomalyDetection

    config_file = Path(model) / "config.json"
    if config_file.is_file():
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError) as error:
            raise ConversionError(f"Model folder '{model}': config.json is not valid JSON ({error}).") from error
        if model_type == "clip":
            return MRADForAnomalyDetection.from_clip(str(model))
        if model_type != "mrad":
            raise ConversionError(
                f"'{model}' is a '{model_type}' folder; --model takes an MRAD model folder or a transformers CLIP folder."
            )
    from mrad_hf.hub.api import load_model

    return load_model(model)


def convert_official_bank(
    image_cache: str | os.PathLike,
    patch_cache: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    model=None,
    source: str | None = None,
):
    """Read an official bank pair and return (and, with `output`, save) the equivalent `MemoryBank`.

    Args:
        image_cache: `cache_model_<dataset>.pt` (image level).
        patch_cache: `cache_patch_model_<dataset>.pt` (pixel level).
        output: where to write the `.safetensors` bank (atomically); nothing is written when None.
        model: the `MRADForAnomalyDetection` (or its folder / Hub id), or a transformers CLIP folder, the bank belongs
            to: its backbone fingerprint and feature settings go into the metadata and its key widths are checked.
            Without it the widths are taken from the files (any backbone) and the backbone is recorded as unknown.
        source: the auxiliary dataset name (default: from the file names, e.g. "visa").
    """
    from mrad_hf.models.mrad.configuration_mrad import MRADConfig
    from mrad_hf.models.mrad.memory_bank_mrad import MemoryBank, backbone_fingerprint, feature_settings

    image_cache, patch_cache = Path(image_cache), Path(patch_cache)
    model = _load_model(model)
    if model is not None:
        widths = (int(model.config.image_key_dim), int(model.config.patch_key_dim))
        backbone, features = backbone_fingerprint(model.clip), feature_settings(model.config)
    else:  # the official banks were built with the reference settings, which are MRADConfig's defaults
        widths, backbone, features = (None, None), None, feature_settings(MRADConfig())
    image_keys, image_values = read_official_cache(image_cache, level="image", width=widths[0])
    patch_keys, patch_values = read_official_cache(patch_cache, level="patch", width=widths[1])
    source = source or _source_from_names(image_cache, patch_cache)
    bank = MemoryBank(
        image_keys=image_keys,
        image_values=image_values,
        patch_keys=patch_keys,
        patch_values=patch_values,
        metadata={
            "source": source,
            "backbone": backbone,
            "features": features,
            "conversion": {
                "from": "official MRAD release (github.com/CROVO1026/MRAD, build_cache_model / build_patch_cache_model)",
                "image_file": image_cache.name,
                "image_sha256": sha256_of(image_cache),
                "patch_file": patch_cache.name,
                "patch_sha256": sha256_of(patch_cache),
                "backbone": "fingerprint of the given model"
                if backbone
                else "unknown (no --model given); the official banks are for CLIP ViT-L/14@336 (768 / 1024-d keys)",
            },
        },
    )
    if output is not None:
        save_bank(bank, output)
    return bank


def _official_pair(cache_dir: str, dataset: str) -> tuple[Path, Path]:
    folder = Path(cache_dir)
    return folder / f"cache_model_{dataset}.pt", folder / f"cache_patch_model_{dataset}.pt"


def run(args: argparse.Namespace) -> int:
    if args.cache_dir and args.dataset:
        image_cache, patch_cache = _official_pair(args.cache_dir, args.dataset)
    elif args.image_cache and args.patch_cache:
        image_cache, patch_cache = Path(args.image_cache), Path(args.patch_cache)
    else:
        print("error: give --cache-dir and --dataset, or --image-cache and --patch-cache", file=sys.stderr)
        return 2
    try:
        bank = convert_official_bank(
            image_cache, patch_cache, args.output, model=args.model, source=args.source or args.dataset
        )
    except (ConversionError, OSError, ValueError) as error:  # bad input files, paths, banks: one clear line
        print_error(args, error)
        return 2
    print(f"Wrote {args.output}: {bank}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mrad_hf.conversion.convert_official_bank", description=DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(prog=parser.prog)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
