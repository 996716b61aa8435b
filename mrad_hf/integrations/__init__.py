# SPDX-License-Identifier: Apache-2.0
"""Layer 3: MRAD where inspection teams already work.

* `mrad_hf.integrations.anomalib`: `MRADAnomalib`, an anomalib `AnomalibModule` (zero-shot) around any MRAD variant
  (needs `pip install "mrad-hf[anomalib]"`; imported only when used).
* `mrad_hf.integrations.inference_endpoints`: the Hugging Face Inference Endpoints `EndpointHandler` that
  `mrad_hf.hub.push_model` writes into model repos as `handler.py`.
"""
