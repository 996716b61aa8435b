"""Paper-protocol evaluation: metrics, per-category runner, tables, heatmaps (paper Sec. 4.1)."""
