# SPDX-License-Identifier: Apache-2.0
"""`mrad release`: convert the official MRAD files and publish the repos the short names point to (`mrad_hf.hub.release`).

    # every file and repo, compared with the Hub, nothing uploaded
    mrad release --official-dir downloads/ --work-dir outputs/release --dry-run
    # publish (idempotent: a second run uploads nothing); a mirror under your own organisation
    MRAD_HUB_NAMESPACE=myorg mrad release --official-dir downloads/ --work-dir outputs/release
    # with evaluation (zero-shot protocol: *-visa models on MVTec AD, *-mvtec models on VisA) for the cards
    mrad release --official-dir downloads/ --work-dir outputs/release --data-root mvtec=/data/mvtec --data-root visa=/data/visa

`--official-dir` holds OpenAI's ViT-L-14-336px.pt and the official cache_model_{visa,mvtec}.pt,
cache_patch_model_{visa,mvtec}.pt, test_on_{mvtec,visa}.pth under their release names.
"""

from __future__ import annotations

__all__ = ["register", "cmd_release"]


def _pairs(values, what: str, allowed=None) -> dict[str, list[str]]:
    from .common import CLIError

    pairs: dict[str, list[str]] = {}
    for value in values or []:
        key, sep, path = value.partition("=")
        if not sep or not key or not path or (allowed is not None and key not in allowed):
            choices = f" (NAME one of {', '.join(allowed)})" if allowed else ""
            raise CLIError(f"{what} takes NAME=PATH{choices}, got {value!r}.")
        pairs.setdefault(key, []).append(path)
    return pairs


def cmd_release(args) -> int:
    from ..hub.release import AUXILIARIES, ReleaseFiles, release

    data_roots = {key: paths[-1] for key, paths in _pairs(args.data_root, "--data-root", AUXILIARIES).items()}
    results = _pairs(args.results, "--results")
    files = ReleaseFiles.from_folder(args.official_dir, auxiliaries=args.auxiliaries)
    release(
        files,
        args.work_dir,
        dry_run=args.dry_run,
        namespace=args.namespace,
        image_size=args.image_size,
        variants=args.variants,
        auxiliaries=args.auxiliaries,
        data_roots=data_roots,
        results=results,
        batch_size=args.batch_size,
        private=args.private,
        endpoint=args.endpoint,
    )
    return 0


def register(commands) -> None:
    from .common import image_size_int, positive_int

    """Add `release` to the `mrad` subcommand parser (choices as in `mrad_hf.hub.release`, kept light for `--help`)."""
    variants, auxiliaries = ("tf", "ft", "clip"), ("visa", "mvtec")
    sub = commands.add_parser(
        "release",
        help="convert the official MRAD files and push the short-name repos (idempotent; --dry-run lists all)",
    )
    sub.add_argument(
        "--official-dir",
        required=True,
        help="folder with ViT-L-14-336px.pt, cache_*model_{visa,mvtec}.pt, test_on_{mvtec,visa}.pth",
    )
    sub.add_argument(
        "--work-dir",
        default="outputs/release",
        help="where the repo folders (and evaluations) are written before upload",
    )
    sub.add_argument(
        "--dry-run",
        action="store_true",
        help="build and compare with the Hub, list every repo and file, upload nothing",
    )
    sub.add_argument("--namespace", help="Hub organisation/user (default $MRAD_HUB_NAMESPACE, else mrad-hf)")
    sub.add_argument(
        "--variants", nargs="+", choices=variants, default=list(variants), help="which MRAD variants to publish"
    )
    sub.add_argument(
        "--auxiliaries",
        nargs="+",
        choices=auxiliaries,
        default=list(auxiliaries),
        help="which auxiliary datasets' banks and models to publish",
    )
    sub.add_argument(
        "--image-size", type=image_size_int, default=518, help="network input size (518 as the official code)"
    )
    sub.add_argument(
        "--data-root",
        action="append",
        metavar="DATASET=FOLDER",
        help="evaluate on mvtec / visa (zero-shot protocol) for the cards",
    )
    sub.add_argument(
        "--results",
        action="append",
        metavar="REPO=RESULTS_JSON",
        help="results.json of `mrad evaluate` for a repo's card, e.g. mrad-clip-visa=results.json",
    )
    sub.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    sub.add_argument("--private", action="store_true", default=None, help="create new repos as private")
    sub.add_argument("--endpoint", help="Hub endpoint (default $HF_ENDPOINT)")
    sub.set_defaults(handler=cmd_release)
