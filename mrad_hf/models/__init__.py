# SPDX-License-Identifier: Apache-2.0
"""Model cores (layer 0). Each folder is exactly the code a saved model ships as remote code."""
