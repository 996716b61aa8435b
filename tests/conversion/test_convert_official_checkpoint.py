# SPDX-License-Identifier: Apache-2.0
"""Official MRAD-FT / MRAD-CLIP checkpoints -> mrad-hf folders. Random checkpoints in exactly the official layout
(`torch.save({"image_proj": MLP().state_dict(), "patch_proj": Projector().state_dict(), ...})`) are converted; the
converted MRAD-FT model's maps and scores must equal a plain re-statement of the official FT scoring
(`mrad.py: compute_socre / compute_patch_socre` with `proj`, `test.py` post-processing) on the original tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_IMAGE_SIZE, make_samples, make_tiny_model, tiny_clip_config
from reference_mrad import reference_average_neighbor, reference_encode_image, reference_trained_score
from scipy.ndimage import gaussian_filter

from mrad_hf import MemoryBank, MRADForAnomalyDetection, MRADImageProcessor
from mrad_hf.conversion.common import ConversionError
from mrad_hf.conversion.convert_official_checkpoint import convert_official_checkpoint, main
from mrad_hf.memory import save_bank
from mrad_hf.models.mrad.memory_bank_mrad import feature_settings

IMAGE_DIM, PATCH_DIM, TEXT_DIM = 24, 48, 32  # tiny_clip_config: projection, vision width, text width
N_CTX, DEEP_LENGTH = 4, 2
START, X, OBJECT, DAMAGED, PERIOD, END = 97, 10, 20, 21, 22, 98  # inside the tiny vocabulary (99); END is the highest


def _linear(out_features, in_features, generator, scale=0.3):
    return {
        "weight": torch.randn(out_features, in_features, generator=generator) * scale,
        "bias": torch.randn(out_features, generator=generator) * 0.1,
    }


def official_ft_checkpoint(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mlp1, mlp2 = _linear(IMAGE_DIM, IMAGE_DIM, g), _linear(IMAGE_DIM, IMAGE_DIM, g)
    fc0, fc1 = _linear(IMAGE_DIM, PATCH_DIM, g), _linear(IMAGE_DIM, PATCH_DIM, g)
    return {
        "image_proj": {f"mlp{i}.{k}": v for i, layer in ((1, mlp1), (2, mlp2)) for k, v in layer.items()},
        "patch_proj": {f"fc.{i}.{k}": v for i, layer in ((0, fc0), (1, fc1)) for k, v in layer.items()},
    }


def _tokenized(words):
    ids = [START] + [X] * N_CTX + words + [PERIOD, END]
    return torch.tensor([ids + [0] * (16 - len(ids))]).reshape(1, 1, 16)


def official_clip_checkpoint(seed=0) -> dict:
    checkpoint = official_ft_checkpoint(seed)
    g = torch.Generator().manual_seed(seed + 100)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.05  # noqa: E731
    mlp_a, mlp_b = _linear(TEXT_DIM, IMAGE_DIM, g), _linear(TEXT_DIM, IMAGE_DIM, g)
    checkpoint["prompt_learner"] = {
        "ctx_pos": r(1, 1, N_CTX, TEXT_DIM),
        "ctx_neg": r(1, 1, N_CTX, TEXT_DIM),
        "compound_prompts_text.0": r(DEEP_LENGTH, TEXT_DIM),
        "compound_prompt_projections.0.weight": r(896, TEXT_DIM),
        "compound_prompt_projections.0.bias": r(896),
        "mlp.c_fc.weight": r(4 * 768, 768),
        "mlp.c_fc.bias": r(4 * 768),
        "mlp.c_proj.weight": r(768, 4 * 768),
        "mlp.c_proj.bias": r(768),
        "token_prefix_pos": r(1, 1, 1, TEXT_DIM),
        "token_suffix_pos": r(1, 1, 11, TEXT_DIM),
        "token_prefix_neg": r(1, 1, 1, TEXT_DIM),
        "token_suffix_neg": r(1, 1, 11, TEXT_DIM),
        "tokenized_prompts_pos": _tokenized([OBJECT]),
        "tokenized_prompts_neg": _tokenized([DAMAGED, OBJECT]),
    }
    checkpoint["prompt_proj"] = {f"mlp{i}.{k}": v for i, layer in ((1, mlp_a), (2, mlp_b)) for k, v in layer.items()}
    return checkpoint


def _official_bank(model, seed=0) -> MemoryBank:
    g = torch.Generator().manual_seed(seed)
    image_labels, patch_labels = torch.tensor([0, 1, 0, 1, 1, 0, 0]), torch.tensor([1, 0, 0, 1, 0, 0, 1, 0, 0, 0])
    return MemoryBank(
        image_keys=F.normalize(torch.randn(7, IMAGE_DIM, generator=g), dim=-1),
        image_values=F.one_hot(image_labels, 2).float(),
        patch_keys=F.normalize(torch.randn(10, PATCH_DIM, generator=g), dim=-1),
        patch_values=F.one_hot(patch_labels, 2).float(),
        metadata={
            "source": "visa",
            "backbone": model.backbone_fingerprint(),
            "features": feature_settings(model.config),
        },
    )


def _project(x, layer):
    return x @ layer["weight"].t() + layer["bias"]


@torch.no_grad()
def reference_ft_retrieval(clip, image, checkpoint, bank):
    """`compute_socre` / `compute_patch_socre` with proj (no similarity dropout at test time) on one image."""
    image_features, patch_tokens = reference_encode_image(clip, image)
    patch = reference_average_neighbor(patch_tokens)
    patch = patch / patch.norm(dim=-1, keepdim=True)
    fc = checkpoint["patch_proj"]
    layer = lambda d, p: {"weight": d[f"{p}.weight"], "bias": d[f"{p}.bias"]}  # noqa: E731
    weights = F.softmax(_project(patch, layer(fc, "fc.0")) @ _project(bank.patch_keys, layer(fc, "fc.1")).t(), dim=-1)
    seg = weights @ bank.patch_values
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    mlp = checkpoint["image_proj"]
    sim = _project(image_features, layer(mlp, "mlp1")) @ _project(bank.image_keys, layer(mlp, "mlp2")).t()
    return F.softmax(sim, dim=-1) @ bank.image_values, seg


@torch.no_grad()
def reference_ft_score(clip, pixel_values, checkpoint, bank, image_size, k=0.7, sigma=4):
    """`test.py --model_type mrad-ft`, one image at a time: (maps (B, S, S), scores (B,))."""
    maps, scores = [], []
    for image in pixel_values.split(1):
        cls_probs, seg = reference_ft_retrieval(clip, image, checkpoint, bank)
        side = int(seg.shape[1] ** 0.5)
        sm = F.interpolate(seg.reshape(1, side, side, -1).permute(0, 3, 1, 2), image_size, mode="bilinear").permute(
            0, 2, 3, 1
        )
        anomaly_map = torch.from_numpy(gaussian_filter(sm[..., 1].numpy(), sigma=sigma))[0]
        flat = anomaly_map.flatten()
        top = torch.topk(flat, int(flat.shape[0] * 0.01))[0].mean()
        scores.append(float((1 - k) * top + k * cls_probs[0, 1]))
        maps.append(anomaly_map.numpy())
    return np.stack(maps), np.array(scores)


def _pixels(model):
    return MRADImageProcessor.from_config(model.config)([s["image"] for s in make_samples(3, seed=11)])["pixel_values"]


def test_ft_checkpoint_matches_official_scoring(tmp_path, capsys):
    tf_model = make_tiny_model()
    checkpoint = official_ft_checkpoint()
    torch.save(checkpoint, tmp_path / "mrad_ft_final.pth")
    bank = _official_bank(tf_model)
    save_bank(bank, tmp_path / "visa.safetensors")
    assert (
        main([str(tmp_path / "mrad_ft_final.pth"), str(tmp_path / "no-clip"), "--clip", str(tmp_path / "missing")])
        == 2
    )
    assert "Could not load a CLIP configuration" in capsys.readouterr().err and not (tmp_path / "no-clip").exists()

    model = convert_official_checkpoint(
        tmp_path / "mrad_ft_final.pth",
        tmp_path / "mrad-ft",
        clip=tf_model.clip,
        bank=tmp_path / "visa.safetensors",
        image_size=TINY_IMAGE_SIZE,
    )
    assert model.config.variant == "ft" and model.conversion_report["dropped_official_keys"] == []
    reloaded = MRADForAnomalyDetection.from_pretrained(tmp_path / "mrad-ft").eval()
    pixels = _pixels(reloaded)
    with torch.no_grad():
        out = reloaded(pixel_values=pixels)
    ref_maps, ref_scores = reference_ft_score(tf_model.clip, pixels, checkpoint, bank, TINY_IMAGE_SIZE)
    torch.testing.assert_close(out.anomaly_map, torch.from_numpy(ref_maps).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.anomaly_score, torch.from_numpy(ref_scores).float(), rtol=0, atol=1e-5)
    with torch.no_grad():  # and the projections matter: without them (MRAD-TF) the scores differ
        tf_model.set_memory_bank(bank)
        assert not torch.allclose(tf_model(pixel_values=pixels).anomaly_score, out.anomaly_score, atol=1e-3)


def test_clip_checkpoint_maps_every_tensor_and_drops_only_known_unused(tmp_path):
    tf_model = make_tiny_model()
    checkpoint = official_clip_checkpoint()
    torch.save(checkpoint, tmp_path / "test_on_mvtec.pth")
    bank = _official_bank(tf_model)
    model = convert_official_checkpoint(
        tmp_path / "test_on_mvtec.pth",
        tmp_path / "mrad-clip",
        clip=tf_model.clip,
        bank=bank,
        image_size=TINY_IMAGE_SIZE,
    )
    assert model.conversion_report["dropped_official_keys"] == sorted(
        [
            f"prompt_learner.{k}"
            for k in checkpoint["prompt_learner"]
            if k.startswith(("compound_prompt_projections", "mlp.", "token_"))
        ]
    )
    reloaded = MRADForAnomalyDetection.from_pretrained(tmp_path / "mrad-clip").eval()
    config = reloaded.config
    assert (config.variant, config.prompt_context_length, config.deep_prompt_length, config.deep_prompt_depth) == (
        "clip",
        N_CTX,
        DEEP_LENGTH,
        2,
    )
    assert config.prompt_token_ids == [
        [START, *[X] * N_CTX, OBJECT, PERIOD, END],
        [START, *[X] * N_CTX, DAMAGED, OBJECT, PERIOD, END],
    ]

    learner, official = reloaded.prompt_learner, checkpoint["prompt_learner"]
    assert torch.equal(learner.normal_context, official["ctx_pos"][0, 0]) and torch.equal(
        learner.anomaly_context, official["ctx_neg"][0, 0]
    )
    assert torch.equal(learner.deep_prompts, official["compound_prompts_text.0"][None])
    g = torch.Generator().manual_seed(3)
    bias, tokens = torch.randn(2, 2, TEXT_DIM, generator=g), torch.randn(2, 2, IMAGE_DIM, generator=g)
    with (
        torch.no_grad()
    ):  # the official forward: ctx + bias on every context vector; bias = (mlp1(normal), mlp2(anomalous))
        torch.testing.assert_close(
            learner.context(bias),
            torch.stack(
                [official["ctx_pos"][0, 0] + bias[:, 0, None], official["ctx_neg"][0, 0] + bias[:, 1, None]], dim=1
            ),
        )
        proj = checkpoint["prompt_proj"]
        expected_bias = torch.stack(
            [
                tokens[:, 0] @ proj["mlp1.weight"].t() + proj["mlp1.bias"],
                tokens[:, 1] @ proj["mlp2.weight"].t() + proj["mlp2.bias"],
            ],
            dim=1,
        )
        torch.testing.assert_close(reloaded.region_bias(tokens), expected_bias)

    pixels = _pixels(reloaded)
    with torch.no_grad():
        out = reloaded(pixel_values=pixels)
    for index, image in enumerate(pixels.split(1)):  # image and pixel retrieval: the official FT formulas
        image_probs, seg = reference_ft_retrieval(tf_model.clip, image, checkpoint, bank)
        torch.testing.assert_close(out.image_probabilities[index], image_probs[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.patch_probabilities[index], seg[0], rtol=0, atol=1e-5)
    assert out.text_probabilities is not None and torch.isfinite(out.anomaly_map).all()

    # the whole MRAD-CLIP inference (region priors, biased prompts, deep prompts in fp16, text map, score) against the
    # plain re-statement of the official test.py, computed from the original checkpoint tensors
    layer = lambda weights, name: (
        lambda x: _project(x, {"weight": weights[f"{name}.weight"], "bias": weights[f"{name}.bias"]})
    )  # noqa: E731
    image_proj = (layer(checkpoint["image_proj"], "mlp1"), layer(checkpoint["image_proj"], "mlp2"))
    patch_proj = (layer(checkpoint["patch_proj"], "fc.0"), layer(checkpoint["patch_proj"], "fc.1"))
    prompt = dict(
        ctx_pos=official["ctx_pos"][0, 0],
        ctx_neg=official["ctx_neg"][0, 0],
        deep_prompts=[official["compound_prompts_text.0"]],
        token_ids=torch.cat(
            [official["tokenized_prompts_pos"].reshape(1, -1), official["tokenized_prompts_neg"].reshape(1, -1)]
        ).long(),
        n_ctx=N_CTX,
        prompt_proj=(layer(checkpoint["prompt_proj"], "mlp1"), layer(checkpoint["prompt_proj"], "mlp2")),
    )
    banks = (bank.image_keys, bank.image_values, bank.patch_keys, bank.patch_values)
    ref_maps, ref_scores = reference_trained_score(
        tf_model.clip, pixels, banks, image_proj, patch_proj, TINY_IMAGE_SIZE, prompt=prompt
    )
    np.testing.assert_allclose(out.anomaly_map.numpy(), ref_maps, atol=2e-5)
    np.testing.assert_allclose(out.anomaly_score.numpy(), ref_scores, atol=2e-5)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c["prompt_learner"].update(extra_scale=torch.ones(1)),
            r"unknown keys \['prompt_learner.extra_scale'\]",
        ),
        (lambda c: c.pop("patch_proj"), r"missing keys: \['patch_proj'\]"),
        (lambda c: c["image_proj"].pop("mlp2.bias"), r"missing keys: \['image_projection.key.bias'\]"),
        (lambda c: c.update(optimizer={}), r"unknown keys: \['optimizer'\]"),
        (
            lambda c: c["prompt_learner"].update(ctx_pos=torch.zeros(2, 1, N_CTX, TEXT_DIM)),
            r"shape \(1, 1, n_ctx, D\)",
        ),
        (
            lambda c: c["patch_proj"].update({"fc.0.weight": torch.zeros(IMAGE_DIM, 1024)}),
            r"does not fit this backbone.*patch_projection.query.weight",
        ),
        (
            lambda c: c["prompt_learner"].update({"tokenized_prompts_pos": torch.tensor(5)}),
            r"'prompt_learner.tokenized_prompts_pos' must hold one tokenized prompt, got shape \(\)",
        ),
        (  # deep prompts of two lengths cannot be stacked (a RuntimeError inside torch.stack before)
            lambda c: c["prompt_learner"].update({"compound_prompts_text.1": torch.zeros(DEEP_LENGTH + 1, TEXT_DIM)}),
            r"its tensors do not form an official MRAD checkpoint \(RuntimeError: stack expects each tensor",
        ),
    ],
)
def test_bad_checkpoints_stop_with_the_keys(tmp_path, edit, message):
    """Every refusal names the checkpoint file (what the CLI prints as its one line), then what is wrong."""
    checkpoint = official_clip_checkpoint()
    edit(checkpoint)
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    clip_model = MRADForAnomalyDetection.from_clip(tiny_clip_config()).clip
    with pytest.raises(ConversionError, match=message) as error:
        convert_official_checkpoint(tmp_path / "ckpt.pth", clip=clip_model, image_size=TINY_IMAGE_SIZE)
    assert str(error.value).startswith(f"Official checkpoint '{tmp_path / 'ckpt.pth'}'")
