# SPDX-License-Identifier: Apache-2.0
"""OpenAI CLIP checkpoint -> transformers CLIPModel: a random state dict in OpenAI's exact layout, converted, must
reproduce an independent OpenAI-style forward (sequence of `nn.MultiheadAttention`-style blocks over the stacked
`in_proj`, QuickGELU, `ln_post` on the class token, `@ proj`; causal text tower pooled at the argmax token)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mrad_hf.conversion.common import ConversionError
from mrad_hf.conversion.convert_openai_clip import convert_openai_clip, main

# tiny, with OpenAI's head rule (width // 64): vision 128 -> 2 heads, text 64 -> 1 head
VISION_WIDTH, VISION_LAYERS, PATCH, GRID = 128, 2, 14, 4
TEXT_WIDTH, TEXT_LAYERS, VOCAB, CONTEXT, EMBED = 64, 2, 99, 16, 32


def _block(prefix: str, width: int, generator) -> dict[str, torch.Tensor]:
    r = lambda *shape, std=0.05: torch.randn(*shape, generator=generator) * std  # noqa: E731
    return {
        f"{prefix}.attn.in_proj_weight": r(3 * width, width),
        f"{prefix}.attn.in_proj_bias": r(3 * width),
        f"{prefix}.attn.out_proj.weight": r(width, width),
        f"{prefix}.attn.out_proj.bias": r(width),
        f"{prefix}.ln_1.weight": 1 + r(width),
        f"{prefix}.ln_1.bias": r(width),
        f"{prefix}.mlp.c_fc.weight": r(4 * width, width),
        f"{prefix}.mlp.c_fc.bias": r(4 * width),
        f"{prefix}.mlp.c_proj.weight": r(width, 4 * width),
        f"{prefix}.mlp.c_proj.bias": r(width),
        f"{prefix}.ln_2.weight": 1 + r(width),
        f"{prefix}.ln_2.bias": r(width),
    }


def openai_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    r = lambda *shape, std=0.05: torch.randn(*shape, generator=generator) * std  # noqa: E731
    state = {
        "visual.class_embedding": r(VISION_WIDTH, std=0.5),
        "visual.positional_embedding": r(GRID * GRID + 1, VISION_WIDTH, std=0.5),
        "visual.conv1.weight": r(VISION_WIDTH, 3, PATCH, PATCH),
        "visual.ln_pre.weight": 1 + r(VISION_WIDTH),
        "visual.ln_pre.bias": r(VISION_WIDTH),
        "visual.ln_post.weight": 1 + r(VISION_WIDTH),
        "visual.ln_post.bias": r(VISION_WIDTH),
        "visual.proj": r(VISION_WIDTH, EMBED),
        "token_embedding.weight": r(VOCAB, TEXT_WIDTH, std=0.5),
        "positional_embedding": r(CONTEXT, TEXT_WIDTH, std=0.5),
        "ln_final.weight": 1 + r(TEXT_WIDTH),
        "ln_final.bias": r(TEXT_WIDTH),
        "text_projection": r(TEXT_WIDTH, EMBED),
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(VISION_LAYERS):
        state.update(_block(f"visual.transformer.resblocks.{i}", VISION_WIDTH, generator))
    for i in range(TEXT_LAYERS):
        state.update(_block(f"transformer.resblocks.{i}", TEXT_WIDTH, generator))
    return state


# ---------------------------------------------------------------- independent OpenAI-style forward
def _attention(x, sd, prefix, heads, mask=None):
    batch, length, width = x.shape
    qkv = x @ sd[f"{prefix}.attn.in_proj_weight"].t() + sd[f"{prefix}.attn.in_proj_bias"]
    q, k, v = (t.reshape(batch, length, heads, width // heads).transpose(1, 2) for t in qkv.split(width, dim=-1))
    logits = q @ k.transpose(-1, -2) / (width // heads) ** 0.5
    if mask is not None:
        logits = logits + mask
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)
    return out @ sd[f"{prefix}.attn.out_proj.weight"].t() + sd[f"{prefix}.attn.out_proj.bias"]


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _blocks(x, sd, prefix, layers, heads, mask=None):
    for i in range(layers):
        p = f"{prefix}.{i}"
        x = x + _attention(_ln(x, sd, f"{p}.ln_1"), sd, p, heads, mask)
        h = _ln(x, sd, f"{p}.ln_2") @ sd[f"{p}.mlp.c_fc.weight"].t() + sd[f"{p}.mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + h @ sd[f"{p}.mlp.c_proj.weight"].t() + sd[f"{p}.mlp.c_proj.bias"]
    return x


def openai_encode_image(sd, images):
    x = F.conv2d(images, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = (
        torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
        + sd["visual.positional_embedding"]
    )
    x = _blocks(_ln(x, sd, "visual.ln_pre"), sd, "visual.transformer.resblocks", VISION_LAYERS, VISION_WIDTH // 64)
    return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def openai_encode_text(sd, tokens):
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    x = _ln(_blocks(x, sd, "transformer.resblocks", TEXT_LAYERS, TEXT_WIDTH // 64, mask), sd, "ln_final")
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ sd["text_projection"]


def _inputs():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, PATCH * GRID, PATCH * GRID, generator=generator)
    tokens = torch.randint(3, VOCAB - 1, (3, CONTEXT), generator=generator)
    tokens[0, 5], tokens[1, -1], tokens[2, 9] = (
        VOCAB - 1,
        VOCAB - 1,
        VOCAB - 1,
    )  # the end token (highest id) at various places
    tokens[0, 6:], tokens[2, 10:] = 0, 0
    return images, tokens


def _script_archive(state: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive whose state dict is `state`, like OpenAI's released `.pt` files."""
    root = nn.Module()
    for key, value in state.items():
        module = root
        *parents, leaf = key.split(".")
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    for name in ("input_resolution", "context_length", "vocab_size"):  # non-weight entries OpenAI's archives carry
        root.register_buffer(name, torch.tensor(CONTEXT))
    with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI's files are TorchScript archives
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(root), str(path))


@pytest.mark.parametrize("layout", ["state_dict", "torchscript"])
def test_converted_clip_reproduces_openai_forward(tmp_path, layout):
    state = openai_state_dict()
    path = tmp_path / "ViT-tiny.pt"
    if layout == "state_dict":
        torch.save(state, path)
    else:
        _script_archive(state, path)
    model = convert_openai_clip(path, tmp_path / "hf")
    config = model.config
    assert (
        config.vision_config.hidden_size,
        config.vision_config.num_hidden_layers,
        config.vision_config.num_attention_heads,
    ) == (128, 2, 2)
    assert (config.vision_config.image_size, config.vision_config.patch_size, config.projection_dim) == (56, 14, 32)
    assert (
        config.text_config.vocab_size,
        config.text_config.max_position_embeddings,
        config.text_config.num_attention_heads,
    ) == (99, 16, 1)

    from transformers import CLIPModel

    reloaded = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    images, tokens = _inputs()
    with torch.no_grad():
        expected_image, expected_text = openai_encode_image(state, images), openai_encode_text(state, tokens)
        image = reloaded.get_image_features(pixel_values=images).pooler_output
        text = reloaded.get_text_features(input_ids=tokens).pooler_output
    torch.testing.assert_close(image, expected_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(text, expected_text, rtol=0, atol=1e-5)
    assert float(reloaded.logit_scale.detach()) == pytest.approx(4.6052)
    assert expected_image.abs().max() > 0.1  # a meaningful comparison, not zeros against zeros


def test_unknown_and_missing_keys_are_listed(tmp_path):
    state = openai_state_dict()
    state["visual.extra_head.weight"] = torch.zeros(2)
    del state["ln_final.bias"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=r"unknown keys \['visual.extra_head.weight'\]"):
        convert_openai_clip(tmp_path / "bad.pt")
    del state["visual.extra_head.weight"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=r"missing keys: \['text_model.final_layer_norm.bias'\]"):
        convert_openai_clip(tmp_path / "bad.pt")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: s.pop("ln_final.weight"),
            r"\['ln_final.weight'\] are missing or have the wrong number of dimensions",
        ),
        (lambda s: s.update({"visual.conv1.weight": torch.zeros(3)}), r"\['visual.conv1.weight'\] are missing or"),
        (lambda s: s.update({"logit_scale": torch.zeros(2)}), r"logit_scale must be one number, got shape \(2,\)"),
        (
            lambda s: s.update({"transformer.resblocks.0.attn.in_proj_bias": torch.tensor(1.0)}),
            r"its tensors do not form an OpenAI ViT CLIP \(RuntimeError: chunk expects",
        ),
        (lambda s: s.update({"visual.extra": torch.zeros(1)}), r"unknown keys \['visual.extra'\]"),
    ],
    ids=["missing-shape-source", "wrong-ndim", "logit-scale", "0-d-in-proj", "unknown-key"],
)
def test_every_refusal_names_the_file_and_the_cli_prints_one_line(tmp_path, capsys, edit, message):
    """Malformed entries used to escape as KeyError / RuntimeError tracebacks (no file named); now each is one line."""
    state = openai_state_dict()
    edit(state)
    path = tmp_path / "ViT-bad.pt"
    torch.save(state, path)
    assert main([str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    program = "python -m mrad_hf.conversion.convert_openai_clip"
    assert err.startswith(f"{program}: error: OpenAI CLIP checkpoint '{path}': ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    from mrad_hf.cli.main import main as mrad

    assert mrad(["convert", "clip", str(path), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == err.replace(program, "mrad convert clip")  # the CLI's one-line form
    assert not (tmp_path / "out").exists()


def test_cli_reports_pickled_code_and_heads(tmp_path, capsys):
    torch.save({"visual.proj": _NotATensor()}, tmp_path / "evil.pt")
    assert main([str(tmp_path / "evil.pt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        "holds Python objects or code that MRAD will not execute (it refers to 'test_convert_openai_clip._NotATensor'"
        in err
    )
    assert "weights_only" not in err and "likely succeed" not in err and "safe_globals" not in err
    assert (
        "MRAD reads only plain torch.save files of tensors in dicts and lists and OpenAI's released TorchScript" in err
    )
    state = openai_state_dict()
    torch.save(state, tmp_path / "ok.pt")
    assert main([str(tmp_path / "ok.pt"), str(tmp_path / "out"), "--vision-heads", "3"]) == 2
    assert "cannot split widths 128 / 64 into 3 / 1 heads" in capsys.readouterr().err
    assert main([str(tmp_path / "ok.pt"), str(tmp_path / "out"), "--vision-heads", "4"]) == 0
    assert "width 128, patch 14, image 56, projection 32" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()


class _NotATensor:
    pass
