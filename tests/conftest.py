"""Test-wide setup: 8 virtual CPU devices (sharded code runs on CPU) and a private feature cache."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101-dev"


@pytest.fixture(scope="session", autouse=True)
def _feature_cache(tmp_path_factory):
    # One cache per test session: tests share extracted features but never the user's cache.
    if "CBIR_JAX_CACHE" not in os.environ or os.environ.get("CI"):
        os.environ["CBIR_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture
def caltech_dev() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (shared development data)")
    return SHARED_DATA
