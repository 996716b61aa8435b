# SPDX-License-Identifier: Apache-2.0
"""MRADConfig: reference defaults, derived sizes for ViT-L/14 at 518, validation, round trip."""

import pytest
from transformers import CLIPConfig

from mrad_hf import MRADConfig
from mrad_hf.cli.common import RANDOM_BACKBONES


def vit_l14_336() -> CLIPConfig:
    """OpenAI CLIP ViT-L/14@336's shapes: the CLI's `random-vit-l14-336` backbone (one definition of them)."""
    return CLIPConfig(**RANDOM_BACKBONES["random-vit-l14-336"])


def test_reference_defaults_and_vit_l_sizes():
    config = MRADConfig(clip_config=vit_l14_336())
    assert config.image_size == 518 and config.grid_size == 37
    assert (config.image_key_dim, config.patch_key_dim) == (768, 1024)
    assert (config.patch_size, config.text_width, config.num_deep_prompts) == (14, 768, 8)
    assert config.vv_start_layer == 1 and config.feature_layer == -1
    assert config.neighbor_kernel_sizes == [1, 3, 5]
    assert config.retrieval_temperature == 1.0 and config.image_score_weight == 0.7 and config.top_k_ratio == 0.01
    assert config.gaussian_sigma == 4.0 and config.gaussian_truncate == 4.0 and config.mask_threshold == 0.5
    assert config.position_interpolation == "bilinear" and config.class_key_post_layernorm is False
    assert config.score_fusion == "weighted" and config.region_rule == "exact"
    assert int(config.image_size**2 * config.top_k_ratio) == 2683  # the reference's top-k pixel count


def test_round_trip(tmp_path):
    config = MRADConfig(clip_config=vit_l14_336(), image_score_weight=0.5, image_bank_size=3)
    config.save_pretrained(tmp_path)
    again = MRADConfig.from_pretrained(tmp_path)
    assert again.image_score_weight == 0.5 and again.image_bank_size == 3
    assert again.clip_config.vision_config.hidden_size == 1024


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"score_fusion": "max"}, "score_fusion"),
        ({"neighbor_kernel_sizes": [2]}, "odd"),
        ({"image_score_weight": 1.5}, "image_score_weight"),
        ({"feature_layer": 30}, "feature_layer"),
        ({"vv_start_layer": 24}, "vv_start_layer"),
        ({"image_size": 10}, r"image_size \(10\) must be between the patch size 14 and 4096"),
        ({"image_size": 100000}, r"image_size \(100000\) must be between"),
        ({"gaussian_sigma": 1e6}, r"gaussian_sigma is 1000000.0; it must be in \[0, 64\]"),
        ({"gaussian_truncate": 1e9}, r"gaussian_truncate is 1000000000.0; it must be in \(0, 16\]"),
        ({"gaussian_sigma": float("nan")}, r"gaussian_sigma is nan"),
        ({"text_temperature": float("inf")}, r"text_temperature is inf"),
        ({"top_k_ratio": 0.0}, r"top_k_ratio is 0.0; it must be in \(0, 1\]"),
        ({"patch_dropout_quantile": 1.5}, r"patch_dropout_quantile is 1.5"),
        ({"mask_threshold": -0.1}, r"mask_threshold is -0.1"),
        ({"retrieval_temperature": 0.0}, "retrieval_temperature"),
        ({"position_interpolation": "nearest"}, "position_interpolation"),
        ({"region_rule": "any"}, r"region_rule must be one of \('exact', 'majority'\), got 'any'"),
        ({"variant": "xl"}, r"variant must be one of \('tf', 'ft', 'clip'\), got 'xl'"),
        ({"vv_start_layer": 23, "feature_layer": 5}, "V-V path would be empty"),
        ({"variant": "clip", "prompt_token_ids": [[49406, 49407]] * 2}, r"start \+ 12 context \+ end tokens"),
    ],
)
def test_invalid_values_are_refused(overrides, message):
    with pytest.raises(Exception, match=message):
        MRADConfig(clip_config=vit_l14_336(), **overrides)
