# SPDX-License-Identifier: Apache-2.0
"""The Inference Endpoints custom handler of MRAD model repos, importable for local use and tests.

The handler's code is one self-contained file, `mrad_hf/hub/templates/handler.py` (package data), because it must
run on an endpoint where mrad-hf is not installed: `mrad_hf.hub.push_model` copies it verbatim into each model repo
as `handler.py`. This module loads that same file, so what is tested here is byte for byte what is deployed.

    from mrad_hf.integrations.inference_endpoints import EndpointHandler, decode_map
    handler = EndpointHandler("models/mrad-tf-visa")              # a saved model folder (or a snapshot of a repo)
    [response] = handler({"inputs": base64.b64encode(open("part.png", "rb").read()).decode(),
                          "parameters": {"threshold": 0.5}})
    response["score"], response["label"], decode_map(response["anomaly_map"])   # map: H x W float32 in [0, 1]
"""

from __future__ import annotations

import importlib.util
import sys

from ..hub.api import ENDPOINT_HANDLER_FILE, write_endpoint_handler

__all__ = [
    "EndpointHandler",
    "decode_image",
    "decode_map",
    "encode_map",
    "handler_module",
    "write_endpoint_handler",
    "MAP_FORMAT",
]

_MODULE_NAME = "mrad_hf.integrations._endpoint_handler"


def handler_module():
    """The handler file (`hub/templates/handler.py`) imported as a module (once per process)."""
    module = sys.modules.get(_MODULE_NAME)
    if module is None:
        spec = importlib.util.spec_from_file_location(_MODULE_NAME, ENDPOINT_HANDLER_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_MODULE_NAME] = module
        spec.loader.exec_module(module)
    return module


_handler = handler_module()
EndpointHandler = _handler.EndpointHandler
decode_image = _handler.decode_image
decode_map = _handler.decode_map
encode_map = _handler.encode_map
MAP_FORMAT = _handler.MAP_FORMAT
