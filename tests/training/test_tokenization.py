# SPDX-License-Identifier: Apache-2.0
"""Prompt token ids: from a small BPE vocabulary written like OpenAI's, and from the real one (CI provides it)."""

import gzip
import os
from pathlib import Path

import pytest

from mrad_hf.models.mrad.prompting_mrad import OPENAI_DEFAULT_PROMPT_TOKEN_IDS, prompt_texts, prompt_token_ids
from mrad_hf.training.tokenization import clip_tokenizer_from_bpe, load_clip_tokenizer

# merges that build the prompt words from bytes, in OpenAI's file format (header line, then "a b" pairs)
SMALL_MERGES = [
    "o b",
    "ob j",
    "e c",
    "ec t</w>",
    "obj ect</w>",
    "d a",
    "da m",
    "dam a",
    "dama g",
    "damag e",
    "damage d</w>",
]


def _small_bpe(path: Path) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("#version: test\n" + "\n".join(SMALL_MERGES) + "\n")
    return path


def test_prompt_texts():
    assert prompt_texts(3) == ["X X X object.", "X X X damaged object."]


def test_prompt_ids_from_a_small_bpe_vocabulary(tmp_path):
    tokenizer = clip_tokenizer_from_bpe(
        _small_bpe(tmp_path / "bpe.txt.gz"), tmp_path / "tok", num_merges=len(SMALL_MERGES)
    )
    vocab = tokenizer.get_vocab()
    start, end = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert (start, end) == (512 + len(SMALL_MERGES), 512 + len(SMALL_MERGES) + 1)
    normal, anomaly = prompt_token_ids(tokenizer, context_length=4)
    x, obj, dot, damaged = vocab["x</w>"], vocab["object</w>"], vocab[".</w>"], vocab["damaged</w>"]
    assert normal == [start, x, x, x, x, obj, dot, end]
    assert anomaly == [start, x, x, x, x, damaged, obj, dot, end]


def test_a_non_bpe_file_is_refused(tmp_path):
    bad = tmp_path / "bpe.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a readable gzip BPE file"):
        clip_tokenizer_from_bpe(bad, tmp_path / "tok")
    with pytest.raises(ValueError, match="expected 48894 merge pairs"):
        clip_tokenizer_from_bpe(_small_bpe(tmp_path / "small.txt.gz"), tmp_path / "tok2")


def test_real_openai_vocabulary_gives_the_reference_prompt_ids():
    """OpenAI's bpe_simple_vocab_16e6.txt.gz (MRAD_CLIP_BPE; `.ci/run` extracts it from the open_clip_torch wheel)."""
    path = os.environ.get("MRAD_CLIP_BPE")
    if not path or not Path(path).is_file():
        if os.environ.get("CI"):
            pytest.fail("CI must provide OpenAI's BPE file in MRAD_CLIP_BPE (see .ci/run).")
        pytest.skip("set MRAD_CLIP_BPE to OpenAI's bpe_simple_vocab_16e6.txt.gz to run this check")
    tokenizer = load_clip_tokenizer(path)
    assert tokenizer("Hi there")["input_ids"] == [49406, 1883, 997, 49407]
    assert prompt_token_ids(tokenizer) == [list(ids) for ids in OPENAI_DEFAULT_PROMPT_TOKEN_IDS]


def test_from_clip_encodes_the_prompts_with_the_given_tokenizer(tmp_path):
    from conftest import tiny_clip_config

    from mrad_hf import MRADForAnomalyDetection

    tokenizer = clip_tokenizer_from_bpe(
        _small_bpe(tmp_path / "bpe.txt.gz"), tmp_path / "tok", num_merges=len(SMALL_MERGES)
    )
    clip = tiny_clip_config()
    clip.text_config.vocab_size = len(tokenizer.get_vocab())
    options = dict(variant="clip", prompt_context_length=4, deep_prompt_length=2, deep_prompt_depth=2)
    model = MRADForAnomalyDetection.from_clip(clip, tokenizer=tokenizer, **options)
    assert model.config.prompt_token_ids == prompt_token_ids(tokenizer, context_length=4)
    with pytest.raises(ValueError, match="needs the CLIP tokenizer.*load_clip_tokenizer"):
        MRADForAnomalyDetection.from_clip(clip, tokenizer=str(tmp_path / "bpe.txt.gz"), **options)
