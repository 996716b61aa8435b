# SPDX-License-Identifier: Apache-2.0
"""MRAD for anomaly detection on a frozen Hugging Face CLIP (Xu et al., ICLR 2026, arXiv 2602.00522).

Reading order, top to bottom: the output dataclass, the memory buffers, the trainable heads of the two trained
variants (MRAD-FT's query/key projections, Sec. 3.4; MRAD-CLIP's prompt learner and region-prior biases, Sec. 3.5),
the pre-trained base class (all loading knobs), then `MRADForAnomalyDetection`: dual-path features (Sec. 3.1),
building the two-level memory from labelled auxiliary images (Sec. 3.2), retrieval-based maps and scores (Sec. 3.3)
for the three variants, and the training losses.

One class serves MRAD-TF, MRAD-FT and MRAD-CLIP (`config.variant`), so that `AutoModel` and the pipeline load any
of them from a `save_pretrained` folder with no extra code.

The math lives in small pure functions in sibling files (`features_mrad`, `retrieval`, `postprocessing`),
shared by this model, the trainer, the evaluator and the tests. This file only composes them. It imports
nothing but torch, transformers, safetensors and its siblings (relative imports), so that
`save_pretrained` after `register_for_auto_class` ships a model that loads with `trust_remote_code=True`
where `mrad_hf` is not installed.

Reference semantics: github.com/CROVO1026/MRAD at 1cc1c6b (`mrad.py`, `test.py`, `AnomalyCLIP_lib`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel, PreTrainedModel
from transformers import initialization as init
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import ModelOutput, cached_file

from .configuration_mrad import CustomPipelines, MRADConfig
from .features_mrad import MRADVisionFeatures, dual_path_vision_features, neighbor_average
from .image_processing_mrad import MRADImageProcessor
from .losses_mrad import ft_loss, prompt_loss
from .memory_bank_mrad import (
    MODEL_BANK_FILENAME,
    MemoryBank,
    MemoryBankError,
    backbone_fingerprint,
    check_model_bank,
    validate_calibration,
    verify_model_memory,
)
from .pipeline_anomaly_detection import AnomalyDetectionPipeline
from .postprocessing_mrad import fuse_image_score, gaussian_blur, upsample_patch_probabilities
from .prompting_mrad import OPENAI_DEFAULT_PROMPT_TOKEN_IDS, prompt_token_ids, prompted_text_features
from .retrieval_mrad import (
    l2_normalize,
    masked_soft_retrieve,
    region_prior_tokens,
    retrieval_logits,
    rowwise_linear,
    similarity_dropout_mask,
    soft_retrieve,
)

CALIBRATION_FILENAME = "calibration.json"
#: The trainable modules of the trained variants (absent in MRAD-TF).
HEAD_NAMES = ("image_projection", "patch_projection", "prompt_learner", "region_bias")

__all__ = [
    "MRADOutput",
    "MRADMemory",
    "MRADProjectionPair",
    "MRADPromptLearner",
    "MRADRegionBias",
    "MRADPreTrainedModel",
    "MRADForAnomalyDetection",
]


@dataclass
class MRADOutput(ModelOutput):
    r"""Output of [`MRADForAnomalyDetection`]. B images, an S x S input and a G x G patch grid.

    Args:
        anomaly_map (`torch.FloatTensor` of shape `(B, S, S)`):
            Smoothed per-pixel anomaly probability at the network input size (518 x 518 by default). From the
            pixel-level retrieval for MRAD-TF/FT, from text-patch alignment `(p_a + 1 - p_n) / 2` for MRAD-CLIP.
            Not computed in a training step (training mode with labels and masks).
        anomaly_score (`torch.FloatTensor` of shape `(B,)`):
            Image score: `(1 - k) * mean(top 1% of anomaly_map) + k * image_probabilities[:, 1]`.
        image_probabilities (`torch.FloatTensor` of shape `(B, 2)`):
            Image-level retrieval result [p_normal, p_anomaly].
        patch_probabilities (`torch.FloatTensor` of shape `(B, G*G, 2)`):
            Pixel-level retrieval result per patch, before upsampling and smoothing.
        text_probabilities (`torch.FloatTensor` of shape `(B, G*G, 2)`, *optional*):
            MRAD-CLIP: softmax(cos(patch, [t_normal, t_anomaly]) / 0.07) per patch.
        image_embeds (`torch.FloatTensor` of shape `(B, P)`, *optional*):
            L2-normalised image-level queries (projected class tokens), when `output_features=True`.
        patch_embeds (`torch.FloatTensor` of shape `(B, G*G, W)`, *optional*):
            L2-normalised, neighbour-averaged pixel-level queries, when `output_features=True`.
        loss (`torch.FloatTensor`, *optional*):
            Training loss, when `labels` and `masks` are given (trained variants only).
    """

    loss: torch.FloatTensor | None = None
    anomaly_map: torch.FloatTensor | None = None
    anomaly_score: torch.FloatTensor | None = None
    image_probabilities: torch.FloatTensor | None = None
    patch_probabilities: torch.FloatTensor | None = None
    text_probabilities: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    patch_embeds: torch.FloatTensor | None = None


class MRADFloat32Module(nn.Module):
    """A module that stays float32: `model.to(torch.bfloat16)`, `.half()` and `from_pretrained(dtype=...)` change only
    the CLIP tower. The one fp32 rule of the package: the memory and the heads are created float32 and casts skip
    them (device moves still apply); retrieval, maps and scores are then float32 whatever the backbone runs in."""

    def _apply(self, fn, recurse=True):
        def keep_float32(tensor):
            if not tensor.is_floating_point():
                return fn(tensor)
            probe = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
            return tensor.to(probe.device) if probe.dtype != tensor.dtype else fn(tensor)

        return super()._apply(keep_float32, recurse)


class MRADMemory(MRADFloat32Module):
    """The two memories as persistent buffers (saved in `model.safetensors` as `memory.*`, always float32).

    Shapes come from the config (`image_bank_size`, `patch_bank_size`) so that `from_pretrained` can restore them.
    `metadata` is the bank's provenance (saved beside the weights as `memory_bank.json`).
    """

    def __init__(self, config: MRADConfig):
        super().__init__()
        shapes = self.buffer_shapes(config)
        for name, (shape, dtype) in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype), persistent=True)
        self.metadata: dict[str, Any] = {}

    @staticmethod
    def buffer_shapes(config: MRADConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {
            "image_keys": ((config.image_bank_size, config.image_key_dim), torch.float32),
            "image_values": ((config.image_bank_size, 2), torch.float32),
            "patch_keys": ((config.patch_bank_size, config.patch_key_dim), torch.float32),
            "patch_values": ((config.patch_bank_size, 2), torch.float32),
            "patch_sources": ((config.patch_bank_size,), torch.long),
        }

    def replace(self, bank: MemoryBank) -> None:
        device = self.image_keys.device if self.image_keys.device.type != "meta" else "cpu"
        for name, tensor in bank.tensors().items():
            dtype = torch.long if name == "patch_sources" else torch.float32
            self.register_buffer(name, tensor.detach().to(device=device, dtype=dtype).clone(), persistent=True)
        self.metadata = dict(bank.metadata)


class MRADProjectionPair(MRADFloat32Module):
    """MRAD-FT's recalibrated metric at one memory level: logits = query(q) . key(k)^T (Sec. 3.4).

    Two `Linear` layers with bias (the reference's `MLP.mlp1/mlp2` at the image level, `Projector.fc[0]/fc[1]` at the
    pixel level). The keys are projected on the fly, so the bank keeps raw features.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.query = nn.Linear(in_features, out_features, dtype=torch.float32)
        self.key = nn.Linear(in_features, out_features, dtype=torch.float32)


class MRADPromptLearner(MRADFloat32Module):
    """MRAD-CLIP's learnable text prompts (AnomalyCLIP-style, object-agnostic; Sec. 3.5).

    Parameters: `normal_context` and `anomaly_context` (n_ctx, D): the context vectors of the two prompts;
    `deep_prompts` (n_deep, t, D): the vectors that replace tokens 1..t at text layers 2..n_deep + 1.
    """

    def __init__(self, config: MRADConfig):
        super().__init__()
        width, fp32 = config.text_width, torch.float32
        self.normal_context = nn.Parameter(torch.empty(config.prompt_context_length, width, dtype=fp32))
        self.anomaly_context = nn.Parameter(torch.empty(config.prompt_context_length, width, dtype=fp32))
        self.deep_prompts = nn.Parameter(
            torch.empty(config.num_deep_prompts, config.deep_prompt_length, width, dtype=fp32)
        )

    def context(self, biases: torch.Tensor) -> torch.Tensor:
        """(B, 2, n_ctx, D) context vectors: each state's vectors plus that state's (B, 2, D) bias, on every vector."""
        base = torch.stack([self.normal_context, self.anomaly_context])  # (2, n_ctx, D)
        return base.unsqueeze(0) + biases.unsqueeze(2)


class MRADRegionBias(MRADFloat32Module):
    """MRAD-CLIP's dynamic prompt biases: b_n = normal(normal region token), b_a = anomaly(anomalous region token)."""

    def __init__(self, config: MRADConfig):
        super().__init__()
        self.normal = nn.Linear(config.image_key_dim, config.text_width, dtype=torch.float32)
        self.anomaly = nn.Linear(config.image_key_dim, config.text_width, dtype=torch.float32)

    def forward(self, region_tokens: torch.Tensor) -> torch.Tensor:
        """(B, 2, P) [normal, anomalous] region tokens -> (B, 2, D) biases."""
        return torch.stack([self.normal(region_tokens[:, 0]), self.anomaly(region_tokens[:, 1])], dim=1)


def _torch_default_linear_init(linear: nn.Linear) -> None:
    """PyTorch's own `nn.Linear` initialisation (what the reference's heads use), through transformers' init helpers."""
    init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
    if linear.bias is not None:
        bound = 1.0 / math.sqrt(linear.in_features) if linear.in_features > 0 else 0.0
        init.uniform_(linear.bias, -bound, bound)


class MRADPreTrainedModel(PreTrainedModel):
    """Loading and initialisation knobs shared by the MRAD models.

    `base_model_prefix = "clip"` with the attribute `self.clip` lets a plain CLIP checkpoint load straight into
    MRAD (only the memory buffers are missing) and an MRAD checkpoint load back into `CLIPModel`.
    """

    config: MRADConfig
    config_class = MRADConfig
    base_model_prefix = "clip"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["CLIPEncoderLayer", "CLIPVisionEmbeddings", "CLIPTextEmbeddings"]
    _keys_to_ignore_on_load_missing = [
        r"^memory\.",
        r"^image_projection\.",
        r"^patch_projection\.",
        r"^prompt_learner\.",
        r"^region_bias\.",
    ]
    _supports_sdpa = True  # the CLIP towers follow `attn_implementation` (eager / sdpa)
    supports_gradient_checkpointing = (
        True  # the CLIP text tower's layers, which the MRAD-CLIP prompt stage backprops through
    )
    accepts_loss_kwargs = False  # the loss is a per-batch mean: let Trainer scale it for gradient accumulation

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        """Remember the trained weights a checkpoint lacks (or holds for another variant) before transformers'
        ignore-patterns hide them; `from_pretrained` refuses such a folder."""
        heads = set(self._make_heads(self.config))
        self._weights_mismatch = (
            sorted(key for key in loading_info.missing_keys if key.split(".")[0] in heads),
            sorted(key for key in loading_info.unexpected_keys if key.split(".")[0] in HEAD_NAMES),
        )
        super()._adjust_missing_and_unexpected_keys(loading_info)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MRADMemory):
            for name in MRADMemory.buffer_shapes(self.config):
                init.zeros_(getattr(module, name))
        elif isinstance(module, MRADProjectionPair):
            _torch_default_linear_init(module.query)
            _torch_default_linear_init(module.key)
        elif isinstance(module, MRADRegionBias):
            _torch_default_linear_init(module.normal)
            _torch_default_linear_init(module.anomaly)
        elif isinstance(module, MRADPromptLearner):
            for parameter in (module.normal_context, module.anomaly_context, module.deep_prompts):
                init.normal_(parameter, mean=0.0, std=0.02)


class MRADForAnomalyDetection(MRADPreTrainedModel):
    r"""MRAD on a frozen CLIP: retrieval from a two-level memory bank gives anomaly maps and scores.

    `config.variant` selects MRAD-TF (train-free retrieval), MRAD-FT (retrieval through learned query/key
    projections) or MRAD-CLIP (the map from learnable text prompts biased by region priors, the score from projected
    image retrieval). Build the memory from labelled auxiliary images (or attach a saved bank), then call the model;
    train the FT/CLIP heads with `mrad_hf.training` (`mrad train`).

    Example:

    ```python
    >>> from mrad_hf import MRADForAnomalyDetection, MRADImageProcessor
    >>> model = MRADForAnomalyDetection.from_clip("openai/clip-vit-large-patch14-336")  # doctest: +SKIP
    >>> build_memory_bank(model, aux_dataset, source="visa")  # from mrad_hf.memory  # rows with image, label, mask  # doctest: +SKIP
    >>> processor = MRADImageProcessor.from_config(model.config)
    >>> outputs = model(**processor(images, return_tensors="pt"))  # doctest: +SKIP
    >>> outputs.anomaly_score, outputs.anomaly_map.shape  # doctest: +SKIP
    ```
    """

    def __init__(self, config: MRADConfig):
        super().__init__(config)
        self.clip = CLIPModel._from_config(config.clip_config)
        self.clip.requires_grad_(False)
        self.memory = MRADMemory(config)
        for name, head in self._make_heads(config).items():
            setattr(self, name, head)
        self.calibration: dict[str, Any] | None = (
            None  # decision thresholds (`mrad_hf.tools.calibration`), calibration.json
        )
        self.post_init()

    @staticmethod
    def _make_heads(config: MRADConfig) -> dict[str, nn.Module]:
        """The trainable modules of a variant: none for MRAD-TF; projections for FT; plus prompts and biases for CLIP."""
        heads: dict[str, nn.Module] = {}
        if config.variant in ("ft", "clip"):
            heads["image_projection"] = MRADProjectionPair(config.image_key_dim, config.image_key_dim)
            heads["patch_projection"] = MRADProjectionPair(config.patch_key_dim, config.image_key_dim)
        if config.variant == "clip":
            heads["prompt_learner"] = MRADPromptLearner(config)
            heads["region_bias"] = MRADRegionBias(config)
        return heads

    def train(self, mode: bool = True):
        """Training mode for the heads (enables similarity dropout); the frozen CLIP always stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, trust_bank: bool = False, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus the MRAD state saved beside the weights.

        Takes what transformers takes: a folder or a full Hub id such as `"mrad-hf/mrad-tf-visa"`. Short names
        (`"mrad-tf"`) are resolved by `mrad_hf.hub.api.load_model` and the `mrad` CLI only, not by this method,
        `AutoModel` or `pipeline`. `dtype=torch.bfloat16 / torch.float16` runs the CLIP tower in that dtype; the memory
        and the heads stay float32 (`MRADFloat32Module`).

        Reads `memory_bank.json` (the bank's provenance, onto `model.memory.metadata`) and `calibration.json` (onto
        `model.calibration`), then checks the bank: tensors and sealed metadata as saved, built for this backbone and
        these feature settings (`trust_bank=True` accepts a bank without a fingerprint, with a warning). Refuses a
        folder whose weights lack the trained heads of its configured variant (inference never runs with freshly
        initialised heads).
        """
        allow_new_heads = kwargs.pop("_allow_new_heads", False)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing, unexpected = model.__dict__.pop("_weights_mismatch", ([], []))
        if (missing or unexpected) and not allow_new_heads:
            found = (
                f"lacks the trained weights {missing}"
                if missing
                else f"holds trained weights of another variant {unexpected[:4]}"
            )
            raise ValueError(
                f"'{pretrained_model_name_or_path}' is configured as MRAD-{model.config.variant.upper()} but its weights file "
                f'{found}: config.json\'s "variant" does not match the weights. Restore config.json (or load the folder '
                "the model was saved to); an MRAD model never scores with freshly initialised heads or prompts."
            )
        model.clip.requires_grad_(False)
        for tensor in (*model.parameters(), *model.buffers()):  # memory-mapped weights can be misaligned, and MKL
            if tensor.device.type == "cpu" and tensor.data_ptr() % 64:  # rounds differently on them
                tensor.data = tensor.data.clone()
        if not allow_new_heads:
            keys = ("revision", "cache_dir", "local_files_only", "token", "subfolder")
            hub = {key: kwargs[key] for key in keys if key in kwargs}
            name = pretrained_model_name_or_path
            legacy = _read_json(name, "config.json", hub) or {}  # state saved in config.json by older versions
            metadata = _read_json(name, MODEL_BANK_FILENAME, hub) or legacy.get("memory_bank_metadata")
            model.memory.metadata = metadata or {}
            calibration = _read_json(name, CALIBRATION_FILENAME, hub) or legacy.get("calibration")
            model.calibration = validate_calibration(calibration, f"'{name}' {CALIBRATION_FILENAME}")
            verify_model_memory(model, trust_bank=trust_bank)
        return (model, info) if want_info else model

    @classmethod
    def from_clip(
        cls, clip: str | os.PathLike | CLIPModel | CLIPConfig, *, tokenizer: Any = None, **config_overrides
    ) -> MRADForAnomalyDetection:
        """Wrap any CLIP source in an MRAD model with an empty memory bank (and freshly initialised heads).

        Args:
            clip: a Hub id or local folder of a transformers CLIP checkpoint (e.g.
                `"openai/clip-vit-large-patch14-336"`), a loaded `CLIPModel` (used as is, not copied), or a
                `CLIPConfig` (random weights, for tests).
            tokenizer: MRAD-CLIP only: a CLIP tokenizer or its folder/Hub id (for OpenAI's `bpe_simple_vocab_16e6.txt.gz`
                use `mrad_hf.training.tokenization.load_clip_tokenizer` first),
                used once to store the prompts' token ids in the config. Defaults to the tokenizer saved with `clip`.
            **config_overrides: `MRADConfig` fields, e.g. `variant="ft"`, `image_size=518`, plus `from_pretrained`
                options (`revision`, `cache_dir`, `local_files_only`, `token`).
        """
        hub_keys = ("revision", "cache_dir", "local_files_only", "token", "force_download")
        hub_kwargs = {key: config_overrides.pop(key) for key in hub_keys if key in config_overrides}
        if config_overrides.get("variant") == "clip" and config_overrides.get("prompt_token_ids") is None:
            config_overrides["prompt_token_ids"] = _prompt_token_ids_for(clip, tokenizer, config_overrides)
        if isinstance(clip, CLIPConfig):
            return cls(MRADConfig(clip_config=clip, **config_overrides)).eval()
        if isinstance(clip, CLIPModel):
            config = MRADConfig(clip_config=clip.config, **config_overrides)
            with torch.device("meta"):
                model = cls(config)
            model.clip = clip.requires_grad_(False)
            model.memory = MRADMemory(config)
            for name, head in cls._make_heads(config).items():
                head.apply(model._init_weights)
                setattr(model, name, head)
            return model.eval()
        try:
            clip_config = CLIPConfig.from_pretrained(clip, **hub_kwargs)
        except OSError as error:
            raise OSError(
                f"Could not load a CLIP configuration from {clip!r} ({error}). Pass a local folder with a transformers "
                "CLIP checkpoint, or a Hub id while online; offline (HF_HUB_OFFLINE=1) only cached models load."
            ) from error
        config = MRADConfig(clip_config=clip_config, **config_overrides)
        model = cls.from_pretrained(clip, config=config, _allow_new_heads=True, **hub_kwargs)
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus the files that make the folder self-contained: `memory_bank.json`
        (the bank's provenance and checksums), `calibration.json` (when set), `preprocessor_config.json` and the
        `anomaly-detection` pipeline (`custom_pipelines` in config.json, with its code), so that
        `pipeline(model=folder)` works with `mrad_hf` installed, and with `trust_remote_code=True` without it.
        `mrad_hf.memory.save_model` saves through a staging folder (never a half-written folder)."""
        self.config.custom_pipelines = CustomPipelines(
            {
                "anomaly-detection": {
                    "impl": "pipeline_anomaly_detection.AnomalyDetectionPipeline",
                    "pt": ["AutoModel"],
                    "type": "image",
                }
            }
        )
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            custom_object_save(AnomalyDetectionPipeline, save_directory)
            MRADImageProcessor.from_config(self.config).save_pretrained(save_directory)
            sidecars = {MODEL_BANK_FILENAME: self.get_memory_bank().metadata if self.config.image_bank_size else None}
            sidecars[CALIBRATION_FILENAME] = validate_calibration(self.calibration, "model.calibration")
            for name, content in sidecars.items():
                if content is not None:
                    text = json.dumps(content, indent=2, sort_keys=True, allow_nan=False) + "\n"
                    Path(save_directory, name).write_text(text, encoding="utf-8")

    # ------------------------------------------------------------------ features (Sec. 3.1)
    def extract_features(self, pixel_values: torch.Tensor) -> MRADVisionFeatures:
        """One dual-path pass of the frozen vision tower; see `features_mrad.dual_path_vision_features`."""
        config = self.config
        expected = config.image_size
        if pixel_values.shape[-1] != expected or pixel_values.shape[-2] != expected:
            raise ValueError(
                f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} but this model expects "
                f"{expected}x{expected}; preprocess with MRADImageProcessor.from_config(model.config)."
            )
        return dual_path_vision_features(
            self.clip.vision_model,
            self.clip.visual_projection,
            pixel_values,
            vv_start_layer=config.vv_start_layer,
            feature_layer=config.feature_layer,
            position_interpolation=config.position_interpolation,
            class_key_post_layernorm=config.class_key_post_layernorm,
            batch_invariant=config.batch_invariant,
        )

    def retrieval_queries(self, features: MRADVisionFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(image queries (B, P), patch queries (B, G*G, W)): normalised class embeds; averaged, normalised patches."""
        image_queries = l2_normalize(features.class_embeds.float())
        patch_tokens = neighbor_average(
            features.patch_tokens.float(), features.grid_size, self.config.neighbor_kernel_sizes
        )
        return image_queries, l2_normalize(patch_tokens)

    # ------------------------------------------------------------------ memory bank (Sec. 3.2)
    def backbone_fingerprint(self) -> dict[str, Any]:
        """Identity of the CLIP backbone (see `memory_bank_mrad.backbone_fingerprint`), the same in every dtype."""
        return backbone_fingerprint(self.clip)

    @property
    def memory_bank_metadata(self) -> dict[str, Any]:
        """Provenance of the attached bank (source, counts, backbone fingerprint, ids); saved as `memory_bank.json`."""
        return self.memory.metadata

    def get_memory_bank(self) -> MemoryBank:
        """The attached memory as a standalone `MemoryBank` (copies of the buffers plus metadata)."""
        tensors = {name: buffer.detach().cpu().clone() for name, buffer in self.memory.named_buffers()}
        return MemoryBank(**tensors, metadata=dict(self.memory.metadata or {}))

    def set_memory_bank(self, bank: MemoryBank, *, strict: bool = True, trust_bank: bool = False) -> None:
        """Attach a memory bank (from `mrad_hf.memory.build_memory_bank` or `load_bank`) after checking it was built
        for this backbone; a bank without fingerprint or feature settings needs `trust_bank=True` (a warning says what
        was not checked); `strict=False` turns a known mismatch into a warning."""
        if not isinstance(bank, MemoryBank):
            raise TypeError(
                f"set_memory_bank takes a MemoryBank; read a file with mrad_hf.memory.load_bank({bank!r})."
            )
        check_model_bank(self, bank, strict=strict, trust_bank=trust_bank)
        self.memory.replace(bank)
        self.config.image_bank_size = int(bank.image_keys.shape[0])
        self.config.patch_bank_size = int(bank.patch_keys.shape[0])

    # ------------------------------------------------------------------ retrieval (Sec. 3.3-3.4)
    def _memory_level(self, level: str) -> tuple[torch.Tensor, torch.Tensor, MRADProjectionPair | None]:
        memory = self.memory
        if level == "image":
            keys, values = memory.image_keys, memory.image_values
        elif level == "patch":
            keys, values = memory.patch_keys, memory.patch_values
        else:
            raise ValueError(f"level must be 'image' or 'patch', got {level!r}")
        projection = getattr(self, f"{level}_projection", None) if self.config.variant != "tf" else None
        return keys, values, projection

    def retrieval_logits(self, level: str, queries: torch.Tensor) -> torch.Tensor:
        """Pre-softmax retrieval logits against every entry of one memory level, as the score uses them.

        MRAD-TF: cos(q, k) / tau. MRAD-FT/CLIP: query(q) . key(k) / tau (raw dot products of the projected vectors,
        tau = 1 in the reference). `queries` from `retrieval_queries`; returns (..., N).
        """
        keys, _, projection = self._memory_level(level)
        batch_invariant = self.config.batch_invariant
        if projection is not None:
            queries, keys = _project_queries(projection, queries, batch_invariant), projection.key(keys)
        return retrieval_logits(queries, keys, self.config.retrieval_temperature, batch_invariant=batch_invariant)

    def retrieve(self, level: str, queries: torch.Tensor, *, similarity_dropout: bool | None = None) -> torch.Tensor:
        """Soft retrieval from one memory level: (..., 2) [p_normal, p_anomaly].

        Similarity dropout (Sec. 3.4; trained variants, training mode by default) masks, per query, the entries whose
        *unprojected* cosine is above `config.{image,patch}_dropout_quantile` before the projected softmax.
        """
        keys, values, projection = self._memory_level(level)
        if keys.shape[0] == 0:
            raise MemoryBankError(
                "This model has no memory bank (or an empty one). Build one with mrad_hf.memory.build_memory_bank(model, samples) "
                "or attach a saved one with model.set_memory_bank(mrad_hf.memory.load_bank('memory_bank.safetensors'))."
            )
        if similarity_dropout is None:
            similarity_dropout = self.training and projection is not None
        config = self.config
        batch_invariant = config.batch_invariant
        if not similarity_dropout:
            if projection is not None:
                queries, keys = _project_queries(projection, queries, batch_invariant), projection.key(keys)
            return soft_retrieve(
                queries,
                keys,
                values,
                temperature=config.retrieval_temperature,
                chunk_size=config.retrieval_chunk_size,
                batch_invariant=batch_invariant,
            )
        quantile = config.image_dropout_quantile if level == "image" else config.patch_dropout_quantile
        drop = similarity_dropout_mask(retrieval_logits(queries, keys, batch_invariant=batch_invariant), quantile)
        return masked_soft_retrieve(
            self.retrieval_logits(level, queries), values, drop, batch_invariant=batch_invariant
        )

    # ------------------------------------------------------------------ MRAD-CLIP text branch (Sec. 3.5)
    def projected_patch_tokens(self, features: MRADVisionFeatures) -> torch.Tensor:
        """(B, G*G, P): V-V tokens through `visual_projection`, neighbour-averaged, L2-normalised (text-aligned space)."""
        projected = self.clip.visual_projection(features.patch_tokens).float()
        return l2_normalize(neighbor_average(projected, features.grid_size, self.config.neighbor_kernel_sizes))

    def text_patch_probabilities(
        self, features: MRADVisionFeatures, patch_anomaly_probability: torch.Tensor
    ) -> torch.Tensor:
        """MRAD-CLIP's text branch: (B, G*G, 2) softmax(cos(patch, [t_normal, t_anomaly]) / 0.07) per patch.

        The prompts of an image are biased by its region priors (patches with pixel-retrieval p_anomaly above
        `region_prior_threshold` vs the rest). With `config.batch_invariant`, computed image by image: the text tower
        and the projections then see the same shapes whatever the batch, so an image's map does not depend on the
        images scored with it; otherwise for the whole batch at once.
        """
        config = self.config
        if config.batch_invariant and features.patch_tokens.shape[0] > 1:
            images = zip(
                features.class_embeds.split(1), features.patch_tokens.split(1), patch_anomaly_probability.split(1)
            )
            single = [
                self.text_patch_probabilities(MRADVisionFeatures(c, t, features.grid_size), p) for c, t, p in images
            ]
            return torch.cat(single)
        patch_tokens = self.projected_patch_tokens(features)
        region_tokens = region_prior_tokens(patch_anomaly_probability, patch_tokens, config.region_prior_threshold)
        similarity = torch.matmul(patch_tokens, self.prompt_text_features(region_tokens).transpose(1, 2))
        return torch.softmax(similarity / config.text_temperature, dim=-1)

    def prompt_text_features(self, region_tokens: torch.Tensor) -> torch.Tensor:
        """(B, 2, P) normalised text features [normal, anomalous] of the per-image prompts biased by region tokens."""
        config = self.config
        if config.prompt_token_ids is None:
            raise ValueError(
                "This MRAD-CLIP model has no prompt token ids; create it with MRADForAnomalyDetection.from_clip(..., "
                "variant='clip', tokenizer=<CLIP tokenizer>) or set config.prompt_token_ids."
            )
        learner = self.prompt_learner
        text_dtype = self.clip.text_model.final_layer_norm.weight.dtype
        context = learner.context(self.region_bias(region_tokens.to(learner.normal_context.dtype))).to(text_dtype)
        features = prompted_text_features(
            self.clip.text_model,
            self.clip.text_projection,
            context,
            config.prompt_token_ids,
            learner.deep_prompts.to(text_dtype),
            round_deep_prompts_to_fp16=config.deep_prompt_fp16_rounding,
        )
        return l2_normalize(features.float())

    # ------------------------------------------------------------------ forward: maps, scores, losses
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        loss_stage: str | None = None,
        output_features: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MRADOutput | tuple:
        r"""Score images by retrieval from the attached memory bank.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, S, S)`): from `MRADImageProcessor`.
            labels (`torch.LongTensor` of shape `(B,)`, *optional*): image labels (0 normal, 1 anomaly); with `masks`,
                the training loss of the trained variants is returned in `loss`.
            masks (`torch.FloatTensor` of shape `(B, S, S)`, *optional*): binary ground truth (the processor's `masks`).
            loss_stage (`str`, *optional*): `"ft"` (focal + dice on the pixel retrieval + image cross-entropy) or
                `"prompt"` (MRAD-CLIP's focal + two dice on the text map). Defaults to the variant's own stage.
            output_features: also return the normalised retrieval queries.

        In training mode (`model.train()`) the trained variants apply similarity dropout; a training step (training
        mode with `labels` and `masks`) skips the smoothed maps and scores, which it does not need. Other keywords
        (a processor's `original_sizes`, `Trainer`'s `num_items_in_batch`) are accepted and ignored, as in transformers.
        """
        config = self.config
        want_loss = labels is not None and masks is not None
        if want_loss and config.variant == "tf":
            raise ValueError(
                "MRAD-TF has nothing to train; create the model with variant='ft' or 'clip' to get a loss."
            )
        stage = loss_stage or ("prompt" if config.variant == "clip" else "ft")
        if stage not in ("ft", "prompt") or (stage == "prompt" and config.variant != "clip"):
            raise ValueError(f"loss_stage {stage!r} is not available for variant {config.variant!r}")

        features = self.extract_features(pixel_values)
        image_queries, patch_queries = self.retrieval_queries(features)
        image_probabilities = self.retrieve("image", image_queries)
        patch_probabilities = self.retrieve("patch", patch_queries)
        grid, size = features.grid_size, config.image_size

        text_probabilities = None
        if config.variant == "clip":
            text_probabilities = self.text_patch_probabilities(features, patch_probabilities[..., 1].detach())

        loss = None
        if want_loss:
            masks = masks.to(device=image_probabilities.device, dtype=torch.float32)
            if stage == "ft":
                retrieval_maps = upsample_patch_probabilities(patch_probabilities, grid, size)
                loss = ft_loss(
                    retrieval_maps,
                    masks,
                    image_probabilities,
                    labels.to(masks.device),
                    config.classification_temperature,
                )
            else:
                loss = prompt_loss(upsample_patch_probabilities(text_probabilities, grid, size), masks)

        anomaly_map = anomaly_score = None
        if not (self.training and want_loss):
            map_probabilities = text_probabilities if text_probabilities is not None else patch_probabilities
            anomaly_map, anomaly_score = self.maps_and_scores(
                map_probabilities, image_probabilities[:, 1], grid, text_map=text_probabilities is not None
            )
        output = MRADOutput(
            loss=loss,
            anomaly_map=anomaly_map,
            anomaly_score=anomaly_score,
            image_probabilities=image_probabilities,
            patch_probabilities=patch_probabilities,
            text_probabilities=text_probabilities,
            image_embeds=image_queries if output_features else None,
            patch_embeds=patch_queries if output_features else None,
        )
        return output if return_dict is not False else output.to_tuple()

    def maps_and_scores(
        self,
        patch_probabilities: torch.Tensor,
        image_anomaly_probability: torch.Tensor,
        grid_size: int,
        text_map: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference post-processing: upsample both channels, take the anomaly channel (MRAD-CLIP's text map:
        (p_a + 1 - p_n) / 2), blur, fuse the image score."""
        config = self.config
        upsampled = upsample_patch_probabilities(patch_probabilities, grid_size, config.image_size)
        maps = (upsampled[:, 1] + 1 - upsampled[:, 0]) / 2.0 if text_map else upsampled[:, 1]
        maps = gaussian_blur(
            maps, config.gaussian_sigma, config.gaussian_truncate, batch_invariant=config.batch_invariant
        )
        score = fuse_image_score(
            maps,
            image_anomaly_probability,
            weight=config.image_score_weight,
            top_k_ratio=config.top_k_ratio,
            fusion=config.score_fusion,
        )
        return maps, score

    # ------------------------------------------------------------------ trainable parameters per stage
    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        """The parameters a training stage updates, as the reference: "ft" -> both projection pairs; "prompt" -> the
        prompt learner and the region biases (the projections stay frozen)."""
        if stage == "ft" and self.config.variant in ("ft", "clip"):
            modules = [self.image_projection, self.patch_projection]
        elif stage == "prompt" and self.config.variant == "clip":
            modules = [self.prompt_learner, self.region_bias]
        else:
            raise ValueError(f"No stage {stage!r} for variant {self.config.variant!r}")
        return [parameter for module in modules for parameter in module.parameters()]

    def set_training_stage(self, stage: str | None) -> list[nn.Parameter]:
        """Freeze everything except the stage's parameters (None freezes all); returns the trainable ones."""
        self.requires_grad_(False)
        if stage is None:
            return []
        parameters = self.trainable_parameters(stage)
        for parameter in parameters:
            parameter.requires_grad_(True)
        return parameters


# ---------------------------------------------------------------------- helpers (module-private)
def _read_json(name_or_path: str | os.PathLike, filename: str, hub_kwargs: dict[str, Any]) -> Any:
    """A JSON file of a model folder or Hub repo; None when it has none."""
    folder = Path(os.fspath(name_or_path))
    if folder.is_dir():
        path = folder / hub_kwargs.get("subfolder", "") / filename
        path = str(path) if path.is_file() else None
    else:
        options = {"_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
        path = cached_file(os.fspath(name_or_path), filename, **options, **hub_kwargs)
    try:
        return None if path is None else json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MemoryBankError(
            f"'{path}' is not readable JSON ({error}); re-save the model or re-download it."
        ) from error


def _project_queries(projection: MRADProjectionPair, queries: torch.Tensor, batch_invariant: bool) -> torch.Tensor:
    """The FT query projection; one product per image for 2-D (image-level) queries when `batch_invariant`."""
    return rowwise_linear(projection.query, queries) if batch_invariant else projection.query(queries)


def _prompt_token_ids_for(clip: Any, tokenizer: Any, config_overrides: dict[str, Any]) -> list[list[int]]:
    """MRAD-CLIP prompt ids from a tokenizer object, a tokenizer source, or the tokenizer saved with `clip`."""
    reference_prompts = all(
        config_overrides.get(key, default) == default
        for key, default in (
            ("prompt_context_length", 12),
            ("normal_prompt", "object"),
            ("anomaly_prompt", "damaged object"),
        )
    )
    if tokenizer is None:
        if not isinstance(clip, (str, os.PathLike)):
            vocab_size = (clip.config if isinstance(clip, CLIPModel) else clip).text_config.vocab_size
            if reference_prompts and vocab_size == 49408:  # OpenAI's vocabulary: its ids are known
                return [list(ids) for ids in OPENAI_DEFAULT_PROMPT_TOKEN_IDS]
            raise ValueError(
                "variant='clip' needs the CLIP tokenizer to encode its prompts: pass tokenizer=<CLIPTokenizer, folder, Hub id "
                "or OpenAI bpe_simple_vocab_16e6.txt.gz>."
            )
        tokenizer = clip
    if isinstance(tokenizer, (str, os.PathLike)):
        if str(tokenizer).endswith(".gz"):
            raise ValueError(
                f"tokenizer={tokenizer!r} is OpenAI's BPE file: turn it into a tokenizer first with "
                "mrad_hf.training.tokenization.load_clip_tokenizer (the CLI does this for --tokenizer)."
            )
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tokenizer)
    return prompt_token_ids(
        tokenizer,
        context_length=config_overrides.get("prompt_context_length", 12),
        normal_prompt=config_overrides.get("normal_prompt", "object"),
        anomaly_prompt=config_overrides.get("anomaly_prompt", "damaged object"),
    )


def patch_region_labels(masks: torch.Tensor, grid_size: int, rule: str = "exact") -> torch.Tensor:
    """Label the G x G patch grid from (B, S, S) binary masks: 1 anomalous, 0 normal, -1 dropped.

    "exact" (reference): bilinear (align_corners=False) downsampling; anomalous where the value is exactly 1,
    normal where exactly 0, fractional boundary patches dropped. "majority": anomalous where > 0.5, else normal.
    Returns (B, G*G) int64.
    """
    small = F.interpolate(
        masks.float().unsqueeze(1), size=(grid_size, grid_size), mode="bilinear", align_corners=False
    )
    small = small.squeeze(1).flatten(1)
    if rule == "exact":
        labels = torch.full_like(small, -1, dtype=torch.long)
        labels[small == 1] = 1
        labels[small == 0] = 0
        return labels
    if rule == "majority":
        return (small > 0.5).long()
    raise ValueError(f"Unknown region rule {rule!r}; use 'exact' or 'majority'.")
