"""Test-wide setup: 8 virtual CPU devices (sharded code runs on CPU), a private feature cache, and one JAX
compilation cache per test session, shared by its xdist workers and the commands the tests start."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101-dev"
_SESSION_DIR = "cbir_jax_session_dir"  # the controller's folder, handed to each xdist worker


def pytest_configure(config):
    """Before any test module imports JAX: a compilation cache that lives as long as this session.

    The tests start dozens of `python -m cbir_jax.*` processes that compile the same small programs; each
    compiles them once per session instead of once per process. Nothing persists beyond the session (a
    fresh folder, removed at the end), so no run ever depends on an earlier one. A compiled program is
    the same program whether it came from the cache or the compiler."""
    worker = getattr(config, "workerinput", None)
    if worker is not None:
        folder = worker[_SESSION_DIR]
    else:
        folder = config._cbir_jax_session_dir = tempfile.mkdtemp(prefix="cbir_jax-tests-")
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(Path(folder) / "jax")
        # The commands the tests start store every program, however small: a tiny training run compiles
        # ~110 programs of ~27 ms each, 3 of its 9 s, and they are the same programs in every command (0.6 MB
        # for all of them). The test processes themselves store only those that take 0.2 s to compile
        # (below): they compile thousands of distinct tiny programs, and each write scans the whole cache.
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        # A size limit turns on JAX's file lock, so concurrent processes never read a half-written entry.
        os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)
        import jax  # after XLA_FLAGS and the cache settings above

        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    config._cbir_jax_features = str(Path(folder) / "features")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):  # xdist: every worker shares the controller's session folder
    node.workerinput[_SESSION_DIR] = node.config._cbir_jax_session_dir


def pytest_unconfigure(config):
    folder = getattr(config, "_cbir_jax_session_dir", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


# The longest files (measured 2026-12-02, --durations), started first: with `--dist loadfile` each worker takes
# the next file when it is free, so the short files fill in around the long ones instead of one long file
# starting last and running alone. Only the order changes; every file runs whole, in its own order.
LONGEST_FIRST = [
    "test_pipeline.py", "test_learned_rerank.py", "test_vit_end_to_end.py", "test_reliability_resume.py",
    "test_api.py", "test_serve.py", "test_wheel.py", "test_vit_backbones.py", "test_reliability_train.py",
    "test_store_processes.py", "test_reliability_checkpoints.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole, in order


@pytest.fixture(scope="session", autouse=True)
def _feature_cache(pytestconfig):
    # One cache per test session (shared by its xdist workers: its writes are atomic and locked): tests
    # share extracted features but never the user's cache.
    if "CBIR_JAX_CACHE" not in os.environ or os.environ.get("CI"):
        os.environ["CBIR_JAX_CACHE"] = pytestconfig._cbir_jax_features
    yield


@pytest.fixture
def caltech_dev() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (shared development data)")
    return SHARED_DATA
