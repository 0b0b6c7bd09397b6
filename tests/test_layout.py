"""The package's shape: stages import only downward, entry points import no other entry point, and every
module imports alone (no cycle hidden by import order)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import cbir_jax

PACKAGE = Path(cbir_jax.__file__).parent
# Lower stages never import higher ones (lazy imports inside functions count too).
LAYERS = ["core", "data", "backbones", "features", "scoring", "labels", "evaluation", "training", "runs", "api"]
ENTRY_POINTS = {"train", "evaluate", "search", "diagnose", "report", "index", "serve", "extract"}


def _modules() -> list[str]:
    """Every module under the package, read from the files (not from `pkgutil`, which would skip a folder
    that lost its `__init__.py`)."""
    names = []
    for path in PACKAGE.rglob("*.py"):
        parts = ("cbir_jax", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] != "__main__" and len(parts) > 1:
            names.append(".".join(parts))
    return sorted(names)


def _imports(module: str) -> set[str]:
    path = PACKAGE.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    known = set(_modules()) | {"cbir_jax"}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cbir_jax"):
            for alias in node.names:  # `from pkg import module` depends on the module, anything else on pkg
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("cbir_jax"))
    return out & known


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_stages_import_only_downward() -> None:
    wrong = []
    for module in _modules():
        here = _part(module)
        for target in _imports(module):
            there = _part(target)
            if here in ENTRY_POINTS or not there or there == here:
                continue
            if there in ENTRY_POINTS or (here in LAYERS and there in LAYERS and LAYERS.index(there) > LAYERS.index(here)):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that climb up a stage: " + "; ".join(wrong)


def test_entry_points_import_no_other_entry_point() -> None:
    wrong = [f"{m} -> {t}" for m in _modules() for t in _imports(m)
             if _part(m) in ENTRY_POINTS and _part(t) in ENTRY_POINTS and _part(t) != _part(m)]
    assert not wrong, "; ".join(wrong)


def test_no_import_cycle() -> None:
    graph = {m: {t for t in _imports(m) if t != m} for m in _modules()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return path + [m, t]
            if t not in state and (cycle := visit(t, path + [m])):
                return cycle
        state[m] = 2
        return None

    for m in graph:
        if m not in state and (cycle := visit(m, [])):
            raise AssertionError("import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):]))


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    """One fresh interpreter; before each module, every cbir_jax module is forgotten, so each is imported
    first, as a user's script would."""
    script = (
        "import importlib, json, sys\n"
        "failed = {}\n"
        f"for name in {_modules()!r}:\n"
        "    for m in [m for m in sys.modules if m == 'cbir_jax' or m.startswith('cbir_jax.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed[name] = repr(e)\n"
        "print(json.dumps(failed))\n"
    )
    optional = {"cbir_jax.serve.app", "cbir_jax.serve.server"}  # need the [serve] extra
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    missing_extra = {m for m, e in failed.items() if m in optional and "ModuleNotFoundError" in e}
    assert not {m: e for m, e in failed.items() if m not in missing_extra}


def test_every_folder_of_the_package_is_a_regular_package() -> None:
    """A folder without `__init__.py` is a namespace package: setuptools' `packages.find` leaves it out of a
    wheel, so a non-editable install would lack that whole stage."""
    folders = {p.parent for p in PACKAGE.rglob("*.py")}
    missing = sorted(str(f.relative_to(PACKAGE)) for f in folders if not (f / "__init__.py").exists())
    assert not missing, f"folders without __init__.py: {missing}"


def test_project_imports_use_the_modules_own_names() -> None:
    """`from cbir_jax.x import module as other` hides what a name is: a module takes the name its callers
    want (rename the file instead). Checked in the package, tests, benchmarks and experiments."""
    root = PACKAGE.parent
    wrong = []
    for folder in ("cbir_jax", "tests", "benchmarks", "experiments"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cbir_jax"):
                    names = node.names
                elif isinstance(node, ast.Import):
                    names = [a for a in node.names if a.name.startswith("cbir_jax")]
                else:
                    continue
                wrong += [f"{path.relative_to(root)}:{node.lineno} {a.name} as {a.asname}"
                          for a in names if a.asname and a.asname != a.name.rsplit(".", 1)[-1]]
    assert not wrong, "aliased project imports: " + "; ".join(wrong)


def _calls(attribute: str) -> set[str]:
    """Modules (outside `scoring/`, which implements ranking) whose code calls `<anything>.<attribute>(...)`
    or `<attribute>(...)`."""
    found = set()
    for module in _modules():
        if _part(module) == "scoring":
            continue
        path = PACKAGE.joinpath(*module.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name == attribute:
                    found.add(module)
    return found


def test_one_gallery_builder() -> None:
    """Only `Index` ranks a gallery: search, the page and evaluation's figure are layers over it
    (evaluation's metrics score whole galleries through `retrieval.evaluate_scorer`, training's pair sampling
    takes neighbours through `ranking.gallery_neighbours`)."""
    assert _calls("top_k") == {"cbir_jax.api.index"}
    assert _calls("shortlist_rerank") == set() and _calls("search") <= {"cbir_jax.api.index", "cbir_jax.search"}


def test_one_training_loop() -> None:
    """Every learned scorer trains in `training/trainer.py`: it alone builds an optimiser, writes metrics.jsonl
    and keeps the checkpoints being trained (the best-on-validation keeper keeps its own; `checkpointing`
    opens them to restore)."""
    assert _calls("make_optimizer") == {"cbir_jax.training.trainer"}
    assert _calls("MetricsLog") == {"cbir_jax.training.trainer"}
    assert _calls("Checkpoints") == {"cbir_jax.training.trainer", "cbir_jax.training.selection", "cbir_jax.training.checkpointing"}
    assert _calls("manager") == {"cbir_jax.training.checkpointing"}  # Orbax's manager only behind `Checkpoints`
