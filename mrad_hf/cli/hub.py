# SPDX-License-Identifier: Apache-2.0
"""`mrad push` and `mrad pull`: the Hub side of the `mrad` command (see `mrad_hf.hub`).

    mrad push models/mrad-tf-visa myorg/mrad-tf-visa --results results/mvtec/results.json
    mrad push --bank banks/visa.safetensors myorg/mrad-bank-visa --revision v1
    mrad pull mrad-clip                        # short name -> $MRAD_HUB_NAMESPACE (default mrad-hf)/mrad-clip-visa
    mrad pull --bank myorg/mrad-bank-visa --revision v1
    HF_HUB_OFFLINE=1 mrad predict --model mrad-clip images/    # afterwards, from the cache

`register(commands)` adds the subcommands to the parser built in `mrad_hf/cli/main.py`.
"""

from __future__ import annotations

__all__ = ["register", "cmd_push", "cmd_pull"]


def cmd_push(args) -> int:
    from ..hub import api as hub

    if args.bank:
        info = hub.push_memory_bank(
            args.source, args.repo_id, revision=args.revision, private=args.private, create_pr=args.create_pr
        )
    else:
        from .common import _log, random_note

        model = hub.load_model(args.source)  # the package's loader: a broken folder is one line naming it
        if note := random_note(model):  # its bank records a random backbone: the pushed model is a pipeline check
            _log(note)
        info = hub.push_model(
            model,
            args.repo_id,
            results=args.results,
            base_model=args.base_model,
            revision=args.revision,
            private=args.private,
            create_pr=args.create_pr,
        )
    print(
        f"Pushed {'bank' if args.bank else 'model'} {args.source} to {args.repo_id} at commit {info.oid} ({info.commit_url})",
        flush=True,
    )
    return 0


def cmd_pull(args) -> int:
    from ..hub import api as hub

    pull = hub.pull_memory_bank if args.bank else hub.pull_model
    folder = pull(args.name, revision=args.revision, cache_dir=args.cache_dir, local_dir=args.local_dir)
    print(
        f"Downloaded {args.name} ({args.revision or 'main'}) to {folder}; it now loads offline (HF_HUB_OFFLINE=1).",
        flush=True,
    )
    return 0


def register(commands) -> None:
    """Add `push` and `pull` to the `mrad` subcommand parser."""
    push = commands.add_parser(
        "push", help="push a saved MRAD model folder (with a model card) or a memory bank to the Hub"
    )
    push.add_argument(
        "source", help="a model folder saved with save_pretrained, or with --bank a bank .safetensors file"
    )
    push.add_argument("repo_id", help="<org>/<name> on the Hub (created if missing)")
    push.add_argument("--bank", action="store_true", help="push a memory bank repo (bank + metadata JSON + card)")
    push.add_argument(
        "--results", nargs="+", help="results.json files from `mrad evaluate` for the card's model-index"
    )
    push.add_argument(
        "--base-model", help="CLIP checkpoint id named in the card (default openai/clip-vit-large-patch14-336)"
    )
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument(
        "--private",
        action="store_true",
        default=None,
        help="create the repo as private (default: public; an existing repo keeps its visibility)",
    )
    push.add_argument(
        "--create-pr", action="store_true", help="open a pull request instead of committing to the branch"
    )
    push.set_defaults(handler=cmd_push)

    pull = commands.add_parser("pull", help="download a model or bank repo into the Hub cache for offline use")
    pull.add_argument(
        "name", help="a Hub id or a short name: mrad-tf, mrad-ft, mrad-clip[-visa|-mvtec], mrad-bank-visa, ..."
    )
    pull.add_argument("--bank", action="store_true", help="the repo is a memory bank")
    pull.add_argument("--revision", help="branch, tag or commit (default main)")
    pull.add_argument("--cache-dir", help="Hub cache folder (default $HF_HUB_CACHE)")
    pull.add_argument("--local-dir", help="also/instead place the files in this folder")
    pull.set_defaults(handler=cmd_pull)
