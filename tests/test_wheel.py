"""The package as a user installs it: a wheel built from the tracked files, installed into a fresh venv,
used from a folder outside the source tree (so nothing can be found through the checkout).

Offline: the wheel is built without build isolation, and the fresh venv borrows this environment's
dependencies through a `.pth` line (their install is what CI's `pip install` already proves); only
`cbir_jax` itself comes from the wheel, which the test checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from PIL import Image

from helpers import FAST

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=600, **kwargs)
    assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The python of a fresh venv with the wheel installed."""
    base = tmp_path_factory.mktemp("wheel")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    if not tracked.stdout:
        pytest.skip("not a git checkout: the wheel is built from the tracked files")
    src = base / "src"
    for name in tracked.stdout.split("\0"):
        source = ROOT / name
        if name and source.is_file() and not source.is_symlink():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, src / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(base / "dist"), str(src))
    (wheel,) = (base / "dist").glob("cbir_jax-*.whl")
    venv = base / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    purelib = _run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(purelib, "_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel))
    return python


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CBIR_JAX_CACHE", str(Path.home() / ".cache" / "cbir_jax"))
    return env


def test_the_wheel_ships_its_configs_and_imports_from_the_venv(installed, tmp_path):
    out = _run(str(installed), "-c", "import cbir_jax, cbir_jax.core.config as c; print(cbir_jax.__file__); print(c.CONFIG_DIR)",
               cwd=tmp_path, env=_env())
    package, configs = out.stdout.split()
    assert Path(package).is_relative_to(installed.parents[1]), package  # not the checkout
    assert (Path(configs) / "config.yaml").is_file() and (Path(configs) / "backbone" / "efficientnet_lite0.yaml").is_file()


def test_the_main_job_runs_from_the_installed_wheel(installed, tmp_path):
    run = tmp_path / "run"
    out = _run(str(installed), "-m", "cbir_jax.train", "head=mlp", "labels=ssim_ratio", *FAST, f"hydra.run.dir={run}",
               cwd=tmp_path, env=_env())
    assert "| mlp |" in out.stdout and (run / "metrics.json").is_file()
    assert out.stdout.strip().splitlines()[-1].startswith(f"outputs: {run}/ (")


def test_the_readme_python_example_runs_from_the_installed_wheel(installed, tmp_path):
    from test_api import _readme_example, _write_photos

    _write_photos(tmp_path / "photos", views=1, photos=4)
    shutil.copy(next((tmp_path / "photos").rglob("*.jpg")), tmp_path / "query.jpg")
    for name in ("new1.jpg", "new2.jpg"):
        Image.new("RGB", (40, 30), (10, 200, 30) if name == "new1.jpg" else (200, 10, 30)).save(tmp_path / name)
    script = "\n".join(_readme_example()) + "\nprint(len(index), index.paths[-1])\n"
    out = _run(str(installed), "-c", script, cwd=tmp_path, env=_env())
    count, last = out.stdout.split()[-2:]
    assert count == "6" and last.endswith("new2.jpg")
