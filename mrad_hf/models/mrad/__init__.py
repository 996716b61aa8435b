# SPDX-License-Identifier: Apache-2.0
"""MRAD's remote-code unit (layer 0): config, model, math siblings, memory bank format, processor, pipeline.

Imports torch, transformers, safetensors, numpy, PIL and its own siblings only (relative imports), so that a saved
model loads with `trust_remote_code=True` where `mrad_hf` is not installed.
"""
