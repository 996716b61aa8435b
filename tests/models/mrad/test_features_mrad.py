# SPDX-License-Identifier: Apache-2.0
"""Dual-path features: parity with a plain reference-style implementation and with transformers' CLIP."""

import pytest
import torch
from conftest import TINY_IMAGE_SIZE, make_tiny_model
from reference_mrad import reference_average_neighbor, reference_encode_image

from mrad_hf.memory import build_memory_bank
from mrad_hf.models.mrad.features_mrad import (
    dual_path_vision_features,
    interpolate_position_embeddings,
    neighbor_average,
)
from mrad_hf.runtime import set_backbone_dtype


def _pixels(batch=3, size=TINY_IMAGE_SIZE, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("image_size", [TINY_IMAGE_SIZE, 56, 84])
def test_dual_path_matches_reference_style_path(image_size):
    model = make_tiny_model(image_size=image_size)
    pixels = _pixels(size=image_size)
    features = model.extract_features(pixels)
    ref_class, ref_patches = reference_encode_image(model.clip, pixels)
    assert features.grid_size == image_size // 14
    torch.testing.assert_close(features.class_embeds, ref_class, atol=1e-5, rtol=0)
    torch.testing.assert_close(features.patch_tokens, ref_patches, atol=1e-5, rtol=0)
    # and the values are not trivially equal to something else: the V-V path differs from the original path
    plain = model.clip.vision_model(pixels, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
    assert (model.clip.vision_model.post_layernorm(plain) - features.patch_tokens).abs().max() > 1e-2


def test_partial_dpam_matches_reference():
    """vv_start_layer = 2 equals the reference's DAPM_replace(num_layers - 1)."""
    model = make_tiny_model(vv_start_layer=2)
    pixels = _pixels()
    features = model.extract_features(pixels)
    ref_class, ref_patches = reference_encode_image(model.clip, pixels, dpam_layer=3)
    torch.testing.assert_close(features.class_embeds, ref_class, atol=1e-5, rtol=0)
    torch.testing.assert_close(features.patch_tokens, ref_patches, atol=1e-5, rtol=0)


def test_original_path_equals_transformers_clip_at_native_size():
    """At the native grid the original path is plain CLIP: its class token matches CLIPVisionModel's."""
    model = make_tiny_model(image_size=56)
    pixels = _pixels(size=56)
    hf = model.clip.vision_model(pixels)
    features = model.extract_features(pixels)
    torch.testing.assert_close(
        features.class_embeds, model.clip.visual_projection(hf.last_hidden_state[:, 0]), atol=1e-5, rtol=0
    )
    # class_key_post_layernorm=True gives CLIP's standard image embedding instead (the reference skips ln_post)
    with_ln = dual_path_vision_features(
        model.clip.vision_model, model.clip.visual_projection, pixels, class_key_post_layernorm=True
    )
    standard = model.clip.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(with_ln.class_embeds, standard, atol=1e-5, rtol=0)
    assert (with_ln.class_embeds - features.class_embeds).abs().max() > 1e-3


def test_bilinear_position_interpolation_differs_from_transformers_bicubic():
    model = make_tiny_model()
    table = model.clip.vision_model.embeddings.position_embedding.weight
    ours = interpolate_position_embeddings(table, 8, "bilinear")
    bicubic = interpolate_position_embeddings(table, 8, "bicubic")
    hf = model.clip.vision_model.embeddings.interpolate_pos_encoding(
        torch.zeros(1, 65, 48), TINY_IMAGE_SIZE, TINY_IMAGE_SIZE
    )[0]
    torch.testing.assert_close(bicubic, hf, atol=1e-6, rtol=0)
    assert ours.shape == (65, 48)
    torch.testing.assert_close(ours[0], table[0])  # class row kept
    assert (ours - bicubic).abs().max() > 1e-3
    assert interpolate_position_embeddings(table, 4) is table  # native grid: untouched


def test_neighbor_average_hand_computed():
    tokens = torch.arange(9, dtype=torch.float32).view(1, 9, 1)  # 3 x 3 grid 0..8
    out = neighbor_average(tokens, 3, [1, 3]).view(3, 3)
    # centre: (4 + mean(0..8)=4) / 2 = 4; corner (0,0): (0 + (0+1+3+4)/9) / 2 with zero padding counted
    assert out[1, 1].item() == pytest.approx(4.0)
    assert out[0, 0].item() == pytest.approx((0 + 8 / 9) / 2)
    random_tokens = torch.randn(2, 25, 7)
    torch.testing.assert_close(
        neighbor_average(random_tokens, 5, [1, 3, 5]), reference_average_neighbor(random_tokens)
    )


def test_bad_pixel_values_are_rejected():
    model = make_tiny_model()
    with pytest.raises(ValueError, match="expects 112x112"):
        model.extract_features(torch.zeros(1, 3, 56, 56))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        dual_path_vision_features(model.clip.vision_model, model.clip.visual_projection, torch.zeros(1, 1, 112, 112))


def test_last_block_class_only_path_keeps_plain_clip_values_when_vv_starts_late():
    """vv_start_layer = num_layers - 1: only the last block is dual; its class-only original path still equals CLIP."""
    model = make_tiny_model(image_size=56, vv_start_layer=3)
    pixels = _pixels(size=56)
    hf = model.clip.vision_model(pixels, output_hidden_states=True)
    features = model.extract_features(pixels)
    torch.testing.assert_close(
        features.class_embeds, model.clip.visual_projection(hf.last_hidden_state[:, 0]), atol=1e-5, rtol=0
    )
    ref_class, ref_patches = reference_encode_image(model.clip, pixels, dpam_layer=2)
    torch.testing.assert_close(features.patch_tokens, ref_patches, atol=1e-5, rtol=0)


def test_half_precision_backbone_keeps_memory_and_scores_float32(samples):
    fp32 = make_tiny_model()
    build_memory_bank(fp32, samples, batch_size=4, progress=False)
    half = make_tiny_model()
    build_memory_bank(half, samples, batch_size=4, progress=False)
    assert set_backbone_dtype(half, "bfloat16") is half
    assert half.clip.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert half.memory.image_keys.dtype == torch.float32 and half.memory.patch_keys.dtype == torch.float32
    torch.testing.assert_close(
        half.memory.patch_keys, fp32.memory.patch_keys, atol=0, rtol=0
    )  # the bank is not rounded
    pixels = _pixels(batch=2)
    with torch.no_grad():
        expected, got = fp32(pixels), half(pixels.to(torch.bfloat16))
    assert got.anomaly_map.dtype == torch.float32 and got.image_probabilities.dtype == torch.float32
    difference = (got.anomaly_map - expected.anomaly_map).abs().max().item()
    assert 0 < difference < 2e-2  # bf16 features (8-bit mantissa) move the maps a little, not a lot
    torch.testing.assert_close(got.anomaly_score, expected.anomaly_score, atol=2e-2, rtol=0)
    set_backbone_dtype(half, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(half(pixels).anomaly_map, expected.anomaly_map, atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="Unknown backbone dtype 'half'"):
        set_backbone_dtype(half, "half")
    assert set_backbone_dtype(half, None) is half


def test_cli_dtype_option_casts_only_the_tower():
    from mrad_hf.cli.common import load_detector
    from mrad_hf.cli.main import build_parser

    args = build_parser().parse_args(["predict", "--clip", "random-tiny", "--dtype", "bfloat16", "image.png"])
    assert args.dtype == "bfloat16"
    assert build_parser().parse_args(["predict", "--clip", "random-tiny", "image.png"]).dtype == "float32"
    detector = load_detector(None, "random-tiny", dtype=args.dtype)
    assert detector.clip.visual_projection.weight.dtype == torch.bfloat16
    assert detector.memory.image_keys.dtype == torch.float32


def test_benchmark_reference_path_equals_the_test_oracle(model_with_bank):
    """benchmarks/reference_style.py (the benchmark's baseline) computes what tests/reference_mrad.py does."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, os.pardir, "benchmarks"))
    from benchmark_inference import dual_path_flops
    from reference_mrad import reference_tf_score
    from reference_style import reference_end_to_end

    model = model_with_bank
    memory = model.memory
    bank = (memory.image_keys, memory.image_values, memory.patch_keys, memory.patch_values)
    pixels = _pixels(batch=2)
    maps, scores, class_embeds, patch_tokens = reference_end_to_end(model.clip, pixels, bank, TINY_IMAGE_SIZE)
    oracle_maps, oracle_scores = reference_tf_score(model.clip, pixels, *bank, TINY_IMAGE_SIZE)
    oracle_class, oracle_patches = reference_encode_image(model.clip, pixels)
    torch.testing.assert_close(class_embeds, oracle_class, atol=1e-6, rtol=0)
    torch.testing.assert_close(patch_tokens, oracle_patches, atol=1e-6, rtol=0)
    torch.testing.assert_close(maps, torch.from_numpy(oracle_maps), atol=1e-6, rtol=0)
    torch.testing.assert_close(scores, torch.from_numpy(oracle_scores).float(), atol=1e-6, rtol=0)
    # the analytic cost of ViT-L/14 at 518 px through both paths (issue 8: about 1.26 TFLOP per image)
    assert dual_path_flops(1024, 4096, 24, 14, 518, 768) == pytest.approx(1.2565e12, rel=1e-4)


def test_half_precision_casts_keep_the_bank_float32_and_matching(model_with_bank):
    bank = model_with_bank.get_memory_bank()
    model_with_bank.to(torch.bfloat16)  # a plain cast of the whole model: the memory stays float32
    assert model_with_bank.memory.image_keys.dtype == torch.float32
    assert torch.equal(model_with_bank.memory.image_keys, bank.image_keys)
    fresh = make_tiny_model()
    before = fresh.backbone_fingerprint()
    set_backbone_dtype(fresh, "bfloat16")
    after = fresh.backbone_fingerprint()  # dtype-independent: the architecture is equal, the weights signature close
    assert {k: v for k, v in after.items() if k != "weights_signature"} == {
        k: v for k, v in before.items() if k != "weights_signature"
    }
    assert after["weights_signature"] == pytest.approx(before["weights_signature"], abs=0.01)
    fresh.set_memory_bank(bank)  # ... so a bank built for the float32 backbone still attaches


# ---------------------------------------------------------------------- fast paths equal the reference path (issue 15)
def _variant_model(variant: str, **overrides):
    from conftest import make_samples, make_tiny_trained_model

    model = make_tiny_model(**overrides) if variant == "tf" else make_tiny_trained_model(variant, **overrides)
    build_memory_bank(model, make_samples(6), batch_size=3, progress=False)
    return model


def _assert_outputs_close(got, expected, atol=1e-5):
    for name in ("anomaly_map", "anomaly_score", "image_probabilities", "patch_probabilities"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=atol, rtol=0, msg=name)


VARIANTS = ["tf", "ft", "clip"]


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_onednn_packed_linears_equal_the_reference_path(variant, monkeypatch):
    from mrad_hf.models.mrad import features_mrad

    model = _variant_model(variant)
    pixels = _pixels(batch=3)
    monkeypatch.setenv("MRAD_LINEAR_BACKEND", "aten")
    reference = model(pixels)
    ref_class, ref_patches = reference_encode_image(model.clip, pixels)
    monkeypatch.setenv("MRAD_LINEAR_BACKEND", "onednn")
    assert features_mrad.linear_backend("cpu", torch.float32) == "onednn"
    calls = []
    original = features_mrad._packed_weight
    monkeypatch.setattr(features_mrad, "_packed_weight", lambda linear: calls.append(linear) or original(linear))
    fast = model(pixels)
    assert len(calls) >= 6 * len(model.clip.vision_model.encoder.layers) - 2  # the packed path really ran
    _assert_outputs_close(fast, reference)
    features = model.extract_features(pixels)
    torch.testing.assert_close(features.class_embeds, ref_class, atol=1e-5, rtol=0)
    torch.testing.assert_close(features.patch_tokens, ref_patches, atol=1e-5, rtol=0)


@torch.no_grad()
def test_packed_weights_are_a_side_cache_that_follows_the_parameters(monkeypatch):
    from mrad_hf.models.mrad import features_mrad

    monkeypatch.setenv("MRAD_LINEAR_BACKEND", "onednn")
    model = make_tiny_model()
    keys_before = set(model.state_dict())
    pixels = _pixels(batch=2)
    before = model.extract_features(pixels)
    fc1 = model.clip.vision_model.encoder.layers[1].mlp.fc1
    packed = features_mrad._PACKED_WEIGHTS[fc1][1]
    assert set(model.state_dict()) == keys_before  # nothing packed is saved
    assert features_mrad._packed_weight(fc1) is packed  # packed once, re-used
    fc1.weight.mul_(2.0)  # an in-place change of the source of truth re-packs
    assert features_mrad._packed_weight(fc1) is not packed
    changed = model.extract_features(pixels)
    assert (changed.patch_tokens - before.patch_tokens).abs().max() > 1e-3
    fc1.weight.div_(2.0)
    import copy

    clone = copy.deepcopy(model)  # deepcopy and a dtype round trip work and give the same values
    clone.clip.double().float()
    torch.testing.assert_close(clone.extract_features(pixels).patch_tokens, before.patch_tokens, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_eager_and_sdpa_attention_give_equal_outputs(variant, monkeypatch):
    from mrad_hf.models.mrad import features_mrad

    model = _variant_model(variant)
    pixels = _pixels(batch=2)
    attention_config = model.clip.vision_model.encoder.layers[0].self_attn.config
    assert attention_config._attn_implementation == "sdpa"
    sdpa = model(pixels)
    eager_calls = []
    original = features_mrad.eager_attention_forward
    monkeypatch.setattr(
        features_mrad, "eager_attention_forward", lambda *a, **k: eager_calls.append(1) or original(*a, **k)
    )
    model.clip.vision_model.config._attn_implementation = "eager"
    try:
        assert attention_config._attn_implementation == "eager"
        eager = model(pixels)
    finally:
        model.clip.vision_model.config._attn_implementation = "sdpa"
    assert len(eager_calls) == len(model.clip.vision_model.encoder.layers) + 1  # every block; the last one twice
    _assert_outputs_close(eager, sdpa)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_batch_invariant_switch_off_equals_on_within_float_rounding(variant):
    invariant = _variant_model(variant, batch_invariant=True)
    fast = _variant_model(variant)
    assert fast.config.batch_invariant is False
    pixels = _pixels(batch=4)
    reference = invariant(pixels)
    batched = fast(pixels)
    _assert_outputs_close(batched, reference)
    if variant == "clip":
        torch.testing.assert_close(batched.text_probabilities, reference.text_probabilities, atol=1e-5, rtol=0)
    for size in (1, 3):  # other batch compositions: equal within rounding (bit identity is the switch's job)
        _assert_outputs_close(fast(pixels[:size]), _slice(reference, size))


def _slice(outputs, size):
    from types import SimpleNamespace

    return SimpleNamespace(
        **{
            name: getattr(outputs, name)[:size]
            for name in ("anomaly_map", "anomaly_score", "image_probabilities", "patch_probabilities")
        }
    )


def test_batch_invariant_must_be_a_bool():
    with pytest.raises(Exception, match="batch_invariant"):
        make_tiny_model(batch_invariant="yes")


def test_linear_backend_follows_the_cpu(monkeypatch):
    from mrad_hf.models.mrad import features_mrad

    monkeypatch.delenv("MRAD_LINEAR_BACKEND", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert features_mrad.linear_backend("cpu", torch.float32) == "aten"  # AVX2: MKL measured at least as fast
    assert features_mrad.linear_backend("cpu", torch.bfloat16) == "aten"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert features_mrad.linear_backend("cpu", torch.float32) == "onednn"
    assert features_mrad.linear_backend("cpu", torch.bfloat16) == "onednn"
    assert features_mrad.linear_backend("cpu", torch.float16) == "aten"
    assert features_mrad.linear_backend("cuda", torch.float32) == "aten"
    monkeypatch.setenv("MRAD_LINEAR_BACKEND", "aten")
    assert features_mrad.linear_backend("cpu", torch.float32) == "aten"
    monkeypatch.setenv("MRAD_LINEAR_BACKEND", "fast")
    with pytest.raises(ValueError, match="MRAD_LINEAR_BACKEND"):
        features_mrad.linear_backend("cpu")
