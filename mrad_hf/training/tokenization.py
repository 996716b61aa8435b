# SPDX-License-Identifier: Apache-2.0
"""The CLIP tokenizer from OpenAI's BPE file, for computing MRAD-CLIP's prompt ids offline (paper Sec. 3.5).

The prompt-id rule itself (`prompt_token_ids`) lives with the prompts in `models/mrad/prompting_mrad.py`.

The model never tokenizes at run time: the ids of the normal and anomalous prompts are computed once,
when a MRAD-CLIP model is created, and stored in `MRADConfig.prompt_token_ids`. Any CLIP tokenizer
gives them: the backbone's own (`CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14-336")`)
or one written from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (shipped with OpenAI CLIP and open_clip)
by `clip_tokenizer_from_bpe`, for machines without Hub access.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

__all__ = ["clip_tokenizer_from_bpe", "load_clip_tokenizer"]

# OpenAI's merges file: a header line, then 49152 - 256 - 2 merges are used by CLIP.
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the others to unused code points."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def clip_tokenizer_from_bpe(bpe_path: str | os.PathLike, output_dir: str | os.PathLike, num_merges: int = _NUM_MERGES):
    """Write a Hugging Face CLIP tokenizer (vocab.json, merges.txt) from OpenAI's `bpe_simple_vocab_16e6.txt.gz`.

    The vocabulary is OpenAI's construction: the 256 byte symbols, the same with `</w>`, one token per merge (the
    first `num_merges` merge lines after the header), then the start and end tokens. Returns
    `CLIPTokenizer.from_pretrained(output_dir)`; the ids equal OpenAI's ("Hi there" -> 49406, 1883, 997, 49407).
    """
    from transformers import CLIPTokenizer

    bpe_path = Path(bpe_path)
    try:
        lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    except (OSError, EOFError) as error:
        raise ValueError(
            f"{bpe_path}: not a readable gzip BPE file ({error}); pass OpenAI's bpe_simple_vocab_16e6.txt.gz."
        ) from error
    merges = [tuple(line.split()) for line in lines[1 : num_merges + 1]]
    if len(merges) != num_merges or any(len(pair) != 2 for pair in merges):
        raise ValueError(
            f"{bpe_path}: expected {num_merges} merge pairs after the header; this is not OpenAI's CLIP BPE file."
        )
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "vocab.json").write_text(
        json.dumps({token: index for index, token in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8"
    )
    (output_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n", encoding="utf-8"
    )
    (output_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        ),
        encoding="utf-8",
    )
    return CLIPTokenizer.from_pretrained(output_dir)


def load_clip_tokenizer(source: str | os.PathLike):
    """A CLIP tokenizer from a Hub id or folder, or from an OpenAI BPE `.txt.gz` (converted next to it, once)."""
    from transformers import CLIPTokenizer

    path = Path(source)
    if path.suffix == ".gz" and path.is_file():
        cache = path.with_name(path.name.replace(".txt.gz", "") + "_hf_tokenizer")
        if (cache / "vocab.json").is_file():
            return CLIPTokenizer.from_pretrained(cache)
        return clip_tokenizer_from_bpe(path, cache)
    try:
        return CLIPTokenizer.from_pretrained(source)
    except OSError as error:
        raise OSError(
            f"Could not load a CLIP tokenizer from {source!r} ({error}). Pass the CLIP checkpoint's folder or Hub id, or "
            "OpenAI's bpe_simple_vocab_16e6.txt.gz (inside the open_clip_torch wheel: open_clip/bpe_simple_vocab_16e6.txt.gz)."
        ) from error
