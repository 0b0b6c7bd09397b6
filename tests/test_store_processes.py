"""The feature store across processes: kill -9 then resume, and two jax.distributed processes on localhost.

Multi-host: this file is started twice as a worker (`python tests/test_store_processes.py ROOT STORE PORT ID
[die]`), each running `cbir_jax.extract` with `features.distributed=true`; each extracts every other shard
and process 0 merges the manifest. The union must be the one-process store, byte for byte. With `die`,
process 1 dies at its first shard: process 0 fails cleanly at the barrier and a re-run resumes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120
BARRIER_S = 6


def _env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


def _overrides(root: Path, store: Path) -> list[str]:
    return ["data=folder", f"data.root={root}", "backbone=pixels", "backbone.image_size=8", "backbone.batch_size=4",
            f"features.store={store}", "features.shard_rows=4", "data.workers=0"]


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.suffix in (".npy", ".json")}


def _one_process(root: Path, store: Path):
    from cbir_jax.extract import extract
    from helpers import compose_config

    return extract(compose_config(*_overrides(root, store)))[1]


def _worker(root: str, store: str, port: int, process_id: int, die: bool) -> None:
    from cbir_jax.extract import extract
    import cbir_jax.features.store
    from cbir_jax.features.store import StoreError
    from helpers import compose_config

    if die and process_id == 1:
        cbir_jax.features.store._Store.write_shard = lambda *a, **kw: os._exit(9)  # dies at its first shard
    cfg = compose_config(*_overrides(Path(root), Path(store)), "features.distributed=true",
                         f"features.coordinator=127.0.0.1:{port}", "features.num_processes=2",
                         f"features.process_id={process_id}", f"features.barrier_timeout_s={BARRIER_S}")
    try:
        extract(cfg)
    except StoreError as e:
        print(f"error: {e}", flush=True)
        os._exit(3)  # jax.distributed.shutdown would wait for the dead peer
    import jax

    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(tmp_path: Path, root: Path, store: Path, die: bool) -> tuple[list[int], str]:
    port = _free_port()
    from helpers import run_two_processes

    return run_two_processes(
        lambda p: [sys.executable, __file__, str(root), str(store), str(port), str(p)] + (["die"] if die else []),
        tmp_path, REPO, _env(), TIMEOUT_S)


@pytest.mark.slow
def test_two_processes_build_the_one_process_store(tmp_path):
    from faults import image_folder

    root = image_folder(tmp_path / "data", classes=4, per_class=5)
    _one_process(root, tmp_path / "one")
    codes, out = _run_two(tmp_path, root, tmp_path / "two", die=False)
    assert codes == [0, 0], out
    assert _files(tmp_path / "two") == _files(tmp_path / "one")  # same ids, same features, same shards
    assert not (tmp_path / "two" / "plan.json").exists()


@pytest.mark.slow
def test_a_dead_process_fails_the_others_cleanly_and_a_rerun_resumes(tmp_path):
    from faults import image_folder

    root = image_folder(tmp_path / "data", classes=4, per_class=5)
    codes, out = _run_two(tmp_path, root, tmp_path / "two", die=True)
    assert codes[1] == 9 and codes[0] == 3, out
    line = [x for x in (tmp_path / "log0.txt").read_text().splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "did not reach" in line[0] and "run again to resume" in line[0], out
    committed = len(list((tmp_path / "two" / "shards").glob("*.json")))
    assert committed == 3  # process 0's shards 0, 2, 4: kept
    report = _one_process(root, tmp_path / "two")
    assert (report.kept, report.added) == (12, 8)
    _one_process(root, tmp_path / "one")
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


_KILLED = textwrap.dedent("""
    import sys, time
    from cbir_jax.backbones import build_backbone
    from cbir_jax.core.config import BackboneConfig, DataConfig
    from cbir_jax.data import build_dataset
    from cbir_jax.features import store

    dataset = build_dataset(DataConfig(name="folder", root=sys.argv[1]))
    load = dataset.load
    def slow(i):
        time.sleep(0.1)
        return load(i)
    dataset.load, dataset.paths = slow, None
    store.build_store(sys.argv[2], dataset, build_backbone(BackboneConfig(name="pixels", image_size=8)),
                      shard_rows=4, batch_size=4, progress=False, workers=0)
""")


@pytest.mark.slow
def test_kill_9_mid_extraction_then_rerun_redoes_at_most_one_shard_bit_identical(tmp_path):
    from cbir_jax.backbones import build_backbone
    from cbir_jax.core.config import BackboneConfig, DataConfig
    from cbir_jax.data import build_dataset
    from cbir_jax.features.store import build_store
    from faults import image_folder

    root = image_folder(tmp_path / "data", classes=4, per_class=10)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(root), str(tmp_path / "killed")], env=_env(),
                            stderr=subprocess.PIPE)
    shards = tmp_path / "killed" / "shards"
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and len(list(shards.glob("*.json"))) < 5 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list(shards.glob("*.json")))
    assert 5 <= committed < 10, proc.stderr.read()[-2000:]  # killed about half-way
    dataset = build_dataset(DataConfig(name="folder", root=str(root)))
    backbone = build_backbone(BackboneConfig(name="pixels", image_size=8))
    report = build_store(tmp_path / "killed", dataset, backbone, shard_rows=4, batch_size=4, progress=False)
    assert report.kept == 4 * committed and report.added == 40 - 4 * committed  # only the missing shards
    build_store(tmp_path / "full", dataset, backbone, shard_rows=4, batch_size=4, progress=False)
    assert _files(tmp_path / "killed") == _files(tmp_path / "full")
    assert not [p for p in shards.iterdir() if p.suffix == ".tmp"]  # a write cut by the kill left nothing behind


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), die=len(sys.argv) > 5)
