"""A gallery sharded over every device (of one host or of many), ranked with one top-k merge.

The gallery's rows are split over a 1-D mesh axis "gallery" (`NamedSharding(mesh, P("gallery"))`); each
shard runs the same chunked scan as `ranking.top_k` on its own rows (`shard_map`), the per-shard top-k
lists are all-gathered (B x k per device, nothing else crosses devices) and merged with one top-k. Ties
resolve to the lower gallery index, as on one device, so results are identical to `ranking.top_k`.

The same code runs on many hosts: after `jax.distributed.initialize(...)`, `jax.devices()` lists every
process's devices and each process passes only the rows it holds to `distribute`:

    jax.distributed.initialize()                       # coordinator / process id from the cluster env
    mesh = gallery_mesh()                              # all devices of all processes
    gallery = distribute(local_rows, mesh)             # this process's rows -> one global sharded gallery
    state = prepare(scorer, gallery)
    scores, indices = sharded_top_k(scorer, state, queries, k=10)   # same queries on every process

Indices are global: process p's rows are numbered after those of processes 0..p-1, in order.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cbir_jax.scoring.ranking import scan_top_k
from cbir_jax.scoring.scorers import Scorer

AXIS = "gallery"


def gallery_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process, process by process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


@dataclasses.dataclass(frozen=True)
class ShardedGallery:
    """Global gallery features (rows padded so each device holds as many) and each row's global id
    (-1 for padding), both sharded over the mesh's gallery axis; `n` real rows in all."""

    features: jax.Array
    ids: jax.Array
    n: int
    mesh: Mesh


def distribute(local_rows: np.ndarray, mesh: Mesh) -> ShardedGallery:
    """Builds the global sharded gallery from the rows this process holds (all rows on one host).

    Processes may hold different numbers of rows; each pads its block to a common size that its
    devices divide evenly, and the padding rows get id -1 so they never rank.
    """
    local_rows = np.asarray(local_rows)
    n_local = local_rows.shape[0]
    n_proc = jax.process_count()
    if n_proc > 1:
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(np.asarray([n_local], np.int64))).reshape(-1)
    else:
        counts = np.asarray([n_local])
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    per_process = max(1, -(-int(counts.max()) // local_devices)) * local_devices
    offset = int(counts[: jax.process_index()].sum())
    pad = per_process - n_local
    features = np.pad(local_rows, [(0, pad)] + [(0, 0)] * (local_rows.ndim - 1)) if pad else local_rows
    ids = np.concatenate([np.arange(offset, offset + n_local, dtype=np.int32), np.full(pad, -1, np.int32)])
    sharding = NamedSharding(mesh, P(AXIS))
    g_shape = (per_process * n_proc,) + local_rows.shape[1:]
    return ShardedGallery(
        features=jax.make_array_from_process_local_data(sharding, features, g_shape),
        ids=jax.make_array_from_process_local_data(sharding, ids, (per_process * n_proc,)),
        n=int(counts.sum()),
        mesh=mesh,
    )


def prepare(scorer: Scorer, gallery: ShardedGallery) -> tuple[Any, Any, jax.Array]:
    """`scorer.prepare` on the global gallery, under jit: row terms stay sharded with their rows, shared
    terms are replicated (a gallery-wide statistic, such as the mean, is reduced across all shards)."""
    rows_sharding, replicated = NamedSharding(gallery.mesh, P(AXIS)), NamedSharding(gallery.mesh, P())
    rows_shape, shared_shape = jax.eval_shape(scorer.prepare, gallery.features)
    out = (jax.tree_util.tree_map(lambda _: rows_sharding, rows_shape),
           jax.tree_util.tree_map(lambda _: replicated, shared_shape))
    rows, shared = jax.jit(scorer.prepare, out_shardings=out)(gallery.features)
    return rows, shared, gallery.ids


@functools.partial(jax.jit, static_argnames=("scorer", "mesh", "k", "chunk", "exclude_self"))
def _sharded_top_k(scorer, mesh, rows, shared, ids, queries, self_index, k, chunk, exclude_self):
    def local(rows, shared, ids, queries, self_index):
        s, i = scan_top_k(scorer, rows, shared, queries, k, chunk, self_index, exclude_self, ids=ids)
        s = jax.lax.all_gather(s, AXIS, axis=1, tiled=True)  # (B, devices * k), in shard (= index) order
        i = jax.lax.all_gather(i, AXIS, axis=1, tiled=True)
        top_s, at = jax.lax.top_k(s, k)
        return top_s, jnp.take_along_axis(i, at, axis=1)

    spec_rows = jax.tree_util.tree_map(lambda _: P(AXIS), rows)
    spec_shared = jax.tree_util.tree_map(lambda _: P(), shared)
    f = jax.shard_map(local, mesh=mesh, in_specs=(spec_rows, spec_shared, P(AXIS), P(), P()),
                      out_specs=(P(), P()), check_vma=False)  # outputs are equal on every shard after the gather
    return f(rows, shared, ids, queries, self_index)


def sharded_top_k(
    scorer: Scorer,
    state: tuple[Any, Any, jax.Array],
    queries: jax.Array | np.ndarray,
    k: int,
    chunk: int | None = None,
    self_index: jax.Array | np.ndarray | None = None,
    exclude_self: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """As `ranking.top_k`, over a gallery prepared by `prepare`; indices are global row ids and the
    outputs are replicated on every device. `self_index` holds global ids. Every process must pass the
    same queries."""
    if not scorer.chunkable:
        raise ValueError(f"scorer {scorer.name!r} needs the whole gallery at once; it cannot be sharded")
    rows, shared, ids = state
    queries = np.asarray(queries, np.float32)
    self_index = np.full((queries.shape[0],), -1, np.int32) if self_index is None else np.asarray(self_index, np.int32)
    mesh = ids.sharding.mesh
    replicated = NamedSharding(mesh, P())
    # Host values every process holds alike -> global replicated arrays (works on one or many hosts).
    queries = jax.make_array_from_process_local_data(replicated, queries, queries.shape)
    self_index = jax.make_array_from_process_local_data(replicated, self_index, self_index.shape)
    return _sharded_top_k(scorer, mesh, rows, shared, ids, queries, self_index, k=k, chunk=chunk,
                          exclude_self=exclude_self)


def sharded_search(
    scorer: Scorer, gallery: np.ndarray, queries: np.ndarray, k: int, chunk: int | None = None, mesh: Mesh | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One-host convenience: shards `gallery` over all local devices, ranks, returns numpy (scores, indices)."""
    mesh = mesh or gallery_mesh(jax.local_devices())
    state = prepare(scorer, distribute(gallery, mesh))
    s, i = sharded_top_k(scorer, state, queries, k=k, chunk=chunk)
    return np.asarray(s), np.asarray(i)
