# SPDX-License-Identifier: Apache-2.0
"""`mrad serve`: a small Gradio app to drop an image and see its score, heatmap, decision and explanation.

Gradio is an optional extra (`pip install "mrad-hf[app]"`); without it `build_app` raises an ImportError
that says how to install it. Everything the app shows comes from `analyse`, a plain function over the
anomaly-detection pipeline (so the app's score is the pipeline's score), which works without Gradio.

The app exposes one API endpoint, `/predict` (image file in; score, decision text, heatmap overlay,
explanation panel and a JSON of details out), so it can be scripted with `gradio_client`:

    from gradio_client import Client, handle_file
    score, decision, overlay, panel, details = Client("http://127.0.0.1:7860/").predict(handle_file("part.png"), api_name="/predict")
"""

from __future__ import annotations

import os
from typing import Any

from .explain import DEFAULT_TOP_K, render_explanation
from .visualization import overlay_heatmap

__all__ = ["analyse", "build_app", "detector_for", "import_gradio"]


def import_gradio():
    """Import gradio, or raise an ImportError that says how to install it."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError(
            "The demo app needs Gradio, an optional dependency: pip install \"mrad-hf[app]\" (or pip install gradio). "
            "Everything else (mrad predict, mrad explain) works without it."
        ) from error
    return gradio


def detector_for(model):
    """The anomaly-detection pipeline over `model`, with the model's own image processor."""
    from transformers import pipeline

    from ..models.mrad.image_processing_mrad import MRADImageProcessor

    return pipeline("anomaly-detection", model=model, image_processor=MRADImageProcessor.from_config(model.config), device=model.device)


def _decision_text(result: dict[str, Any]) -> str:
    thresholds = result.get("thresholds")
    if thresholds is None:
        return "no decision: the model is not calibrated (run `mrad calibrate`, or start the app with --threshold)"
    verdict = "ANOMALOUS" if result["is_anomalous"] else "normal"
    share = float(result["mask"].mean()) * 100
    return f"{verdict}  (score {result['score']:.4f} vs threshold {thresholds['image']:.4f} from {thresholds['from']}; {share:.1f} % of pixels flagged)"


def analyse(detector, image: Any, *, top_k: int = DEFAULT_TOP_K, threshold: float | None = None) -> tuple[float, str, Any, Any, dict[str, Any]]:
    """Score one image with the pipeline: (score, decision text, heatmap overlay, explanation panel, details).

    `image` is a path, PIL image or array, as the pipeline takes it. Details: score, decision fields and the
    explanation (top-k memory entries with provenance and similarity).
    """
    if image is None:
        raise ValueError("No image: drop an image file onto the input first.")
    loaded = detector.image_processor.load(image)
    result = detector(loaded, explain=True, top_k=top_k, threshold=threshold)
    overlay = overlay_heatmap(loaded, result["anomaly_map"])
    panel = render_explanation(loaded, result["anomaly_map"], result["explanation"])
    details = {"score": result["score"], "explanation": result["explanation"]}
    if "thresholds" in result:
        details.update(is_anomalous=bool(result["is_anomalous"]), label=result["label"], thresholds=result["thresholds"])
    return result["score"], _decision_text(result), overlay, panel, details


def build_app(model, *, top_k: int = DEFAULT_TOP_K, threshold: float | None = None, title: str = "MRAD anomaly detection"):
    """A `gradio.Blocks` app over `model` (an `MRADForAnomalyDetection` with a memory bank)."""
    gr = import_gradio()
    detector = detector_for(model)
    metadata = model.memory_bank_metadata or {}
    description = (
        f"Memory bank: {model.config.image_bank_size} image / {model.config.patch_bank_size} region entries from "
        f"{metadata.get('source') or 'unknown'}. Drop an image: its score, heatmap, decision and the memory entries behind them."
    )

    def predict(image_path):
        return analyse(detector, image_path, top_k=top_k, threshold=threshold)

    return gr.Interface(
        fn=predict,
        inputs=gr.Image(type="filepath", label="image"),
        outputs=[
            gr.Number(label="anomaly score"),
            gr.Textbox(label="decision"),
            gr.Image(type="pil", label="heatmap overlay"),
            gr.Image(type="pil", label="explanation: nearest memory entries"),
            gr.JSON(label="details"),
        ],
        title=title,
        description=description,
        flagging_mode="never",
        api_name="predict",
        analytics_enabled=False,
    )


def serve(model, *, host: str = "127.0.0.1", port: int | None = None, top_k: int = DEFAULT_TOP_K, threshold: float | None = None, block: bool = True):
    """Build and launch the app; returns the launched app (call `.close()` to stop it when `block=False`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(model, top_k=top_k, threshold=threshold)
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=not block)
    return app
