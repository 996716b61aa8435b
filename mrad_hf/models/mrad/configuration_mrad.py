# SPDX-License-Identifier: Apache-2.0
"""MRAD configuration: every knob of the method as data, with the official code's defaults.

MRAD (Xu et al., *Zero-Shot Anomaly Detection with Memory-Driven Retrieval*, ICLR 2026,
arXiv 2602.00522). The defaults reproduce the released code (github.com/CROVO1026/MRAD, HEAD 1cc1c6b),
which is the reference semantics of this package; where the paper's text differs, the paper's form
is available as an option (``score_fusion="sum"``, ``retrieval_temperature``), never the default.

Sections of the paper the knobs belong to: Sec. 3.1 (frozen CLIP with a V-V local branch),
Sec. 3.2 (the two-level memory bank), Sec. 3.3 (retrieval and scoring), Sec. 3.4 (MRAD-FT: the
recalibrated retrieval metric) and Sec. 3.5 (MRAD-CLIP: prompts with region-prior biases).
"""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, PreTrainedConfig
from transformers.pipelines import PIPELINE_REGISTRY

__all__ = ["MRADConfig", "CustomPipelines", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "VARIANTS"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_POSITION_INTERPOLATIONS = ("bilinear", "bicubic")
_SCORE_FUSIONS = ("weighted", "sum")
_REGION_RULES = ("exact", "majority")
VARIANTS = ("tf", "ft", "clip")
#: State that older versions kept in config.json; now `memory_bank.json` and `calibration.json` beside the weights.
_STATE_KEYS = ("memory_bank_metadata", "calibration")
#: Upper bounds that keep a run finite: a 1e6 sigma or 1e9 truncation asks for a kernel of gigabytes.
_MAX_IMAGE_SIZE, _MAX_GAUSSIAN_SIGMA, _MAX_GAUSSIAN_TRUNCATE = 4096, 64.0, 16.0


class CustomPipelines(dict):
    """`config.custom_pipelines`: the pipelines a saved folder ships as code, where `task in` means "needs that code".

    `save_pretrained` lists the `anomaly-detection` pipeline and its file, so that `pipeline(model=folder,
    trust_remote_code=True)` infers the task and runs where `mrad_hf` is not installed. transformers' `pipeline()`
    infers a task-less call's task from this listing, then demands `trust_remote_code` for every task `in` it. A task
    already registered in this process (as `import mrad_hf` registers `anomaly-detection`) is served by the registered
    code, so it is listed (saved, inferred) but not `in`: `pipeline(model=folder)` and `pipeline("anomaly-detection",
    model=folder)` then run the installed code with no remote code.
    """

    def __contains__(self, task) -> bool:
        return dict.__contains__(self, task) and task not in PIPELINE_REGISTRY.get_supported_tasks()


@strict
class MRADConfig(PreTrainedConfig):
    r"""Configuration of [`MRADForAnomalyDetection`].

    Args:
        clip_config (`CLIPConfig` or `dict`, *optional*):
            The frozen CLIP backbone. Defaults to `CLIPConfig()`; real use loads
            `openai/clip-vit-large-patch14-336` through `MRADForAnomalyDetection.from_clip`.
        image_size (`int`, defaults to 518):
            Side of the square network input. The image is stretched to it (no crop), as the reference does.
        vv_start_layer (`int`, defaults to 1):
            0-based index of the first encoder block that carries the V-V path. The reference replaces the
            attention of blocks 2..24 of ViT-L/14 (`DAPM_replace(24)`), i.e. index 1 to the last.
        feature_layer (`int`, defaults to -1):
            Block whose V-V tokens are used for the patch memory (-1 = last). The reference uses only the last
            layer (its other "layers" alias the last one).
        neighbor_kernel_sizes (`list[int]`, defaults to `[1, 3, 5]`):
            `average_neighbor`: mean of stride-1 average pools with these odd kernels, zero padding counted.
        position_interpolation (`str`, defaults to `"bilinear"`):
            How the positional table is resized to the input grid. `"bilinear"` (align_corners=False, CLS row
            kept) is the reference; `"bicubic"` is what transformers' `interpolate_pos_encoding` does.
        class_key_post_layernorm (`bool`, defaults to `False`):
            Apply `post_layernorm` to the class token before `visual_projection`. The reference does not
            (a quirk inherited from AnomalyCLIP); `True` gives CLIP's standard image embedding.
        retrieval_temperature (`float`, defaults to 1.0):
            tau in softmax(q K^T / tau). The reference uses none (tau = 1); the paper writes a tau.
        retrieval_chunk_size (`int`, *optional*):
            If set, retrieval streams over the bank in chunks of this many keys (exact, bounded memory).
        image_score_weight (`float`, defaults to 0.7):
            k in score = (1 - k) * mean(top pixels of the map) + k * p_anomaly(image retrieval).
        top_k_ratio (`float`, defaults to 0.01):
            Fraction of map pixels averaged for the pixel term of the image score (`int(H * W * ratio)`).
        score_fusion (`str`, defaults to `"weighted"`):
            `"weighted"` is the reference formula above; `"sum"` is the paper's S = Y_cls^a + TopKMean(M).
        gaussian_sigma (`float`, defaults to 4.0):
            Sigma of the Gaussian smoothing of the map (0 disables it).
        gaussian_truncate (`float`, defaults to 4.0):
            Kernel radius in sigmas, as scipy's `gaussian_filter(truncate=...)`.
        mask_threshold (`float`, defaults to 0.5):
            Ground-truth masks are binarised at this value after resizing to `image_size`.
        region_rule (`str`, defaults to `"exact"`):
            How a 518-pixel mask labels the patch grid when building the patch memory. `"exact"` is the
            reference: bilinear downsampling, a patch is anomalous only at exactly 1 and normal only at exactly
            0 (boundary patches are dropped). `"majority"` labels every patch by its bilinear value > 0.5.
        image_mean, image_std (`list[float]`):
            Normalisation of the input (OpenAI CLIP statistics).
        image_bank_size (`int`, defaults to 0):
            Number of image-level memory entries (class-token keys). Sets the shape of the bank buffers so that
            `from_pretrained` restores them; filled by `build_memory_bank` / `set_memory_bank`.
        patch_bank_size (`int`, defaults to 0):
            Number of pixel-level memory entries (normal / anomalous region prototypes).
        variant (`str`, defaults to `"tf"`):
            `"tf"` (MRAD-TF, train-free retrieval), `"ft"` (MRAD-FT: learned query/key projections at both memory
            levels) or `"clip"` (MRAD-CLIP: MRAD-FT plus learnable text prompts whose context vectors get biases
            from the normal/anomalous region priors; the map comes from text-patch alignment).
        image_dropout_quantile (`float`, defaults to 0.95):
            Similarity dropout while training (Sec. 3.4): per query, entries whose *unprojected* cosine is strictly
            above this quantile are masked out of the projected softmax (the top 5%).
        patch_dropout_quantile (`float`, defaults to 0.8):
            The same at the pixel level (top 20%). The reference notes 0.85 when the auxiliary data is MVTec AD.
        classification_temperature (`float`, defaults to 0.07):
            The training loss is `cross_entropy(image_probabilities / 0.07, label)` (a softmax over probabilities,
            as the reference does).
        prompt_context_length (`int`, defaults to 12):
            Learnable context vectors per state in the MRAD-CLIP prompts `[X]*12 object.` / `[X]*12 damaged object.`
        deep_prompt_length (`int`, defaults to 4), deep_prompt_depth (`int`, defaults to 9):
            Deep text prompts: at text layers 2..depth (1-based) the tokens 1..length are replaced by learned vectors.
        deep_prompt_fp16_rounding (`bool`, defaults to `True`):
            The reference casts the deep prompts to fp16 before inserting them (values rounded to fp16 precision).
            `False` keeps them in full precision.
        normal_prompt (`str`, defaults to `"object"`), anomaly_prompt (`str`, defaults to `"damaged object"`):
            Words after the context vectors (the paper writes "good object"; the code uses "object").
        prompt_token_ids (`list[list[int]]`, *optional*):
            Token ids of the two prompts (start token, one placeholder per context vector, the words, the period,
            the end token), from the backbone's CLIP tokenizer; set by `tokenization_mrad.prompt_token_ids`.
        text_temperature (`float`, defaults to 0.07):
            Text-patch alignment: softmax(cos(patch, text) / 0.07).
        region_prior_threshold (`float`, defaults to 0.5):
            A patch belongs to the anomalous region prior when its projected patch retrieval gives p_anomaly > 0.5.
        batch_invariant (`bool`, defaults to `False`):
            `True` guarantees on CPU that an image's map and score are bit-identical whatever batch it is scored in
            (alone, with other images, in any order): one product per image wherever a CPU kernel picks its algorithm
            by the batch size (class-row linears and attention of the last block, its `out_proj`, image-level
            retrieval, the Gaussian blur, MRAD-CLIP's text branch). `False` (default) uses whole-batch products, which
            are faster and export with a dynamic batch axis; outputs then agree across batch compositions within
            float rounding (1e-5), not bit for bit. Not a numerical change of the method either way.

    Example:

    ```python
    >>> from transformers import CLIPConfig
    >>> from mrad_hf import MRADConfig
    >>> config = MRADConfig(clip_config=CLIPConfig(), image_size=518)
    >>> config.image_score_weight
    0.7
    ```

    The config is architecture and protocol only. A saved model keeps its bank's provenance in `memory_bank.json`
    (`model.memory.metadata`) and its decision thresholds in `calibration.json` (`model.calibration`).
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
        if self.neighbor_kernel_sizes is None:
            self.neighbor_kernel_sizes = [1, 3, 5]
        self.neighbor_kernel_sizes = [int(k) for k in self.neighbor_kernel_sizes]
        self.image_mean = list(OPENAI_CLIP_MEAN if self.image_mean is None else self.image_mean)
        self.image_std = list(OPENAI_CLIP_STD if self.image_std is None else self.image_std)
        super().__post_init__(**kwargs)
        if getattr(self, "custom_pipelines", None):
            self.custom_pipelines = CustomPipelines(self.custom_pipelines)

    # ---- derived quantities (no state) ----
    @property
    def patch_size(self) -> int:
        return self.clip_config.vision_config.patch_size

    @property
    def grid_size(self) -> int:
        """Side of the patch grid at `image_size` (37 for ViT-L/14 at 518)."""
        return self.image_size // self.patch_size

    @property
    def image_key_dim(self) -> int:
        """Width of image-level keys: the projected class token (768 for ViT-L/14)."""
        return self.clip_config.projection_dim

    @property
    def patch_key_dim(self) -> int:
        """Width of pixel-level keys: un-projected V-V tokens (1024 for ViT-L/14)."""
        return self.clip_config.vision_config.hidden_size

    @property
    def text_width(self) -> int:
        """Width of the text transformer, i.e. of the context vectors (768 for ViT-L/14)."""
        return self.clip_config.text_config.hidden_size

    @property
    def num_deep_prompts(self) -> int:
        """Layers that receive deep prompts: text layers 2..deep_prompt_depth (8 for the reference depth 9)."""
        return max(self.deep_prompt_depth - 1, 0)

    def validate_architecture(self):
        """Checks run by `@strict` on construction and before every save."""
        vision = self.clip_config.vision_config
        problems = []
        if not vision.patch_size <= self.image_size <= _MAX_IMAGE_SIZE:
            problems.append(
                f"image_size ({self.image_size}) must be between the patch size {vision.patch_size} and {_MAX_IMAGE_SIZE} "
                "(the reference uses 518)"
            )
        if not -vision.num_hidden_layers <= self.feature_layer < vision.num_hidden_layers:
            problems.append(f"feature_layer ({self.feature_layer}) is outside the {vision.num_hidden_layers} blocks")
        if not 0 <= self.vv_start_layer < vision.num_hidden_layers:
            problems.append(f"vv_start_layer ({self.vv_start_layer}) must be in [0, {vision.num_hidden_layers - 1}]")
        elif self.vv_start_layer > self.feature_layer % vision.num_hidden_layers:
            problems.append("vv_start_layer is after feature_layer, so the V-V path would be empty")
        if any(k < 1 or k % 2 == 0 or k > 99 for k in self.neighbor_kernel_sizes):
            problems.append(
                f"neighbor_kernel_sizes must be positive odd integers up to 99, got {self.neighbor_kernel_sizes}"
            )
        if self.position_interpolation not in _POSITION_INTERPOLATIONS:
            problems.append(f"position_interpolation must be one of {_POSITION_INTERPOLATIONS}")
        if self.score_fusion not in _SCORE_FUSIONS:
            problems.append(f"score_fusion must be one of {_SCORE_FUSIONS}")
        if self.region_rule not in _REGION_RULES:
            problems.append(f"region_rule must be one of {_REGION_RULES}")
        if self.retrieval_chunk_size is not None and self.retrieval_chunk_size < 1:
            problems.append("retrieval_chunk_size must be >= 1 or None")
        bounds = {  # name: (low, high, low inclusive); every bound also refuses NaN and infinity
            "retrieval_temperature": (0.0, 1e3, False),
            "classification_temperature": (0.0, 1e3, False),
            "text_temperature": (0.0, 1e3, False),
            "image_score_weight": (0.0, 1.0, True),
            "top_k_ratio": (0.0, 1.0, False),
            "gaussian_sigma": (0.0, _MAX_GAUSSIAN_SIGMA, True),
            "gaussian_truncate": (0.0, _MAX_GAUSSIAN_TRUNCATE, False),
            "mask_threshold": (0.0, 1.0, True),
            "region_prior_threshold": (0.0, 1.0, True),
            "image_dropout_quantile": (0.0, 1.0, True),
            "patch_dropout_quantile": (0.0, 1.0, True),
        }
        for name, (low, high, inclusive) in bounds.items():
            value = float(getattr(self, name))
            if not (math.isfinite(value) and (low <= value if inclusive else low < value) and value <= high):
                problems.append(f"{name} is {value}; it must be in {'[' if inclusive else '('}{low:g}, {high:g}]")
        if self.image_bank_size < 0 or self.patch_bank_size < 0:
            problems.append("bank sizes must be >= 0")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            problems.append("image_mean and image_std need 3 values (RGB)")
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not isinstance(self.batch_invariant, bool):
            problems.append(f"batch_invariant must be True or False, got {self.batch_invariant!r}")
        if self.variant == "clip":
            text = self.clip_config.text_config
            if self.deep_prompt_depth - 1 > text.num_hidden_layers - 1:
                problems.append(
                    f"deep_prompt_depth ({self.deep_prompt_depth}) exceeds the {text.num_hidden_layers} text layers"
                )
            if self.deep_prompt_length > self.prompt_context_length:
                problems.append("deep_prompt_length must not exceed prompt_context_length")
            if self.prompt_token_ids is not None:
                if len(self.prompt_token_ids) != 2:
                    problems.append("prompt_token_ids needs two token lists (normal, anomaly)")
                elif any(
                    len(ids) < self.prompt_context_length + 2 or len(ids) > text.max_position_embeddings
                    for ids in self.prompt_token_ids
                ):
                    problems.append(
                        f"each prompt needs start + {self.prompt_context_length} context + end tokens and at most "
                        f"{text.max_position_embeddings} tokens"
                    )
        if problems:
            raise ValueError("Invalid MRADConfig: " + "; ".join(problems) + ".")
