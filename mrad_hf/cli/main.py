# SPDX-License-Identifier: Apache-2.0
"""The `mrad` command: thin wrappers over the package (build banks, predict, make synthetic data, demo).

    mrad demo --output-dir outputs/demo                      # the README's end-to-end run
    mrad make-synthetic --output-dir data/synthetic
    mrad build-bank --clip openai/clip-vit-large-patch14-336 --dataset visa --data-root /data/visa \
        --output banks/visa.safetensors --save-model models/mrad-tf-visa
    mrad predict --model models/mrad-tf-visa images/ --output-dir outputs/predict --threshold 0.5
    mrad evaluate --clip openai/clip-vit-large-patch14-336 --bank-from visa --bank-root /data/visa \
        --dataset mvtec --data-root /data/mvtec --output-dir results/mvtec

Every command prints what it uses (in particular whether the CLIP weights are pretrained or random) and
exits with a one-line error, not a traceback, on bad input (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import detect, hub, tools, train

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrad", description="MRAD zero-shot anomaly detection (ICLR 2026) on Hugging Face transformers.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    detect.register(commands)  # mrad demo / make-synthetic / build-bank / predict / evaluate
    hub.register(commands)  # mrad push / mrad pull
    tools.register(commands)  # mrad bank / calibrate / explain / serve
    train.register(commands)  # mrad train
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("mrad: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one clear line for users; --debug for developers
        if args.debug or os.environ.get("MRAD_DEBUG"):
            raise
        print(f"mrad {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
