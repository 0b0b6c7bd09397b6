"""cbir_jax: content-based image retrieval with learned pairwise scorers, in JAX."""

import os

# Multirun sweeps start many jobs on one accelerator: do not let each grab most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

__version__ = "0.1.0"
