# SPDX-License-Identifier: Apache-2.0
"""Run-time choices (mrad_hf/runtime.py): dtype "auto" from the CPU, autocast, malloc tuning, opt-in compile."""

import pytest
import torch
from conftest import TINY_IMAGE_SIZE

from mrad_hf import runtime
from mrad_hf.runtime import compile_features, set_backbone_dtype


def _pixels(batch=3, size=TINY_IMAGE_SIZE, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_resolve_dtype_follows_the_cpu(monkeypatch):
    def fake(capability, bf16):
        return lambda: {"model": "x", "capability": capability, "mkldnn": True, "flags": [], "bf16_matrix": bf16}

    real = runtime.cpu_features()
    monkeypatch.setattr(runtime, "cpu_features", fake("AVX2", False))
    assert runtime.resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(runtime, "cpu_features", fake("AVX512", True))
    assert runtime.resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.resolve_dtype("auto", "cuda") == torch.float16
    assert runtime.resolve_dtype("bfloat16") == torch.bfloat16 and runtime.resolve_dtype(None) == torch.float32
    with pytest.raises(ValueError, match="Unknown backbone dtype"):
        runtime.resolve_dtype("fp8")
    assert real["capability"] == torch.backends.cpu.get_cpu_capability() and isinstance(real["bf16_matrix"], bool)


@torch.no_grad()
def test_autocast_mode_keeps_float32_weights_and_float32_outputs(model_with_bank):
    model = model_with_bank
    pixels = _pixels(batch=2)
    expected = model(pixels)
    set_backbone_dtype(model, "bfloat16", mode="autocast")
    try:
        assert model.clip.vision_model.embeddings.patch_embedding.weight.dtype == torch.float32
        got = model(pixels)
        assert (
            got.anomaly_map.dtype == torch.float32
            and model.extract_features(pixels).patch_tokens.dtype == torch.float32
        )
        difference = (got.anomaly_map - expected.anomaly_map).abs().max().item()
        assert 0 < difference < 2e-2  # bf16 matmuls under autocast: close, not equal
    finally:
        set_backbone_dtype(model, "float32", mode="autocast")
    torch.testing.assert_close(model(pixels).anomaly_map, expected.anomaly_map, atol=0, rtol=0)
    with pytest.raises(ValueError, match="mode"):
        set_backbone_dtype(model, "bfloat16", mode="amp")


def test_malloc_tuning_applies_in_a_fresh_process():
    import subprocess
    import sys

    code = "from mrad_hf.runtime import tune_malloc_for_inference as t; import torch; print(t()); torch.ones(8, 1370, 4096).sum()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False")


@torch.no_grad()
def test_compile_features_wraps_the_instance_feature_pass(model_with_bank):
    """The opt-in torch.compile hook (backend "eager" here: the wiring, not inductor's speed, which the benchmark
    measures) gives the model's own outputs."""
    pixels = _pixels(batch=2)
    expected = model_with_bank(pixels)
    compiled = compile_features(model_with_bank, backend="eager")
    try:
        assert "extract_features" in compiled.__dict__
        torch.testing.assert_close(compiled(pixels).anomaly_map, expected.anomaly_map, atol=1e-6, rtol=0)
    finally:
        del model_with_bank.extract_features


def test_a_dtype_change_keeps_a_compiled_feature_pass(model_with_bank):
    """set_backbone_dtype removes only its own autocast wrapper (which wraps a compiled pass), never the compiled one."""
    compiled = compile_features(model_with_bank, backend="eager").extract_features
    try:
        set_backbone_dtype(model_with_bank, "float32")
        assert model_with_bank.__dict__["extract_features"] is compiled
        set_backbone_dtype(model_with_bank, "bfloat16", mode="autocast")
        wrapper = model_with_bank.__dict__["extract_features"]
        assert wrapper._mrad_autocast and wrapper._mrad_inner is compiled
        set_backbone_dtype(model_with_bank, "float32", mode="autocast")
        assert model_with_bank.__dict__["extract_features"] is compiled
    finally:
        model_with_bank.__dict__.pop("extract_features", None)
        model_with_bank.clip.to(torch.float32)
