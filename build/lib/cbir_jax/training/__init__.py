"""Training scorers: the pair-head loop, losses, pair sampling, checkpoints, model selection on validation
rows, the learned re-ranker's loop, metrics logs and curves, and `fit` (what trains each kind of scorer)."""
