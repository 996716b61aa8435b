# SPDX-License-Identifier: Apache-2.0
"""Living banks: provenance per entry, add without training, merge with checks, de-duplication rule, remove by source."""

import pytest
import torch
from conftest import make_samples, make_tiny_model

from mrad_hf.memory import build_memory_bank, load_bank, save_bank
from mrad_hf.memory.tools import (
    add_samples,
    bank_info,
    deduplicate,
    image_ids,
    image_sources,
    merge_banks,
    provenance,
    remove_sources,
    select_entries,
)
from mrad_hf.models.mrad.memory_bank_mrad import MemoryBank, MemoryBankError
from mrad_hf.models.mrad.retrieval_mrad import one_hot_labels


@pytest.fixture
def base_bank(tiny_model, samples):
    return build_memory_bank(tiny_model, samples, batch_size=4, source="public", progress=False, attach=False)


def test_provenance_of_every_entry(base_bank, samples):
    # make_samples: odd images are anomalous with a mask -> image entry + anomalous + normal region; even ones: image + normal region
    assert image_sources(base_bank) == ["public"] * 6
    assert image_ids(base_bank) == [s["id"] for s in samples]
    assert provenance(base_bank, "image", 3) == {
        "level": "image",
        "index": 3,
        "kind": "image",
        "label": 1,
        "source": "public",
        "image_id": "img3",
        "image_index": 3,
    }
    kinds = [provenance(base_bank, "patch", j)["kind"] for j in range(len(base_bank.patch_keys))]
    ids = [provenance(base_bank, "patch", j)["image_id"] for j in range(len(base_bank.patch_keys))]
    assert kinds == [
        "normal region",
        "anomalous region",
        "normal region",
        "normal region",
        "anomalous region",
        "normal region",
        "normal region",
        "anomalous region",
        "normal region",
    ]
    assert ids == ["img0", "img1", "img1", "img2", "img3", "img3", "img4", "img5", "img5"]


def test_old_banks_without_per_entry_sources_still_load(base_bank, tmp_path):
    metadata = {k: v for k, v in base_bank.metadata.items() if k not in ("image_sources", "image_ids", "image_sha256")}
    old = MemoryBank(**base_bank.tensors(), metadata=metadata)
    save_bank(old, tmp_path / "v1.safetensors")
    loaded = load_bank(tmp_path / "v1.safetensors")
    assert image_sources(loaded) == ["public"] * 6
    assert image_ids(loaded) == [f"entry-{i}" for i in range(6)]
    assert provenance(loaded, "patch", 1)["image_id"] == "entry-1"
    assert loaded.metadata["format_version"] == 2


def test_provenance_out_of_step_with_keys_is_refused(base_bank):
    with pytest.raises(MemoryBankError, match="image_sources.*lists 2 entries but the bank has 6"):
        MemoryBank(**base_bank.tensors(), metadata={**base_bank.metadata, "image_sources": ["a", "b"]})
    sources = base_bank.patch_sources.clone()
    sources[0] = 6
    with pytest.raises(MemoryBankError, match="patch_sources points at image entry 6"):
        MemoryBank(**{**base_bank.tensors(), "patch_sources": sources}, metadata=base_bank.metadata)


def test_add_appends_exactly_the_entries_the_model_computes(tiny_model, base_bank, tmp_path):
    new_samples = make_samples(4, seed=21)
    grown = add_samples(base_bank, tiny_model, new_samples, source="line-3", dedup_threshold=None, progress=False)
    fresh = build_memory_bank(tiny_model, new_samples, source="x", progress=False, attach=False)
    torch.testing.assert_close(grown.image_keys, torch.cat([base_bank.image_keys, fresh.image_keys]))
    torch.testing.assert_close(grown.patch_keys, torch.cat([base_bank.patch_keys, fresh.patch_keys]))
    assert torch.equal(grown.patch_sources, torch.cat([base_bank.patch_sources, fresh.patch_sources + 6]))
    assert image_sources(grown) == ["public"] * 6 + ["line-3"] * 4
    assert (
        provenance(grown, "patch", 10)["image_id"] == "img1" and provenance(grown, "patch", 10)["source"] == "line-3"
    )
    assert [step["operation"] for step in grown.metadata["history"]] == ["add"]
    # survives the file format, and the original bank is untouched
    reloaded = load_bank(save_bank(grown, tmp_path / "grown.safetensors"))
    assert image_sources(reloaded) == image_sources(grown) and image_ids(reloaded) == image_ids(grown)
    assert base_bank.counts()["image_entries"] == 6
    info = bank_info(reloaded)
    assert info["per_source"]["line-3"] == {
        "normal images": 2,
        "anomalous images": 2,
        "normal regions": 4,
        "anomalous regions": 2,
    }


def test_adding_the_same_images_again_is_deduplicated_and_remove_restores(tiny_model, base_bank, samples):
    again = add_samples(base_bank, tiny_model, samples, source="copy", progress=False)
    assert again.counts() == base_bank.counts()  # every new key is identical (cosine 1) to an existing one
    kept = add_samples(
        base_bank, tiny_model, make_samples(4, seed=21), source="line-3", dedup_threshold=None, progress=False
    )
    restored = remove_sources(kept, ["line-3"])
    for name, tensor in base_bank.tensors().items():
        assert torch.equal(getattr(restored, name), tensor), name
    assert image_ids(restored) == image_ids(base_bank)
    with pytest.raises(MemoryBankError, match="already has entries from source 'public'"):
        add_samples(base_bank, tiny_model, samples, source="public", progress=False)


def test_add_refuses_a_model_with_another_backbone(base_bank, samples):
    with pytest.raises(MemoryBankError, match="weights signature"):
        add_samples(base_bank, make_tiny_model(seed=1), samples, source="other", progress=False)


def _bank(image_keys, image_labels, patch_keys, patch_labels, patch_sources, sources):
    return MemoryBank(
        image_keys=torch.tensor(image_keys, dtype=torch.float32),
        image_values=one_hot_labels(torch.tensor(image_labels)),
        patch_keys=torch.tensor(patch_keys, dtype=torch.float32),
        patch_values=one_hot_labels(torch.tensor(patch_labels)),
        patch_sources=torch.tensor(patch_sources),
        metadata={"source": "hand", "image_sources": sources, "image_ids": [f"i{k}" for k in range(len(sources))]},
    )


def test_deduplication_rule():
    near = [1.0, 0.01]  # cosine with [1, 0] is 0.99995
    bank = _bank(
        image_keys=[[1, 0], near, [1, 0], near],
        image_labels=[0, 0, 1, 0],
        patch_keys=[[0, 1], [0.01, 1.0], [0, 1], [1, 0]],
        patch_labels=[0, 0, 1, 0],
        patch_sources=[0, 1, 2, 3],
        sources=["a", "b", "c", "d"],
    )
    result = deduplicate(bank, 0.999)
    # patches: #1 duplicates #0 (same label) -> dropped; #2 has another label; #3 is different -> kept.
    # images: #1 duplicates #0 and lost its only region -> dropped; #2 other label; #3 duplicates #0 but keeps a region -> kept
    assert image_sources(result) == ["a", "c", "d"]
    assert result.patch_sources.tolist() == [0, 1, 2]
    assert result.patch_values.argmax(1).tolist() == [0, 1, 0]
    assert deduplicate(bank, 0.99999).counts() == bank.counts()  # below the threshold nothing is dropped
    with pytest.raises(ValueError, match="cosine similarity in"):
        deduplicate(bank, 1.5)


def test_merge_checks_compatibility_and_keeps_provenance(tiny_model, base_bank):
    line = build_memory_bank(tiny_model, make_samples(2, seed=5), source="line", progress=False, attach=False)
    merged = merge_banks([base_bank, line], names=["public.safetensors", "line.safetensors"], dedup_threshold=None)
    assert image_sources(merged) == ["public"] * 6 + ["line"] * 2
    assert merged.metadata["source"] == "public+line"
    assert merged.patch_sources.tolist()[-3:] == [6, 7, 7]
    other = build_memory_bank(make_tiny_model(seed=3), make_samples(2), source="x", progress=False, attach=False)
    with pytest.raises(MemoryBankError, match="Cannot merge x.safetensors into public.safetensors.*weights signature"):
        merge_banks([base_bank, other], names=["public.safetensors", "x.safetensors"])
    resized = build_memory_bank(
        make_tiny_model(image_size=56), make_samples(2), source="y", progress=False, attach=False
    )
    with pytest.raises(MemoryBankError, match="feature setting image_size: bank 112 vs model 56"):
        merge_banks([base_bank, resized])


def test_remove_errors_are_actionable(base_bank):
    with pytest.raises(MemoryBankError, match=r"no entries from \['nope'\]; its sources are \['public'\]"):
        remove_sources(base_bank, ["nope"])
    with pytest.raises(MemoryBankError, match="would leave the bank empty"):
        remove_sources(base_bank, ["public"])
    with pytest.raises(MemoryBankError, match="would lose its image entry"):
        select_entries(base_bank, [0], [0, 1])
