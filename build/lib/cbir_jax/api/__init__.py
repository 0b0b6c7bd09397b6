"""The public Python API: `Index` (a searchable folder, saved to and loaded from one file) over the stages
below it; `cbir_jax.Index` and `cbir_jax.load_run` reach it without importing it at `import cbir_jax`."""

from cbir_jax.api.index import Index, QueryError
from cbir_jax.api.store import IndexFileError

__all__ = ["Index", "IndexFileError", "QueryError"]
