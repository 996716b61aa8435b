# SPDX-License-Identifier: Apache-2.0
"""No converter executes code from the file it reads (issue 13 §1).

Every hostile archive of `hostile_archives` goes through all three converters (OpenAI CLIP, official bank, official
checkpoint): each is refused with a one-line reason, and the attack's effect is absent (the marker file is not
written, nothing is read, the loop never runs: a watchdog kills the test process if a converter hangs). A positive
control shows that the TorchScript payloads really do what they claim when their code runs. A real TorchScript
archive of a tiny random CLIP in OpenAI's module layout (`nn.MultiheadAttention` blocks, traced as OpenAI's release
was) converts bit-exactly."""

from __future__ import annotations

import ast
import collections
import faulthandler
import warnings
from pathlib import Path

import hostile_archives as hostile
import pytest
import torch
import torch.nn as nn
from test_convert_openai_clip import (
    CONTEXT,
    EMBED,
    GRID,
    PATCH,
    TEXT_LAYERS,
    TEXT_WIDTH,
    VISION_LAYERS,
    VISION_WIDTH,
    VOCAB,
    openai_state_dict,
)

from mrad_hf.conversion.common import ConversionError
from mrad_hf.conversion.convert_official_bank import convert_official_bank
from mrad_hf.conversion.convert_official_checkpoint import convert_official_checkpoint
from mrad_hf.conversion.convert_openai_clip import convert_openai_clip, convert_openai_state_dict
from mrad_hf.conversion.torchscript import read_torchscript_state_dict

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def watchdog():
    """A converter that runs the archive's infinite loop would hang here: dump the stacks and exit after 120 s."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _through_every_converter(path: Path, tmp_path: Path, tiny_model) -> dict[str, str]:
    """The refusal message of each converter for `path` (all three must refuse, with a ConversionError)."""
    messages = {}
    with pytest.raises(ConversionError) as error:
        convert_openai_clip(path, tmp_path / "clip-out")
    messages["clip"] = str(error.value)
    torch.save(
        {"keys": torch.zeros(2, tiny_model.config.patch_key_dim), "values": torch.eye(2)}, tmp_path / "patch.pt"
    )
    with pytest.raises(ConversionError) as error:
        convert_official_bank(path, tmp_path / "patch.pt", tmp_path / "bank.safetensors")
    messages["bank"] = str(error.value)
    with pytest.raises(ConversionError) as error:
        convert_official_checkpoint(path, tmp_path / "ckpt-out", clip=tiny_model.clip)
    messages["checkpoint"] = str(error.value)
    for produced in ("clip-out", "bank.safetensors", "ckpt-out"):
        assert not (tmp_path / produced).exists()
    return messages


def _refused_by_name(messages: dict[str, str], path: Path) -> None:
    for kind in ("bank", "checkpoint"):
        assert "is a TorchScript archive (it carries code), not a plain pickled state dict" in messages[kind]
        assert str(path) in messages[kind]


def test_file_write_through_from_file_shared_is_never_done(tmp_path, tiny_model):
    marker = tmp_path / "marker"
    scripted = hostile.script_archive(hostile.WritesFile(str(marker)), tmp_path / "writes.pt")
    scripted.__setstate__((torch.zeros(2), str(tmp_path / "control"), False))  # positive control: the code writes
    assert (tmp_path / "control").read_bytes() == b"A" * 8
    messages = _through_every_converter(tmp_path / "writes.pt", tmp_path, tiny_model)
    assert not marker.exists()
    assert (
        "saves a custom state (a __setstate__ method of the archive), which is code this reader does not run"
        in messages["clip"]
    )
    _refused_by_name(messages, tmp_path / "writes.pt")


def test_file_read_is_never_done(tmp_path, tiny_model):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0")
    scripted = hostile.script_archive(hostile.ReadsFile(str(secret)), tmp_path / "reads.pt")
    scripted.__setstate__((torch.zeros(8), str(secret), False))  # positive control: the code reads the file
    assert bytes(scripted.weight.to(torch.uint8).tolist()) == b"root:x:0"
    messages = _through_every_converter(tmp_path / "reads.pt", tmp_path, tiny_model)
    assert "custom state" in messages["clip"] and "root:x" not in messages["clip"]
    _refused_by_name(messages, tmp_path / "reads.pt")


@pytest.mark.parametrize("payload", [hostile.Loops, hostile.Allocates], ids=["infinite-loop", "terabyte-allocation"])
def test_infinite_loop_and_huge_allocation_never_run(tmp_path, tiny_model, payload):
    path = tmp_path / "payload.pt"
    hostile.script_archive(payload(), path)
    messages = _through_every_converter(path, tmp_path, tiny_model)  # returns at all: the loop did not run (watchdog)
    assert "custom state" in messages["clip"]
    _refused_by_name(messages, path)


def test_pickled_system_call_is_refused_naming_the_global(tmp_path, tiny_model):
    marker = tmp_path / "marker"
    path = tmp_path / "system.pt"
    hostile.write_raw_archive(path, {"run": hostile.system_call(f"touch {marker}")}, {})
    messages = _through_every_converter(path, tmp_path, tiny_model)
    assert "it refers to 'posix.system'" in messages["clip"] or "it refers to 'nt.system'" in messages["clip"]
    assert not marker.exists()
    # the same payload in a plain (non-TorchScript) zip reaches torch.load(weights_only=True), which refuses it too
    plain = tmp_path / "plain.pt"
    hostile.write_raw_archive(plain, {"run": hostile.system_call(f"touch {marker}")}, {}, torchscript=False)
    with pytest.raises(ConversionError, match="cannot be loaded safely|not a readable PyTorch file"):
        convert_official_bank(plain, tmp_path / "patch.pt", tmp_path / "bank.safetensors")
    assert not marker.exists()


@pytest.mark.parametrize(
    "attributes, records, compress, message",
    [
        (
            {"w": hostile.raw_tensor("0", 10**12, (10**12,))},
            {"0": b"\0" * 8},
            False,
            "holds 8 bytes but the pickle claims 1000000000000 FloatStorage elements",
        ),
        (
            {"w": hostile.raw_tensor("0", 2, (1000,))},
            {"0": b"\0" * 8},
            False,
            r"reaches past its storage \(2 elements\)",
        ),
        ({"w": hostile.raw_tensor("0", 2, (2,))}, {"0": b"\0" * 8}, True, "is compressed"),
        (
            {"w": hostile.raw_tensor("7", 2, (2,))},
            {"0": b"\0" * 8},
            False,
            "storage record 'archive/data/7' is missing",
        ),
    ],
    ids=["huge-claimed-storage", "tensor-past-storage", "compressed-record", "missing-record"],
)
def test_malformed_storages_are_refused_before_any_allocation(tmp_path, attributes, records, compress, message):
    path = tmp_path / "bad.pt"
    hostile.write_raw_archive(path, attributes, records, compress=compress)
    with pytest.raises(ConversionError, match=message):
        convert_openai_clip(path)


# ---------------------------------------------------------------- OpenAI's module layout, traced
class _Block(nn.Module):
    def __init__(self, width: int, attn_mask: torch.Tensor | None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            collections.OrderedDict(
                c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width)
            )
        )
        self.attn_mask = attn_mask  # a plain attribute in OpenAI's model, not part of the state dict

    def forward(self, x):
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[_Block(width, attn_mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class _Visual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, VISION_WIDTH, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(VISION_WIDTH))
        self.positional_embedding = nn.Parameter(torch.zeros(GRID * GRID + 1, VISION_WIDTH))
        self.ln_pre, self.ln_post = nn.LayerNorm(VISION_WIDTH), nn.LayerNorm(VISION_WIDTH)
        self.transformer = _Transformer(VISION_WIDTH, VISION_LAYERS)
        self.proj = nn.Parameter(torch.zeros(VISION_WIDTH, EMBED))

    def forward(self, image):
        x = self.conv1(image).flatten(2).permute(2, 0, 1)
        x = torch.cat([self.class_embedding.expand(1, x.shape[1], -1), x]) + self.positional_embedding[:, None]
        return self.ln_post(self.transformer(self.ln_pre(x))[0]) @ self.proj


class _OpenAICLIP(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = _Visual()
        self.transformer = _Transformer(TEXT_WIDTH, TEXT_LAYERS, torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1))
        self.token_embedding = nn.Embedding(VOCAB, TEXT_WIDTH)
        self.positional_embedding = nn.Parameter(torch.zeros(CONTEXT, TEXT_WIDTH))
        self.ln_final = nn.LayerNorm(TEXT_WIDTH)
        self.text_projection = nn.Parameter(torch.zeros(TEXT_WIDTH, EMBED))
        self.logit_scale = nn.Parameter(torch.zeros(()))
        for name in ("input_resolution", "context_length", "vocab_size"):
            self.register_buffer(name, torch.tensor(CONTEXT))

    def forward(self, image, tokens):
        text = self.transformer(self.token_embedding(tokens).permute(1, 0, 2) + self.positional_embedding[:, None])
        return self.visual(image), self.ln_final(text)[0] @ self.text_projection


def test_traced_openai_layout_archive_converts_bit_exactly(tmp_path):
    state = openai_state_dict(seed=5)
    module = _OpenAICLIP().eval()
    module.load_state_dict(
        {**state, **{name: torch.tensor(CONTEXT) for name in ("input_resolution", "context_length", "vocab_size")}}
    )
    example = (torch.zeros(1, 3, PATCH * GRID, PATCH * GRID), torch.zeros(1, CONTEXT, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(module, example), str(tmp_path / "ViT-tiny.pt"))
    read = read_torchscript_state_dict(tmp_path / "ViT-tiny.pt")
    assert set(read) == set(module.state_dict())  # what ScriptModule.state_dict() holds: no attn_mask, no attributes
    assert all(
        torch.equal(read[key], value) and read[key].dtype == value.dtype for key, value in module.state_dict().items()
    )
    converted = convert_openai_clip(tmp_path / "ViT-tiny.pt", tmp_path / "hf").state_dict()
    expected = convert_openai_state_dict(state).state_dict()
    assert converted.keys() == expected.keys() and all(torch.equal(converted[key], expected[key]) for key in expected)


def test_no_torch_jit_load_anywhere_in_the_repository():
    calls = []
    for path in sorted(REPO.rglob("*.py")):
        if any(part.startswith(".") for part in path.relative_to(REPO).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "load"
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "jit"
            ):
                calls.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert calls == []
