# SPDX-License-Identifier: Apache-2.0
"""The command-line options of the three converters, shared by `python -m mrad_hf.conversion.<script>` and
`mrad convert clip|bank|checkpoint`. Standard library only, so `mrad --help` answers without importing torch."""

from __future__ import annotations

import argparse

__all__ = [
    "CLIP_DESCRIPTION",
    "BANK_DESCRIPTION",
    "CHECKPOINT_DESCRIPTION",
    "add_clip_arguments",
    "add_bank_arguments",
    "add_checkpoint_arguments",
]

BANK_DESCRIPTION = "Convert the official MRAD memory banks (cache_model_*.pt + cache_patch_model_*.pt) to an mrad-hf bank (.safetensors)."
CHECKPOINT_DESCRIPTION = "Convert an official MRAD-FT / MRAD-CLIP checkpoint (.pth) to an mrad-hf model folder."
CLIP_DESCRIPTION = "Convert OpenAI's CLIP checkpoint (ViT-L-14-336px.pt, TorchScript or state dict) to a transformers CLIPModel folder."


def add_bank_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of this converter (shared by `python -m` and `mrad convert`)."""
    parser.add_argument("--cache-dir", help="folder with the official files (use with --dataset)")
    parser.add_argument(
        "--dataset", help="visa or mvtec: picks cache_model_<dataset>.pt and cache_patch_model_<dataset>.pt"
    )
    parser.add_argument("--image-cache", help="the image-level file (cache_model_<dataset>.pt)")
    parser.add_argument("--patch-cache", help="the patch-level file (cache_patch_model_<dataset>.pt)")
    parser.add_argument("--output", required=True, help="bank file to write (.safetensors)")
    parser.add_argument(
        "--model",
        help="MRAD model folder / Hub id, or transformers CLIP folder, the bank belongs to (records its backbone fingerprint)",
    )
    parser.add_argument("--source", help="auxiliary dataset name for the metadata (default: from the file names)")


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of this converter (shared by `python -m` and `mrad convert`)."""
    parser.add_argument(
        "checkpoint",
        help="official .pth (test_on_mvtec.pth, test_on_visa.pth, mrad_ft_final.pth, mrad_clip_final.pth)",
    )
    parser.add_argument("output_dir", help="folder to write with save_pretrained")
    parser.add_argument(
        "--clip", required=True, help="CLIP backbone: transformers folder (see convert_openai_clip) or Hub id"
    )
    parser.add_argument("--bank", help="memory bank: .safetensors from convert_official_bank, or a Hub bank repo")
    parser.add_argument("--image-size", type=int, default=518, help="network input size (518 as the official code)")


def add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of this converter (shared by `python -m` and `mrad convert`)."""
    parser.add_argument("checkpoint", help="OpenAI CLIP .pt file")
    parser.add_argument("output_dir", help="folder to write (config.json + model.safetensors)")
    parser.add_argument(
        "--vision-heads", type=int, help="attention heads of the image tower (default width // 64, as OpenAI)"
    )
    parser.add_argument("--text-heads", type=int, help="attention heads of the text tower (default width // 64)")
