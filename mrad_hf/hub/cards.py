# SPDX-License-Identifier: Apache-2.0
"""Render the Hub model card (README.md) of an MRAD model repo from the templates in this folder.

    # from a saved model (variant, memory source and input size are read from its config)
    python -m mrad_hf.hub.cards --model models/mrad-clip-visa --repo-id myorg/mrad-clip-visa \
        --results results/mvtec-from-visa/results.json --output README.md
    # without the model at hand
    python -m mrad_hf.hub.cards --variant clip --auxiliary visa --repo-id myorg/mrad-clip-visa \
        --results results/mvtec-from-visa/results.json --output README.md

`--results` takes the `results.json` files written by `mrad evaluate` (one per evaluated dataset); they fill
the card's `model-index`. `mrad push` renders the same card automatically (`mrad_hf.hub.render_model_card`).
Templates: `model_card_template.md` (models) and `bank_card_template.md` (memory-bank repos).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrad_hf.hub.api import render_model_card
from mrad_hf.memory.files import atomic_write

__all__ = ["card_config", "main"]


def card_config(variant: str, auxiliary: str, image_size: int = 518) -> SimpleNamespace:
    """The few config fields a card needs, for rendering without loading the model."""
    return SimpleNamespace(variant=variant, memory_bank_metadata={"source": auxiliary}, image_size=image_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mrad_hf.hub.cards", description="Render an MRAD model card (README.md)."
    )
    parser.add_argument("--repo-id", required=True, help="<org>/<name> the card is for (used in the usage snippet)")
    parser.add_argument(
        "--model", help="a saved MRAD model folder (or Hub id) to read variant, memory source and input size from"
    )
    parser.add_argument(
        "--variant", choices=("tf", "ft", "clip"), help="without --model: MRAD-TF, MRAD-FT or MRAD-CLIP"
    )
    parser.add_argument(
        "--auxiliary", choices=("visa", "mvtec"), help="without --model: the auxiliary (memory / training) dataset"
    )
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--results", nargs="*", default=[], help="results.json files from `mrad evaluate`")
    parser.add_argument("--base-model", help="CLIP checkpoint id (default openai/clip-vit-large-patch14-336)")
    parser.add_argument("--output", default="README.md")
    args = parser.parse_args(argv)
    if args.model:
        from mrad_hf.models.mrad.configuration_mrad import MRADConfig

        config = MRADConfig.from_pretrained(args.model)
    elif args.variant and args.auxiliary:
        config = card_config(args.variant, args.auxiliary, args.image_size)
    else:
        parser.error("give --model, or --variant and --auxiliary")
    try:
        card = render_model_card(config, repo_id=args.repo_id, results=args.results, base_model=args.base_model)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    atomic_write(args.output, lambda tmp: card.save(tmp))
    print(f"Wrote {args.output} ({len(card.data.eval_results or [])} evaluation results in model-index)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
