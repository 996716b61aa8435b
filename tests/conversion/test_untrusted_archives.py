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
import re
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
    with pytest.raises(ConversionError, match="MRAD will not execute|not a readable PyTorch file"):
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


# ---------------------------------------------------------------- tensors not made of their stored bytes
def _bomb_inputs(tiny_model, bad: torch.Tensor) -> dict[str, tuple[dict, str]]:
    """For each converter, a file whose one named tensor is `bad` (the rest well formed), and that tensor's key path."""
    width = tiny_model.config.image_key_dim
    clip_state = openai_state_dict()
    clip_state["token_embedding.weight"] = bad
    return {
        "bank": ({"keys": bad, "values": torch.eye(2)}, "keys"),
        "clip": (clip_state, "token_embedding.weight"),
        "checkpoint": (
            {"image_proj": {"mlp1.weight": bad, "mlp1.bias": torch.zeros(width)}, "patch_proj": {}},
            "image_proj.mlp1.weight",
        ),
    }


@pytest.mark.parametrize(
    "make_bad, problem",
    [
        (
            lambda: torch.zeros(1).expand(200_000, 768),
            r"of size \(200000, 768\) repeats its elements \(stride \(0, 0\)",
        ),
        (
            lambda: torch.zeros(768).expand(200_000, 768),
            r"of size \(200000, 768\) repeats its elements \(stride \(0, 1\)",
        ),
        (
            lambda: torch.zeros(200_000).as_strided((100_000, 768), (1, 1)),
            r"of size \(100000, 768\) / stride \(1, 1\) has 76800000 elements but its storage holds only 200000 from "
            r"offset 0 \(overlapping strides",
        ),
    ],
    ids=["expanded-everywhere", "expanded-rows", "overlapping-strides"],
)
def test_expanded_and_overlapping_tensors_are_refused_by_every_converter_naming_file_and_tensor(
    tmp_path, tiny_model, make_bad, problem
):
    """The audit's 2 KB file (`torch.zeros(1).expand(3_000_000, 768)` as bank keys) made the converter allocate 9 GB;
    every converter now refuses such tensors before copying them, naming the file and the tensor."""
    bad = make_bad()
    inputs = _bomb_inputs(tiny_model, bad)
    torch.save(
        {"keys": torch.nn.functional.normalize(torch.ones(2, 48), dim=-1), "values": torch.eye(2)}, tmp_path / "p.pt"
    )
    runs = {
        "bank": lambda path: convert_official_bank(path, tmp_path / "p.pt", tmp_path / "bank.safetensors"),
        "clip": lambda path: convert_openai_clip(path, tmp_path / "clip-out"),
        "checkpoint": lambda path: convert_official_checkpoint(path, tmp_path / "ckpt-out", clip=tiny_model.clip),
    }
    for kind, (obj, name) in inputs.items():
        path = tmp_path / f"{kind}_bomb.pt"
        torch.save(obj, path)
        assert path.stat().st_size * 50 < bad.numel() * bad.element_size()  # a few MB standing for > 300 MB
        with pytest.raises(ConversionError, match=rf"'{re.escape(str(path))}': tensor '{name}' {problem}") as error:
            runs[kind](path)
        assert "allocate far more memory than the file holds" in str(error.value)
    for produced in ("clip-out", "bank.safetensors", "ckpt-out"):
        assert not (tmp_path / produced).exists()


def test_many_views_of_one_storage_are_refused_by_their_total(tmp_path):
    """Each view lies inside its storage once, but a thousand distinct views of one 8 KB storage read 6 MB."""
    base = torch.nn.functional.normalize(torch.randn(2000, 1), dim=0).flatten()
    torch.save({"keys": [base[i:] for i in range(1000)]}, tmp_path / "views.pt")
    with pytest.raises(ConversionError, match=r"its tensors read 6002000 bytes but the file holds only \d+ \(views"):
        convert_official_bank(tmp_path / "views.pt", tmp_path / "views.pt")
    torch.save({"keys": [base[:1000], base[1000:], base]}, tmp_path / "slices.pt")  # slices + the whole: 2x, allowed
    with pytest.raises(ConversionError, match=r"missing keys: \['values'\]"):  # read, then checked as a bank
        convert_official_bank(tmp_path / "slices.pt", tmp_path / "slices.pt")


def test_torchscript_archive_with_expanded_parameter_is_refused_naming_it(tmp_path):
    path = tmp_path / "expanded.pt"
    weight = hostile.raw_tensor("0", 1, (3_000_000, 768), stride=(0, 0))
    hostile.write_raw_archive(path, {"weight": weight}, {"0": b"\0" * 4}, parameters=("weight",))
    with pytest.raises(ValueError, match=r"tensor 'weight' of size \(3000000, 768\) repeats its elements"):
        read_torchscript_state_dict(path)
    with pytest.raises(
        ConversionError, match=rf"'{re.escape(str(path))}' is a TorchScript archive .*tensor 'weight' of"
    ):
        convert_openai_clip(path)
    hostile.write_raw_archive(
        path, {"weight": hostile.raw_tensor("0", 2, (2,))}, {"0": b"\0" * 8}, parameters=("weight",)
    )
    assert torch.equal(read_torchscript_state_dict(path)["weight"], torch.zeros(2))  # control: a stored tensor is read


def test_legacy_format_storage_claims_are_checked_before_torch_load_allocates(tmp_path, tiny_model):
    """torch.load allocates each legacy-format storage at the size its pickle claims (40 GB here, 355 bytes stored)."""
    path = tmp_path / "cache_model_visa.pt"
    hostile.write_legacy_file(path, {"keys": hostile.raw_tensor("0", 10**10, (3,))}, {"0": b"\0" * 12})
    with pytest.raises(ConversionError, match=r"claims storages of 40000000000 bytes but the file holds only \d+"):
        convert_official_bank(path, path)
    # the census executes nothing: a legacy file calling os.system is then refused by torch.load, naming the global
    marker = tmp_path / "marker"
    hostile.write_legacy_file(path, {"run": hostile.system_call(f"touch {marker}")}, {})
    with pytest.raises(ConversionError, match=r"will not execute \(it refers to '(posix|nt)\.system'"):
        convert_official_bank(path, path)
    assert not marker.exists()
    # control: a genuine legacy-format official cache converts
    keys = torch.nn.functional.normalize(torch.randn(3, tiny_model.config.image_key_dim), dim=-1)
    torch.save({"keys": keys, "values": torch.eye(2)[[0, 1, 0]]}, path, _use_new_zipfile_serialization=False)
    patch = tmp_path / "cache_patch_model_visa.pt"
    patch_keys = torch.nn.functional.normalize(torch.randn(2, tiny_model.config.patch_key_dim), dim=-1)
    torch.save({"keys": patch_keys, "values": torch.eye(2)}, patch, _use_new_zipfile_serialization=False)
    assert torch.equal(convert_official_bank(path, patch, model=tiny_model).image_keys, keys)


class _Code:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_refusals_never_advise_weights_only_false(tmp_path, tiny_model, legacy):
    """torch's refusal says re-running with weights_only=False "will likely succeed" (that runs the file's code);
    every converter says instead what it will not execute and which files it reads."""
    path = tmp_path / "code.pt"  # torch.save names the zip's folder "code/": still a plain file, not TorchScript
    torch.save({"keys": _Code()}, path, _use_new_zipfile_serialization=not legacy)
    messages = _through_every_converter(path, tmp_path, tiny_model)
    for kind, message in messages.items():
        refusal = r"' holds Python objects or code that MRAD will not execute \(it refers to '(builtins\.)?print'"
        assert re.search(re.escape(f"'{path}") + refusal, message), message
        for advice in ("weights_only", "likely succeed", "safe_globals", "trust"):
            assert advice not in message, (kind, advice)
    assert (
        "MRAD reads only plain torch.save files of tensors in dicts and lists and OpenAI's released"
        in messages["clip"]
    )
    assert (
        "MRAD reads only plain torch.save files of tensors in dicts and lists (the official MRAD" in messages["bank"]
    )


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
