"""The search page: `python -m cbir_jax.serve` (needs the `[serve]` extra: FastAPI + uvicorn).

`gallery` prepares and ranks (no web framework); `app` is the HTTP surface; `server` runs it.
"""
