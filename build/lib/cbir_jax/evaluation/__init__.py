"""Measuring retrieval: metrics, the evaluation runner and its tables, figures, baselines tuned on validation
rows, the paired bootstrap, diagnostics."""
