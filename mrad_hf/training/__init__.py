# SPDX-License-Identifier: Apache-2.0
"""Training MRAD-FT and MRAD-CLIP with Accelerate (layer 2; paper Sec. 3.4-3.5)."""
