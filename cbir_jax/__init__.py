"""cbir_jax: content-based image retrieval with learned pairwise scorers, in JAX."""

import logging
import os

# Multirun sweeps start many jobs on one accelerator: do not let each grab most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# JAX logs at INFO, on every machine without a TPU, that it found none: noise at the top of every run's log.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

__version__ = "0.1.0"
