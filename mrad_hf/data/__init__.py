"""Dataset loaders and the synthetic-defect benchmark generator (paper Sec. 4.1 protocol)."""
