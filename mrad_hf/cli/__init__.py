# SPDX-License-Identifier: Apache-2.0
"""The `mrad` command line (layer 3): one module per command group over `common`; see `main`."""

from .main import main

__all__ = ["main"]
