# SPDX-License-Identifier: Apache-2.0
"""Hugging Face Inference Endpoints custom handler for an MRAD anomaly-detection model repo (paper Sec. 3.3).

`mrad_hf.hub.push_model` writes this file as `handler.py` into every model repo it pushes; Inference Endpoints
(and any server that follows the same convention) instantiate `EndpointHandler(path)` once and call it per request.
It needs no `mrad_hf`: where it is not installed, the model, its processor and its code come from the repo itself
(`trust_remote_code=True`, which is what a repo's own endpoint runs); where it is installed, its registered classes
are used and no code from the folder runs. This file imports only the standard library, numpy, Pillow, torch and
transformers (and `mrad_hf` when present).

Request (JSON, or a raw image body, which the Inference Toolkit hands over as a PIL image in `inputs`):

    {"inputs": "<base64 image> | data:image/png;base64,... | https://.../part.png",
     "parameters": {"threshold": 0.5, "pixel_threshold": 0.5}}        # parameters optional

`inputs` may also be raw `bytes`, a `PIL.Image.Image`, a numpy array, or a list of any of these (one response
each, in order). Local file paths are refused (a request must not choose which server files are read).

Response (per image):

    {"score": 0.63, "label": "anomaly", "is_anomalous": true,
     "threshold": {"image": 0.5, "pixel": 0.5, "from": "parameters" | "calibration"},
     "anomaly_map": "<base64 PNG>", "anomaly_map_format": "png-gray16:value=pixel/65535", "width": W, "height": H,
     "mask": "<base64 PNG, 0/255>"}

`label`, `is_anomalous`, `threshold` and `mask` appear only when a threshold is known: `parameters.threshold`, else
the model's calibration (`calibration.json` next to the weights, else `config.calibration`, as `mrad calibrate`
writes it). The map is the model's smoothed anomaly map resized bilinearly to the input image's size and stored as a
16-bit grayscale PNG of `round(clip(map, 0, 1) * 65535)` (MRAD's maps are probabilities in [0, 1]).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import urllib.request
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

__all__ = ["EndpointHandler", "MAP_FORMAT"]

MAP_FORMAT = "png-gray16:value=pixel/65535"
_URL_TIMEOUT_S = float(os.environ.get("MRAD_HANDLER_URL_TIMEOUT", "10"))
_MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024


def _mrad_hf_installed() -> bool:
    """With mrad_hf importable its classes are registered with transformers and no code from the repo is needed."""
    try:
        import mrad_hf  # noqa: F401  (registers MRAD with AutoModel / AutoImageProcessor)
    except ImportError:
        return False
    return True


class EndpointHandler:
    """`EndpointHandler(path)(data) -> list[dict]`: one response per image (see the module docstring)."""

    def __init__(self, path: str = ""):
        folder = path or os.path.dirname(os.path.abspath(__file__))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        run_folder_code = not _mrad_hf_installed()
        self.model = AutoModel.from_pretrained(folder, trust_remote_code=run_folder_code).to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=run_folder_code)
        self.calibration = _calibration(folder, self.model.config)

    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError(
                'The request must be a JSON object with "inputs" (an image as base64, a data URI or a URL).'
            )
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(
                f'"parameters" must be an object such as {{"threshold": 0.5}}, got {type(parameters).__name__}.'
            )
        unknown = sorted(set(parameters) - {"threshold", "pixel_threshold"})
        if unknown:
            raise ValueError(f"Unknown parameters {unknown}; this handler takes 'threshold' and 'pixel_threshold'.")
        inputs = data["inputs"]
        images = [decode_image(item) for item in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
        thresholds = self._thresholds(parameters)
        return [self._score(image, thresholds) for image in images]

    def _thresholds(self, parameters: dict[str, Any]) -> dict[str, Any] | None:
        if parameters.get("threshold") is not None:
            image = float(parameters["threshold"])
            pixel = float(parameters["pixel_threshold"]) if parameters.get("pixel_threshold") is not None else image
            return {"image": image, "pixel": pixel, "from": "parameters"}
        if self.calibration is not None:
            return {
                "image": float(self.calibration["image_threshold"]),
                "pixel": float(self.calibration.get("pixel_threshold", self.calibration["image_threshold"])),
                "from": "calibration",
            }
        return None

    @torch.no_grad()
    def _score(self, image: Image.Image, thresholds: dict[str, Any] | None) -> dict[str, Any]:
        width, height = image.size
        pixel_values = self.processor(image, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
        outputs = self.model(pixel_values=pixel_values)
        score = float(outputs.anomaly_score.reshape(-1)[0])
        anomaly_map = outputs.anomaly_map.float().reshape(1, 1, *outputs.anomaly_map.shape[-2:])
        if anomaly_map.shape[-2:] != (height, width):
            anomaly_map = F.interpolate(anomaly_map, size=(height, width), mode="bilinear", align_corners=False)
        anomaly_map = anomaly_map[0, 0].cpu().numpy()
        response: dict[str, Any] = {
            "score": score,
            "anomaly_map": encode_map(anomaly_map),
            "anomaly_map_format": MAP_FORMAT,
            "width": width,
            "height": height,
        }
        if thresholds is not None:
            response["is_anomalous"] = score > thresholds["image"]
            response["label"] = "anomaly" if response["is_anomalous"] else "normal"
            response["threshold"] = thresholds
            response["mask"] = _png(((anomaly_map > thresholds["pixel"]) * 255).astype(np.uint8))
        return response


def decode_image(item: Any) -> Image.Image:
    """An RGB PIL image from a PIL image, numpy array, raw bytes, a base64 string, a data URI or an http(s) URL."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        array = item if item.dtype == np.uint8 else np.clip(item, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if isinstance(item, str):
        text = item.strip()
        if text.startswith(("http://", "https://")):
            item = _download(text)
        else:
            if text.startswith("data:"):
                text = text.partition(",")[2]
            try:
                item = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(
                    "inputs is a string but neither an http(s) URL nor valid base64 image data (local file paths are not "
                    "accepted); send the image bytes base64-encoded, as a data URI, or as a URL."
                ) from None
    if isinstance(item, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(item))) as image:
                image.load()
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(
                f"inputs could not be decoded as an image ({error}); send a PNG, JPEG, BMP, TIFF or WebP file."
            ) from None
    raise ValueError(
        f"inputs of type {type(item).__name__} is not an image; send base64 image bytes, a data URI or a URL."
    )


def encode_map(anomaly_map: np.ndarray) -> str:
    """The map as a base64 16-bit grayscale PNG: pixel = round(clip(map, 0, 1) * 65535)."""
    return _png(np.rint(np.clip(anomaly_map, 0.0, 1.0) * 65535.0).astype(np.uint16))


def decode_map(encoded: str) -> np.ndarray:
    """Inverse of `encode_map` (float32 in [0, 1], quantised to 1/65535): for clients and tests."""
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
        return np.asarray(image, dtype=np.float32) / 65535.0


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _download(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mrad-endpoint-handler"})
    try:
        with urllib.request.urlopen(request, timeout=_URL_TIMEOUT_S) as response:  # noqa: S310 (http(s) only, checked above)
            data = response.read(_MAX_DOWNLOAD_BYTES + 1)
    except OSError as error:
        raise ValueError(
            f"Could not download the image at {url} ({error}); send the image bytes base64-encoded instead."
        ) from None
    if len(data) > _MAX_DOWNLOAD_BYTES:
        raise ValueError(
            f"The image at {url} is larger than {_MAX_DOWNLOAD_BYTES // 2**20} MiB; send a smaller image."
        )
    return data


def _calibration(folder: str, config) -> dict[str, Any] | None:
    """Thresholds written by `mrad calibrate`: `calibration.json` next to the weights, else `config.calibration`."""
    path = os.path.join(folder, "calibration.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            calibration = json.load(handle)
    else:
        calibration = getattr(config, "calibration", None) or (
            getattr(config, "memory_bank_metadata", None) or {}
        ).get("calibration")
    return calibration if isinstance(calibration, dict) and "image_threshold" in calibration else None
