"""`--help` of the entry points, through Hydra's own `--help` (configs/hydra/help/cbir_jax.yaml).

All entry points compose the same `configs/config.yaml`, so one help config serves them all and picks the
text by the running command: its module docstring (what it does, with examples), written once beside its
code, so `--help` and the source never tell two stories.
"""

from __future__ import annotations

import inspect
import sys
from types import ModuleType


def _entry_point(job: str) -> tuple[str, ModuleType | None]:
    """(module name, module) of the running command: `python -m` runs it as `__main__` (whose Hydra job name
    is `__main__` for a package's `__main__.py`, e.g. serve); otherwise the job's name says which it is."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name.startswith("cbir_jax."):
        return spec.name.removesuffix(".__main__"), main
    name = f"cbir_jax.{job}"
    return name, sys.modules.get(name)


def entry_point(job: str) -> str:
    """The running command's short name (`train`, `serve`, ...), also for `python -m cbir_jax.serve`."""
    return _entry_point(job)[0].rsplit(".", 1)[-1]


def command(job: str) -> str:
    """How the command is typed: `python -m cbir_jax.train`."""
    return f"python -m {_entry_point(job)[0]}"


def description(job: str) -> str:
    """The command's docstring, with `$` escaped for Hydra's `string.Template` (which fills in the groups)."""
    module = _entry_point(job)[1]
    text = inspect.getdoc(module) if module is not None else None
    return (text or command(job)).replace("$", "$$")
