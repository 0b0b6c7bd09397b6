"""What every stage shares: errors, registries, the config schema and its checks, atomic files, the checked
cache, L2 normalisation. Imports nothing else from cbir_jax."""
