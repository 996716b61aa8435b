# SPDX-License-Identifier: Apache-2.0
"""MRAD-FT and MRAD-CLIP against a plain re-statement of the reference (`tests/reference_mrad.py`): inference maps and
scores, similarity dropout in training, the text branch (deep prompts rounded to fp16, CLIP's full 77-style context),
bias injection, region priors, the stage switch, parameter counts, and save/load through AutoModel and the pipeline."""

import numpy as np
import pytest
import torch
from conftest import TINY_PROMPT_TOKEN_IDS, make_samples, make_tiny_trained_model
from reference_mrad import (
    reference_compute_patch_score,
    reference_compute_score,
    reference_encode_text_learn,
    reference_trained_score,
)
from transformers import AutoModel, CLIPConfig, pipeline

from mrad_hf import MRADConfig, MRADImageProcessor
from mrad_hf.cli.common import RANDOM_BACKBONES
from mrad_hf.memory import build_memory_bank
from mrad_hf.training.trainer import count_trainable_parameters, set_training_stage


def _inputs(model, samples):
    return MRADImageProcessor.from_config(model.config)(
        [s["image"] for s in samples], masks=[s["mask"] for s in samples]
    )


def _randomise_heads(model, seed=1):
    """Non-trivial head weights (fresh biases are small; larger values exercise the bias paths)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("clip."):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def _reference_heads(model):
    image, patch = model.image_projection, model.patch_projection
    return (image.query, image.key), (patch.query, patch.key)


def _prompt(model):
    learner = model.prompt_learner
    ids = model.config.prompt_token_ids
    token_ids = torch.zeros(2, model.config.clip_config.text_config.max_position_embeddings, dtype=torch.long)
    for row, prompt in enumerate(ids):
        token_ids[row, : len(prompt)] = torch.tensor(prompt)
    return dict(
        ctx_pos=learner.normal_context,
        ctx_neg=learner.anomaly_context,
        deep_prompts=list(learner.deep_prompts),
        token_ids=token_ids,
        n_ctx=model.config.prompt_context_length,
        prompt_proj=(model.region_bias.normal, model.region_bias.anomaly),
    )


@pytest.fixture(scope="module")
def bank_samples():
    return make_samples(8, seed=0)


@pytest.mark.parametrize("variant", ["ft", "clip"])
def test_inference_matches_reference(variant, bank_samples):
    model = make_tiny_trained_model(variant)
    _randomise_heads(model)
    build_memory_bank(model, bank_samples, batch_size=4, progress=False)
    bank = model.get_memory_bank()
    queries = make_samples(3, seed=11)
    pixel_values = _inputs(model, queries)["pixel_values"]
    with torch.no_grad():
        output = model(pixel_values=pixel_values)
    image_proj, patch_proj = _reference_heads(model)
    with torch.no_grad():
        maps, scores = reference_trained_score(
            model.clip,
            pixel_values,
            (bank.image_keys, bank.image_values, bank.patch_keys, bank.patch_values),
            image_proj,
            patch_proj,
            model.config.image_size,
            prompt=_prompt(model) if variant == "clip" else None,
        )
    np.testing.assert_allclose(output.anomaly_map.numpy(), maps, atol=2e-5)
    np.testing.assert_allclose(output.anomaly_score.numpy(), scores, atol=2e-5)
    assert np.ptp(scores) > 1e-4  # the images are told apart, so the comparison is not between constants


def test_training_mode_applies_similarity_dropout_like_reference(bank_samples):
    model = make_tiny_trained_model("ft")
    _randomise_heads(model)
    build_memory_bank(model, bank_samples, batch_size=4, progress=False)
    bank = model.get_memory_bank()
    pixel_values = _inputs(model, bank_samples[:4])["pixel_values"]
    with torch.no_grad():
        features = model.extract_features(pixel_values)
        image_q, patch_q = model.retrieval_queries(features)
        model.train()
        train_image, train_patch = model.retrieve("image", image_q), model.retrieve("patch", patch_q)
        model.eval()
        eval_image = model.retrieve("image", image_q)
    image_proj, patch_proj = _reference_heads(model)
    with torch.no_grad():
        ref_image = reference_compute_score(image_q, bank.image_keys, bank.image_values, image_proj, need_mask=True)
        ref_patch, _ = reference_compute_patch_score(
            patch_q, bank.patch_keys, bank.patch_values, patch_proj, need_mask=True
        )
        ref_eval = reference_compute_score(image_q, bank.image_keys, bank.image_values, image_proj, need_mask=False)
    torch.testing.assert_close(train_image, ref_image, atol=1e-6, rtol=0)
    torch.testing.assert_close(train_patch, ref_patch, atol=1e-6, rtol=0)
    torch.testing.assert_close(eval_image, ref_eval, atol=1e-6, rtol=0)
    assert (train_image - eval_image).abs().max() > 1e-3  # the training images are in the memory: dropout matters


def test_text_features_match_reference_full_context_and_fp16_deep_prompts():
    model = make_tiny_trained_model("clip")
    _randomise_heads(model)
    region_tokens = torch.randn(2, 2, model.config.image_key_dim)
    region_tokens[1, 1] = 0  # an empty anomalous region
    with torch.no_grad():
        ours = model.prompt_text_features(region_tokens)
        bias = model.region_bias(region_tokens)
        prompt = _prompt(model)
        theirs = reference_encode_text_learn(
            model.clip,
            prompt["ctx_pos"],
            prompt["ctx_neg"],
            bias,
            prompt["token_ids"],
            prompt["deep_prompts"],
            prompt["n_ctx"],
        )
        theirs = theirs / theirs.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        model.config.deep_prompt_fp16_rounding = False
        unrounded = model.prompt_text_features(region_tokens)
    assert (unrounded - ours).abs().max() > 0  # the switch changes something: the fp16 rounding is really applied


def test_bias_is_added_to_every_context_vector():
    model = make_tiny_trained_model("clip")
    biases = torch.randn(3, 2, model.config.text_width)
    context = model.prompt_learner.context(biases)
    assert context.shape == (3, 2, 12, model.config.text_width)
    for vector in range(12):
        torch.testing.assert_close(context[:, 0, vector], model.prompt_learner.normal_context[vector] + biases[:, 0])
        torch.testing.assert_close(context[:, 1, vector], model.prompt_learner.anomaly_context[vector] + biases[:, 1])


def test_stage_switch_sets_exactly_the_reference_trainable_parameters():
    model = make_tiny_trained_model("clip")
    trainable = lambda: sorted({name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad})  # noqa: E731
    set_training_stage(model, "ft")
    assert trainable() == ["image_projection", "patch_projection"]
    set_training_stage(model, "prompt")
    assert trainable() == ["prompt_learner", "region_bias"]
    set_training_stage(model, None)
    assert trainable() == []
    with pytest.raises(ValueError, match="No stage 'prompt' for variant 'ft'"):
        set_training_stage(make_tiny_trained_model("ft"), "prompt")


def test_parameter_counts_for_vit_l14_match_reference_without_building_it():
    config = MRADConfig(clip_config=CLIPConfig(**RANDOM_BACKBONES["random-vit-l14-336"]), variant="clip")
    assert count_trainable_parameters(config, "ft") == 2_755_584
    assert count_trainable_parameters(config, "prompt") == 1_224_192


def test_loss_requires_a_trained_variant_and_masks(bank_samples):
    model = make_tiny_trained_model("ft")
    build_memory_bank(model, bank_samples, batch_size=4, progress=False)
    inputs = _inputs(model, bank_samples[:2])
    output = model(pixel_values=inputs["pixel_values"], labels=torch.tensor([0, 1]), masks=inputs["masks"])
    assert output.loss is not None and output.loss.requires_grad and output.loss.item() > 0
    with pytest.raises(ValueError, match="not available for variant 'ft'"):
        model(
            pixel_values=inputs["pixel_values"],
            labels=torch.tensor([0, 1]),
            masks=inputs["masks"],
            loss_stage="prompt",
        )


@pytest.mark.parametrize("variant", ["ft", "clip"])
def test_save_and_reload_through_automodel_and_pipeline(variant, bank_samples, tmp_path, capsys):
    model = make_tiny_trained_model(variant)
    _randomise_heads(model)
    build_memory_bank(model, bank_samples, batch_size=4, progress=False)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.variant == variant
    assert not any(p.requires_grad for n, p in reloaded.named_parameters() if n.startswith("clip."))
    image = bank_samples[1]["image"]
    pixel_values = _inputs(model, [bank_samples[1]])["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).anomaly_score
        again = reloaded(pixel_values=pixel_values).anomaly_score
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=0)
    result = pipeline("anomaly-detection", model=str(tmp_path))(image)
    assert abs(result["score"] - expected.item()) < 1e-6
    assert "custom code" not in capsys.readouterr().out  # mrad_hf is installed: no remote-code prompt


def test_clip_variant_needs_prompt_ids_or_a_tokenizer():
    from conftest import tiny_clip_config

    from mrad_hf import MRADForAnomalyDetection

    with pytest.raises(ValueError, match="needs the CLIP tokenizer"):
        MRADForAnomalyDetection.from_clip(tiny_clip_config(), variant="clip")
    # OpenAI-sized vocabularies get the reference prompts' ids without a tokenizer
    config = CLIPConfig(**RANDOM_BACKBONES["random-tiny"])
    model = MRADForAnomalyDetection.from_clip(config, variant="clip", image_size=112, deep_prompt_depth=1)
    assert model.config.prompt_token_ids[1] == [49406] + [343] * 12 + [13568, 14115, 269, 49407]
    assert TINY_PROMPT_TOKEN_IDS[0][-1] == 98
