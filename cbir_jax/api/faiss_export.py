"""An index as a faiss index, to serve it where cbir_jax is not installed (needs faiss-cpu, the [bench] extra).

The exported index takes *raw* backbone features as queries (`Index.embed(q, raw=True)`, or the same
backbone run anywhere else): the fitted post-processing (L2, PCA / PCA-whitening, L2) travels inside it as
faiss `VectorTransform`s in an `IndexPreTransform`, so the saved file alone turns a raw feature into a
ranking. Gallery rows are the index's post-processed features, as `Index.search` ranks them:

- `cosine`: unit-normalised rows in an `IndexFlatIP`; `D` is the cosine (similarity, descending);
- `euclid`: rows in an `IndexFlatL2`; `D` is the *squared* distance (ascending), so our score is `-sqrt(D)`.

faiss labels are the index's ids (row numbers). Any other scorer (a learned head, a re-ranker, SSIM) has no
flat faiss form; exporting one is a one-line `FaissExportError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cbir_jax.core.errors import UserError
from cbir_jax.core.files import atomic_write_text
from cbir_jax.core.vectors import l2_normalise

# scorer -> (faiss flat index class, rows unit-normalised, what D is)
FAISS_FORMS = {
    "cosine": ("IndexFlatIP", True, "cosine similarity (descending)"),
    "euclid": ("IndexFlatL2", False, "squared euclidean distance (ascending); score = -sqrt(D)"),
}


class FaissExportError(UserError):
    """A scorer faiss cannot express, or faiss not installed."""


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise FaissExportError("faiss export needs faiss: pip install -e '.[bench]' (or faiss-cpu)") from None
    return faiss


def _linear(faiss: Any, a: np.ndarray, b: np.ndarray) -> Any:
    """y = a x + b as a faiss LinearTransform (a: d_out x d_in)."""
    t = faiss.LinearTransform(a.shape[1], a.shape[0], True)
    faiss.copy_array_to_vector(np.ascontiguousarray(a, np.float32).ravel(), t.A)
    faiss.copy_array_to_vector(np.ascontiguousarray(b, np.float32), t.b)
    t.is_trained = True
    return t


def _transforms(faiss: Any, post: dict[str, Any], dim: int, unit_rows: bool) -> list[Any]:
    """The post-processing of `postprocess.apply` as faiss transforms, in order."""
    chain = []
    if post["l2"]:
        chain.append(faiss.NormalizationTransform(dim, 2.0))
    if "projection" in post:
        p, mean = post["projection"].astype(np.float64), post["mean"].astype(np.float64)
        chain.append(_linear(faiss, p.T, -(mean @ p)))
        if post["l2"]:
            chain.append(faiss.NormalizationTransform(p.shape[1], 2.0))
    if unit_rows and not post["l2"]:  # cosine normalises the query itself
        out_dim = post["projection"].shape[1] if "projection" in post else dim
        chain.append(faiss.NormalizationTransform(out_dim, 2.0))
    return chain


def factory_index(factory: str, dim: int, metric: Any = None) -> Any:
    """An untrained faiss index of `factory` (faiss's `index_factory`); a string faiss cannot parse for
    `dim`-dimensional vectors is one line. Cheap: the command line checks `faiss=` before extracting."""
    faiss = _faiss()
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT if metric is None else metric)
    except RuntimeError:  # faiss's own parse error names a C++ function, not the mistake
        raise FaissExportError(f"faiss={factory}: not an index_factory string faiss can build for {dim}-d vectors "
                               "(e.g. IVF1024,PQ32 or IVF4096,Flat; PQm needs m to divide the dimension)") from None


def to_faiss(index: Any, factory: Optional[str] = None, *, train_rows: int = 100_000, nprobe: int = 16,
             seed: int = 0) -> Any:
    """A faiss index ranking as `index.search` (a `cbir_jax.Index`) does.

    Without `factory`: a flat index (ids equal, scores equal up to float32 rounding). With one (a faiss
    `index_factory` string such as `IVF1024,PQ32`): that index, trained on `train_rows` gallery rows drawn
    with `seed` and filled chunk by chunk from the store, so the gallery is never in memory whole; IVF
    indexes probe `nprobe` lists per query. Approximate: measure its recall (benchmarks/scale.py)."""
    name = index.scorer_name
    if name not in FAISS_FORMS:
        raise FaissExportError(
            f"scorer {name} has no faiss form (faiss holds {' and '.join(FAISS_FORMS)} as flat indexes): "
            "rank with Index.search, or build the index with scorer='cosine'"
        )
    faiss = _faiss()
    flat_name, unit_rows, _ = FAISS_FORMS[name]

    def ready(rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(l2_normalise(rows) if unit_rows else rows, np.float32)

    if factory is None:
        rows = ready(index.gallery())
        body = getattr(faiss, flat_name)(rows.shape[1])
        body.add(rows)
    else:
        metric = faiss.METRIC_INNER_PRODUCT if unit_rows else faiss.METRIC_L2
        sample = ready(index.sample_gallery(train_rows, seed))
        body = factory_index(factory, sample.shape[1], metric)
        body.train(sample)
        for _, chunk in index.iter_gallery():
            body.add(ready(chunk))
        try:
            faiss.extract_index_ivf(body).nprobe = nprobe
        except RuntimeError:  # not an IVF index: nothing to probe
            pass
    chain = _transforms(faiss, index.post, index.backbone.feature_dim, unit_rows)
    if not chain:
        return body
    exported = faiss.IndexPreTransform(chain[-1], body)
    for t in reversed(chain[:-1]):
        exported.prepend_transform(t)
    return exported


def save_faiss(index: Any, path: str | os.PathLike, factory: Optional[str] = None) -> tuple[Path, Path]:
    """`faiss.write_index(to_faiss(index), path)`, and beside it `path.json`: the file of each id (relative to
    `root`, itself relative to the JSON's folder), the metric, and the backbone whose raw features it takes."""
    faiss = _faiss()
    exported = to_faiss(index, factory)
    path = Path(path)
    faiss.write_index(exported, str(path))
    sidecar = path.with_name(path.name + ".json")
    here = path.absolute().parent
    atomic_write_text(sidecar, json.dumps({
        "format": "cbir_jax.faiss",
        "factory": factory or FAISS_FORMS[index.scorer_name][0],
        "scorer": index.scorer_name,
        "distances": FAISS_FORMS[index.scorer_name][2],
        "queries": f"raw {index.backbone.name} features ({index.backbone.fingerprint})",
        "root": Path(os.path.relpath(index.root, here)).as_posix(),
        "ids": index.ids.tolist(),
        "paths": index.paths,
    }, indent=1))
    return path, sidecar
