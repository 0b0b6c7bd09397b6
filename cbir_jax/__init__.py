"""cbir_jax: content-based image retrieval with learned pairwise scorers, in JAX."""

import logging
import os

# Multirun sweeps start many jobs on one accelerator: do not let each grab most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# JAX logs at INFO, on every machine without a TPU, that it found none: noise at the top of every run's log.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

__version__ = "0.1.0"

# The public API, imported on first use (PEP 562): `import cbir_jax.core.errors` (which every stage does)
# must not pull in JAX, Flax and the whole pipeline, nor create an import cycle through the API.
_LAZY = {"Index": "cbir_jax.api.index", "load_run": "cbir_jax.runs.trained", "Run": "cbir_jax.runs.trained",
         "fit": "cbir_jax.train", "Trained": "cbir_jax.train"}
__all__ = ["Index", "Run", "Trained", "fit", "load_run", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cbir_jax' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
