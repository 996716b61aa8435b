# SPDX-License-Identifier: Apache-2.0
"""MRAD configuration (Xu et al., ICLR 2026, arXiv 2602.00522, Sec. 3.1-3.5): every knob of the method as data.

The defaults reproduce the released code (github.com/CROVO1026/MRAD, HEAD 1cc1c6b), the reference semantics of this
package; where the paper's text differs, its form is an option (``score_fusion="sum"``, ``retrieval_temperature``).
"""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, PreTrainedConfig
from transformers.pipelines import PIPELINE_REGISTRY

__all__ = ["MRADConfig", "CustomPipelines", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "VARIANTS"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VARIANTS = ("tf", "ft", "clip")
_CHOICES = {
    "position_interpolation": ("bilinear", "bicubic"),
    "score_fusion": ("weighted", "sum"),
    "region_rule": ("exact", "majority"),
    "variant": VARIANTS,
}
#: State that older versions kept in config.json; now `memory_bank.json` and `calibration.json` beside the weights.
_STATE_KEYS = ("memory_bank_metadata", "calibration")
#: Upper bounds that keep a run finite: a 1e6 sigma or 1e9 truncation asks for a kernel of gigabytes.
_MAX_IMAGE_SIZE, _MAX_GAUSSIAN_SIGMA, _MAX_GAUSSIAN_TRUNCATE = 4096, 64.0, 16.0
#: name: (low, high, low inclusive); every bound also refuses NaN and infinity.
_BOUNDS = {
    **dict.fromkeys(("retrieval_temperature", "classification_temperature", "text_temperature"), (0.0, 1e3, False)),
    **dict.fromkeys(("image_score_weight", "mask_threshold", "region_prior_threshold"), (0.0, 1.0, True)),
    **dict.fromkeys(("image_dropout_quantile", "patch_dropout_quantile"), (0.0, 1.0, True)),
    "top_k_ratio": (0.0, 1.0, False),
    "gaussian_sigma": (0.0, _MAX_GAUSSIAN_SIGMA, True),
    "gaussian_truncate": (0.0, _MAX_GAUSSIAN_TRUNCATE, False),
}


class CustomPipelines(dict):
    """`config.custom_pipelines`, listed by `save_pretrained` so that `pipeline(model=folder)` infers the task.

    `task in` means "needs the shipped code" (transformers then demands `trust_remote_code`); a task registered in
    this process (`import mrad_hf` registers `anomaly-detection`) is listed but not `in`: the installed code runs."""

    def __contains__(self, task) -> bool:
        return dict.__contains__(self, task) and task not in PIPELINE_REGISTRY.get_supported_tasks()


@strict
class MRADConfig(PreTrainedConfig):
    r"""Configuration of [`MRADForAnomalyDetection`]: architecture and protocol only (a saved model keeps its bank's
    provenance in `memory_bank.json` and its thresholds in `calibration.json`). "Reference" = the official code.

    Args:
        clip_config (`CLIPConfig` or `dict`, *optional*): the frozen CLIP (real use: `from_clip`, ViT-L/14@336).
        image_size (`int`, defaults to 518): input side; images are stretched to it (no crop), as the reference does.
        vv_start_layer (`int`, defaults to 1): first V-V block (0-based); the reference's `DAPM_replace(24)` = 2..24.
        feature_layer (`int`, defaults to -1): block of the patch-memory tokens (the reference's "layers" alias -1).
        neighbor_kernel_sizes (`list[int]`, defaults to `[1, 3, 5]`): odd average-pool kernels, means zero-padded.
        position_interpolation (`str`, defaults to `"bilinear"`): the reference (CLS row kept); `"bicubic"`: HF's.
        class_key_post_layernorm (`bool`, defaults to `False`): `post_layernorm` on class keys; the reference skips it
            (an AnomalyCLIP quirk); `True` gives CLIP's standard image embedding.
        retrieval_temperature (`float`, defaults to 1.0): tau in softmax(q K^T / tau), the paper's; reference: none.
        retrieval_chunk_size (`int`, *optional*): stream retrieval over chunks of this many keys (exact, less memory).
        image_score_weight (`float`, defaults to 0.7): k in score = (1 - k) * mean(top map pixels) + k * p_anomaly.
        top_k_ratio (`float`, defaults to 0.01): fraction of map pixels in that mean (`int(H * W * ratio)`).
        score_fusion (`str`, defaults to `"weighted"`): the reference formula; `"sum"`: paper, Y_cls^a + TopKMean(M).
        gaussian_sigma, gaussian_truncate (`float`, defaults to 4.0): map smoothing (sigma 0: none; radius in sigmas).
        mask_threshold (`float`, defaults to 0.5): ground-truth masks are binarised at it after resizing.
        region_rule (`str`, defaults to `"exact"`): patch labels from a bilinearly downsampled mask: the reference's
            anomalous only at exactly 1, normal only at exactly 0 (boundary patches dropped), or `"majority"` (> 0.5).
        image_mean, image_std (`list[float]`): input normalisation (OpenAI CLIP statistics).
        image_bank_size, patch_bank_size (`int`, defaults to 0): memory entries (the shapes of the bank buffers).
        variant (`str`, defaults to `"tf"`): `"tf"` train-free, `"ft"` learned q/k projections, `"clip"` + prompts.
        image_dropout_quantile (`float`, defaults to 0.95): training masks entries above this per-query quantile of the
            *unprojected* cosine out of the projected softmax (Sec. 3.4).
        patch_dropout_quantile (`float`, defaults to 0.8): the same per patch (reference: 0.85 with MVTec AD aux data).
        classification_temperature (`float`, defaults to 0.07): loss CE(probabilities / 0.07): a reference quirk.
        prompt_context_length (`int`, defaults to 12): context vectors in `[X]*12 object.` / `[X]*12 damaged object.`
        deep_prompt_length, deep_prompt_depth (`int`, defaults to 4, 9): text layers 2..depth get tokens 1..length.
        deep_prompt_fp16_rounding (`bool`, defaults to `True`): round deep prompts to fp16, as the reference does.
        normal_prompt, anomaly_prompt (`str`, defaults to `"object"`, `"damaged object"`): paper: "good object".
        prompt_token_ids (`list[list[int]]`, *optional*): both prompts' CLIP ids (`prompting_mrad.prompt_token_ids`).
        text_temperature (`float`, defaults to 0.07): text-patch alignment softmax(cos(patch, text) / 0.07).
        region_prior_threshold (`float`, defaults to 0.5): patch p_anomaly above which it is in the anomalous prior.
        batch_invariant (`bool`, defaults to `False`): `True`: CPU maps bit-identical in any batch (per-image
            products); `False`: whole-batch products (faster, dynamic export batch; equal within 1e-5). Same method.

    Example:

    ```python
    >>> from mrad_hf import MRADConfig
    >>> MRADConfig(image_size=518).image_score_weight
    0.7
    ```
    """

    model_type = "mrad"
    sub_configs_defaults = {"clip_config": CLIPConfig}

    clip_config: dict | CLIPConfig | None = None
    image_size: int = 518
    vv_start_layer: int = 1
    feature_layer: int = -1
    neighbor_kernel_sizes: list[int] | tuple[int, ...] | None = None
    position_interpolation: str = "bilinear"
    class_key_post_layernorm: bool = False
    retrieval_temperature: float = 1.0
    retrieval_chunk_size: int | None = None
    image_score_weight: float = 0.7
    top_k_ratio: float = 0.01
    score_fusion: str = "weighted"
    gaussian_sigma: float = 4.0
    gaussian_truncate: float = 4.0
    mask_threshold: float = 0.5
    region_rule: str = "exact"
    image_mean: list[float] | tuple[float, ...] | None = None
    image_std: list[float] | tuple[float, ...] | None = None
    image_bank_size: int = 0
    patch_bank_size: int = 0
    variant: str = "tf"
    image_dropout_quantile: float = 0.95
    patch_dropout_quantile: float = 0.8
    classification_temperature: float = 0.07
    prompt_context_length: int = 12
    deep_prompt_length: int = 4
    deep_prompt_depth: int = 9
    deep_prompt_fp16_rounding: bool = True
    normal_prompt: str = "object"
    anomaly_prompt: str = "damaged object"
    prompt_token_ids: list | None = None
    text_temperature: float = 0.07
    region_prior_threshold: float = 0.5
    batch_invariant: bool = False

    def __post_init__(self, **kwargs):
        for state in _STATE_KEYS:  # folders saved before the sidecars: the model reads them from config.json itself
            kwargs.pop(state, None)
        kernels = [1, 3, 5] if self.neighbor_kernel_sizes is None else self.neighbor_kernel_sizes
        self.neighbor_kernel_sizes = [int(k) for k in kernels]
        self.image_mean = list(OPENAI_CLIP_MEAN if self.image_mean is None else self.image_mean)
        self.image_std = list(OPENAI_CLIP_STD if self.image_std is None else self.image_std)
        super().__post_init__(**kwargs)
        if getattr(self, "custom_pipelines", None):
            self.custom_pipelines = CustomPipelines(self.custom_pipelines)

    # derived sizes, no state (ViT-L/14 at 518: grid 37, key widths 768 / 1024, text width 768, 8 deep prompts)
    patch_size = property(lambda self: self.clip_config.vision_config.patch_size)
    grid_size = property(lambda self: self.image_size // self.patch_size)
    image_key_dim = property(lambda self: self.clip_config.projection_dim)  # the projected class token
    patch_key_dim = property(lambda self: self.clip_config.vision_config.hidden_size)  # un-projected V-V tokens
    text_width = property(lambda self: self.clip_config.text_config.hidden_size)  # of the context vectors
    num_deep_prompts = property(lambda self: max(self.deep_prompt_depth - 1, 0))  # text layers 2..deep_prompt_depth

    def validate_architecture(self):
        """Checks run by `@strict` on construction and before every save."""
        vision, text = self.clip_config.vision_config, self.clip_config.text_config
        layers, text_layers, max_tokens = (
            vision.num_hidden_layers,
            text.num_hidden_layers,
            text.max_position_embeddings,
        )
        size, patch, context = self.image_size, vision.patch_size, self.prompt_context_length
        problems = []
        if not patch <= size <= _MAX_IMAGE_SIZE:
            problems.append(
                f"image_size ({size}) must be between the patch size {patch} and {_MAX_IMAGE_SIZE} (reference: 518)"
            )
        if not -layers <= self.feature_layer < layers:
            problems.append(f"feature_layer ({self.feature_layer}) is outside the {layers} blocks")
        if not 0 <= self.vv_start_layer < layers:
            problems.append(f"vv_start_layer ({self.vv_start_layer}) must be in [0, {layers - 1}]")
        elif self.vv_start_layer > self.feature_layer % layers:
            problems.append("vv_start_layer is after feature_layer, so the V-V path would be empty")
        if any(k < 1 or k % 2 == 0 or k > 99 for k in self.neighbor_kernel_sizes):
            problems.append(f"neighbor_kernel_sizes must be odd integers in [1, 99], got {self.neighbor_kernel_sizes}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name, (low, high, inclusive) in _BOUNDS.items():
            value = float(getattr(self, name))
            if not (math.isfinite(value) and (low <= value if inclusive else low < value) and value <= high):
                problems.append(f"{name} is {value}; it must be in {'[' if inclusive else '('}{low:g}, {high:g}]")
        if self.retrieval_chunk_size is not None and self.retrieval_chunk_size < 1:
            problems.append("retrieval_chunk_size must be >= 1 or None")
        if self.image_bank_size < 0 or self.patch_bank_size < 0:
            problems.append("bank sizes must be >= 0")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            problems.append("image_mean and image_std need 3 values (RGB)")
        if not isinstance(self.batch_invariant, bool):
            problems.append(f"batch_invariant must be True or False, got {self.batch_invariant!r}")
        if self.variant == "clip" and self.deep_prompt_depth > text_layers:
            problems.append(f"deep_prompt_depth ({self.deep_prompt_depth}) exceeds the {text_layers} text layers")
        if self.variant == "clip" and self.deep_prompt_length > context:
            problems.append("deep_prompt_length must not exceed prompt_context_length")
        token_ids = self.prompt_token_ids if self.variant == "clip" else None
        if token_ids is not None and len(token_ids) != 2:
            problems.append("prompt_token_ids needs two token lists (normal, anomaly)")
        elif token_ids is not None and not all(context + 2 <= len(ids) <= max_tokens for ids in token_ids):
            problems.append(f"each prompt needs start + {context} context + end tokens, at most {max_tokens} in all")
        if problems:
            raise ValueError("Invalid MRADConfig: " + "; ".join(problems) + ".")
