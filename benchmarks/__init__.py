"""Benchmarks: each module has `run(quick: bool) -> list[dict]` and runs alone with `python -m`."""
