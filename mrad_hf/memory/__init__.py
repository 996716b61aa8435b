# SPDX-License-Identifier: Apache-2.0
"""Living memory banks (layer 1): add, merge, remove, de-duplicate, inspect (paper Sec. 3.2)."""
