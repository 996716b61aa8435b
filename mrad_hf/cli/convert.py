# SPDX-License-Identifier: Apache-2.0
"""`mrad convert clip|bank|checkpoint`: the converters of `mrad_hf.conversion`, from the installed package.

    mrad convert clip ViT-L-14-336px.pt models/clip-vit-large-patch14-336        # OpenAI's file, no code run
    mrad convert bank --cache-dir ./cache --dataset visa --output banks/visa.safetensors \
        --model models/clip-vit-large-patch14-336                                 # a CLIP or an MRAD folder
    mrad convert checkpoint test_on_mvtec.pth models/mrad-clip-visa --clip models/clip-vit-large-patch14-336 \
        --bank banks/visa.safetensors

Each is the same as `python -m mrad_hf.conversion.convert_<...>` with the same options (`conversion.options`);
the converter itself (and torch) is imported only when the command runs.
"""

from __future__ import annotations

import importlib

__all__ = ["register"]

_CONVERTERS = {
    "clip": "convert_openai_clip",
    "bank": "convert_official_bank",
    "checkpoint": "convert_official_checkpoint",
}


def _runner(module: str):
    def run(args) -> int:
        return importlib.import_module(f"mrad_hf.conversion.{module}").run(args)

    return run


def register(commands) -> None:
    from ..conversion import options

    convert = commands.add_parser(
        "convert",
        help="convert OpenAI's CLIP .pt or the official MRAD banks / checkpoints (no code from the file runs)",
    )
    kinds = convert.add_subparsers(dest="kind", required=True, metavar="<kind>")
    for kind, module in _CONVERTERS.items():
        description = getattr(options, f"{kind.upper()}_DESCRIPTION")
        sub = kinds.add_parser(kind, help=description, description=description)
        getattr(options, f"add_{kind}_arguments")(sub)
        sub.set_defaults(
            handler=_runner(module), prog=f"mrad convert {kind}"
        )  # errors: 'mrad convert <kind>: error: ...'
