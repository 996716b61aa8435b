# SPDX-License-Identifier: Apache-2.0
"""User tools over a model (layer 2): calibration, explanations, heatmap rendering, the demo app."""
