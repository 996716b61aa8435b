# SPDX-License-Identifier: Apache-2.0
"""`mrad convert clip|bank|checkpoint`: the converters of `mrad_hf.conversion`, from the installed package.

    mrad convert clip ViT-L-14-336px.pt models/clip-vit-large-patch14-336        # OpenAI's file, no code run
    mrad convert bank --cache-dir ./cache --dataset visa --output banks/visa.safetensors \
        --model models/clip-vit-large-patch14-336                                 # a CLIP or an MRAD folder
    mrad convert checkpoint test_on_mvtec.pth models/mrad-clip-visa --clip models/clip-vit-large-patch14-336 \
        --bank banks/visa.safetensors

Each is the same as `python -m mrad_hf.conversion.convert_<...>` with the same options.
"""

from __future__ import annotations

__all__ = ["register"]


def register(commands) -> None:
    from ..conversion import convert_official_bank, convert_official_checkpoint, convert_openai_clip

    convert = commands.add_parser("convert", help="convert OpenAI's CLIP .pt or the official MRAD banks / checkpoints")
    kinds = convert.add_subparsers(dest="kind", required=True)
    for name, module in (("clip", convert_openai_clip), ("bank", convert_official_bank), ("checkpoint", convert_official_checkpoint)):
        sub = kinds.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
