# SPDX-License-Identifier: Apache-2.0
"""Run the official MRAD code (github.com/CROVO1026/MRAD) itself as the benchmark baseline, on our random weights.

Nothing of the official code is copied into this repository: `load_official(checkout)` imports it from a scratch
checkout the user fetched (e.g. `git clone https://github.com/CROVO1026/MRAD /work/scratch/MRAD`; the numbers in
benchmarks/results were taken at 1cc1c6b). Four of its imports are not needed for MRAD-TF inference and are absent from
our environment (`pkg_resources` for a version check, `torchvision.transforms` for its dataset transforms, `thop`
for a FLOP profiler, `ftfy` for prompt text cleaning); empty stand-ins are registered for them only when they cannot be imported.

`official_mrad_tf(...)` is the MRAD-TF loop body of the official `test.py` (HEAD 1cc1c6b, lines ~150-220) for one
image: `model.encode_image(image, features_list, DPAM_layer=24)`, `average_neighbor` + L2 normalisation,
`compute_patch_socre` / `compute_socre` from its `mrad.py`, `get_similarity_map`, `scipy.ndimage.gaussian_filter`
(sigma 4), top-1% mean, `(1 - k) * topk + k * p_anomaly` with k = 0.7. The glue lines are written out here
because `test.py` itself does not import at HEAD (it imports a function its last commit deleted).

`official_and_ours(checkout, seed)` builds the official `AnomalyCLIP` ViT-L/14@336 with its own random
initialisation, converts that state dict with `mrad_hf.conversion.convert_openai_clip` and wraps it in an
`MRADForAnomalyDetection`: both sides then hold the same weights.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import torch

VIT_L14_336 = dict(
    embed_dim=768,
    image_resolution=336,
    vision_layers=24,
    vision_width=1024,
    vision_patch_size=14,
    context_length=77,
    vocab_size=49408,
    transformer_width=768,
    transformer_heads=12,
    transformer_layers=12,
)
DESIGN_DETAILS = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9, "learnabel_text_embedding_length": 4}
FEATURES_LIST = [6, 12, 18, 24]


def _stand_in(name: str, **attributes) -> None:
    try:
        importlib.import_module(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)


def load_official(checkout: str | Path) -> types.SimpleNamespace:
    """Import the official code from `checkout` (a folder with AnomalyCLIP_lib/, mrad.py, models/)."""
    checkout = Path(checkout).expanduser().resolve()
    if not (checkout / "AnomalyCLIP_lib").is_dir() or not (checkout / "mrad.py").is_file():
        raise FileNotFoundError(
            f"{checkout} is not a checkout of github.com/CROVO1026/MRAD (no AnomalyCLIP_lib/ or mrad.py); "
            "clone it there or pass --official PATH."
        )
    import packaging.version

    _stand_in("pkg_resources", packaging=packaging)
    _stand_in("torchvision")
    _stand_in(
        "torchvision.transforms",
        **{name: None for name in ("Compose", "Resize", "ToTensor", "Normalize", "CenterCrop", "InterpolationMode")},
    )
    _stand_in("thop", profile=None)
    _stand_in("ftfy", fix_text=lambda text: text)  # text cleaning for its tokenizer; MRAD-TF encodes no text
    sys.path.insert(0, str(checkout))
    try:
        anomaly_clip_lib = importlib.import_module("AnomalyCLIP_lib")
        anomaly_clip = importlib.import_module("AnomalyCLIP_lib.AnomalyCLIP")
        mrad = importlib.import_module("mrad")
        mlp = importlib.import_module("models.mlp")
    finally:
        sys.path.remove(str(checkout))
    import subprocess

    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return types.SimpleNamespace(
        lib=anomaly_clip_lib,
        AnomalyCLIP=anomaly_clip.AnomalyCLIP,
        compute_socre=mrad.compute_socre,
        compute_patch_socre=mrad.compute_patch_socre,
        average_neighbor=mlp.average_neighbor,
        path=str(checkout),
        commit=commit,
    )


def official_and_ours(checkout: str | Path, seed: int = 0, image_size: int = 518):
    """(official namespace, official AnomalyCLIP model with DPAM on blocks 2-24, our MRAD-TF model): same weights."""
    from mrad_hf import MRADForAnomalyDetection
    from mrad_hf.conversion.convert_openai_clip import convert_openai_state_dict

    official = load_official(checkout)
    torch.manual_seed(seed)
    model = official.AnomalyCLIP(**VIT_L14_336, design_details=DESIGN_DETAILS).float().eval()
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    clip = convert_openai_state_dict(state)
    ours = MRADForAnomalyDetection.from_clip(clip, image_size=image_size).eval()
    model.visual.DAPM_replace(DPAM_layer=24)
    return official, model, ours


@torch.no_grad()
def official_mrad_tf(
    official, model, image: torch.Tensor, bank: tuple, image_size: int = 518, k: float = 0.7, sigma: float = 4.0
):
    """The official test.py MRAD-TF path for one (1, 3, S, S) image: (anomaly map (S, S), score)."""
    from scipy.ndimage import gaussian_filter

    cache_key, cache_value, cache_keys_patch, cache_values_patch = bank
    device = image.device
    image_features, patch_features, _, patch_projections = model.encode_image(image, FEATURES_LIST, DPAM_layer=24)
    patch_projection = official.average_neighbor(patch_projections[3])
    patch_projection = patch_projection / patch_projection.norm(dim=-1, keepdim=True)
    patch_f_bia = official.average_neighbor(patch_features[3])
    patch_f_bia = patch_f_bia / patch_f_bia.norm(dim=-1, keepdim=True)
    seg_logit, _, _, _ = official.compute_patch_socre(
        patch_f_bia,
        cache_keys_patch,
        cache_values_patch,
        device=device,
        proj=None,
        need_mask=False,
        patch_projection=patch_projection,
        gt_mask=None,
        is_mradft=True,
        use_proj=False,
    )
    seg_similarity_map = official.lib.get_similarity_map(seg_logit, image_size)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    cache_logits, _ = official.compute_socre(image_features, cache_key, cache_value, device, proj=None, use_proj=False)
    text_probs = cache_logits[:, 1]
    anomaly_map = torch.stack([seg_similarity_map[..., 1]])
    anomaly_map = torch.stack(
        [torch.from_numpy(gaussian_filter(i, sigma=sigma)) for i in anomaly_map.detach().cpu()], dim=0
    )
    anomaly_map = anomaly_map.sum(dim=0)
    map_flat = anomaly_map.flatten()
    topk_values, _ = torch.topk(map_flat, int(map_flat.shape[0] * 0.01))
    score = (1 - k) * topk_values.mean() + k * text_probs
    return anomaly_map[0], score
