"""Bounded fuzzing (hypothesis): mutated images, mutated weight files, random config overrides.

Each input must either work or fail with the documented one-line error type; nothing else may escape,
and loading a weights file must never resolve a global through the real import machinery or start a
process (checked with an audit hook). Deterministic (`derandomize`) so CI failures reproduce; each test
runs a fixed number of examples, a few seconds in all.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hydra.errors import ConfigCompositionException
from PIL import Image

from cbir_jax.backbones import torch_pickle
from torch_writer import save_state_dict
from cbir_jax.runs.cli import to_typed
from cbir_jax.core.config import CONFIG_DIR
from cbir_jax.data.base import ImageLoadError, decode_image
from cbir_jax.core.errors import UserError

from helpers import compose_config

pytestmark = pytest.mark.fuzz
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _image_bytes(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8))
    if fmt == "GIF":
        image = image.convert("P")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


IMAGE_SEEDS = {fmt: _image_bytes(fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF")}


def mutated(seed: bytes) -> st.SearchStrategy[bytes]:
    """Seed bytes with some bytes overwritten, a range deleted or duplicated, and/or a truncation."""

    def apply(edits, cut, dup):
        data = bytearray(seed)
        for pos, value in edits:
            data[pos % len(data)] = value
        if dup is not None:
            a, n = dup[0] % len(data), dup[1]
            data[a:a] = data[a : a + n]
        return bytes(data[: max(1, int(len(data) * cut))])

    return st.builds(
        apply,
        st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
        st.one_of(st.just(1.0), st.floats(0.0, 1.0)),
        st.one_of(st.none(), st.tuples(st.integers(0, 1 << 20), st.integers(1, 64))),
    )


@FUZZ
@given(st.sampled_from(sorted(IMAGE_SEEDS)).flatmap(lambda fmt: mutated(IMAGE_SEEDS[fmt])))
def test_mutated_images_decode_or_fail_with_one_line(data):
    try:
        image = decode_image(data)
    except ImageLoadError as e:
        assert "\n" not in str(e)
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def _weights(legacy: bool) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.pth"
        save_state_dict({"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
                            "bn.num_batches_tracked": np.array(3, np.int64)}, path, legacy=legacy)
        return path.read_bytes()


WEIGHT_SEEDS = {"zip": _weights(False), "legacy": _weights(True)}
_FORBIDDEN = ("pickle.find_class", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork")
_seen: list[str] = []
_watching = [False]


def _audit(event: str, args) -> None:
    if _watching[0] and event in _FORBIDDEN:
        _seen.append(event)


sys.addaudithook(_audit)  # cannot be removed; only records while `_watching`


@FUZZ
@given(st.sampled_from(sorted(WEIGHT_SEEDS)).flatmap(lambda k: mutated(WEIGHT_SEEDS[k])))
def test_mutated_weight_files_load_or_fail_with_one_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.pth"
        path.write_bytes(data)
        _seen.clear()
        _watching[0] = True
        try:
            out = torch_pickle.load_state_dict(path)
        except torch_pickle.CheckpointFileError as e:
            assert "\n" not in str(e)
            out = None
        finally:
            _watching[0] = False
    assert _seen == []  # no real global resolved, no process started
    if out is not None:
        assert all(isinstance(v, np.ndarray) for v in out.values())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


GROUPS = ["data", "backbone", "labels", "head", "pairs", "loss", "train", "experiment"]
NUMBERS = st.one_of(st.integers(-3, 10**6).map(str), st.sampled_from(["0", "-1", "1e30", "-1e-3", "nan", "inf", "0.5", "2.0", "null"]))
KEYS = ["train.learning_rate", "train.batch_size", "train.epochs", "train.log_every", "train.checkpoint_every",
        "pairs.pairs_per_epoch", "pairs.hard_fraction", "pairs.hard_k", "k", "eval.k", "data.split.train_fraction",
        "data.split.query_fraction", "labels.image_size", "labels.ssim_win_size", "backbone.image_size",
        "train.grad_clip", "features.whiten_dim", "data.max_per_class", "train.weight_decay"]
OVERRIDE = st.one_of(
    st.sampled_from(GROUPS).flatmap(lambda g: st.sampled_from(_options(g) + ["nope"]).map(lambda o: f"{g}={o}")),
    st.tuples(st.sampled_from(KEYS), NUMBERS).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.sampled_from(["data.root=/nonexistent", "head.hidden=[]", "head.hidden=[0]", "train.epochz=3", "+train.x=1",
                     "train.schedule=linear", "features.whiten=zca", "labels.transform=log"]),
)


def _build_components(cfg) -> None:
    """What a run builds from its config before any data is read: every choice is resolved here."""
    from cbir_jax.scoring import heads
    from cbir_jax.training import losses, optim
    from cbir_jax.labels import pair_labels
    from cbir_jax.features import postprocess
    from cbir_jax.data import splits
    from cbir_jax.scoring.baselines import baseline_scorer

    heads.build_head(cfg.head)
    losses.get_loss(cfg.loss)
    optim.make_optimizer(cfg.train, total_steps=10)
    pair_labels.PAIR_LABELS.get(cfg.labels.name)
    pair_labels.transform_targets(cfg.labels.transform, np.arange(5.0))
    postprocess.fit(cfg.features, np.random.default_rng(0).normal(size=(12, 6)))
    splits.make_split(cfg.data.split, 24, lambda: np.repeat(np.arange(6), 4))
    for name in cfg.eval.baselines:
        baseline_scorer(name)


@settings(FUZZ, max_examples=80)
@given(st.lists(OVERRIDE, max_size=6))
def test_random_overrides_compose_or_fail_with_one_message(overrides):
    try:
        cfg = to_typed(compose_config(*overrides, fast=False))
        _build_components(cfg)
    except UserError as e:  # ConfigError at start, or a component's own one-line error
        assert "\n" not in str(e)
        return
    except ConfigCompositionException:  # Hydra's own message: an unknown option, key or type
        return
    assert cfg.train.learning_rate > 0 and cfg.k >= 1
