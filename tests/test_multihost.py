"""Two processes on localhost, each holding part of the gallery, rank it as one (jax.distributed + gloo).

The test starts this file twice as a worker (`python tests/test_multihost.py WORKDIR PORT PROCESS_ID`);
each worker has 2 CPU devices, so the mesh spans 4 devices on 2 processes. Process 0 holds 120 rows and
process 1 the other 83 (uneven on purpose); both must return the single-process top-k.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np

N_ROWS, SPLIT, DIM, N_QUERIES, K = 203, 120, 12, 5, 7
HIDDEN = (16, 8)
TIMEOUT_S = 50


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N_ROWS, DIM)).astype(np.float32), rng.normal(size=(N_QUERIES, DIM)).astype(np.float32)


def _scorers():
    import jax

    from cbir_jax.scoring import heads, scorers
    from cbir_jax.core.config import HeadConfig

    head = heads.build_head(HeadConfig(name="mlp", hidden=list(HIDDEN)))
    params = heads.init_params(head, DIM, jax.random.key(1))
    return {"cosine": scorers.fixed_scorer("cosine"), "euclid": scorers.fixed_scorer("euclid"),
            "mlp": scorers.pair_scorer("mlp", head, params)}


def _worker(workdir: str, port: int, process_id: int) -> None:
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", coordinator_bind_address=f"127.0.0.1:{port}",
        num_processes=2, process_id=process_id, initialization_timeout=TIMEOUT_S,
    )
    from cbir_jax.scoring import sharding

    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.devices())
    gallery, queries = _data()
    local = gallery[:SPLIT] if process_id == 0 else gallery[SPLIT:]
    mesh = sharding.gallery_mesh()
    sg = sharding.distribute(local, mesh)
    out = {}
    for name, scorer in _scorers().items():
        s, i = sharding.sharded_top_k(scorer, sharding.prepare(scorer, sg), queries, k=K, chunk=16)
        out[f"{name}_s"], out[f"{name}_i"] = np.asarray(s), np.asarray(i)
    np.savez(Path(workdir) / f"process{process_id}.npz", **out)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_rank_like_one(tmp_path):
    import jax.numpy as jnp

    from cbir_jax.scoring import ranking

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    from helpers import run_two_processes

    codes, outputs = run_two_processes(lambda p: [sys.executable, __file__, str(tmp_path), str(port), str(p)],
                                       tmp_path, repo, env, TIMEOUT_S)
    assert all(c == 0 for c in codes), f"workers failed ({codes}):\n{outputs}"

    gallery, queries = _data()
    for name, scorer in _scorers().items():
        state = scorer.prepare(jnp.asarray(gallery))
        s, i = (np.asarray(x) for x in ranking.top_k(scorer, state, jnp.asarray(queries), k=K))
        for p in range(2):
            got = np.load(tmp_path / f"process{p}.npz")
            np.testing.assert_array_equal(got[f"{name}_i"], i, err_msg=f"{name}, process {p}")
            np.testing.assert_allclose(got[f"{name}_s"], s, rtol=1e-5, atol=1e-6, err_msg=f"{name}, process {p}")


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
