# SPDX-License-Identifier: Apache-2.0
"""Convert an official MRAD-FT / MRAD-CLIP checkpoint (`.pth`) to an mrad-hf `save_pretrained` folder.

The official `train.py` saves `{"image_proj", "patch_proj"}` (MRAD-FT, `mrad_ft_final.pth`) or additionally
`{"prompt_learner", "prompt_proj"}` (MRAD-CLIP: `mrad_clip_final.pth`, the released `test_on_{mvtec,visa}.pth`),
each a module state dict. All renaming is in `official_to_hf` (one function, timm style):

    image_proj.mlp1.{weight,bias}  -> image_projection.query      image_proj.mlp2 -> image_projection.key
    patch_proj.fc.0                -> patch_projection.query      patch_proj.fc.1 -> patch_projection.key
    prompt_learner.ctx_pos (1,1,n,D) -> prompt_learner.normal_context (n,D);  ctx_neg -> anomaly_context
    prompt_learner.compound_prompts_text.{i} (t,D) -> prompt_learner.deep_prompts[i]  (one (depth-1, t, D) parameter)
    prompt_proj.mlp1 -> region_bias.normal                         prompt_proj.mlp2 -> region_bias.anomaly
    prompt_learner.tokenized_prompts_{pos,neg} -> config.prompt_token_ids (the exact ids the reference used)

Known-unused official entries are dropped and listed: `prompt_learner.compound_prompt_projections.*` and
`prompt_learner.mlp.*` (created but never called at test time), `prompt_learner.token_prefix_*` / `token_suffix_*`
(token embeddings of the prompts, recomputed from the frozen CLIP). Anything else unknown, or anything missing,
stops the conversion with the list of keys.

    python -m mrad_hf.conversion.convert_official_checkpoint checkpoints/test_on_mvtec.pth models/mrad-clip-visa \
        --clip models/clip-vit-large-patch14-336 --bank banks/visa.safetensors
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from mrad_hf.conversion.common import ConversionError, check_keys, load_torch_file, print_error, require_mapping
from mrad_hf.conversion.options import CHECKPOINT_DESCRIPTION as DESCRIPTION
from mrad_hf.conversion.options import add_checkpoint_arguments as add_arguments

__all__ = [
    "official_to_hf",
    "map_official_checkpoint",
    "convert_official_checkpoint",
    "OfficialCheckpoint",
    "DROPPED_KEYS",
    "main",
    "add_arguments",
    "run",
]

_PARTS = {"ft": ("image_proj", "patch_proj"), "clip": ("image_proj", "patch_proj", "prompt_learner", "prompt_proj")}
_LINEAR_RENAMES = {
    "image_proj.mlp1.": "image_projection.query.",
    "image_proj.mlp2.": "image_projection.key.",
    "patch_proj.fc.0.": "patch_projection.query.",
    "patch_proj.fc.1.": "patch_projection.key.",
    "prompt_proj.mlp1.": "region_bias.normal.",
    "prompt_proj.mlp2.": "region_bias.anomaly.",
}
#: Official entries that MRAD's test-time computation never uses (regexes on "<part>.<key>").
DROPPED_KEYS = (
    r"prompt_learner\.compound_prompt_projections\..+",
    r"prompt_learner\.mlp\..+",
    r"prompt_learner\.token_(prefix|suffix)_(pos|neg)",
)
_DEEP_PROMPT = re.compile(r"^prompt_learner\.compound_prompts_text\.(\d+)$")
_TOKEN_IDS = {"prompt_learner.tokenized_prompts_pos": 0, "prompt_learner.tokenized_prompts_neg": 1}


def official_to_hf(
    key: str, tensor: torch.Tensor, where: str = "Official checkpoint"
) -> list[tuple[str, torch.Tensor]] | None:
    """The one key mapping: an official "<part>.<key>" entry -> [(mrad-hf name, tensor)]; [] if dropped, None if unknown.
    Errors start with `where` (the file).

    Deep prompts map to "prompt_learner.deep_prompts.<i>" (stacked into one parameter by `map_official_checkpoint`),
    the tokenized prompts to "config.prompt_token_ids.<0|1>".
    """
    for old, new in _LINEAR_RENAMES.items():
        if key.startswith(old) and key[len(old) :] in ("weight", "bias"):
            return [(new + key[len(old) :], tensor)]
    if key in ("prompt_learner.ctx_pos", "prompt_learner.ctx_neg"):
        if tensor.ndim != 4 or tensor.shape[:2] != (1, 1):
            raise ConversionError(
                f"{where}: '{key}' must have shape (1, 1, n_ctx, D) (one class, one template), got {tuple(tensor.shape)}."
            )
        name = "normal_context" if key.endswith("pos") else "anomaly_context"
        return [(f"prompt_learner.{name}", tensor[0, 0])]
    if match := _DEEP_PROMPT.match(key):
        return [(f"prompt_learner.deep_prompts.{match.group(1)}", tensor)]
    if key in _TOKEN_IDS:
        return [(f"config.prompt_token_ids.{_TOKEN_IDS[key]}", tensor)]
    if any(re.fullmatch(pattern, key) for pattern in DROPPED_KEYS):
        return []
    return None


def _token_ids(tensor: torch.Tensor, key: str, where: str) -> list[int]:
    """Ids up to and including the end token (CLIP's highest id, where the reference pools), without padding."""
    ids = tensor.reshape(-1).tolist()
    if tensor.ndim == 0 or len(ids) != tensor.shape[-1] or not ids:
        raise ConversionError(f"{where}: '{key}' must hold one tokenized prompt, got shape {tuple(tensor.shape)}.")
    end = max(range(len(ids)), key=ids.__getitem__)
    return [int(i) for i in ids[: end + 1]]


@dataclass
class OfficialCheckpoint:
    """An official checkpoint renamed to mrad-hf: what to load, what config it implies, what was dropped."""

    variant: str
    state_dict: dict[str, torch.Tensor]
    config_overrides: dict = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


def map_official_checkpoint(checkpoint: Mapping, path: str = "checkpoint") -> OfficialCheckpoint:
    """Rename every entry of an official checkpoint dict; unknown entries stop with their list."""
    parts = set(checkpoint)
    variant = "clip" if "prompt_learner" in parts or "prompt_proj" in parts else "ft"
    check_keys(parts, _PARTS[variant], f"Official checkpoint '{path}' (top-level state dicts, MRAD-{variant.upper()})")
    state_dict, deep, token_ids, dropped, unknown = {}, {}, {}, [], []
    for part in _PARTS[variant]:
        module_state = require_mapping(checkpoint[part], path, f"Official checkpoint part '{part}' of")
        for key, tensor in module_state.items():
            full = f"{part}.{key}"
            mapped = (
                official_to_hf(full, tensor, f"Official checkpoint '{path}'")
                if isinstance(tensor, torch.Tensor)
                else None
            )
            if mapped is None:
                unknown.append(full)
            elif not mapped:
                dropped.append(full)
            for name, value in mapped or []:
                if name.startswith("prompt_learner.deep_prompts."):
                    deep[int(name.rsplit(".", 1)[1])] = value
                elif name.startswith("config.prompt_token_ids."):
                    token_ids[int(name.rsplit(".", 1)[1])] = _token_ids(value, full, f"Official checkpoint '{path}'")
                else:
                    state_dict[name] = value.detach().float().contiguous()
    if unknown:
        raise ConversionError(
            f"Official checkpoint '{path}': unknown keys {sorted(unknown)}; this is not an official MRAD checkpoint."
        )
    overrides = {"variant": variant}
    if variant == "clip":
        if sorted(deep) != list(range(len(deep))) or not deep:
            raise ConversionError(
                f"Official checkpoint '{path}': deep prompts compound_prompts_text.* must be numbered 0..N-1, found {sorted(deep)}."
            )
        missing = [
            f"prompt_learner.ctx_{s}"
            for s in ("pos", "neg")
            if f"prompt_learner.{'normal' if s == 'pos' else 'anomaly'}_context" not in state_dict
        ]
        missing += [
            f"prompt_learner.tokenized_prompts_{s}" for i, s in enumerate(("pos", "neg")) if i not in token_ids
        ]
        if missing:
            raise ConversionError(f"Official checkpoint '{path}': missing keys {missing}.")
        state_dict["prompt_learner.deep_prompts"] = torch.stack([deep[i] for i in range(len(deep))]).float()
        overrides.update(
            prompt_context_length=int(state_dict["prompt_learner.normal_context"].shape[0]),
            deep_prompt_length=int(deep[0].shape[0]),
            deep_prompt_depth=len(deep) + 1,
            prompt_token_ids=[token_ids[0], token_ids[1]],
        )
    return OfficialCheckpoint(
        variant=variant, state_dict=state_dict, config_overrides=overrides, dropped=sorted(dropped)
    )


def convert_official_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    clip,
    bank=None,
    strict_bank: bool = True,
    **config_overrides,
):
    """Build the MRAD-FT / MRAD-CLIP model of an official checkpoint on `clip`, attach `bank`, save to `output_dir`.

    Args:
        checkpoint: the official `.pth` file (loaded with `weights_only=True`).
        output_dir: folder for `save_pretrained` (weights, bank, config, processor, code); nothing written when None.
        clip: the backbone, any `MRADForAnomalyDetection.from_clip` source: a transformers CLIP folder (e.g. made by
            `conversion.convert_openai_clip` from `ViT-L-14-336px.pt`), a Hub id or a loaded `CLIPModel`.
        bank: a `MemoryBank`, a bank `.safetensors` (e.g. from `conversion.convert_official_bank`) or a Hub bank repo.
        **config_overrides: further `MRADConfig` fields (e.g. `image_size`).
    Returns:
        The model (eval mode). `model.conversion_report` lists the dropped official keys.
    """
    from mrad_hf.hub.api import load_memory_bank
    from mrad_hf.models.mrad.memory_bank_mrad import MemoryBank
    from mrad_hf.models.mrad.modeling_mrad import MRADForAnomalyDetection

    raw = require_mapping(
        load_torch_file(checkpoint, "Official MRAD checkpoint"), checkpoint, "Official MRAD checkpoint"
    )
    try:
        official = map_official_checkpoint(raw, str(checkpoint))
    except (RuntimeError, IndexError, TypeError) as error:  # a malformed tensor that no check names (e.g. unstackable)
        raise ConversionError(
            f"Official checkpoint '{checkpoint}': its tensors do not form an official MRAD checkpoint "
            f"({type(error).__name__}: {str(error)[:200]})."
        ) from error
    model = MRADForAnomalyDetection.from_clip(clip, **{**config_overrides, **official.config_overrides})
    heads = ("image_projection.", "patch_projection.", "prompt_learner.", "region_bias.")
    target = {name: tensor for name, tensor in model.state_dict().items() if name.startswith(heads)}
    check_keys(official.state_dict, target, f"Official checkpoint '{checkpoint}' (after renaming to mrad-hf names)")
    mismatched = [
        f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(target[name].shape)}"
        for name, t in official.state_dict.items()
        if t.shape != target[name].shape
    ]
    if mismatched:
        raise ConversionError(
            f"Official checkpoint '{checkpoint}' does not fit this backbone ({'; '.join(mismatched)}). The official checkpoints "
            "belong to CLIP ViT-L/14@336 (pass --clip with that model)."
        )
    model.load_state_dict(
        official.state_dict, strict=False
    )  # the CLIP weights stay as loaded; heads fully covered above
    if bank is not None:
        model.set_memory_bank(bank if isinstance(bank, MemoryBank) else load_memory_bank(bank), strict=strict_bank)
    model.conversion_report = {"variant": official.variant, "dropped_official_keys": official.dropped}
    if output_dir is not None:
        from mrad_hf.memory.files import MODEL_FOLDER, atomic_directory

        with atomic_directory(
            output_dir, MODEL_FOLDER
        ) as staging:  # an interrupted conversion leaves no half-written folder
            model.save_pretrained(staging)
    return model.eval()


def run(args: argparse.Namespace) -> int:
    try:
        model = convert_official_checkpoint(
            args.checkpoint, args.output_dir, clip=args.clip, bank=args.bank, image_size=args.image_size
        )
    except (ConversionError, OSError, ValueError) as error:  # bad input files, paths, banks: one clear line
        print_error(args, error)
        return 2
    report = model.conversion_report
    print(
        f"Wrote {args.output_dir}: MRAD-{report['variant'].upper()}; dropped unused official keys: {report['dropped_official_keys'] or 'none'}"
    )
    if args.bank is None:
        print("No --bank given: attach one before scoring (model.set_memory_bank(...)).")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mrad_hf.conversion.convert_official_checkpoint", description=DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(prog=parser.prog)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
