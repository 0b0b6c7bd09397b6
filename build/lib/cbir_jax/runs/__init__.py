"""Run folders: their lifecycle (immutability, resume), the entry points' CLI plumbing, loading a finished run
(`load_run`) to score with."""
