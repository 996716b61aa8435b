# SPDX-License-Identifier: Apache-2.0
"""Explanations: the listed entries are the true top-k by the similarity the score uses, with provenance; the panel."""

import numpy as np
import pytest
import torch
from conftest import make_samples
from PIL import Image
from transformers import pipeline

from mrad_hf import MRADImageProcessor
from mrad_hf.memory import build_memory_bank
from mrad_hf.memory.tools import image_ids, provenance
from mrad_hf.tools.explain import explain_images, render_explanation, resolve_thumbnail, save_explanation


@pytest.fixture
def queries(model_with_bank):
    images = [s["image"] for s in make_samples(3, seed=31)]
    return MRADImageProcessor.from_config(model_with_bank.config)(images)["pixel_values"]


def test_entries_are_the_true_top_k_by_the_scoring_similarity(model_with_bank, queries):
    model, top_k = model_with_bank, 4
    explanations = explain_images(model, queries, top_k=top_k)
    with torch.no_grad():
        outputs = model(pixel_values=queries)
        image_queries, patch_queries = model.retrieval_queries(model.extract_features(queries))
        image_logits = model.retrieval_logits("image", image_queries)
    # these logits are the score's: their softmax over the memory values is the model's image probability
    torch.testing.assert_close(
        torch.softmax(image_logits, -1) @ model.memory.image_values, outputs.image_probabilities
    )
    bank = model.get_memory_bank()
    for b, explanation in enumerate(explanations):
        order = torch.argsort(image_logits[b], descending=True)[:top_k].tolist()
        neighbours = explanation["image"]["neighbours"]
        assert [n["index"] for n in neighbours] == order
        assert [n["similarity"] for n in neighbours] == pytest.approx(image_logits[b, order].tolist(), abs=1e-6)
        weights = torch.softmax(image_logits[b], -1)[order]
        assert [n["weight"] for n in neighbours] == pytest.approx(weights.tolist(), abs=1e-6)
        assert all(n["image_id"] == image_ids(bank)[n["index"]] and n["source"] == "unit-test" for n in neighbours)
        # the region: the patch with the highest anomaly probability, and its own top-k prototypes
        region = explanation["region"]
        patch = int(outputs.patch_probabilities[b, :, 1].argmax())
        assert region["patch_index"] == patch and divmod(patch, region["grid_size"]) == (region["row"], region["col"])
        assert region["p_anomaly"] == pytest.approx(float(outputs.patch_probabilities[b, patch, 1]))
        patch_logits = model.retrieval_logits("patch", patch_queries[b, patch])
        order = torch.argsort(patch_logits, descending=True)[:top_k].tolist()
        assert [n["index"] for n in region["neighbours"]] == order
        assert [n for n in region["neighbours"]] == [
            {
                **provenance(bank, "patch", i),
                "rank": r + 1,
                "similarity": pytest.approx(float(patch_logits[i]), abs=1e-6),
                "weight": pytest.approx(float(torch.softmax(patch_logits, -1)[i]), abs=1e-6),
            }
            for r, i in enumerate(order)
        ]
        assert explanation["score"] == pytest.approx(float(outputs.anomaly_score[b]))


def test_pipeline_explain_batched_equals_single(model_with_bank):
    detect = pipeline(
        "anomaly-detection",
        model=model_with_bank,
        image_processor=MRADImageProcessor.from_config(model_with_bank.config),
        device="cpu",
    )
    images = [s["image"] for s in make_samples(3, seed=32)]
    singles = [detect(image, explain=True, top_k=2)["explanation"] for image in images]
    batched = [r["explanation"] for r in detect(images, explain=True, top_k=2, batch_size=2)]
    for one, many in zip(singles, batched):  # batching changes float rounding only
        for level in ("image", "region"):
            assert [n["index"] for n in many[level]["neighbours"]] == [n["index"] for n in one[level]["neighbours"]]
            assert [n["similarity"] for n in many[level]["neighbours"]] == pytest.approx(
                [n["similarity"] for n in one[level]["neighbours"]], abs=1e-5
            )
    assert [e["region"]["patch_index"] for e in batched] == [e["region"]["patch_index"] for e in singles]
    assert len(singles[0]["image"]["neighbours"]) == 2
    assert "explanation" not in detect(images[0])
    with pytest.raises(ValueError, match="top_k is the number of memory entries"):
        detect(images[0], explain=True, top_k=0)


def test_panel_shows_source_thumbnails_and_placeholders(tiny_model, tmp_path):
    rows = make_samples(4, seed=33)
    for index, row in enumerate(
        rows[:2]
    ):  # the first two entries come from files under the root, the others have no file
        row["id"] = f"aux{index}.png"
        Image.fromarray(row["image"]).save(tmp_path / row["id"])
    build_memory_bank(tiny_model, rows, source="files", progress=False)
    query = MRADImageProcessor.from_config(tiny_model.config)(rows[0]["image"])["pixel_values"]
    explanation = explain_images(tiny_model, query, top_k=4)[0]
    tile, gap, strip = 96, 4, 18
    anomaly_map = np.linspace(0, 1, 50 * 60, dtype=np.float32).reshape(50, 60)
    path = save_explanation(
        tmp_path / "panel.png",
        Image.fromarray(rows[0]["image"]),
        anomaly_map,
        explanation,
        tile=tile,
        image_root=tmp_path,
    )
    panel = np.asarray(Image.open(path).convert("RGB"))
    assert panel.shape[1] == 4 * (tile + gap) + gap
    top = strip + strip + tile + strip  # header, row-1 label, query tiles, row-2 label
    for rank, entry in enumerate(explanation["image"]["neighbours"]):
        left = gap + rank * (tile + gap)
        inside = panel[top + 10 : top + tile - 10, left + 10 : left + tile - 10].astype(int)
        if entry["image_index"] < 2:
            expected = np.asarray(
                Image.fromarray(rows[entry["image_index"]]["image"]).resize((tile, tile), Image.Resampling.BILINEAR)
            )
            assert np.abs(inside - expected[10:-10, 10:-10].astype(int)).max() <= 1
        else:  # placeholder: flat grey except its caption text
            assert (np.all(inside == 225, axis=-1)).mean() > 0.8
    assert (
        render_explanation(Image.fromarray(rows[1]["image"]), anomaly_map, explanation).size[0]
        == 4 * (160 + gap) + gap
    )


# ---------------------------------------------------------------- thumbnails come only from the image root (issue 13 §2)
def _png_declaring(path, width: int, height: int) -> None:
    """A small PNG whose header claims width x height (what a 20000 x 20000 PNG looks like before decoding)."""
    import struct
    import zlib

    Image.new("RGB", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _tile(panel: np.ndarray, rank: int, tile: int) -> np.ndarray:
    gap, strip = 4, 18
    top, left = strip + strip + tile + strip, gap + rank * (tile + gap)
    return panel[top + 10 : top + tile - 10, left + 10 : left + tile - 10].astype(int)


def test_thumbnails_are_read_only_inside_the_image_root(tiny_model, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "private"
    root.mkdir(), outside.mkdir()
    rows = make_samples(6, seed=34)
    Image.fromarray(rows[0]["image"]).save(root / "good.png")
    Image.fromarray(rows[1]["image"]).save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "folder.png").mkdir()
    ids = ["good.png", str(outside / "secret.png"), "../private/secret.png", "link.png", "folder.png", "missing.png"]
    build_memory_bank(tiny_model, rows, source="files", progress=False)
    # banks built here never store absolute ids; a bank from elsewhere (or an edited one) may: put them in by hand
    bank = tiny_model.get_memory_bank()
    bank.metadata["image_ids"] = ids
    tiny_model.set_memory_bank(bank)
    query = MRADImageProcessor.from_config(tiny_model.config)(rows[0]["image"])["pixel_values"]
    explanation = explain_images(tiny_model, query, top_k=6)[0]
    tile, notes = 96, []
    panel = np.asarray(
        render_explanation(
            Image.fromarray(rows[0]["image"]),
            np.zeros((8, 8), np.float32),
            explanation,
            tile=tile,
            image_root=root,
            notes=notes,
        )
    )
    reasons = {}
    for rank, entry in enumerate(explanation["image"]["neighbours"]):
        inside = _tile(panel, rank, tile)
        if entry["image_id"] == "good.png":
            expected = np.asarray(Image.fromarray(rows[0]["image"]).resize((tile, tile), Image.Resampling.BILINEAR))
            assert np.abs(inside - expected[10:-10, 10:-10].astype(int)).max() <= 1
        else:
            assert np.all(inside == 225, axis=-1).mean() > 0.8  # a placeholder, never the private image
            reasons[entry["image_id"]] = next(
                note for note in notes if note.startswith(f"thumbnail of '{entry['image_id']}'")
            )
    assert reasons[str(outside / "secret.png")].endswith("absolute image id, not read")
    assert reasons["../private/secret.png"].endswith("image id leaves the image root")
    assert reasons["link.png"].endswith("image id leaves the image root (symlink)")
    assert reasons["folder.png"].endswith("not a regular file")
    assert reasons["missing.png"].endswith("file not found under the image root")
    # without a root nothing is read at all, not even the good file
    panel = np.asarray(
        render_explanation(Image.fromarray(rows[0]["image"]), np.zeros((8, 8), np.float32), explanation, tile=tile)
    )
    good = [rank for rank, e in enumerate(explanation["image"]["neighbours"]) if e["image_id"] == "good.png"][0]
    assert np.all(_tile(panel, good, tile) == 225, axis=-1).mean() > 0.8


def _save_panel(folder, image, explanation, notes):
    """The panel of one explanation with thumbnails read from `folder` (`notes` collects the placeholder reasons)."""
    save_explanation(
        folder / "panel.png",
        Image.fromarray(image),
        np.zeros((8, 8), np.float32),
        explanation,
        tile=96,
        image_root=folder,
        notes=notes,
    )


def test_unusable_image_ids_are_placeholders_and_the_run_goes_on(tiny_model, tmp_path):
    """Ids the system refuses (a NUL byte, a name over the 255-byte limit, in characters or in UTF-8 bytes) are
    placeholder tiles with a note: resolving them never raises, and the panel is written."""
    rows = make_samples(4, seed=36)
    Image.fromarray(rows[0]["image"]).save(tmp_path / "good.png")
    ids = ["good.png", "bad\0id.png", "x" * 300 + ".png", "\u00e9" * 200 + ".png"]  # the last: 400 bytes
    build_memory_bank(tiny_model, rows, source="files", progress=False)
    bank = tiny_model.get_memory_bank()
    bank.metadata["image_ids"] = ids
    tiny_model.set_memory_bank(bank)
    assert resolve_thumbnail(ids[1], tmp_path) == (None, "unusable image id")
    assert resolve_thumbnail(ids[2], tmp_path) == (None, "unusable image id (File name too long)")
    assert resolve_thumbnail(ids[3], tmp_path) == (None, "unusable image id (File name too long)")
    assert resolve_thumbnail("good.png", tmp_path) == ((tmp_path / "good.png").resolve(), None)
    query = MRADImageProcessor.from_config(tiny_model.config)(rows[0]["image"])["pixel_values"]
    explanation = explain_images(tiny_model, query, top_k=4)[0]
    notes = []
    _save_panel(tmp_path, rows[0]["image"], explanation, notes)
    assert (tmp_path / "panel.png").is_file()
    assert {note.split("': ", 1)[1] for note in notes} == {
        "unusable image id",
        "unusable image id (File name too long)",
    }


def test_bad_thumbnails_are_placeholders_and_the_run_goes_on(tiny_model, tmp_path, monkeypatch):
    import mrad_hf.tools.explain as explain

    rows = make_samples(5, seed=35)
    _png_declaring(tmp_path / "huge.png", 20000, 20000)
    _png_declaring(tmp_path / "large.png", 12000, 12000)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    Image.new("RGB", (2000, 2000), (10, 200, 30)).save(tmp_path / "big.png")
    Image.new("RGB", (2000, 2000), (200, 10, 30)).save(tmp_path / "big.jpg", quality=90)
    for row, image_id in zip(rows, ["huge.png", "corrupt.png", "big.png", "big.jpg", "large.png"]):
        row["id"] = image_id
    build_memory_bank(tiny_model, rows, source="files", progress=False)
    query = MRADImageProcessor.from_config(tiny_model.config)(rows[0]["image"])["pixel_values"]
    explanation = explain_images(tiny_model, query, top_k=5)[0]
    decoded_sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(
        Image.Image,
        "resize",
        lambda self, size, *a, **k: decoded_sizes.append(self.size) or resize(self, size, *a, **k),
    )
    notes = []
    _save_panel(tmp_path, rows[0]["image"], explanation, notes)
    assert (tmp_path / "panel.png").is_file()
    assert (
        "thumbnail of 'huge.png': unreadable (ValueError: too large for a thumbnail (over PIL's decompression-bomb"
        in "".join(notes)
    )
    assert str(tmp_path) not in "".join(notes)  # the notes name the id, never the server path
    assert any(
        n.startswith("thumbnail of 'large.png': unreadable") and "12000x12000 px is too large for a thumbnail" in n
        for n in notes
    )
    assert any(n.startswith("thumbnail of 'corrupt.png': unreadable (") for n in notes)
    assert (
        len(set(notes)) == 3
    )  # (region rows repeat them) the two big files were drawn, from a reduced decode (draft for JPEG, reduce for PNG)
    assert (
        max(max(size) for size in decoded_sizes if size != (8, 8)) <= 2 * 160
        and explain.THUMBNAIL_MAX_PIXELS < 20000 * 20000
    )


def test_public_explanation_names_no_server_path(model_with_bank):
    explanation = {
        "image": {
            "neighbours": [{"image_id": "/srv/private/part.png", "index": 0}, {"image_id": "good/001.png", "index": 1}]
        },
        "region": {"neighbours": [{"image_id": "C:\\data\\x.png", "index": 2}]},
    }
    from mrad_hf.tools.explain import public_explanation

    public = public_explanation(explanation)
    assert [n["image_id"] for n in public["image"]["neighbours"]] == ["part.png", "good/001.png"]
    assert public["region"]["neighbours"][0] == {"image_id": "x.png", "index": 2, "image_id_redacted": True}
    assert explanation["image"]["neighbours"][0]["image_id"] == "/srv/private/part.png"  # the input is not modified
