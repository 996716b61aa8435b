# SPDX-License-Identifier: Apache-2.0
"""Convert OpenAI's original CLIP checkpoint (e.g. `ViT-L-14-336px.pt`) to a transformers `CLIPModel` folder.

For users who have only OpenAI's file (the official MRAD code loads exactly that one). Both the released
TorchScript archive (its weights read by `conversion.torchscript` with a restricted unpickler: none of the
archive's code runs) and a plain state-dict file (`torch.load(weights_only=True)`) are accepted. The architecture is inferred from the tensor shapes as OpenAI's
`clip.model.build_model` does (ViT image towers only); head counts are `width // 64` as in OpenAI's code unless
given. All key renaming lives in `openai_to_hf_tensors` (timm's `_convert_openai_clip` style):

    visual.conv1 -> vision_model.embeddings.patch_embedding      visual.ln_pre -> vision_model.pre_layrnorm
    visual.class_embedding / positional_embedding -> vision_model.embeddings.class_embedding / position_embedding
    [visual.]transformer.resblocks.i.attn.in_proj_{weight,bias} -> ...layers.i.self_attn.{q,k,v}_proj (split in 3)
    attn.out_proj -> self_attn.out_proj   ln_1/ln_2 -> layer_norm1/2   mlp.c_fc/c_proj -> mlp.fc1/fc2
    visual.ln_post -> vision_model.post_layernorm    ln_final -> text_model.final_layer_norm
    visual.proj (W x P) -> visual_projection.weight (P x W, transposed); text_projection likewise
    token_embedding / positional_embedding -> text_model.embeddings.*    logit_scale -> logit_scale

    python -m mrad_hf.conversion.convert_openai_clip ViT-L-14-336px.pt models/clip-vit-large-patch14-336
    # then: MRADForAnomalyDetection.from_clip("models/clip-vit-large-patch14-336", image_size=518)

The text config keeps OpenAI's pooling at the highest token id (the end-of-text token) via transformers'
legacy `eos_token_id=2` convention, as the Hub's `openai/clip-vit-*` configs do.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping

import torch

from mrad_hf.conversion.common import ConversionError, check_keys, load_torch_file, print_error, require_mapping
from mrad_hf.conversion.options import CLIP_DESCRIPTION as DESCRIPTION
from mrad_hf.conversion.options import add_clip_arguments as add_arguments

__all__ = [
    "openai_to_hf_tensors",
    "infer_clip_config",
    "convert_openai_state_dict",
    "convert_openai_clip",
    "main",
    "add_arguments",
    "run",
]

#: Entries of OpenAI's TorchScript state dict that are not weights (`clip.model.build_model` deletes them).
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_LEVEL = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
#: The entries `infer_clip_config` reads shapes from, with their number of dimensions.
_INFERRED_FROM = {
    "visual.conv1.weight": 4,
    "visual.positional_embedding": 2,
    "ln_final.weight": 1,
    "visual.transformer.resblocks.0.mlp.c_fc.weight": 2,
    "transformer.resblocks.0.mlp.c_fc.weight": 2,
    "token_embedding.weight": 2,
    "positional_embedding": 2,
    "text_projection": 2,
}


def openai_to_hf_tensors(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The one key mapping: an OpenAI CLIP state-dict entry -> its transformers `CLIPModel` entries ([] if unknown)."""
    if key in _TOP_LEVEL:
        return [(_TOP_LEVEL[key], tensor)]
    if key in _TRANSPOSED:
        return [(_TRANSPOSED[key], tensor.t().contiguous())]
    match = _BLOCK.match(key)
    if not match:
        return []
    tower = "vision_model" if match.group(1) else "text_model"
    prefix, part = f"{tower}.encoder.layers.{match.group(2)}.", match.group(3)
    if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if part.endswith("weight") else "bias"
        q, k, v = tensor.chunk(3, dim=0)
        return [(f"{prefix}self_attn.{name}_proj.{kind}", t.contiguous()) for name, t in zip("qkv", (q, k, v))]
    if part in _BLOCK_PARTS:
        return [(prefix + _BLOCK_PARTS[part], tensor)]
    return []


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str, where: str) -> int:
    indices = {
        int(m.group(2)) for key in state_dict if (m := _BLOCK.match(key)) and bool(m.group(1)) == (prefix == "visual.")
    }
    if indices != set(range(len(indices))):
        raise ConversionError(
            f"{where}: {prefix or 'text '}transformer blocks are not numbered 0..N-1 ({sorted(indices)})."
        )
    return len(indices)


def infer_clip_config(
    state_dict: Mapping[str, torch.Tensor],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    where: str = "OpenAI CLIP checkpoint",
):
    """A `CLIPConfig` from the tensor shapes, as OpenAI's `build_model` infers its architecture; errors start with
    `where` (the file)."""
    from transformers import CLIPConfig

    if "visual.proj" not in state_dict or "visual.conv1.weight" not in state_dict:
        found = sorted(key for key in state_dict if key.startswith("visual."))[:5]
        raise ConversionError(
            f"{where}: no ViT image tower (visual.conv1.weight / visual.proj missing; found e.g. {found}). "
            "ResNet CLIPs (RN50, ...) cannot be converted to transformers' CLIPModel."
        )
    shaped = [key for key, ndim in _INFERRED_FROM.items() if getattr(state_dict.get(key), "ndim", None) != ndim]
    if shaped:
        raise ConversionError(
            f"{where}: {shaped} are missing or have the wrong number of dimensions (expected "
            f"{[_INFERRED_FROM[key] for key in shaped]}); this is not an OpenAI ViT CLIP state dict."
        )
    if "logit_scale" in state_dict and state_dict["logit_scale"].numel() != 1:
        raise ConversionError(
            f"{where}: logit_scale must be one number, got shape {tuple(state_dict['logit_scale'].shape)}."
        )
    conv = state_dict["visual.conv1.weight"]
    vision_width, patch_size = int(conv.shape[0]), int(conv.shape[-1])
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = int(state_dict["ln_final.weight"].shape[0])
    vision_layers, text_layers = _count_blocks(state_dict, "visual.", where), _count_blocks(state_dict, "", where)
    vision_heads = vision_heads or vision_width // 64
    text_heads = text_heads or text_width // 64
    if vision_heads < 1 or vision_width % vision_heads or text_heads < 1 or text_width % text_heads:
        raise ConversionError(
            f"{where}: cannot split widths {vision_width} / {text_width} into {vision_heads} / {text_heads} heads "
            "(OpenAI uses width // 64); pass vision_heads= / text_heads= (--vision-heads / --text-heads)."
        )
    return CLIPConfig(
        vision_config=dict(
            hidden_size=vision_width,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
            intermediate_size=int(state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            patch_size=patch_size,
            image_size=patch_size * grid,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        text_config=dict(
            hidden_size=text_width,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            intermediate_size=int(state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            vocab_size=int(state_dict["token_embedding.weight"].shape[0]),
            max_position_embeddings=int(state_dict["positional_embedding"].shape[0]),
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        projection_dim=int(state_dict["text_projection"].shape[1]),
        logit_scale_init_value=float(state_dict["logit_scale"]) if "logit_scale" in state_dict else 2.6592,
    )


def convert_openai_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    where: str = "OpenAI CLIP checkpoint",
):
    """(`CLIPModel` with the converted weights, in eval mode) from an OpenAI CLIP state dict; every key is accounted
    for. Errors start with `where` (the file the state dict came from)."""
    from transformers import CLIPModel

    state_dict = {key: value for key, value in state_dict.items() if key not in NON_WEIGHT_KEYS}
    not_tensors = sorted(str(key) for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ConversionError(f"{where}: entries {not_tensors[:5]} are not tensors; this is not a CLIP state dict.")
    unknown = sorted(key for key, value in state_dict.items() if not openai_to_hf_tensors(key, value))
    if unknown:
        raise ConversionError(f"{where}: unknown keys {unknown}; this is not an OpenAI ViT CLIP state dict.")
    config = infer_clip_config(state_dict, vision_heads=vision_heads, text_heads=text_heads, where=where)
    converted = dict(pair for key, value in state_dict.items() for pair in openai_to_hf_tensors(key, value.float()))
    model = CLIPModel(config).eval()
    expected = {key for key in model.state_dict() if not key.endswith("position_ids")}
    check_keys(converted, expected, f"{where} (after renaming to transformers names)")
    for key, value in converted.items():
        target = model.state_dict()[key]
        if target.shape != value.shape:
            raise ConversionError(
                f"{where}: '{key}' has shape {tuple(value.shape)}, the inferred architecture needs {tuple(target.shape)}."
            )
    model.load_state_dict(converted, strict=False)
    return model


def convert_openai_clip(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
):
    """Read `ViT-*.pt` (TorchScript archive or plain state dict), return the `CLIPModel`; save it to `output_dir` if given."""
    state_dict = require_mapping(
        load_torch_file(checkpoint, "OpenAI CLIP checkpoint", torchscript=True), checkpoint, "OpenAI CLIP checkpoint"
    )
    where = f"OpenAI CLIP checkpoint '{checkpoint}'"
    try:
        model = convert_openai_state_dict(state_dict, vision_heads=vision_heads, text_heads=text_heads, where=where)
    except (RuntimeError, IndexError, TypeError) as error:  # a malformed tensor that no check above names
        raise ConversionError(
            f"{where}: its tensors do not form an OpenAI ViT CLIP ({type(error).__name__}: {str(error)[:200]})."
        ) from error
    if output_dir is not None:
        from mrad_hf.memory.files import CLIP_FOLDER, atomic_directory

        with atomic_directory(
            output_dir, CLIP_FOLDER
        ) as staging:  # an interrupted conversion leaves no half-written folder
            model.save_pretrained(staging)
    return model


def run(args: argparse.Namespace) -> int:
    try:
        model = convert_openai_clip(
            args.checkpoint, args.output_dir, vision_heads=args.vision_heads, text_heads=args.text_heads
        )
    except (ConversionError, OSError, ValueError) as error:  # bad input files, paths, banks: one clear line
        print_error(args, error)
        return 2
    vision = model.config.vision_config
    print(
        f"Wrote {args.output_dir}: ViT with {vision.num_hidden_layers} layers, width {vision.hidden_size}, patch {vision.patch_size}, "
        f"image {vision.image_size}, projection {model.config.projection_dim}"
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mrad_hf.conversion.convert_openai_clip", description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(prog=parser.prog)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
