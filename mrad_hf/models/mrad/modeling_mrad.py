# SPDX-License-Identifier: Apache-2.0
"""MRAD for anomaly detection on a frozen Hugging Face CLIP (Xu et al., ICLR 2026, arXiv 2602.00522).

One class, `MRADForAnomalyDetection`, serves MRAD-TF, MRAD-FT and MRAD-CLIP (`config.variant`): dual-path features
(Sec. 3.1), the two-level memory as buffers (Sec. 3.2), retrieval maps and scores (Sec. 3.3), MRAD-FT's query/key
projections (Sec. 3.4) and MRAD-CLIP's prompts with region-prior biases (Sec. 3.5). The math lives in the sibling
files; this one composes it and imports only torch, transformers and its siblings, so that a saved model loads with
`trust_remote_code=True` where `mrad_hf` is not installed. Reference: github.com/CROVO1026/MRAD at 1cc1c6b.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
    r"""Output of [`MRADForAnomalyDetection`] for B images, an S x S input and a G x G patch grid.

    Args:
        anomaly_map (`torch.FloatTensor` of shape `(B, S, S)`):
            Smoothed per-pixel anomaly probability: from the pixel-level retrieval (MRAD-TF/FT) or from text-patch
            alignment `(p_a + 1 - p_n) / 2` (MRAD-CLIP). Not computed in a training step.
        anomaly_score (`torch.FloatTensor` of shape `(B,)`):
            `(1 - k) * mean(top 1% of anomaly_map) + k * image_probabilities[:, 1]`.
        image_probabilities (`torch.FloatTensor` of shape `(B, 2)`): image-level retrieval [p_normal, p_anomaly].
        patch_probabilities (`torch.FloatTensor` of shape `(B, G*G, 2)`): pixel-level retrieval per patch.
        text_probabilities (`torch.FloatTensor` of shape `(B, G*G, 2)`, *optional*):
            MRAD-CLIP: softmax(cos(patch, [t_normal, t_anomaly]) / 0.07) per patch.
        image_embeds (`torch.FloatTensor` of shape `(B, P)`, *optional*), patch_embeds (`(B, G*G, W)`, *optional*):
            The normalised retrieval queries, with `output_features=True`.
        loss (`torch.FloatTensor`, *optional*): the training loss, with `labels` and `masks` (trained variants).
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
    """The package's one fp32 rule: the memory and the heads are created float32 and dtype casts (`.to(bf16)`,
    `.half()`, `from_pretrained(dtype=...)`) skip them, device moves apply; retrieval, maps and scores stay float32."""

    def _apply(self, fn, recurse=True):
        def keep_float32(tensor):
            if not tensor.is_floating_point():
                return fn(tensor)
            probe = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
            return tensor.to(probe.device) if probe.dtype != tensor.dtype else fn(tensor)

        return super()._apply(keep_float32, recurse)


class MRADMemory(MRADFloat32Module):
    """The two memories as buffers (`memory.*` in `model.safetensors`), shaped by the config's bank sizes so that
    `from_pretrained` restores them; `metadata` is the bank's provenance (`memory_bank.json`)."""

    def __init__(self, config: MRADConfig):
        super().__init__()
        for name, (shape, dtype) in self.buffer_shapes(config).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype), persistent=True)
        self.metadata: dict[str, Any] = {}

    @staticmethod
    def buffer_shapes(config: MRADConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        image, patch = config.image_bank_size, config.patch_bank_size
        return {
            "image_keys": ((image, config.image_key_dim), torch.float32),
            "image_values": ((image, 2), torch.float32),
            "patch_keys": ((patch, config.patch_key_dim), torch.float32),
            "patch_values": ((patch, 2), torch.float32),
            "patch_sources": ((patch,), torch.long),
        }

    def replace(self, bank: MemoryBank) -> None:
        device = self.image_keys.device if self.image_keys.device.type != "meta" else "cpu"
        for name, tensor in bank.tensors().items():
            dtype = torch.long if name == "patch_sources" else torch.float32
            self.register_buffer(name, tensor.detach().to(device=device, dtype=dtype).clone(), persistent=True)
        self.metadata = dict(bank.metadata)


class MRADProjectionPair(MRADFloat32Module):
    """MRAD-FT's recalibrated metric at one memory level, logits = query(q) . key(k)^T (Sec. 3.4; the reference's
    `MLP.mlp1/mlp2` and `Projector.fc[0]/fc[1]`). Keys are projected on the fly: the bank keeps raw features."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.query = nn.Linear(in_features, out_features, dtype=torch.float32)
        self.key = nn.Linear(in_features, out_features, dtype=torch.float32)


class MRADPromptLearner(MRADFloat32Module):
    """MRAD-CLIP's learnable prompts (Sec. 3.5): `normal_context` and `anomaly_context` (n_ctx, D), and
    `deep_prompts` (n_deep, t, D) that replace tokens 1..t at text layers 2..n_deep + 1."""

    def __init__(self, config: MRADConfig):
        super().__init__()
        width, fp32 = config.text_width, torch.float32
        self.normal_context = nn.Parameter(torch.empty(config.prompt_context_length, width, dtype=fp32))
        self.anomaly_context = nn.Parameter(torch.empty(config.prompt_context_length, width, dtype=fp32))
        shape = (config.num_deep_prompts, config.deep_prompt_length, width)
        self.deep_prompts = nn.Parameter(torch.empty(shape, dtype=fp32))

    def context(self, biases: torch.Tensor) -> torch.Tensor:
        """(B, 2, n_ctx, D): each state's context vectors plus that state's (B, 2, D) bias."""
        return torch.stack([self.normal_context, self.anomaly_context]).unsqueeze(0) + biases.unsqueeze(2)


class MRADRegionBias(MRADFloat32Module):
    """MRAD-CLIP's prompt biases: (B, 2, P) [normal, anomalous] region tokens -> (B, 2, D) [b_n, b_a]."""

    def __init__(self, config: MRADConfig):
        super().__init__()
        self.normal = nn.Linear(config.image_key_dim, config.text_width, dtype=torch.float32)
        self.anomaly = nn.Linear(config.image_key_dim, config.text_width, dtype=torch.float32)

    def forward(self, region_tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.normal(region_tokens[:, 0]), self.anomaly(region_tokens[:, 1])], dim=1)


def _torch_default_linear_init(linear: nn.Linear) -> None:
    """PyTorch's own `nn.Linear` initialisation (the reference's heads), through transformers' init helpers."""
    init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(linear.in_features) if linear.in_features > 0 else 0.0
    init.uniform_(linear.bias, -bound, bound)


class MRADPreTrainedModel(PreTrainedModel):
    """Loading and initialisation knobs. `base_model_prefix = "clip"` lets a plain CLIP checkpoint load into MRAD
    (only the memory is missing) and an MRAD checkpoint load back into `CLIPModel`."""

    config: MRADConfig
    config_class = MRADConfig
    base_model_prefix = "clip"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["CLIPEncoderLayer", "CLIPVisionEmbeddings", "CLIPTextEmbeddings"]
    _keys_to_ignore_on_load_missing = [rf"^{name}\." for name in ("memory", *HEAD_NAMES)]
    _supports_sdpa = True  # the CLIP towers follow `attn_implementation` (eager / sdpa)
    supports_gradient_checkpointing = True  # the text tower, which MRAD-CLIP's prompt stage backprops through
    accepts_loss_kwargs = False  # the loss is a per-batch mean: Trainer scales it for gradient accumulation

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        """Remember the trained weights a checkpoint lacks (or holds for another variant) before the ignore
        patterns hide them: `from_pretrained` refuses such a folder."""
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
            for buffer in module.buffers():
                init.zeros_(buffer)
        elif isinstance(module, (MRADProjectionPair, MRADRegionBias)):
            for linear in module.children():
                _torch_default_linear_init(linear)
        elif isinstance(module, MRADPromptLearner):
            for parameter in module.parameters():
                init.normal_(parameter, mean=0.0, std=0.02)


class MRADForAnomalyDetection(MRADPreTrainedModel):
    r"""MRAD on a frozen CLIP: retrieval from a two-level memory bank gives anomaly maps and scores.

    `config.variant`: MRAD-TF (train-free retrieval), MRAD-FT (retrieval through learned query/key projections) or
    MRAD-CLIP (the map from learnable prompts biased by region priors, the score from projected image retrieval).
    Build the memory from labelled auxiliary images (or attach a saved bank), then call the model; train the FT/CLIP
    heads with `mrad_hf.training` (`mrad train`).

    Example:

    ```python
    >>> from mrad_hf import MRADForAnomalyDetection, MRADImageProcessor
    >>> from mrad_hf.memory import build_memory_bank
    >>> model = MRADForAnomalyDetection.from_clip("openai/clip-vit-large-patch14-336")  # doctest: +SKIP
    >>> build_memory_bank(model, aux_dataset, source="visa")  # rows with image, label, mask  # doctest: +SKIP
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
        self.calibration: dict[str, Any] | None = None  # decision thresholds (calibration.json)
        self.post_init()

    @staticmethod
    def _make_heads(config: MRADConfig) -> dict[str, nn.Module]:
        """The trainable modules: none for MRAD-TF; the projections for FT; plus prompts and biases for CLIP."""
        heads: dict[str, nn.Module] = {}
        if config.variant in ("ft", "clip"):
            heads["image_projection"] = MRADProjectionPair(config.image_key_dim, config.image_key_dim)
            heads["patch_projection"] = MRADProjectionPair(config.patch_key_dim, config.image_key_dim)
        if config.variant == "clip":
            heads["prompt_learner"] = MRADPromptLearner(config)
            heads["region_bias"] = MRADRegionBias(config)
        return heads

    def train(self, mode: bool = True):
        """Training mode for the heads (similarity dropout); the frozen CLIP always stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, trust_bank: bool = False, **kwargs):
        """`PreTrainedModel.from_pretrained` (a folder or a full Hub id; short names such as "mrad-tf" are resolved
        by `mrad_hf.hub.api.load_model` and the CLI only), plus the state saved beside the weights.

        `dtype=torch.bfloat16 / float16` casts the CLIP tower only (`MRADFloat32Module`). Reads `memory_bank.json`
        (onto `model.memory.metadata`) and `calibration.json` (`model.calibration`), then checks the bank: tensors
        and sealed metadata as saved, built for this backbone and feature settings (`trust_bank=True` accepts a bank
        without a fingerprint, with a warning). Refuses weights that lack the trained heads of the configured variant.
        """
        allow_new_heads = kwargs.pop("_allow_new_heads", False)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing, unexpected = model.__dict__.pop("_weights_mismatch", ([], []))
        name = pretrained_model_name_or_path
        if (missing or unexpected) and not allow_new_heads:
            found = (
                f"lacks the trained weights {missing}"
                if missing
                else f"holds trained weights of another variant {unexpected[:4]}"
            )
            raise ValueError(
                f"'{name}' is configured as MRAD-{model.config.variant.upper()} but its weights file {found}: "
                'config.json\'s "variant" does not match the weights. Restore config.json (or load the folder the model '
                "was saved to); an MRAD model never scores with freshly initialised heads or prompts."
            )
        model.clip.requires_grad_(False)
        for tensor in (*model.parameters(), *model.buffers()):  # MKL rounds differently on misaligned memory-mapped
            if tensor.device.type == "cpu" and tensor.data_ptr() % 64:  # weights: align them
                tensor.data = tensor.data.clone()
        if not allow_new_heads:
            keys = ("revision", "cache_dir", "local_files_only", "token", "subfolder")
            hub = {key: kwargs[key] for key in keys if key in kwargs}
            legacy = _read_json(name, "config.json", hub) or {}  # older versions kept this state in config.json
            model.memory.metadata = (
                _read_json(name, MODEL_BANK_FILENAME, hub) or legacy.get("memory_bank_metadata") or {}
            )
            calibration = _read_json(name, CALIBRATION_FILENAME, hub) or legacy.get("calibration")
            model.calibration = validate_calibration(calibration, f"'{name}' {CALIBRATION_FILENAME}")
            verify_model_memory(model, trust_bank=trust_bank)
        return (model, info) if want_info else model

    @classmethod
    def from_clip(
        cls, clip: str | os.PathLike | CLIPModel | CLIPConfig, *, tokenizer: Any = None, **config_overrides
    ) -> MRADForAnomalyDetection:
        """An MRAD model with an empty memory bank (and freshly initialised heads) around any CLIP.

        Args:
            clip: a Hub id or folder of a transformers CLIP checkpoint (`"openai/clip-vit-large-patch14-336"`), a
                loaded `CLIPModel` (used as is, not copied) or a `CLIPConfig` (random weights, for tests).
            tokenizer: MRAD-CLIP with other prompts or vocabulary than OpenAI's: a CLIP tokenizer object, used once
                to store the prompts' token ids in the config (OpenAI's vocabulary needs none: its ids are known).
            **config_overrides: `MRADConfig` fields (`variant="ft"`, ...) and the Hub options `revision`,
                `cache_dir`, `local_files_only`, `token`, `force_download`.
        """
        hub_keys = ("revision", "cache_dir", "local_files_only", "token", "force_download")
        hub_kwargs = {key: config_overrides.pop(key) for key in hub_keys if key in config_overrides}
        clip_config = clip.config if isinstance(clip, CLIPModel) else clip
        if isinstance(clip, (str, os.PathLike)):
            try:
                clip_config = CLIPConfig.from_pretrained(clip, **hub_kwargs)
            except OSError as error:
                raise OSError(
                    f"Could not load a CLIP configuration from {clip!r} ({error}). Pass a local folder with a "
                    "transformers CLIP checkpoint, or a Hub id while online; offline (HF_HUB_OFFLINE=1) only cached "
                    "models load."
                ) from error
        if config_overrides.get("variant") == "clip" and config_overrides.get("prompt_token_ids") is None:
            config_overrides["prompt_token_ids"] = _prompt_token_ids_for(clip_config, tokenizer, config_overrides)
        config = MRADConfig(clip_config=clip_config, **config_overrides)
        if isinstance(clip, CLIPConfig):
            return cls(config).eval()
        if not isinstance(clip, CLIPModel):
            return cls.from_pretrained(clip, config=config, _allow_new_heads=True, **hub_kwargs).eval()
        with torch.device("meta"):
            model = cls(config)
        model.clip = clip.requires_grad_(False)
        model.memory = MRADMemory(config)
        for name, head in cls._make_heads(config).items():
            head.apply(model._init_weights)
            setattr(model, name, head)
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained` plus what makes the folder self-contained: `memory_bank.json`,
        `calibration.json` (when set), `preprocessor_config.json` and the `anomaly-detection` pipeline with its code,
        so that `pipeline(model=folder)` works with `mrad_hf` installed, and with `trust_remote_code=True` without.
        (`mrad_hf.memory.save_model` saves through a staging folder: never a half-written folder.)"""
        impl = "pipeline_anomaly_detection.AnomalyDetectionPipeline"
        pipelines = {"anomaly-detection": {"impl": impl, "pt": ["AutoModel"], "type": "image"}}
        self.config.custom_pipelines = CustomPipelines(pipelines)
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
        """One dual-path pass of the frozen vision tower (`features_mrad.dual_path_vision_features`)."""
        config, size = self.config, self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} but this model expects "
                f"{size}x{size}; preprocess with MRADImageProcessor.from_config(model.config)."
            )
        names = ("vv_start_layer", "feature_layer", "position_interpolation", "class_key_post_layernorm")
        settings = {name: getattr(config, name) for name in (*names, "batch_invariant")}
        return dual_path_vision_features(self.clip.vision_model, self.clip.visual_projection, pixel_values, **settings)

    def retrieval_queries(self, features: MRADVisionFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(image queries (B, P), patch queries (B, G*G, W)): normalised class embeds; averaged, normalised patches."""
        kernels = self.config.neighbor_kernel_sizes
        patch_tokens = neighbor_average(features.patch_tokens.float(), features.grid_size, kernels)
        return l2_normalize(features.class_embeds.float()), l2_normalize(patch_tokens)

    # ------------------------------------------------------------------ memory bank (Sec. 3.2)
    def backbone_fingerprint(self) -> dict[str, Any]:
        """Identity of the CLIP backbone, the same in every dtype (`memory_bank_mrad.backbone_fingerprint`)."""
        return backbone_fingerprint(self.clip)

    @property
    def memory_bank_metadata(self) -> dict[str, Any]:
        """Provenance of the attached bank (source, counts, fingerprint, ids); saved as `memory_bank.json`."""
        return self.memory.metadata

    def get_memory_bank(self) -> MemoryBank:
        """The attached memory as a standalone `MemoryBank` (copies of the buffers, plus the metadata)."""
        tensors = {name: buffer.detach().cpu().clone() for name, buffer in self.memory.named_buffers()}
        return MemoryBank(**tensors, metadata=dict(self.memory.metadata or {}))

    def set_memory_bank(self, bank: MemoryBank, *, strict: bool = True, trust_bank: bool = False) -> None:
        """Attach a bank (`mrad_hf.memory.build_memory_bank` / `load_bank`) built for this backbone; one without a
        fingerprint or feature settings needs `trust_bank=True` (warns what was not checked); `strict=False` turns a
        known mismatch into a warning."""
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
        if level not in ("image", "patch"):
            raise ValueError(f"level must be 'image' or 'patch', got {level!r}")
        keys, values = getattr(self.memory, f"{level}_keys"), getattr(self.memory, f"{level}_values")
        return keys, values, getattr(self, f"{level}_projection", None) if self.config.variant != "tf" else None

    def _projected(self, level: str, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(queries, keys, values) of one level, through the FT projections where the variant has them."""
        keys, values, projection = self._memory_level(level)
        if projection is not None:
            query = projection.query
            queries = rowwise_linear(query, queries) if self.config.batch_invariant else query(queries)
            keys = projection.key(keys)
        return queries, keys, values

    def retrieval_logits(self, level: str, queries: torch.Tensor) -> torch.Tensor:
        """(..., N) pre-softmax logits against one memory level, as the score uses them: cos(q, k) / tau (MRAD-TF) or
        query(q) . key(k) / tau (FT/CLIP; tau = 1 in the reference). `queries` from `retrieval_queries`."""
        queries, keys, _ = self._projected(level, queries)
        temperature, batch_invariant = self.config.retrieval_temperature, self.config.batch_invariant
        return retrieval_logits(queries, keys, temperature, batch_invariant=batch_invariant)

    def retrieve(self, level: str, queries: torch.Tensor, *, similarity_dropout: bool | None = None) -> torch.Tensor:
        """Soft retrieval from one memory level -> (..., 2) [p_normal, p_anomaly]. Similarity dropout (Sec. 3.4;
        trained variants in training mode by default) masks, per query, the entries whose *unprojected* cosine is
        above `config.{image,patch}_dropout_quantile` before the projected softmax."""
        keys, values, projection = self._memory_level(level)
        if keys.shape[0] == 0:
            raise MemoryBankError(
                "This model has no memory bank (or an empty one). Build one with mrad_hf.memory.build_memory_bank(model, "
                "samples) or attach one with model.set_memory_bank(mrad_hf.memory.load_bank('memory_bank.safetensors'))."
            )
        config = self.config
        if similarity_dropout is None:
            similarity_dropout = self.training and projection is not None
        if similarity_dropout:
            quantile = config.image_dropout_quantile if level == "image" else config.patch_dropout_quantile
            cosines = retrieval_logits(queries, keys, batch_invariant=config.batch_invariant)
            drop = similarity_dropout_mask(cosines, quantile)
            logits = self.retrieval_logits(level, queries)
            return masked_soft_retrieve(logits, values, drop, batch_invariant=config.batch_invariant)
        queries, keys, values = self._projected(level, queries)
        return soft_retrieve(
            queries,
            keys,
            values,
            temperature=config.retrieval_temperature,
            chunk_size=config.retrieval_chunk_size,
            batch_invariant=config.batch_invariant,
        )

    # ------------------------------------------------------------------ MRAD-CLIP text branch (Sec. 3.5)
    def projected_patch_tokens(self, features: MRADVisionFeatures) -> torch.Tensor:
        """(B, G*G, P): V-V tokens through `visual_projection`, neighbour-averaged, L2-normalised (text space)."""
        projected = self.clip.visual_projection(features.patch_tokens).float()
        return l2_normalize(neighbor_average(projected, features.grid_size, self.config.neighbor_kernel_sizes))

    def text_patch_probabilities(self, features: MRADVisionFeatures, patch_anomaly: torch.Tensor) -> torch.Tensor:
        """(B, G*G, 2) softmax(cos(patch, [t_normal, t_anomaly]) / 0.07), with each image's prompts biased by its
        region priors (patches whose pixel-retrieval p_anomaly is above `region_prior_threshold` vs the rest). With
        `config.batch_invariant`, image by image: an image's map then does not depend on the images scored with it."""
        config = self.config
        if config.batch_invariant and features.patch_tokens.shape[0] > 1:
            parts = zip(features.class_embeds.split(1), features.patch_tokens.split(1), patch_anomaly.split(1))
            grid = features.grid_size
            return torch.cat([self.text_patch_probabilities(MRADVisionFeatures(c, t, grid), p) for c, t, p in parts])
        patch_tokens = self.projected_patch_tokens(features)
        region_tokens = region_prior_tokens(patch_anomaly, patch_tokens, config.region_prior_threshold)
        similarity = torch.matmul(patch_tokens, self.prompt_text_features(region_tokens).transpose(1, 2))
        return torch.softmax(similarity / config.text_temperature, dim=-1)

    def prompt_text_features(self, region_tokens: torch.Tensor) -> torch.Tensor:
        """(B, 2, P) normalised text features [normal, anomalous] of the prompts biased by (B, 2, P) region tokens."""
        config = self.config
        if config.prompt_token_ids is None:
            raise ValueError(
                "This MRAD-CLIP model has no prompt token ids; create it with MRADForAnomalyDetection.from_clip(..., "
                "variant='clip', tokenizer=<CLIP tokenizer>) or set config.prompt_token_ids."
            )
        learner, text_dtype = self.prompt_learner, self.clip.text_model.final_layer_norm.weight.dtype
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
            labels (`torch.LongTensor` of shape `(B,)`, *optional*): 0 normal, 1 anomaly; with `masks`, the trained
                variants return their training loss in `loss`.
            masks (`torch.FloatTensor` of shape `(B, S, S)`, *optional*): binary ground truth (the processor's).
            loss_stage (`str`, *optional*): `"ft"` (focal + dice on the pixel retrieval + image cross-entropy) or
                `"prompt"` (MRAD-CLIP: focal + two dice on the text map); defaults to the variant's own stage.
            output_features (`bool`): also return the normalised retrieval queries.

        In training mode the trained variants apply similarity dropout, and a training step (with `labels` and
        `masks`) skips the maps and scores. Other keywords (the processor's `original_sizes`, `Trainer`'s
        `num_items_in_batch`) are accepted and ignored, as in transformers.
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
                labels = labels.to(masks.device)
                loss = ft_loss(retrieval_maps, masks, image_probabilities, labels, config.classification_temperature)
            else:
                loss = prompt_loss(upsample_patch_probabilities(text_probabilities, grid, size), masks)

        anomaly_map = anomaly_score = None
        if not (self.training and want_loss):
            text_map = text_probabilities is not None
            map_probabilities = text_probabilities if text_map else patch_probabilities
            anomaly_map, anomaly_score = self.maps_and_scores(
                map_probabilities, image_probabilities[:, 1], grid, text_map=text_map
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
        self, patch_probabilities: torch.Tensor, image_anomaly: torch.Tensor, grid_size: int, text_map: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference post-processing: upsample both channels, take the anomaly channel (MRAD-CLIP's text map:
        (p_a + 1 - p_n) / 2), blur, fuse the image score."""
        config = self.config
        upsampled = upsample_patch_probabilities(patch_probabilities, grid_size, config.image_size)
        maps = (upsampled[:, 1] + 1 - upsampled[:, 0]) / 2.0 if text_map else upsampled[:, 1]
        maps = gaussian_blur(
            maps, config.gaussian_sigma, config.gaussian_truncate, batch_invariant=config.batch_invariant
        )
        score = fuse_image_score(
            maps,
            image_anomaly,
            weight=config.image_score_weight,
            top_k_ratio=config.top_k_ratio,
            fusion=config.score_fusion,
        )
        return maps, score


# ---------------------------------------------------------------------- helpers (module-private)
def _read_json(name_or_path: str | os.PathLike, filename: str, hub_kwargs: dict[str, Any]) -> Any:
    """The JSON object in a file of a model folder or Hub repo, None without the file; else an error naming it."""
    folder = Path(os.fspath(name_or_path))
    if folder.is_dir():
        path = folder / hub_kwargs.get("subfolder", "") / filename
        path = str(path) if path.is_file() else None
    else:
        options = {"_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
        path = cached_file(os.fspath(name_or_path), filename, **options, **hub_kwargs)
    try:
        content = None if path is None else json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(content, (dict, type(None))):
            raise ValueError(f"it holds a JSON {type(content).__name__}, not an object")
    except (OSError, ValueError, RecursionError) as error:
        raise MemoryBankError(
            f"'{path}' is not a readable JSON object ({error}); re-save the model or re-download it."
        ) from error
    return content


def _prompt_token_ids_for(clip_config: CLIPConfig, tokenizer: Any, overrides: dict[str, Any]) -> list[list[int]]:
    """MRAD-CLIP prompt ids: OpenAI's known ids for the reference prompts on its vocabulary, else from `tokenizer`."""
    defaults = {"prompt_context_length": 12, "normal_prompt": "object", "anomaly_prompt": "damaged object"}
    prompts = {key: overrides.get(key, default) for key, default in defaults.items()}
    if tokenizer is None and prompts == defaults and clip_config.text_config.vocab_size == 49408:
        return [list(ids) for ids in OPENAI_DEFAULT_PROMPT_TOKEN_IDS]
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        raise ValueError(
            "variant='clip' with this vocabulary or these prompts needs the CLIP tokenizer to encode them: pass "
            "tokenizer=CLIPTokenizer.from_pretrained(...) (for OpenAI's bpe_simple_vocab_16e6.txt.gz: "
            "mrad_hf.training.tokenization.load_clip_tokenizer(path); the CLI's --tokenizer does this)."
        )
    context_length = prompts.pop("prompt_context_length")
    return prompt_token_ids(tokenizer, context_length=context_length, **prompts)
