# SPDX-License-Identifier: Apache-2.0
"""What every `mrad` command shares: the parser (help with defaults, bounded values), the one set of model options
and the detector they load (saved model, CLIP checkpoint or random backbone; bank, dtype, device), the user-facing
error type and message, logging that goes through progress bars and rank 0, JSON output, image collection and the
bank-building step.

Importing this module costs only the standard library: torch and transformers are imported where a command runs
the model, so `mrad --help` and every `mrad <command> --help` answer at once."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "CLIError",
    "RANDOM_BACKBONES",
    "ArgumentParser",
    "cli_message",
    "detector_from_args",
    "load_detector",
    "model_options",
]

#: Randomly initialised CLIP shapes for offline runs, where no pretrained weights can be downloaded.
RANDOM_BACKBONES: dict[str, dict] = {
    "random-tiny": dict(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=112,
            patch_size=14,
        ),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=32,
    ),
    "random-small": dict(
        vision_config=dict(
            hidden_size=192,
            intermediate_size=768,
            num_hidden_layers=6,
            num_attention_heads=6,
            image_size=224,
            patch_size=14,
        ),
        text_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
        projection_dim=128,
    ),
    "random-vit-l14-336": dict(
        vision_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ),
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        projection_dim=768,
    ),
}
#: With random weights all patch features are nearly collinear, so softmax retrieval at the reference's
#: temperature 1.0 is almost uniform and the offline demo would show noise; it uses this sharper one instead
#: (only for random backbones, and it says so). Real CLIP weights use the reference's 1.0.
RANDOM_DEMO_TEMPERATURE = 0.01
RANDOM_WARNING = (
    "NOTE: using a RANDOMLY INITIALISED CLIP backbone ({name}). No pretrained CLIP weights can be downloaded on this "
    "machine, so the scores below show that the pipeline runs end to end, not MRAD's accuracy. For real results pass "
    "--clip openai/clip-vit-large-patch14-336 (or a local folder with that checkpoint)."
)
RANDOM_MODEL_WARNING = (
    "NOTE: this model's CLIP backbone is RANDOMLY INITIALISED ({name}; its bank records it), so its scores show that "
    "the pipeline runs end to end, not MRAD's accuracy. For real results build the bank with --clip "
    "openai/clip-vit-large-patch14-336 (or a local folder with that checkpoint)."
)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ---------------------------------------------------------------------- messages
def _is_main_process() -> bool:
    """Rank 0 of a multi-process run (torchrun / accelerate launch set RANK), or a single process."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _log(message: str, *, all_ranks: bool = False) -> None:
    """Print one message line: through `tqdm.write` while tqdm is loaded (so a live progress bar does not swallow or
    break it), from rank 0 only in a multi-process run unless `all_ranks`."""
    if not (all_ranks or _is_main_process()):
        return
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        tqdm_module.tqdm.write(str(message), file=sys.stdout)
        sys.stdout.flush()
    else:
        print(message, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` for the CLI: one 'WARNING: ...' line on stderr, above any progress bar, rank 0 only."""
    if not _is_main_process():
        return
    text = f"WARNING: {cli_message(message) if isinstance(message, Warning) else message}"
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        tqdm_module.tqdm.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)


#: Python-API advice inside library messages -> what a command-line user types instead.
CLI_ADVICE: tuple[tuple[str, str], ...] = (
    ("pass trust_bank=True (to set_memory_bank / from_pretrained)", "pass --trust-bank"),
    ("trust_bank=True", "--trust-bank"),
    ("pass strict=False", "pass --trust-bank"),
    ("strict=False", "--trust-bank"),
    ("allow_random_backbone=True", "a pretrained --clip (runs on random backbones give meaningless numbers)"),
    (
        "add defect images with label 1 and their masks (e.g. the test split of a dataset), or pass "
        "allow_no_anomalies=True to build it anyway.",
        "add defect images with their masks. With --dataset folder: one folder per defect kind beside good/, masks as "
        "<stem>_mask.png beside each image or in a masks/ folder (docs/own-data.md), or name them with --abnormal-dir "
        "and --mask-dir; with a benchmark: its test split (--split test, the default).",
    ),
    ("(mrad_hf.memory.build_memory_bank, `mrad build-bank`)", "(`mrad build-bank`)"),
    ("mrad_hf.memory.build_memory_bank(model, samples)", "`mrad build-bank`"),
)


def cli_message(error: BaseException) -> str:
    """The one line a user sees for `error`: its message in command-line terms (never an empty line)."""
    message = (
        " ".join(str(error).split()) or f"{type(error).__name__} (no message; rerun with --debug for the traceback)"
    )
    for python_advice, cli_advice in CLI_ADVICE:
        message = message.replace(python_advice, cli_advice)
    return message


# ---------------------------------------------------------------------- parser: formatting and bounded values
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' after every option's help, except where there is nothing to show (None, a flag's False)
    or the help already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "%(default)" in text
            or "default:" in text.lower()
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
        ):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


class _CommandsAction(argparse._SubParsersAction):
    """Subcommands whose `help=` (the line in `mrad --help`) is also their description in `mrad <command> --help`."""

    def add_parser(self, name, **kwargs):
        if kwargs.get("help") and "description" not in kwargs:
            kwargs["description"] = kwargs["help"][0].upper() + kwargs["help"][1:] + "."
        kwargs.setdefault("formatter_class", HelpFormatter)
        return super().add_parser(name, **kwargs)


class ArgumentParser(argparse.ArgumentParser):
    """The `mrad` parser: defaults shown in every help, subcommands described, errors as one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _CommandsAction)


def _bounded(kind: type, name: str, *, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """An argparse `type=` that parses `kind` and refuses non-finite values and values outside [low, high]."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r} (not a finite number)")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value

    parse.__name__ = name
    return parse


positive_int = _bounded(int, "an integer >= 1", low=1)
non_negative_int = _bounded(int, "an integer >= 0", low=0)
finite_float = _bounded(float, "a finite number")
positive_float = _bounded(float, "a finite number > 0", low=0.0, low_open=True)
probability = _bounded(float, "a number strictly between 0 and 1", low=0.0, high=1.0, low_open=True, high_open=True)
unit_interval = _bounded(float, "a number in (0, 1]", low=0.0, high=1.0, low_open=True)
seed_int = _bounded(int, "an integer seed in [0, 2**32 - 1]", low=0, high=2**32 - 1)
port_int = _bounded(int, "a TCP port in [1, 65535]", low=1, high=65535)
#: Image scores lie in [0, 2] (the ranges `validate_calibration` enforces): a threshold outside flags all or nothing.
image_threshold = _bounded(float, "an image-score threshold in [0, 2] (the range of image scores)", low=0.0, high=2.0)
#: The network input side: at least one 14-px patch; 518 is the paper's. Above 2048 px the two attentions of a
#: ViT-L/14 need tens of GiB per image (tokens grow with the square of the side), so it is refused here.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 14, 2048
image_size_int = _bounded(
    int,
    f"an image side in pixels in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] (the paper uses 518)",
    low=MIN_IMAGE_SIZE,
    high=MAX_IMAGE_SIZE,
)

DTYPES = ("float32", "bfloat16", "float16", "auto")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|(cuda|xpu|npu)(:\d+)?)$")


def device_name(text: str) -> str:
    """--device: auto, cpu, cuda, cuda:N, mps, xpu[:N], npu[:N] (checked against the machine when the model loads)."""
    if not _DEVICE_PATTERN.match(text.strip().lower()):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text.strip().lower()


def clip_source(text: str) -> str:
    """--clip: a Hub id or folder, or one of the random backbone names (a misspelt random-* name is refused)."""
    if text.startswith("random-") and text not in RANDOM_BACKBONES:
        raise argparse.ArgumentTypeError(f"unknown random backbone {text!r}; use one of {', '.join(RANDOM_BACKBONES)}")
    return text


RANDOM_NAMES = " / ".join(RANDOM_BACKBONES)


# ---------------------------------------------------------------------- the shared model options
def model_options(
    sub: argparse.ArgumentParser,
    *,
    model: bool = True,
    clip_required: bool = False,
    clip_default: str | None = None,
    bank: bool = True,
    image_size: bool = True,
    batch_size: bool = True,
    num_workers: bool = False,
    on_error: bool = True,
    seed_default: int = 0,
    image_size_default: int | None = None,
    temperature_help: str | None = None,
    runs_model: bool = True,
) -> argparse.ArgumentParser:
    """Add the model options every model-running command shares (one definition, one help text each):

    `--model | --clip`, `--bank` (+ `--trust-bank`), `--image-size`, `--retrieval-temperature`, `--dtype`,
    `--device`, `--batch-size` (+ `--num-workers` where asked), `--on-error`, `--seed`. `detector_from_args(args)`
    turns them into a model.
    """
    group = sub.add_argument_group("model options")
    source = group.add_mutually_exclusive_group(required=clip_required) if model else group
    if model:
        source.add_argument(
            "--model",
            help="a saved MRAD model folder (from --save-model, `mrad demo` or `mrad train`) or a Hub id / short name (mrad-tf, mrad-clip, ...)",
        )
    clip_help = f"a CLIP checkpoint (Hub id such as openai/clip-vit-large-patch14-336, or a local folder) for a new model, or a random backbone for offline runs: {RANDOM_NAMES}"
    clip_options = {"required": True} if clip_required and not model else {}
    source.add_argument("--clip", type=clip_source, default=clip_default, help=clip_help, **clip_options)
    if bank:
        group.add_argument(
            "--bank",
            help="a memory bank (.safetensors file, or a Hub bank id such as mrad-bank-visa) to use instead of the model's own",
        )
        group.add_argument(
            "--trust-bank",
            action="store_true",
            help="attach a --bank built for another backbone or other feature settings (warn instead of refusing)",
        )
    if image_size:
        size_help = "network input side in pixels" + (
            " (518 is the paper's)"
            if image_size_default
            else " for a new model (default: 518, the paper's; a saved model keeps its own)"
        )
        group.add_argument("--image-size", type=image_size_int, default=image_size_default, help=size_help)
    temperature_help = (
        temperature_help
        or f"softmax temperature of retrieval (default: the model's; a new model: 1.0, the reference's, or {RANDOM_DEMO_TEMPERATURE} on a random backbone)"
    )
    group.add_argument("--retrieval-temperature", type=positive_float, help=temperature_help)
    if runs_model:
        group.add_argument(
            "--dtype",
            choices=DTYPES,
            default="float32",
            help="CLIP tower precision; bank, retrieval and scores stay float32. auto: bfloat16 on GPUs that support it, else float32",
        )
        group.add_argument(
            "--device",
            type=device_name,
            default="auto",
            help="where the model runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps",
        )
    if batch_size:
        group.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    if num_workers:
        group.add_argument(
            "--num-workers",
            type=_bounded(int, "an integer from 0 to 64", low=0, high=64),
            default=0,
            help="processes decoding and resizing the next images while the model runs (0: in this process)",
        )
    if on_error:
        group.add_argument(
            "--on-error",
            choices=("skip", "fail"),
            default="skip",
            help="unreadable images or masks: skip them and report the list, or stop at the first",
        )
    group.add_argument(
        "--seed", type=seed_int, default=seed_default, help="random seed (random backbones' weights, shuffling)"
    )
    return group


# ---------------------------------------------------------------------- local paths and Hub ids
def _looks_like_local_path(name: str) -> bool:
    """A name the user meant as a path (not a Hub id `name` / `org/name`).

    `org/name` whose `org` is a folder here (`models/parts` next to `models/`) is a path: a Hub organisation is
    never meant by a name that starts with a local folder.
    """
    return (
        name.startswith((".", "/", "~", "\\"))
        or (name.count("/") == 1 and os.path.isdir(os.path.expanduser(name.split("/")[0])))
        or name.endswith(("/", "\\"))
        or name.count("/") > 1
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")
        or os.path.splitext(name)[1].lower() in {".safetensors", ".json", ".pt", ".pth", ".bin"}
    )


def check_local_path(option: str, name: str) -> str:
    """`name` expanded if it exists locally; a one-line error at once if it is meant as a path and does not exist.

    Anything else is returned unchanged, to be tried as a Hub id (no network is touched here).
    """
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        return expanded
    if not _looks_like_local_path(name):
        return name
    import difflib

    parent = os.path.dirname(os.path.abspath(expanded)) or "."
    hint = ""
    if os.path.isdir(parent):
        close = difflib.get_close_matches(os.path.basename(expanded.rstrip("/\\")), os.listdir(parent), n=1)
        if close:
            hint = f" Did you mean '{os.path.join(os.path.dirname(name.rstrip('/')), close[0])}'?"
    else:
        hint = f" (its folder '{parent}' does not exist either)."
    raise CLIError(
        f"{option} '{name}': no such file or folder ({os.path.abspath(expanded)}); it is not tried on the Hub because it is a path.{hint}"
    )


# ---------------------------------------------------------------------- devices and precision
def resolve_device(device: str | None) -> str:
    """`auto` -> "cuda" when a CUDA device is visible, else "cpu"; an explicit device that is not there is an error.

    Under `torchrun` / `accelerate launch` (LOCAL_RANK set), "auto" and a bare "cuda" mean this process's own GPU,
    `cuda:LOCAL_RANK`, so that N processes on N GPUs do not all run on the first one.
    """
    import torch

    device = (device or "auto").lower()
    local_rank = os.environ.get("LOCAL_RANK")
    if device in ("auto", "cuda") and torch.cuda.is_available() and local_rank is not None:
        device = f"cuda:{int(local_rank) % torch.cuda.device_count()}"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError(
                f"--device {device}: no CUDA device is visible to torch {torch.__version__} (torch.cuda.is_available() is False); use --device cpu, or install a CUDA build of torch."
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise CLIError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0 .. cuda:{torch.cuda.device_count() - 1})."
            )
    elif device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CLIError("--device mps: the Apple MPS backend is not available here; use --device cpu.")
    return device


def resolve_dtype(dtype: str | None, device: str) -> str:
    """`auto` -> the precision the device runs best (`runtime.resolve_dtype`: bfloat16 on CUDA and on CPUs with
    bf16 matrix units, float32 elsewhere); other names pass through."""
    if dtype != "auto":
        return dtype or "float32"
    from ..runtime import resolve_dtype as resolve_backbone_dtype

    return str(resolve_backbone_dtype("auto", device)).replace("torch.", "")


# ---------------------------------------------------------------------- loading a detector
_FROM_ARGS = object()


def detector_from_args(args: argparse.Namespace, *, bank=_FROM_ARGS, **overrides):
    """The model the shared options (`model_options`) name: loaded, bank attached, cast to --dtype, on --device.

    `bank` (a path, a Hub id, a `MemoryBank` or None) replaces `--bank`; `overrides` are MRADConfig fields.
    """
    if getattr(args, "retrieval_temperature", None) is not None:
        overrides.setdefault("retrieval_temperature", args.retrieval_temperature)
    return load_detector(
        getattr(args, "model", None),
        getattr(args, "clip", None),
        image_size=getattr(args, "image_size", None),
        seed=getattr(args, "seed", 0),
        dtype=getattr(args, "dtype", None),
        device=getattr(args, "device", None),
        bank=getattr(args, "bank", None) if bank is _FROM_ARGS else bank,
        trust_bank=getattr(args, "trust_bank", False),
        **overrides,
    )


def load_detector(
    model: str | None = None,
    clip: str | None = None,
    *,
    image_size: int | None = None,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    bank=None,
    trust_bank: bool = False,
    **overrides,
):
    """An MRAD model from an MRAD folder / Hub id (`model`) or a CLIP source (`clip`, or a `random-*` name).

    `overrides` are MRADConfig fields for a new model (for a saved one only `retrieval_temperature` may change).
    `bank` (a file, a Hub bank id or a `MemoryBank`) replaces the model's own, checked against the float32
    backbone (`trust_bank` warns instead of refusing a mismatch). Then the CLIP tower is cast to `dtype`
    ("bfloat16", "float16", "auto"; memory, retrieval and scores stay float32) and the model moved to `device`
    ("auto": CUDA when available).
    """
    if model:
        model = check_local_path("--model", model)
    elif clip and clip not in RANDOM_BACKBONES:
        clip = check_local_path("--clip", clip)
    if isinstance(bank, (str, os.PathLike)):
        bank = check_local_path("--bank", os.fspath(bank))
    device = resolve_device(device)  # before any loading: a wrong --device fails at once
    from ..runtime import tune_malloc_for_inference

    tune_malloc_for_inference()  # large activations re-used, not re-mapped per layer (batch 8 as fast as batch 1)
    detector = _load_detector(model, clip, image_size=image_size, seed=seed, **overrides).eval()
    if bank is not None:
        _attach_bank(detector, bank, trust=trust_bank)
    if clip not in RANDOM_BACKBONES and (note := random_note(detector)):  # a random --clip said so on loading
        _log(note)
    detector.to(device)
    _set_dtype(detector, resolve_dtype(dtype, device))
    if device != "cpu":
        _log(f"Running on {device}")
    return detector


def random_note(detector) -> str | None:
    """The NOTE line for a model whose CLIP backbone was randomly initialised (`memory.building.random_backbone`:
    a `--clip random-*` now, or recorded in its bank), else None: every command that uses one prints it."""
    from ..memory.building import random_backbone

    name = random_backbone(detector)
    if name is None:
        return None
    return (RANDOM_WARNING if getattr(detector, "random_backbone", None) else RANDOM_MODEL_WARNING).format(name=name)


def score_text(result: dict) -> str:
    """An image's console score, followed by its decision ("anomaly" / "normal") when a --threshold or the model's
    calibration made one, as scores.json records it: `0.362342  anomaly ` or `0.362342`."""
    return f"{result['score']:.6f}" + (f"  {result['label']:7s}" if "is_anomalous" in result else "")


def load_bank(name: str, option: str = "--bank"):
    """A `MemoryBank` from a local file, or else a Hub bank repo / short name (a missing local path fails at once)."""

    name = check_local_path(option, os.fspath(name))
    if os.path.exists(name):
        from ..memory.files import load_bank as read_bank_file

        return read_bank_file(name)
    from ..hub.api import load_memory_bank  # not a path (check_local_path said so): a Hub bank repo or short name

    return load_memory_bank(name)


def _attach_bank(detector, bank, *, trust: bool) -> None:
    name = bank if isinstance(bank, str) else None
    if name is not None:
        bank = load_bank(name)
    detector.set_memory_bank(bank, strict=not trust, trust_bank=trust)  # --trust-bank: warn what is not checked
    if name is not None:
        _log(
            f"Using memory bank {name} ({bank.counts()['image_entries']} image / {bank.counts()['patch_entries']} region entries)"
        )


def _set_dtype(detector, dtype: str | None):
    from ..runtime import set_backbone_dtype

    if dtype and dtype != "float32":
        _log(
            f"CLIP tower in {dtype}; memory bank, retrieval and scores stay float32 (pays off on GPUs and CPUs with bf16 matrix units; slower elsewhere)"
        )
    return set_backbone_dtype(detector, dtype)


def _load_detector(model: str | None, clip: str | None, *, image_size: int | None, seed: int, **overrides):
    import torch
    from transformers import CLIPConfig

    from ..models.mrad.memory_bank_mrad import verify_model_memory
    from ..models.mrad.modeling_mrad import MRADForAnomalyDetection

    overrides = {key: value for key, value in overrides.items() if value is not None}
    if image_size is not None:
        overrides["image_size"] = image_size
    if model:
        from ..hub.api import load_detector_bundle

        # the one loader for a model folder: the pipeline, the CLI and the app read its preprocessor_config.json alike
        detector, detector.saved_image_processor = load_detector_bundle(model)
        verify_model_memory(detector)  # config and weights from the same save, bank built for this backbone
        if image_size is not None and image_size != detector.config.image_size:
            raise CLIError(
                f"--image-size {image_size} differs from the saved model's {detector.config.image_size}; drop --image-size (a saved model's bank was built at its own size)."
            )
        if "retrieval_temperature" in overrides:
            detector.config.retrieval_temperature = overrides["retrieval_temperature"]
        _log(
            f"Loaded MRAD model from {model} (bank: {detector.config.image_bank_size} image / {detector.config.patch_bank_size} patch entries)"
        )
        return detector
    if not clip:
        raise CLIError(
            f"Pass --model (a saved MRAD model) or --clip (a CLIP checkpoint, or {RANDOM_NAMES} for an offline run with random weights)."
        )
    if clip in RANDOM_BACKBONES:
        _log(RANDOM_WARNING.format(name=clip))
        if "retrieval_temperature" not in overrides:  # at the reference's 1.0 random features retrieve uniformly
            overrides["retrieval_temperature"] = RANDOM_DEMO_TEMPERATURE
            _log(
                f"Retrieval temperature: {RANDOM_DEMO_TEMPERATURE} for the random backbone (the reference's 1.0 makes "
                "every heatmap uniform on random features; --retrieval-temperature sets another)"
            )
        torch.manual_seed(seed)
        detector = MRADForAnomalyDetection.from_clip(CLIPConfig(**RANDOM_BACKBONES[clip]), **overrides)
        detector.random_backbone = clip  # recorded in every bank built from it (`memory.building.random_backbone`)
        return detector
    _log(f"Loading pretrained CLIP weights from {clip}")
    try:
        return MRADForAnomalyDetection.from_clip(clip, **overrides)
    except OSError as error:
        raise CLIError(
            f"Could not load the CLIP checkpoint '{clip}': {cli_message(error)} Offline, use a local CLIP folder (`mrad convert clip` makes one from OpenAI's .pt file) or --clip random-small to check the pipeline with random weights."
        ) from error


def _inside(path: str | os.PathLike, folder: str) -> bool:
    """Whether `path`, symlinks resolved, is `folder` (a realpath) or lies under it."""
    real = os.path.realpath(path)
    return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)


def _collect_images(inputs: Sequence[str], *, output_dir: str | os.PathLike | None = None) -> list[Path]:
    """Image files named or found (recursively) in folders; masks and ignored files per `data.files.scan_folder`.

    Files under `output_dir` (the command's output folder) are never found as inputs: a folder scan skips them with
    a count, so a rerun does not score its own earlier heatmaps or panels, and an input folder inside (or equal to)
    the output folder is refused, since its outputs would land among its inputs. Files named one by one are kept."""
    from ..data.files import IMAGE_EXTENSIONS, FolderScan, scan_folder

    outputs = None if output_dir is None else os.path.realpath(output_dir)
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if outputs is not None and _inside(path, outputs):
                raise CLIError(
                    f"The input folder '{path}' is inside the output folder '{output_dir}', where this command writes its results (they would be read as inputs next time): choose an --output-dir outside the inputs (a new sub-folder of an input folder is fine: it is skipped)."
                )
            scan = scan_folder(path)  # the loaders' one rule for what is an image and what is a mask
            if outputs is not None:
                found = [*scan.images, *scan.masks, *(entry.path for entry in scan.ignored)]
                skipped = {entry for entry in found if _inside(entry, outputs)}
                if skipped:
                    _log(
                        f"Skipping {len(skipped)} file(s) under '{path}' that are in the output folder '{output_dir}' (a command's own outputs are never its inputs)"
                    )
                    scan = FolderScan(
                        [image for image in scan.images if image not in skipped],
                        [mask for mask in scan.masks if mask not in skipped],
                        [entry for entry in scan.ignored if entry.path not in skipped],
                    )
            if scan.masks:
                _log(
                    f"Skipping {len(scan.masks)} ground-truth mask file(s) under '{path}' (a 'ground_truth'/'masks'/'gt' folder or a '_mask' name), e.g. {scan.masks[0]}"
                )
            if scan.ignored:
                _log(scan.summary(path))
            if not scan.images:
                raise CLIError(f"No images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under folder '{path}'.")
            paths.extend(scan.images)
        elif path.is_file():
            paths.append(path)
        else:
            raise CLIError(f"'{path}' is neither an image file nor a folder.")
    return paths


def without_outputs(dataset, output_dir: str | os.PathLike, what: str):
    """`dataset` less the rows whose image lies under `output_dir` (the command's output folder), with a count:
    a command's own outputs (an earlier run's heatmaps) are never its inputs, as in `_collect_images`."""
    outputs = os.path.realpath(output_dir)
    keep = [index for index, path in enumerate(dataset["path"]) if not _inside(path, outputs)]
    if len(keep) == len(dataset):
        return dataset
    if not keep:
        raise CLIError(
            f"Every image of {what} is inside the output folder '{output_dir}', where this command writes its results (they would be read as inputs next time): choose an --output-dir outside the data."
        )
    _log(
        f"Leaving out {len(dataset) - len(keep)} image(s) of {what} that are in the output folder '{output_dir}' (a command's own outputs are never its inputs)"
    )
    return dataset.select(keep)


def _looks_like_mask(relative: Path) -> bool:
    """Ground-truth masks inside a dataset folder are not inputs: `data.files.classify_file`, the one rule."""
    from ..data.files import classify_file

    return classify_file(Path(relative).with_suffix(".png"), Path()) == "mask"


def dataset_options(sub, what: str = "the dataset", *, required: bool = True) -> None:
    """`--dataset`, `--data-root`, `--categories` and the explicit folders, for every command that reads a dataset."""
    sub.add_argument(
        "--dataset",
        required=required,
        help=f"{what}: mvtec, visa, mpdd, btad, ..., mvtec-layout, or folder (your own data)",
    )
    sub.add_argument(
        "--data-root", help="the dataset folder (with --normal-dir etc.: the folder they are relative to)"
    )
    sub.add_argument("--categories", nargs="+", help="only these categories")
    sub.add_argument(
        "--normal-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="--dataset folder: a folder of normal images (repeatable, globs allowed)",
    )
    sub.add_argument(
        "--abnormal-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="--dataset folder: a folder of anomalous images, named after the defect (repeatable, globs allowed)",
    )
    sub.add_argument(
        "--mask-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="--dataset folder: masks of the anomalous images, matched by file stem (repeatable, globs allowed)",
    )


def load_dataset_from_args(args, *, output_dir: str | os.PathLike | None = None, **kwargs):
    """The dataset named by `dataset_options`' arguments (`kwargs`, e.g. split=..., go to the loader), less any
    image under the command's `output_dir` (`without_outputs`)."""
    from ..data.loaders import load_benchmark

    explicit = {"normal_dirs": args.normal_dir, "abnormal_dirs": args.abnormal_dir, "mask_dirs": args.mask_dir}
    if not args.data_root and not any(explicit.values()):
        raise CLIError(
            f"--dataset {args.dataset} needs --data-root DIR (or, with --dataset folder, --normal-dir/--abnormal-dir)."
        )
    if any(explicit.values()):
        kwargs.update(explicit)
    import warnings

    from ..data.files import IgnoredFilesWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IgnoredFilesWarning)
        dataset = load_benchmark(args.dataset, args.data_root, categories=args.categories, **kwargs)
    for warning in caught:  # the loader's one-line summary of what it did not read, printed as a line
        if issubclass(warning.category, IgnoredFilesWarning):
            _log(str(warning.message))
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return dataset if output_dir is None else without_outputs(dataset, output_dir, f"--dataset {args.dataset}")


def _write_json(path: Path, payload) -> None:
    from ..memory.files import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)

    atomic_write(path, write)


def _build_bank_from(detector, dataset, *, source: str, batch_size: int, on_error: str):
    """Build (and attach) a bank from a loader dataset, reading files through MRAD's decoder.

    Unreadable images or masks are skipped and listed in `bank.metadata["skipped_files"]` (`on_error="skip"`),
    or stop the command with a one-line error (`"fail"`).
    """
    from ..data.reading import iter_readable_rows
    from ..memory.building import CountedRows, build_memory_bank
    from ..models.mrad.image_processing_mrad import MRADInputError

    processor = detector_image_processor(detector)
    skipped: list[dict[str, str]] = []
    rows = CountedRows(
        iter_readable_rows(dataset, processor.load_pair, on_error=on_error, failures=skipped), len(dataset)
    )
    try:
        bank = build_memory_bank(detector, rows, batch_size=batch_size, source=source, image_processor=processor)
    except MRADInputError as error:
        raise CLIError(f"{error} (--on-error skip reports and skips such files)") from error
    if skipped:
        bank.metadata["skipped_files"] = skipped
    return bank


def _report_skipped(skipped: list[dict[str, str]], where: str) -> None:
    """The summary line of a run that skipped unreadable files: how many, the first one, where the full list is."""
    if skipped:
        _log(
            f"SKIPPED {len(skipped)} file(s) that could not be read, e.g. {skipped[0]['path']}: {skipped[0]['error']} "
            f"All skipped files are listed in {where}."
        )


def detector_image_processor(detector):
    """The image processor saved with a loaded model folder, else the one its config describes."""
    from ..models.mrad.image_processing_mrad import MRADImageProcessor

    saved = getattr(detector, "saved_image_processor", None)
    return saved if saved is not None else MRADImageProcessor.from_config(detector.config)


def _detector_pipeline(detector):
    from transformers import pipeline

    processor = detector_image_processor(detector)
    return processor, pipeline("anomaly-detection", model=detector, image_processor=processor, device=detector.device)
