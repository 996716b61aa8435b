# SPDX-License-Identifier: Apache-2.0
"""The exportable MRAD graph: pixels -> (anomaly_map, anomaly_score) with a free batch axis (paper Sec. 3.1-3.5).

`MRADExportModule` wraps a loaded `MRADForAnomalyDetection` and computes exactly what its `forward` returns in
`anomaly_map` / `anomaly_score`, as one traceable function of `pixel_values` whose every operator runs over the
whole batch: the dual-path vision tower, both retrievals against the memory bank (its keys and values become
constants of the exported graph), MRAD-CLIP's image-conditioned text branch (region priors -> prompt biases ->
the prompted text tower), the bilinear upsampling, the scipy-equal Gaussian blur and the score fusion.

Why a wrapper and not `model.forward`: the model's default path is bit-exact batch invariant, which it gets from
per-image loops (per-image `out_proj`, per-image blur, row-wise products, the per-image text branch). A loop over
`tensor.split(1)` fixes the batch size in a traced graph, so `torch.export` / ONNX specialise the batch. This
module composes the same pure functions (`features_mrad`, `retrieval_mrad`, `postprocessing_mrad`,
`prompting_mrad`) batch-wise instead; it equals the model to float rounding (tests: max |diff| < 1e-5 on random
tiny CLIPs), not bit for bit. Dense retrieval is used whatever `config.retrieval_chunk_size` says (the chunked
online softmax equals it to rounding; an exported graph holds the whole (B, G*G, N) logits, ~110 MB per image
for a 20k-entry patch bank at 518 px).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.mrad.features_mrad import interpolate_position_embeddings, neighbor_average
from ..models.mrad.modeling_mrad import MRADForAnomalyDetection
from ..models.mrad.postprocessing_mrad import fuse_image_score, gaussian_kernel1d, upsample_patch_probabilities
from ..models.mrad.prompting_mrad import causal_attention_mask
from ..models.mrad.retrieval_mrad import l2_normalize, region_prior_tokens

__all__ = ["MRADExportModule", "OUTPUT_NAMES", "INPUT_NAME"]

INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("anomaly_map", "anomaly_score")


def _reflect_indices(length: int, radius: int) -> torch.Tensor:
    """scipy "reflect" padding indices (d c b a | a b c d | d c b a), as `postprocessing_mrad.gaussian_blur` pads."""
    positions = torch.arange(-radius, length + radius) % (2 * length)
    return torch.where(positions >= length, 2 * length - 1 - positions, positions)


class MRADExportModule(nn.Module):
    """`pixel_values (B, 3, S, S) -> (anomaly_map (B, S, S), anomaly_score (B,))` for export, batch-wise.

    Holds references to the model's (frozen) modules and memory, so exporting it embeds the CLIP weights, the heads
    and the bank as graph constants. Inference only: no similarity dropout, no loss.
    """

    def __init__(self, model: MRADForAnomalyDetection):
        super().__init__()
        config = model.config
        if model.memory.image_keys.shape[0] == 0 or model.memory.patch_keys.shape[0] == 0:
            raise ValueError(
                "This model has no memory bank (or an empty level); an exported graph would score nothing. "
                "Build one with "
                "model.build_memory_bank(samples) or attach one with model.set_memory_bank(path) before exporting."
            )
        self.config = config
        self.variant = config.variant
        self.clip = model.clip
        self.memory = model.memory
        self.image_projection = getattr(model, "image_projection", None) if self.variant != "tf" else None
        self.patch_projection = getattr(model, "patch_projection", None) if self.variant != "tf" else None
        vision = model.clip.vision_model
        grid = config.image_size // config.patch_size
        self.grid_size = grid
        self.num_layers = len(vision.encoder.layers)
        self.feature_layer = config.feature_layer % self.num_layers
        # constants computed once here (not in the traced graph): resized positions, blur weights and pad indices
        positions = interpolate_position_embeddings(
            vision.embeddings.position_embedding.weight, grid, config.position_interpolation
        )
        self.register_buffer("positions", positions.detach().clone(), persistent=False)
        self.blur = config.gaussian_sigma != 0
        if self.blur:
            weights = gaussian_kernel1d(config.gaussian_sigma, config.gaussian_truncate).float()
            radius = (weights.numel() - 1) // 2
            self.register_buffer("blur_weights", weights, persistent=False)
            self.register_buffer("blur_indices", _reflect_indices(config.image_size, radius), persistent=False)
        if self.variant == "clip":
            self.prompt_learner = model.prompt_learner
            self.region_bias = model.region_bias
            token_ids, end_positions = model.prompt_token_tensors()
            self.text_length = int(end_positions.max()) + 1
            self.register_buffer("prompt_token_ids", token_ids[:, : self.text_length].clone(), persistent=False)
            self.prompt_end_positions = [int(position) for position in end_positions]  # python ints: static indices
            self.register_buffer(
                "text_mask", causal_attention_mask(self.text_length, torch.float32, token_ids.device), persistent=False
            )

    # ------------------------------------------------------------------ vision tower (features_mrad, batch-wise)
    @staticmethod
    def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
        return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)

    @staticmethod
    def _merge_heads(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).flatten(2)

    def _attention(self, attention: nn.Module, normed: torch.Tensor, with_vv: bool, class_only: bool):
        """`features_mrad._block_attention` over the whole batch: (original_out, vv_out or None), after `out_proj`."""
        heads = attention.num_heads
        query_input = normed[:, :1] if class_only else normed
        query = self._split_heads(attention.q_proj(query_input), heads)
        key = self._split_heads(attention.k_proj(normed), heads)
        value = self._split_heads(attention.v_proj(normed), heads)
        original = F.scaled_dot_product_attention(query, key, value, scale=attention.scale)
        if not with_vv:
            return attention.out_proj(self._merge_heads(original)), None
        vv = F.scaled_dot_product_attention(value, value, value, scale=attention.scale)
        length = original.shape[2]
        projected = attention.out_proj(torch.cat([self._merge_heads(original), self._merge_heads(vv)], dim=1))
        return projected[:, :length], projected[:, length:]

    def vision_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class_embeds (B, P), patch_tokens (B, G*G, W)), as `features_mrad.dual_path_vision_features`."""
        config = self.config
        vision = self.clip.vision_model
        embeddings = vision.embeddings
        dtype = embeddings.patch_embedding.weight.dtype
        patches = embeddings.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        class_token = embeddings.class_embedding.to(dtype).expand(patches.shape[0], 1, -1)
        hidden = vision.pre_layrnorm(torch.cat([class_token, patches], dim=1) + self.positions.to(dtype))
        vv_start = config.vv_start_layer
        vv_hidden = hidden if vv_start == 0 else None
        for index, layer in enumerate(vision.encoder.layers):
            with_vv = vv_start <= index <= self.feature_layer
            class_only = index == self.num_layers - 1 and index + 1 != vv_start
            original, vv = self._attention(layer.self_attn, layer.layer_norm1(hidden), with_vv, class_only)
            if with_vv:
                vv_hidden = vv_hidden + vv
            if class_only:
                hidden = hidden[:, :1]
            hidden = hidden + original
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
            if index + 1 == vv_start:
                vv_hidden = hidden
        class_state = hidden[:, 0]
        if config.class_key_post_layernorm:
            class_state = vision.post_layernorm(class_state)
        return self.clip.visual_projection(class_state), vision.post_layernorm(vv_hidden)[:, 1:]

    # ------------------------------------------------------------------ retrieval (retrieval_mrad, dense)
    def _retrieve(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, projection) -> torch.Tensor:
        if projection is not None:
            queries, keys = projection.query(queries), projection.key(keys)
        logits = torch.matmul(queries, keys.transpose(0, 1))
        temperature = self.config.retrieval_temperature
        if temperature != 1.0:
            logits = logits / temperature
        return torch.matmul(torch.softmax(logits, dim=-1), values)

    # -------------------------------------------------------- MRAD-CLIP text branch (prompting_mrad, batch-wise)
    def _text_probabilities(self, patch_tokens: torch.Tensor, patch_anomaly_probability: torch.Tensor) -> torch.Tensor:
        """`MRADForAnomalyDetection.text_patch_probabilities` for the whole batch at once."""
        config = self.config
        clip = self.clip
        projected = l2_normalize(
            neighbor_average(
                clip.visual_projection(patch_tokens).float(), self.grid_size, config.neighbor_kernel_sizes
            )
        )
        region_tokens = region_prior_tokens(patch_anomaly_probability, projected, config.region_prior_threshold)
        learner = self.prompt_learner
        text_model = clip.text_model
        text_dtype = text_model.final_layer_norm.weight.dtype
        context = learner.context(self.region_bias(region_tokens.to(learner.normal_context.dtype))).to(text_dtype)
        batch, states, n_ctx, width = context.shape
        words = text_model.embeddings.token_embedding(self.prompt_token_ids).to(text_dtype)  # (S, T, D)
        prefix = words[:, :1].unsqueeze(0).expand(batch, -1, -1, -1)
        suffix = words[:, 1 + n_ctx :].unsqueeze(0).expand(batch, -1, -1, -1)
        hidden = torch.cat([prefix, context, suffix], dim=2).flatten(0, 1)
        hidden = hidden + text_model.embeddings.position_embedding.weight[: self.text_length].to(text_dtype)
        mask = self.text_mask  # float32: exports refuse a half-precision tower
        deep_prompts = learner.deep_prompts
        for index, layer in enumerate(text_model.encoder.layers):
            if 1 <= index <= deep_prompts.shape[0]:
                deep = deep_prompts[index - 1]
                if config.deep_prompt_fp16_rounding:
                    deep = deep.half()
                deep = deep.to(text_dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
                hidden = torch.cat([hidden[:, :1], deep, hidden[:, 1 + deep.shape[1] :]], dim=1)
            hidden = layer(hidden, attention_mask=mask)
        hidden = text_model.final_layer_norm(hidden).unflatten(0, (batch, states))  # (B, S, T, D)
        end_states = torch.stack([hidden[:, state, end] for state, end in enumerate(self.prompt_end_positions)], dim=1)
        text_features = l2_normalize(clip.text_projection(end_states).float())
        similarity = torch.matmul(projected, text_features.transpose(1, 2))
        return torch.softmax(similarity / config.text_temperature, dim=-1)

    # -------------------------------------------------------- post-processing (postprocessing_mrad, batch-wise)
    def _gaussian_blur(self, maps: torch.Tensor) -> torch.Tensor:
        if not self.blur:
            return maps
        weights, indices = self.blur_weights.to(maps.dtype), self.blur_indices
        x = maps.unsqueeze(1).index_select(2, indices)
        x = F.conv2d(x, weights.view(1, 1, -1, 1))
        x = x.index_select(3, indices)
        return F.conv2d(x, weights.view(1, 1, 1, -1)).squeeze(1)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        memory = self.memory
        class_embeds, patch_tokens = self.vision_features(pixel_values)
        image_queries = l2_normalize(class_embeds.float())
        patch_queries = l2_normalize(
            neighbor_average(patch_tokens.float(), self.grid_size, config.neighbor_kernel_sizes)
        )
        image_probabilities = self._retrieve(
            image_queries, memory.image_keys, memory.image_values, self.image_projection
        )
        patch_probabilities = self._retrieve(
            patch_queries, memory.patch_keys, memory.patch_values, self.patch_projection
        )
        upsampled_source = patch_probabilities
        if self.variant == "clip":
            upsampled_source = self._text_probabilities(patch_tokens, patch_probabilities[..., 1])
        upsampled = upsample_patch_probabilities(upsampled_source, self.grid_size, config.image_size)
        maps = (upsampled[:, 1] + 1 - upsampled[:, 0]) / 2.0 if self.variant == "clip" else upsampled[:, 1]
        maps = self._gaussian_blur(maps)
        score = fuse_image_score(
            maps,
            image_probabilities[:, 1],
            weight=config.image_score_weight,
            top_k_ratio=config.top_k_ratio,
            fusion=config.score_fusion,
        )
        return maps, score
