# SPDX-License-Identifier: Apache-2.0
"""The `mrad` command: thin wrappers over the package (build banks, predict, evaluate, calibrate, train, Hub, demo).

    mrad demo --output-dir outputs/demo                      # the README's end-to-end run
    mrad make-synthetic --output-dir data/synthetic
    mrad build-bank --clip openai/clip-vit-large-patch14-336 --dataset visa --data-root /data/visa \
        --output banks/visa.safetensors --save-model models/mrad-tf-visa
    mrad predict --model models/mrad-tf-visa images/ --output-dir outputs/predict --threshold 0.5 --device cuda
    mrad evaluate --clip openai/clip-vit-large-patch14-336 --bank-from visa --bank-root /data/visa \
        --dataset mvtec --data-root /data/mvtec --output-dir results/mvtec

Every command that runs a model takes the same model options (`common.model_options`: `--model | --clip`,
`--bank`, `--image-size`, `--retrieval-temperature`, `--dtype`, `--device`, `--batch-size`, `--on-error`,
`--seed`), prints what it uses (in particular whether the CLIP weights are pretrained or random) and exits with a
one-line error, not a traceback, on bad input (`--debug` or MRAD_DEBUG=1 shows the traceback). Building the parser
imports only the standard library, so `mrad --help` answers at once; each command imports what it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from . import common, convert, detect, export, hub, release, tools, train

__all__ = ["main", "build_parser"]


class _VersionAction(argparse.Action):
    """`mrad --version`: the installed distribution's version (read only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("mrad-hf")
        except PackageNotFoundError:
            installed = "unknown (not installed; pip install . to install it)"
        print(f"mrad {installed}")
        parser.exit()


def build_parser() -> common.ArgumentParser:
    parser = common.ArgumentParser(
        prog="mrad",
        description="MRAD zero-shot anomaly detection (ICLR 2026) on Hugging Face transformers: score images "
        "for defects by retrieval from a memory of labelled examples. `mrad <command> --help` for each command's options.",
    )
    parser.add_argument("--version", action=_VersionAction, help="show the installed mrad-hf version and exit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    detect.register(commands)  # mrad demo / make-synthetic / build-bank / predict / evaluate
    hub.register(commands)  # mrad push / mrad pull
    release.register(commands)  # mrad release
    tools.register(commands)  # mrad bank / calibrate / explain / serve
    train.register(commands)  # mrad train
    convert.register(commands)  # mrad convert clip / bank / checkpoint
    export.register(commands)  # mrad export --format onnx|openvino
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or bool(os.environ.get("MRAD_DEBUG"))
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = common._show_warning  # one line each, above progress bars, rank 0 only
            return args.handler(args)
    except KeyboardInterrupt:
        print("mrad: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one clear line for users; --debug for developers
        if debug:
            raise
        print(f"mrad {args.command}: error: {common.cli_message(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
