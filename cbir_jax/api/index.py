"""`cbir_jax.Index`: a folder of images made searchable in a few lines of Python, without Hydra.

```python
import cbir_jax
index = cbir_jax.Index.build("efficientnet_lite0", "photos/")   # or Index.build(cbir_jax.load_run(RUN), "photos/")
scores, ids, paths = index.search("query.jpg", k=10)
index.save("photos.index"); index = cbir_jax.Index.load("photos.index")
index.add(["new1.jpg", "new2.jpg"])
```

Every step is the project's own: the folder source (`data=folder`: class sub-folders give labels,
unreadable files are skipped, named and counted), cached feature extraction, post-processing fitted on the
gallery (`features/postprocess.py`), and the chunked top-k of `scoring/ranking.py`. So an index ranks
exactly as `python -m cbir_jax.search` does for the same backbone, scorer and folder. The file format is
described in `api/store.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from cbir_jax.api import faiss_export, store
from cbir_jax.api.store import IndexFileError, Stored
from cbir_jax.backbones import Backbone, build_backbone
from cbir_jax.core.config import (
    BackboneConfig, Config, DataConfig, EvalConfig, FeaturesConfig, LabelsConfig, default_cache_dir, preset,
)
from cbir_jax.core.errors import CheckpointError, UserError
from cbir_jax.core.registry import UnknownComponentError
from cbir_jax.data import DataError, ImageDataset, ImageLoadError, build_dataset
from cbir_jax.data.base import load_image_file, pil_to_rgb, to_rgb_uint8
from cbir_jax.core.vectors import EPS
from cbir_jax.features import postprocess
from cbir_jax.features.extract import extract_features, forward_batches
from cbir_jax.features.stage import Stage, load_stage
from cbir_jax.features.store import FeatureStore, Item, build_store, remove_rows
from cbir_jax.scoring import heads, ranking, scorers
from cbir_jax.scoring.baselines import baseline_names, baseline_scorer
from cbir_jax.scoring.scorers import Scorer
from cbir_jax.runs.cli import refuse_overrides, to_typed
from cbir_jax.runs.trained import Run, load_run, load_trained, trained_scorer

log = logging.getLogger(__name__)

# One query: an image file, a PIL image or a uint8 array (HxW, HxWx3 or HxWx4); a batch: a list of them or
# a uint8 (B, H, W, 3) array.
Query = Union[str, os.PathLike, Image.Image, np.ndarray, Sequence[Any]]
_ADD_THUMB = 8  # extraction also makes thumbnails (for SSIM labels); `add` has no use for them
MEMORY = ("auto", "ram", "stream")
AUTO_STREAM_BYTES = 1 << 30  # memory="auto": a stored gallery larger than this is ranked from disk, chunk by chunk
STREAM_ROWS = 8192  # at most this many rows per streamed chunk (42 MB at D=1280, float32): measured fastest


def _tiling(shard_rows: int) -> int:
    """Chunk rows that tile the store's shards (the largest divisor of `shard_rows` up to STREAM_ROWS), so
    every chunk is a view of one memory-mapped shard: nothing is copied on the host."""
    return max(d for d in range(1, min(shard_rows, STREAM_ROWS) + 1) if shard_rows % d == 0)


class QueryError(UserError):
    """A query that is not an image: a wrong array type or shape, or an empty batch."""


def check_k(k: Any) -> int:
    """`k` as an int >= 1 (a bool, None or 0 is a caller's mistake, not a request for one hit)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise QueryError(f"k must be an integer >= 1, not {k!r}")
    return int(k)


def _one_image(query: Any) -> np.ndarray:
    if isinstance(query, (str, os.PathLike)):
        try:
            return load_image_file(str(query))
        except ImageLoadError as e:
            raise type(e)(f"query {query}: {e}") from None
    if isinstance(query, Image.Image):
        return pil_to_rgb(query)
    array = np.asarray(query)
    if array.dtype != np.uint8:
        raise QueryError(f"a query array must be uint8 (HxWx3 pixels), not {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
        return to_rgb_uint8(Image.fromarray(array))
    raise QueryError(f"a query array must be HxW, HxWx3 or HxWx4 (or a batch BxHxWx3), not shape {array.shape}")


def as_images(queries: Query) -> tuple[list[np.ndarray], bool]:
    """The queries as uint8 RGB images, and whether one query was given (not a batch)."""
    if isinstance(queries, (list, tuple)):
        if not queries:
            raise QueryError("an empty list of queries")
        return [_one_image(q) for q in queries], False
    if isinstance(queries, np.ndarray) and queries.ndim == 4:
        if len(queries) == 0:
            raise QueryError("an empty batch of queries")
        return [_one_image(q) for q in queries], False
    return [_one_image(queries)], True


def _choose_scorer(name: Optional[str], run: Optional[Run]) -> Scorer:
    if run is not None and name in (None, run.head):
        return run.scorer
    name = name or "cosine"
    if name in baseline_names():
        return baseline_scorer(name)
    raise UnknownComponentError(
        f"scorer={name!r} is not a fixed metric or re-ranker ({', '.join(baseline_names())}); a learned scorer "
        "comes with its run: Index.build(cbir_jax.load_run(RUN_DIR), folder)"
    )


def _plain(cfg: Any) -> dict[str, Any]:
    """A config dataclass as JSON-ready values (what the index file keeps)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def _typed(schema: type, values: dict[str, Any]) -> Any:
    """Values read back from an index file as the typed config (checked by the schema)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))


class Index:
    """A searchable folder of images: raw backbone features, the post-processing fitted on them, a scorer.

    Build one with `Index.build`, reopen a saved one with `Index.load`. Ids are row numbers, 0..N-1 in the
    order images were added, so `ids` index `paths` and `labels`; `remove` renumbers the rows after the
    removed ones (as faiss's `remove_ids` does): a file's path is its lasting name.

    A loaded index keeps its features on disk (a feature store) and is its folder: `add` and `remove`
    update it in place. `memory` says how it ranks: `ram` loads the gallery once (fastest for many queries
    on a gallery that fits), `stream` reads it chunk by chunk for every batch of queries (memory bounded by
    two chunks, whatever N), `auto` streams a stored gallery over 1 GiB. Scorers that need the whole gallery
    at once (the re-rankers) load it either way.
    """

    def __init__(self, data: Stored, backbone: Backbone, scorer: Union[Scorer, Mapping[str, Scorer]],
                 features: FeaturesConfig, run: Optional[Run] = None, batch_size: int = 32,
                 chunk: Optional[int] = EvalConfig.gallery_chunk, load: Optional[Callable[[int], np.ndarray]] = None,
                 name: str = "", memory: str = "auto") -> None:
        if memory not in MEMORY:
            raise UserError(f"memory={memory!r}: valid: {', '.join(MEMORY)}")
        self.memory = memory
        self._data = data
        self.name = name or f"folder:{Path(data.root).name}"  # where the gallery came from, for titles
        self.backbone = backbone
        # name -> scorer; the first is the index's own (saved with it), the others rank the same gallery
        self.scorers: dict[str, Scorer] = {scorer.name: scorer} if isinstance(scorer, Scorer) else dict(scorer)
        if not self.scorers:
            raise ValueError("an Index needs at least one scorer")
        self.features_config = features
        self.run = run
        self.batch_size = batch_size
        self.chunk = chunk
        self._load = load  # row -> image, for galleries whose images are not files under `root`
        self._gallery: Optional[np.ndarray] = None
        self._raw: Optional[np.ndarray] = None
        self._post_scorers: dict[str, Scorer] = {}
        self._states: dict[str, Any] = {}

    @property
    def scorer(self) -> Scorer:
        """The index's own scorer (the one saved with it)."""
        return next(iter(self.scorers.values()))

    # ---- building, saving, loading ------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        backbone: Union[str, Run, BackboneConfig],
        folder: Union[str, os.PathLike],
        *,
        scorer: Optional[str] = None,
        features: Optional[FeaturesConfig] = None,
        cache_dir: Optional[str] = None,
        batch_size: Optional[int] = None,
    ) -> "Index":
        """Indexes every image under `folder` (one sub-folder per class gives labels).

        `backbone`: a backbone name (`efficientnet_lite0`, `pixels`, `resnet50` ...: the settings of
        `configs/backbone/<name>.yaml`), a `BackboneConfig`, or a `Run` (`cbir_jax.load_run`), whose
        backbone, post-processing and learned scorer are used. `scorer`: a fixed metric or non-learned
        re-ranker by name (default: the run's scorer, else `cosine`). `features`: the post-processing
        (default: the run's, else L2-normalised). Features are cached under `cache_dir` (default
        `$CBIR_JAX_CACHE` or `~/.cache/cbir_jax`), so building the same folder again costs no forward pass.
        """
        run = backbone if isinstance(backbone, Run) else None
        cache_dir = cache_dir or (run.config.cache_dir if run is not None else default_cache_dir())
        if run is not None:
            backbone_cfg, net = run.config.backbone, run.backbone
        else:
            backbone_cfg = preset("backbone", backbone, BackboneConfig) if isinstance(backbone, str) else backbone
            net = build_backbone(backbone_cfg, cache_dir)
        features = features or (run.config.features if run is not None else FeaturesConfig())
        chosen = _choose_scorer(scorer, run)  # before extraction: a wrong name fails at once
        dataset = build_dataset(DataConfig(name="folder", root=str(folder)))
        fs = extract_features(dataset, net, thumb_size=LabelsConfig.image_size, cache_dir=cache_dir,
                              batch_size=batch_size or backbone_cfg.batch_size, use_cache=features.cache)
        data = Stored(
            features=fs.features,
            paths=[Path(i).as_posix() for i in fs.ids],
            labels=fs.labels,
            class_names=list(dataset.class_names),
            root=str(Path(os.path.expanduser(folder)).resolve()),
            backbone=net.name,
            backbone_fingerprint=net.fingerprint,
            backbone_config=_plain(backbone_cfg),
            features_config=_plain(features),
            post=postprocess.fit(features, fs.features),
            scorer=chosen.name,
            run=str(run.path) if run is not None and chosen is run.scorer else "",
            run_select=str(run.config.eval.select) if run is not None and chosen is run.scorer else "",
            skipped=list(fs.skipped),
        )
        return cls(data, net, chosen, features, run if data.run else None, batch_size or backbone_cfg.batch_size)

    @classmethod
    def from_stage(cls, cfg: Config, stage: Stage, scorer: Union[Scorer, Mapping[str, Scorer]],
                   rows: Optional[np.ndarray] = None) -> "Index":
        """The gallery a composed config describes: the stage's rows (all, or `rows`), post-processed as
        `cfg.features` fitted on them, ranked by `scorer` (one, or several by name). What `search`, the search
        page and evaluation's figure rank against; images come from the stage's dataset."""
        fs = stage.features
        rows = np.arange(len(fs)) if rows is None else np.asarray(rows, np.int64)
        raw = np.asarray(fs.features[rows], np.float32)
        labels = fs.labels
        dataset_rows = fs.keep[rows]
        data = Stored(
            features=raw,
            paths=[Path(fs.ids[r]).as_posix() for r in rows],
            labels=None if labels is None else np.asarray(labels[rows], np.int32),
            class_names=list(fs.dataset.class_names),
            root=str(Path(os.path.expanduser(cfg.data.root)).resolve()) if cfg.data.name == "folder" else "",
            backbone=stage.backbone.name,
            backbone_fingerprint=stage.backbone.fingerprint,
            backbone_config=_plain(cfg.backbone),
            features_config=_plain(cfg.features),
            post=postprocess.fit(cfg.features, raw),
            scorer=next(iter(scorer)) if isinstance(scorer, Mapping) else scorer.name,
            run="",
            run_select="",
            skipped=list(fs.skipped),
        )
        return cls(data, stage.backbone, scorer, cfg.features, batch_size=cfg.backbone.batch_size,
                   chunk=cfg.eval.gallery_chunk, load=lambda row: fs.dataset.load(int(dataset_rows[row])),
                   name=fs.dataset.name)

    def with_scorers(self, named: Mapping[str, Scorer]) -> "Index":
        """The same gallery ranked by these scorers too (after its own); their states are prepared lazily."""
        self.scorers.update({n: s for n, s in named.items() if n not in self.scorers})
        return self

    def subset(self, rows: np.ndarray) -> "Index":
        """A new index of these rows (ids renumbered 0..M-1 in that order), with the same fitted
        post-processing, scorers and image source."""
        rows = np.asarray(rows, np.int64)
        d = self._data
        data = dataclasses.replace(
            d, features=self._features()[rows], paths=[d.paths[r] for r in rows],
            labels=None if d.labels is None else d.labels[rows], class_names=list(d.class_names),
        )
        load = None if self._load is None else (lambda row, base=self._load: base(int(rows[row])))
        return type(self)(data, self.backbone, self.scorers, self.features_config, self.run, self.batch_size,
                          self.chunk, load, self.name)

    def save(self, path: Union[str, os.PathLike], *, storage: str = "float32", shard_rows: int = 4096) -> Path:
        """Writes the index as one folder (format: `cbir_jax/api/store.py`), its features a feature store of
        `shard_rows`-row shards in `storage` dtype; returns its path. Saving a loaded index to its own folder
        rewrites only its header."""
        if not self._data.root:
            raise UserError("only an index of a folder can be saved (its images are files under one root)")
        return store.save(self._data, path, storage=storage, shard_rows=shard_rows)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, root: Optional[str] = None, run: Optional[str] = None,
             memory: str = "auto", verify: Optional[bool] = None) -> "Index":
        """Reopens a saved index: no image is read, no gallery feature recomputed, and (a version-2 folder)
        no feature loaded until ranking needs it (`memory`: see the class).

        `root` / `run`: where the indexed folder / the learned scorer's run now are, if they moved apart from
        the index. A header whose folder lies outside the index's own folder is refused unless `root=` is
        given (an index from someone else must not open files you did not point it at). A damaged index, a
        newer format, or a backbone that no longer computes the same features (another weights file or
        cbir_jax version) is a one-line `IndexFileError`. `verify`: re-hash and check every shard (default:
        for features under 1 GiB; see `api/store.py: load`).
        """
        data = store.load(path, verify=verify)
        if root is not None:
            data.root = str(Path(os.path.expanduser(root)).resolve())
        else:
            home = Path(os.path.expanduser(path)).absolute().parent.resolve()
            if not Path(data.root).resolve().is_relative_to(home):
                raise IndexFileError(f"index={path}: its images folder {data.root} lies outside the index's folder "
                                     f"{home}; pass root={data.root} if you trust it (command line: index_root=)")
        if not Path(data.root).is_dir():
            log.warning("index %s: its folder %s is not there (pass root= if it moved); paths name missing files",
                        path, data.root)
        try:
            backbone_cfg = _typed(BackboneConfig, data.backbone_config)
            features = _typed(FeaturesConfig, data.features_config)
        except OmegaConfBaseException as e:
            raise IndexFileError(f"index={path}: damaged header ({type(e).__name__} in its configs)") from None
        net = build_backbone(backbone_cfg)
        if net.fingerprint != data.backbone_fingerprint or net.feature_dim != data.dim:
            raise IndexFileError(
                f"index={path} holds {data.backbone} features ({data.backbone_fingerprint}), but this backbone now "
                f"computes {net.fingerprint}: build the index again"
            )
        if "projection" in data.post and data.post["projection"].shape[1] > data.dim:
            raise IndexFileError(f"index={path}: damaged (whitening to more dimensions than the features have)")
        loaded_run = None
        if data.run:
            data.run = str(run or data.run)
            if not Path(data.run).is_dir():
                raise IndexFileError(f"index={path}: its scorer {data.scorer} comes from the run {data.run}, "
                                     "which is not there (pass run=RUN_DIR if it moved)")
            loaded_run = load_run(data.run, select=data.run_select or "best")
            if loaded_run.head != data.scorer or loaded_run.backbone.fingerprint != data.backbone_fingerprint:
                raise IndexFileError(f"index={path}: the run {data.run} trained {loaded_run.head} on "
                                     f"{loaded_run.backbone.name}, not {data.scorer} on {data.backbone}")
            scorer = loaded_run.scorer
        else:
            scorer = _choose_scorer(data.scorer, None)
        return cls(data, net, scorer, features, loaded_run, backbone_cfg.batch_size, memory=memory)

    # ---- growing ------------------------------------------------------------------------------------------

    def add(self, files: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]], *, copy: bool = False) -> np.ndarray:
        """Appends image files; returns their new ids. Files already indexed are left alone, unreadable ones
        skipped, named and counted (as in `build`).

        Files must lie inside the indexed folder, so the index and its folder still move together; one outside
        is refused (one line) unless `copy=True`, which copies it into the folder's top level first (a name
        already taken there by another file is refused rather than overwritten).
        The post-processing fitted at build time is kept, so earlier scores do not change; `refit()`
        re-fits it on every row (as building from scratch would).
        """
        if not isinstance(files, (str, os.PathLike)) and not isinstance(files, Iterable):
            raise QueryError(f"add() takes an image path or an iterable of paths, not {type(files).__name__}")
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        bad = [f for f in files if not isinstance(f, (str, os.PathLike))]
        if bad:
            raise QueryError(f"add() takes image paths, not {type(bad[0]).__name__}")
        root = Path(self._data.root)
        root_dir = Path(os.path.expanduser(root)).resolve()
        known = set(self._data.paths)
        rel, full, copies = [], [], []
        for f in files:
            given = Path(os.path.expanduser(f)).absolute()
            source = given.parent.resolve() / given.name  # `..` and linked folders resolved; the file as named
            if not source.is_relative_to(root_dir):
                if not copy:
                    raise DataError(f"add: {f} is outside the indexed folder {root}; move it there, or add(..., copy=True)")
                if not source.is_file():
                    raise DataError(f"add: cannot copy {f}: no such file")
                target = root_dir / source.name
                if target.exists() and not (target.is_file() and target.read_bytes() == source.read_bytes()):
                    raise DataError(f"add: cannot copy {f} into {root}: {source.name} is already another file there")
                copies.append((source, target))
                source = target
            r = source.relative_to(root_dir).as_posix()
            if r in known:
                log.info("add: %s is already indexed", f)
                continue
            known.add(r)
            rel.append(r)
            full.append(str(root / r))
        for source, target in copies:  # only once every file is known to be acceptable
            if not target.exists():
                shutil.copy2(source, target)
        if not rel:
            return np.zeros(0, np.int64)
        d = self._data
        n = len(d)
        if isinstance(d.features, FeatureStore):
            added, skipped = self._add_to_store(rel, full)
        else:
            dataset = ImageDataset(name="add", ids=rel, load=lambda i: load_image_file(full[i]), labels=None,
                                   class_names=[], content_key="")
            fs = extract_features(dataset, self.backbone, thumb_size=_ADD_THUMB, cache_dir="",
                                  batch_size=self.batch_size, use_cache=False)
            d.features = np.concatenate([d.features, fs.features])
            added, skipped = list(fs.ids), list(fs.skipped)
            d.paths = d.paths + added
        if d.labels is not None:
            d.labels = np.concatenate([d.labels, np.asarray([self._class_of(p) for p in added], np.int32)])
        d.skipped = d.skipped + skipped
        self._changed()
        return np.arange(n, n + len(added), dtype=np.int64)

    def _add_to_store(self, rel: list[str], full: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
        """New files into the index's feature store by the store's own update (`build_store`): the rows it
        holds are kept as they are, the new files are decoded by its workers and committed as new shards."""
        features: FeatureStore = self._data.features
        known = features.items + [Item.of(r) for s in features.shards for r in s["skipped"]]
        new = []
        for r, f in zip(rel, full):
            st = os.stat(f) if os.path.isfile(f) else None
            new.append(Item(r, r, int(st.st_size), int(st.st_mtime_ns)) if st else Item(r, r))
        items = known + new
        files = [str(Path(self._data.root) / it.path) for it in items]
        dataset = ImageDataset(name="add", ids=[it.id for it in items], load=lambda i: load_image_file(files[i]),
                               labels=None, class_names=[], content_key="", paths=files,
                               stats=[(it.size, it.mtime_ns) for it in items])
        build_store(features.root, dataset, self.backbone, storage=str(features.dtype),
                    shard_rows=int(features.manifest.get("shard_rows", 4096)), batch_size=self.batch_size,
                    progress=False)
        after = FeatureStore.open(features.root, fingerprint=self.backbone.fingerprint)
        self._data.features = after
        self._data.paths = [it.path if it.path is not None else it.id for it in after.items]
        added = self._data.paths[len(features):]
        wanted = set(rel)
        skipped = [(f, why) for f, why in after.skipped if f in wanted]
        return added, skipped

    def remove(self, ids: Union[int, Iterable[int]]) -> int:
        """Removes these rows; the rows after them move up (ids are row numbers). Returns how many were
        removed. The post-processing fitted at build time is kept (`refit()` re-fits it)."""
        rows = np.unique(np.atleast_1d(np.asarray(ids if not isinstance(ids, (int, np.integer)) else [ids])))
        if rows.size and (rows.dtype.kind not in "iu" or rows[0] < 0 or rows[-1] >= len(self)):
            raise QueryError(f"remove() takes ids in 0..{len(self) - 1}, not {rows.tolist()[:5]}")
        if not rows.size:
            return 0
        d = self._data
        keep = np.setdiff1d(np.arange(len(d)), rows)
        if isinstance(d.features, FeatureStore):
            d.features = remove_rows(d.features.root, rows)
        else:
            d.features = d.features[keep]
        d.paths = [d.paths[r] for r in keep]
        if d.labels is not None:
            d.labels = d.labels[keep]
        self._changed()
        return int(rows.size)

    def _class_of(self, rel: str) -> int:
        """The class of an added file: its first folder under the root (a new name is a new class), else -1."""
        parts = rel.split("/")
        if len(parts) < 2 or parts[0] == "..":
            return -1
        if parts[0] not in self._data.class_names:
            self._data.class_names.append(parts[0])
        return self._data.class_names.index(parts[0])

    def refit(self) -> None:
        """Re-fits the post-processing on every row (after `add`, to match a fresh build of the folder)."""
        self._data.post = postprocess.fit(self.features_config, self._features())
        self._changed()

    def _changed(self) -> None:
        """Forgets what was computed from the rows; a stored index writes its header (labels, fit) again."""
        self._gallery, self._states, self._raw, self._post_scorers = None, {}, None, {}
        if isinstance(self._data.features, FeatureStore) and store.is_index_folder(self._data.features.root.parent):
            store.save(self._data, self._data.features.root.parent)

    # ---- searching ----------------------------------------------------------------------------------------

    def embed(self, queries: Query, *, raw: bool = False) -> np.ndarray:
        """Features (B, D) of queries as the scorer sees them (post-processed), or the backbone's raw ones
        (what the faiss export takes: its post-processing is inside it)."""
        return self._embed(as_images(queries)[0], raw)

    def _embed(self, images: list[np.ndarray], raw: bool = False) -> np.ndarray:
        feats = forward_batches(self.backbone, images, min(self.batch_size, len(images)))
        return feats if raw else postprocess.apply(self._data.post, feats)

    def _features(self) -> np.ndarray:
        """The raw gallery (N, D) in memory: read from the feature store once, for what needs it whole."""
        features = self._data.features
        if not isinstance(features, FeatureStore):
            return features
        if self._raw is None:
            size = len(features) * features.dim * 4
            log.log(logging.INFO if size > AUTO_STREAM_BYTES else logging.DEBUG,  # said only where it matters
                    "loading %d x %d stored features (%.2f GB) into memory", len(features), features.dim, size / 1e9)
            self._raw = self._finite(features.features())
        return self._raw

    def _finite(self, rows: np.ndarray) -> np.ndarray:
        if not np.all(np.isfinite(rows)):
            raise IndexFileError(f"index {self.name}: damaged (non-finite features)")
        return rows

    def gallery(self) -> np.ndarray:
        """The post-processed gallery (N, D'), as the scorer ranks it."""
        if self._gallery is None:
            features, post = self._data.features, self._data.post
            if isinstance(features, FeatureStore) and self._raw is None and "projection" not in post:
                # read from disk into a fresh array and normalised in place: the gallery costs N x D once,
                # not three times (the raw rows are read again if `refit` or `subset` needs them)
                # 64-byte aligned, so `device_put` aliases it on CPU instead of copying N x D again; checked
                # and normalised block by block, so no N x D temporary exists beside it
                x = features.features(out=ranking.aligned_empty((len(features), features.dim)))
                for first in range(0, len(x), 65536):
                    block = self._finite(x[first:first + 65536])
                    if post["l2"]:
                        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), EPS)  # as l2_normalise
                self._gallery = x
            else:
                self._gallery = postprocess.apply(post, self._features())
        return self._gallery

    def _post_scorer(self, scorer: Scorer) -> Scorer:
        """`scorer` on raw stored rows: the fitted post-processing runs in the jitted pass over each chunk."""
        if scorer.name not in self._post_scorers:
            post = self._data.post
            if "projection" not in post and scorer.scale_invariant:  # L2 alone cannot change its scores
                self._post_scorers[scorer.name] = scorer
            else:
                self._post_scorers[scorer.name] = scorers.with_transform(
                    scorer, lambda rows: postprocess.apply(post, rows), name=f"{scorer.name}+post")
        return self._post_scorers[scorer.name]

    def rows(self, ids: Sequence[int]) -> np.ndarray:
        """Post-processed features (len(ids), D') of these gallery rows, as queries: a stored index reads
        only their shards (a gallery image used as a query does not load the gallery)."""
        features = self._data.features
        if self._gallery is None and isinstance(features, FeatureStore):
            return postprocess.apply(self._data.post, self._finite(features.rows(ids)))
        return self.gallery()[np.asarray(ids, np.int64)]

    def _streams(self, scorer: Scorer) -> bool:
        """Whether `scorer` ranks this index from disk, chunk by chunk (see the class)."""
        features = self._data.features
        if not isinstance(features, FeatureStore) or not scorer.row_local or self._gallery is not None:
            return False
        return self.memory == "stream" or (self.memory == "auto" and len(features) * features.dim * 4 > AUTO_STREAM_BYTES)

    def search(self, queries: Query, k: int = 10, *, scorer: Optional[str] = None) -> tuple[np.ndarray, np.ndarray, list]:
        """The k best gallery items per query: (scores, ids, paths), best first.

        Scores are similarities (higher is better; `euclid` gives minus the distance). One query (a path,
        PIL image or HxWx3 array) gives (k,), (k,) and a list of k paths; a batch (a list, or a BxHxWx3 array)
        gives (B, k), (B, k) and B lists. k is capped at the gallery size. `scorer`: one of `scorers` by name
        (default: the index's own).
        """
        k = check_k(k)  # before any image is decoded
        images, single = as_images(queries)
        q = self._embed(images)  # decoded once: `embed(images)` would convert each array again
        scores, ids = self.rank(q, k, scorer=scorer)
        paths = [[self.path(j) if j >= 0 else None for j in row] for row in ids.tolist()]
        return (scores[0], ids[0], paths[0]) if single else (scores, ids, paths)

    def rank(self, queries: np.ndarray, k: int = 10, *, scorer: Optional[str] = None,
             exclude: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of post-processed query features (B, D'): (scores, ids), both (B, k), ids -1 past the
        gallery's end. `exclude` (B,): a gallery id per query left out of its ranking (a query that is itself
        a gallery row), -1 for none; re-rankers then also treat that row as absent (leave-one-out)."""
        chosen = self.scorers[scorer] if scorer is not None else self.scorer
        k = min(check_k(k), len(self))
        if self._streams(chosen):
            features: FeatureStore = self._data.features
            rows = min(_tiling(int(features.manifest.get("shard_rows") or STREAM_ROWS)), len(self))
            try:
                s, i = ranking.top_k_streamed(self._post_scorer(chosen), features.iter_chunks(rows), queries, k,
                                              rows_per_chunk=rows, self_index=exclude)
            except ranking.NonFiniteScores:
                raise IndexFileError(f"index {self.name}: damaged (non-finite stored features: NaN scores)") from None
            return s, i.astype(np.int64)
        self_index = None if exclude is None else jnp.asarray(exclude, jnp.int32)
        s, i = ranking.top_k(chosen, self.prepared(chosen.name), jnp.asarray(queries, jnp.float32), k=k,
                             chunk=self.chunk, self_index=self_index, exclude_self=exclude is not None)
        return np.asarray(s), np.asarray(i).astype(np.int64)

    def prepared(self, name: str) -> Any:
        """The named scorer's state over the gallery, prepared once (until `add` or `refit`)."""
        if name not in self._states:
            self._states[name] = self.scorers[name].prepare(jax.device_put(self.gallery()))
        return self._states[name]

    # ---- what it holds ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return (f"Index({len(self)} images of {self.root}, backbone={self._data.backbone}, "
                f"scorer={self.scorer_name}, {len(self.skipped)} skipped)")

    @property
    def root(self) -> str:
        return self._data.root

    @property
    def scorer_name(self) -> str:
        return self._data.scorer

    @property
    def ids(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)

    @property
    def paths(self) -> list[str]:
        """Each row's file relative to `root` (POSIX separators)."""
        return self._data.paths

    @property
    def labels(self) -> Optional[np.ndarray]:
        """Each row's class index (-1: none), or None where the folder has no class sub-folders."""
        return self._data.labels

    @property
    def class_names(self) -> list[str]:
        return self._data.class_names

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(file, reason) of every file that could not be indexed."""
        return self._data.skipped

    @property
    def post(self) -> dict[str, Any]:
        """The fitted post-processing (`features/postprocess.py`): `l2`, and `mean`/`projection` if whitened."""
        return self._data.post

    def path(self, id_: int) -> str:
        """The file of one id, under the index's root."""
        return str(Path(self._data.root) / self._data.paths[int(id_)])

    def image(self, id_: int) -> np.ndarray:
        """The image of one id (uint8 HxWx3), read from its file (or the dataset it was built from)."""
        if self._load is not None:
            return self._load(int(id_))
        return load_image_file(self.path(id_))

    # ---- faiss ----------------------------------------------------------------------------------------------

    def to_faiss(self, factory: Optional[str] = None, **options: Any):
        """The index as a faiss index that takes raw backbone features (`embed(q, raw=True)`): the
        post-processing is inside it. Flat (cosine: IndexFlatIP; euclid: IndexFlatL2) by default, or a
        trained `factory` index (`"IVF1024,PQ32"` ...) filled chunk by chunk. See `api/faiss_export.py`."""
        return faiss_export.to_faiss(self, factory, **options)

    def save_faiss(self, path: Union[str, os.PathLike], factory: Optional[str] = None) -> tuple[Path, Path]:
        """Writes `to_faiss(factory)` to `path` (faiss.write_index) and its ids and paths beside it (`path.json`)."""
        return faiss_export.save_faiss(self, path, factory)

    def iter_gallery(self, rows: int = STREAM_ROWS) -> Iterable[tuple[int, np.ndarray]]:
        """(first row, post-processed rows) chunk by chunk: from disk for a stored index, never whole."""
        features = self._data.features
        if isinstance(features, FeatureStore) and self._raw is None:
            for first, chunk in features.iter_chunks(rows):
                yield first, postprocess.apply(self._data.post, self._finite(chunk))
        else:
            x = self._features()
            for first in range(0, len(x), rows):
                yield first, postprocess.apply(self._data.post, x[first:first + rows])

    def sample_gallery(self, rows: int, seed: int = 0) -> np.ndarray:
        """`rows` post-processed gallery rows drawn without replacement (all of them if fewer), in row order."""
        n = len(self)
        wanted = np.arange(n) if rows >= n else np.sort(np.random.default_rng(seed).choice(n, rows, replace=False))
        return self.rows(wanted)  # a stored index reads only these rows


def from_command_line(
    cfg_dict: DictConfig, overridden: frozenset[str] = frozenset(), *, also: Sequence[str] = (), head: bool = True,
) -> tuple[Config, Index]:
    """The gallery a command line names, as an `Index` (what `search` and `serve` rank against).

    `index=FILE`: the saved index and its own scorer. Otherwise every image of `data` (features cached by
    the stages), ranked by `checkpoint=RUN`'s trained scorer or, without one, by the fixed `head=` (with
    `head=False`, only when `head=` was given). Then the fixed metrics and re-rankers named in `also`, on
    the same gallery. Returns the config the gallery was built with (a run's own, today's keys on top).
    """
    now = to_typed(cfg_dict)
    named = {str(name): baseline_scorer(name) for name in also}  # a wrong name fails before any feature loads
    if now.index:
        refuse_overrides(now.index, overridden)
        return now, Index.load(now.index, root=now.index_root, memory=now.index_memory).with_scorers(named)
    cfg, primary = now, {}
    if now.checkpoint:
        run = Path(now.checkpoint)
        cfg, info = load_trained(run, cfg_dict, overridden)
        cfg = dataclasses.replace(cfg, serve=now.serve)  # the page's settings are today's, never the run's
        stage = load_stage(cfg, split_by="none")
        primary = {cfg.head.name: trained_scorer(cfg, run, info, stage)}
    else:
        wanted = head or "head" in overridden
        if wanted and heads.is_learned(cfg.head.name):
            raise CheckpointError(f"head={cfg.head.name} is learned: pass checkpoint=RUN_DIR (or a fixed head, e.g. head=cosine)")
        if wanted:
            primary = {cfg.head.name: scorers.fixed_scorer(cfg.head.name)}
        if not primary and not named:
            raise DataError("no checkpoint, no head= and no other scorer: nothing to rank with")
        stage = load_stage(cfg, split_by="none")
    return cfg, Index.from_stage(cfg, stage, {**primary, **{n: s for n, s in named.items() if n not in primary}})
