# SPDX-License-Identifier: Apache-2.0
"""`mrad serve`: a small Gradio app to drop an image and see its score, heatmap, decision and explanation.

Gradio is an optional extra (`pip install "mrad-hf[app]"`); without it `build_app` raises an ImportError
that says how to install it. Everything the app shows comes from `analyse`, a plain function over the
anomaly-detection pipeline (so the app's score is the pipeline's score), which works without Gradio.

The app exposes one API endpoint, `/predict` (image file in; score, decision text, heatmap overlay,
explanation panel and a JSON of details out), so it can be scripted with `gradio_client`:

    from gradio_client import Client, handle_file
    score, decision, overlay, panel, details = Client("http://127.0.0.1:7860/").predict(handle_file("part.png"), api_name="/predict")

What a client can reach is bounded (issue 13 §2, §5): uploads are capped (`max_upload_mb`, default 50 MB, checked by
Gradio at upload and again before decoding), thumbnails of memory entries come only from the `image_root` the
operator names (never from paths a bank records), the JSON names no server path (`public_explanation`), uploads
and rendered images live in the app's own temporary folder, removed when the app closes, and a failure is shown to
the user as its one-line message (`gradio.Error`), not as Gradio's generic "Error".
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

from .explain import DEFAULT_TOP_K, public_explanation, render_explanation
from .visualization import overlay_heatmap

__all__ = ["DEFAULT_MAX_UPLOAD_MB", "analyse", "build_app", "detector_for", "import_gradio"]

#: Largest upload the app accepts, in megabytes.
DEFAULT_MAX_UPLOAD_MB = 50.0


def import_gradio():
    """Import gradio, or raise an ImportError that says how to install it."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError(
            'The demo app needs Gradio, an optional dependency: pip install "mrad-hf[app]" (or pip install gradio). '
            "Everything else (mrad predict, mrad explain) works without it."
        ) from error
    return gradio


def detector_for(model):
    """The anomaly-detection pipeline over `model`, with the model's own image processor."""
    from transformers import pipeline

    from ..models.mrad.image_processing_mrad import MRADImageProcessor

    return pipeline(
        "anomaly-detection",
        model=model,
        image_processor=MRADImageProcessor.from_config(model.config),
        device=model.device,
    )


def _decision_text(result: dict[str, Any]) -> str:
    thresholds = result.get("thresholds")
    if thresholds is None:
        return "no decision: the model is not calibrated (run `mrad calibrate`, or start the app with --threshold)"
    verdict = "ANOMALOUS" if result["is_anomalous"] else "normal"
    share = float(result["mask"].mean()) * 100
    return f"{verdict}  (score {result['score']:.4f} vs threshold {thresholds['image']:.4f} from {thresholds['from']}; {share:.1f} % of pixels flagged)"


def analyse(
    detector,
    image: Any,
    *,
    top_k: int = DEFAULT_TOP_K,
    threshold: float | None = None,
    image_root: str | os.PathLike | None = None,
    max_upload_mb: float | None = None,
) -> tuple[float, str, Any, Any, dict[str, Any]]:
    """Score one image with the pipeline: (score, decision text, heatmap overlay, explanation panel, details).

    `image` is a path, PIL image or array, as the pipeline takes it. Details: score, decision fields and the
    explanation (top-k memory entries with provenance and similarity, no server paths). Thumbnails of the memory
    entries are read only from `image_root`; a path `image` larger than `max_upload_mb` is refused before decoding.
    """
    if image is None:
        raise ValueError("No image: drop an image file onto the input first.")
    if max_upload_mb is not None and isinstance(image, (str, os.PathLike)) and os.path.isfile(image):
        size = os.path.getsize(image)
        if size > max_upload_mb * 1e6:
            raise ValueError(
                f"The upload is {size / 1e6:.1f} MB; this app accepts images up to {max_upload_mb:g} MB. Downscale or compress it."
            )
    loaded = detector.image_processor.load(image)
    result = detector(loaded, explain=True, top_k=top_k, threshold=threshold)
    overlay = overlay_heatmap(loaded, result["anomaly_map"])
    notes: list[str] = []
    panel = render_explanation(
        loaded, result["anomaly_map"], result["explanation"], image_root=image_root, notes=notes
    )
    details = {"score": result["score"], "explanation": public_explanation(result["explanation"])}
    if notes:
        details["thumbnail_notes"] = [note.split("': ", 1)[-1] for note in notes]  # the reasons, without the ids
    if "thresholds" in result:
        details.update(
            is_anomalous=bool(result["is_anomalous"]), label=result["label"], thresholds=result["thresholds"]
        )
    return result["score"], _decision_text(result), overlay, panel, details


def build_app(
    model,
    *,
    top_k: int = DEFAULT_TOP_K,
    threshold: float | None = None,
    title: str = "MRAD anomaly detection",
    image_root: str | os.PathLike | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
):
    """A `gradio.Blocks` app over `model` (an `MRADForAnomalyDetection` with a memory bank).

    `app.launch_options` holds the `launch` arguments that enforce the upload cap; `app.temp_dir` is the app's own
    temporary folder (uploads, rendered images), removed by `app.close()` or at exit.
    """
    gr = import_gradio()
    temp_dir = tempfile.mkdtemp(prefix="mrad-serve-")
    os.environ["GRADIO_TEMP_DIR"] = temp_dir  # Gradio reads it for every upload and cached output
    detector = detector_for(model)
    metadata = model.memory_bank_metadata or {}
    description = (
        f"Memory bank: {model.config.image_bank_size} image / {model.config.patch_bank_size} region entries from "
        f"{metadata.get('source') or 'unknown'}. Drop an image: its score, heatmap, decision and the memory entries behind them."
    )

    def predict(image_path):
        try:
            return analyse(
                detector,
                image_path,
                top_k=top_k,
                threshold=threshold,
                image_root=image_root,
                max_upload_mb=max_upload_mb,
            )
        except Exception as error:  # show the user the real reason in one line, not Gradio's generic "Error"
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            if image_path:  # name the user's file, not where the server stored the upload
                message = message.replace(str(image_path), os.path.basename(str(image_path))).replace(
                    temp_dir, "<upload>"
                )
            raise gr.Error(message, print_exception=False) from error

    app = gr.Interface(
        fn=predict,
        # a file input, so that MRAD's decoder (not the component) reads the upload and its message reaches the user
        inputs=gr.File(file_types=["image"], type="filepath", label="image"),
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
        delete_cache=(600, 3600),  # Gradio's own sweep of cached outputs older than an hour, every 10 minutes
    )
    app.temp_dir = temp_dir
    app.launch_options = {"max_file_size": max(1, int(max_upload_mb * 1e6))}  # bytes
    close = app.close

    def close_and_clean(*args, **kwargs):
        try:
            return close(*args, **kwargs)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)

    app.close = close_and_clean
    atexit.register(shutil.rmtree, temp_dir, True)
    return app


def serve(
    model,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    top_k: int = DEFAULT_TOP_K,
    threshold: float | None = None,
    block: bool = True,
    image_root: str | os.PathLike | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
):
    """Build and launch the app; returns the launched app (call `.close()` to stop it when `block=False`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(model, top_k=top_k, threshold=threshold, image_root=image_root, max_upload_mb=max_upload_mb)
    try:
        app.launch(
            server_name=host,
            server_port=port,
            share=False,
            prevent_thread_lock=not block,
            quiet=not block,
            **app.launch_options,
        )
    finally:
        if block:
            app.close()
    return app
