"""One error path: user errors are one line (exit 2), bugs keep their traceback, and the range checks."""

import errno
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cbir_jax.runs import cli
from cbir_jax.runs.cli import run_or_exit, to_typed
from cbir_jax.data import DataError
from cbir_jax.core.errors import ConfigError, UserError
from cbir_jax.evaluation.retrieval import check_evaluable

from helpers import compose_config


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=-1", "train.learning_rate=-1.0 must be > 0"),
        ("train.learning_rate=0", "must be > 0"),
        ("train.learning_rate=nan", "must be > 0"),
        ("train.log_every=0", "train.log_every=0 must be >= 1"),
        ("train.batch_size=0", "train.batch_size=0 must be >= 1"),
        ("train.checkpoint_every=0", "train.checkpoint_every=0 must be >= 1"),
        ("train.epochs=0", "train.epochs=0 must be >= 1"),
        ("pairs.pairs_per_epoch=0", "pairs.pairs_per_epoch=0 must be >= 1"),
        ("pairs.hard_fraction=1.5", "must be in [0, 1]"),
        ("data.split.train_fraction=-0.1", "must be in [0, 1]"),
        ("k=-1", "k=-1 must be >= 1"),
        ("k=0", "k=0 must be >= 1"),
        ("eval.k=0", "eval.k=0 must be >= 1"),
        ("labels.image_size=4", "labels.ssim_win_size=7 must be <= labels.image_size"),
        ("seed=-1", "seed=-1 must be >= 0"),  # numpy's generators refuse it deep inside, with a traceback
        ("data.seed=-1", "data.seed=-1 must be >= 0"),
        ("train.patience=-1", "train.patience=-1 must be >= 1 or null"),  # trained 0 steps and exited 0
        ("train.patience=0", "train.patience=0 must be >= 1 or null"),
        ("serve.port=99999", "serve.port=99999 must be in [0, 65535]"),  # an OverflowError from socket
        ("serve.port=-1", "serve.port=-1 must be in [0, 65535]"),
    ],
)
def test_out_of_range_values_fail_at_start_with_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        to_typed(compose_config(override))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override, valid",
    [
        ("train.schedule=linear", "[cosine, constant]"),
        ("features.whiten=pcaa", "[none, pca, pca_whiten]"),
        ("labels.transform=log", "[rank, minmax, none]"),
        ("data.split.by=folder", "[class, image, none]"),
        ("eval.select=worst", "[best, last]"),
        ("eval.tuned_baselines=[dba]", "[alpha_qe, dba_alpha_qe, diffusion, k_reciprocal]"),
        ("head.activation=swish", "[relu, gelu, silu, tanh]"),
    ],
)
def test_closed_choices_fail_when_the_config_is_composed(override, valid):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose_config(override)
    assert valid in str(e.value.__cause__)


def test_a_bad_choice_stops_the_command_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cbir_jax.train", "features.whiten=pcaa", f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "Invalid value 'pcaa', expected one of [none, pca, pca_whiten]" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


def test_every_broken_value_is_named_at_once():
    with pytest.raises(ConfigError, match=r"train.log_every=0 .*; k=0 "):
        to_typed(compose_config("train.log_every=0", "k=0"))


def test_user_error_is_one_line_and_exit_2(capsys):
    def fail():
        raise DataError("data.root=x: no such folder")

    with pytest.raises(SystemExit) as e:
        run_or_exit(fail)
    assert e.value.code == 2 and capsys.readouterr().err == "error: data.root=x: no such folder\n"


def test_a_bare_value_error_is_a_bug_and_keeps_its_traceback():
    def bug():
        raise ValueError("shapes (3,) and (4,) not aligned")

    with pytest.raises(ValueError, match="not aligned"):
        run_or_exit(bug)
    assert not issubclass(ValueError, UserError)


@pytest.mark.parametrize("code", [errno.EACCES, errno.ENOSPC, errno.EROFS])
def test_permission_and_full_disk_errors_name_the_path(capsys, code):
    def fail():
        raise OSError(code, "boom", "/some/run/metrics.json")

    with pytest.raises(SystemExit) as e:
        run_or_exit(fail)
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: /some/run/metrics.json: ")


def test_ctrl_c_outside_training_is_one_line(capsys):
    def interrupt():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        run_or_exit(interrupt)
    assert e.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"


def test_no_evaluable_query_is_one_line():
    labels = np.array([0, 1, 2])  # one image per class: nothing relevant to any query but itself
    with pytest.raises(DataError, match="no query has a relevant item"):
        check_evaluable(labels, labels, np.arange(3), "tiny")
    check_evaluable(np.array([0, 0, 1]), np.array([0, 0, 1]), np.arange(3), "ok")  # class 0 has a pair


_FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from cbir_jax.core.files import atomic_write
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    target = Path(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        atomic_write(target, lambda f: f.write(b"x" * 100_000))
    except OSError as e:
        print(e.errno, e.filename)
""")


def test_full_disk_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, str(target)], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [str(errno.EFBIG), str(target)], out.stderr
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    known = cli.one_line(OSError(errno.EFBIG, "File too large", str(target)))
    assert known == (f"{target}: File too large", 2)


def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="cache_dir=.*afile is a file, not a folder"):
        to_typed(compose_config(f"cache_dir={afile}"))


def test_sigterm_outside_training_is_one_line_and_exit_143(capsys):
    import os
    import signal
    import time

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises first
        raise AssertionError("SIGTERM was not handled")

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            run_or_exit(terminated)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.value.code == 143 and capsys.readouterr().err == "error: terminated (SIGTERM)\n"


def test_a_busy_port_is_one_line():
    pytest.importorskip("uvicorn")
    from cbir_jax.serve import server

    taken = server.bind("127.0.0.1", 0)
    try:
        with pytest.raises(UserError, match=r"cannot listen on 127.0.0.1:\d+") as e:
            server.bind("127.0.0.1", taken.getsockname()[1])
        assert "\n" not in str(e.value)
    finally:
        taken.close()


def test_orphan_temporary_files_are_removed_by_the_next_writer(tmp_path):
    import os
    import time

    from cbir_jax.core import files

    target = tmp_path / "photos.index"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited: its temporary file is an orphan
    orphan = tmp_path / f".photos.index.{files._HOST}.{dead_pid}.k2j3h4.tmp"
    orphan.write_bytes(b"\0" * 1_000_000)  # what a kill -9 mid-save leaves
    live = tmp_path / f".photos.index.{files._HOST}.{os.getpid()}.a1b2c3.tmp"  # a writer still at work
    live.write_bytes(b"x")
    old_style = tmp_path / ".photos.index.zx81ab.tmp"  # no process id: an orphan once a day old
    old_style.write_bytes(b"x")
    day_ago = time.time() - files.ORPHAN_AGE_S - 60
    os.utime(old_style, (day_ago, day_ago))
    recent_old_style = tmp_path / ".photos.index.qq11ww.tmp"
    recent_old_style.write_bytes(b"x")
    other = tmp_path / f".other.index.{files._HOST}.{dead_pid}.abcdef.tmp"  # another file's: not ours to remove
    other.write_bytes(b"x")
    files.atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert not orphan.exists() and not old_style.exists()
    assert live.exists() and recent_old_style.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, recent_old_style.name, other.name])


def test_file_names_that_are_not_utf8_are_skipped_by_name(tmp_path, caplog):
    import logging
    import os

    from faults import image_folder
    from cbir_jax.core.config import DataConfig
    from cbir_jax.data import build_dataset

    root = image_folder(tmp_path / "photos", classes=2, per_class=3)
    bad = os.path.join(os.fsencode(root / "c0"), b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    try:
        os.rename(os.fsencode(root / "c0" / "0.png"), bad)
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(DataConfig(name="folder", root=str(root)))
    assert sorted(dataset.ids) == ["c0/1.png", "c0/2.png", "c1/0.png", "c1/1.png", "c1/2.png"]
    assert ("c0/caf\\xe9.png", "name is not valid UTF-8") in dataset.skipped
    assert any("not valid UTF-8" in r.getMessage() for r in caplog.records)
    assert list(dataset.labels) == [0, 0, 1, 1, 1]


def test_an_image_without_pixels_is_refused(tmp_path):
    from PIL import Image

    from cbir_jax.data import ImageLoadError
    from cbir_jax.data.base import load_image_file, to_rgb_uint8

    with pytest.raises(ImageLoadError, match="empty image"):
        to_rgb_uint8(Image.new("RGB", (0, 0)))
    path = tmp_path / "empty.png"
    path.write_bytes(_png(0, 5))
    with pytest.raises(ImageLoadError) as e:  # Pillow already refuses to identify a 0-pixel PNG
        load_image_file(str(path))
    assert "\n" not in str(e.value)


def _png(width: int, height: int) -> bytes:
    """A PNG whose header declares `width`x`height` (Pillow will not write a 0-pixel image itself)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_index_refuses_a_bad_k_and_a_bad_add_with_one_line(tmp_path):
    import cbir_jax
    from faults import image_folder
    from cbir_jax.api.index import QueryError

    root = image_folder(tmp_path / "photos", classes=2, per_class=3)
    index = cbir_jax.Index.build("pixels", root, cache_dir=str(tmp_path / "cache"))
    query = root / "c0" / "0.png"
    for k in (0, -3, None, True, 2.5, "3"):  # k=0 used to return one hit silently; None a TypeError
        with pytest.raises(QueryError, match="k must be an integer >= 1") as e:
            index.search(query, k=k)
        assert "\n" not in str(e.value)
    scores, ids, paths = index.search(query, k=100)  # more than the gallery: capped, as documented
    assert len(ids) == len(index) == 6
    for bad in (None, 5, [None], [str(query), 7]):
        with pytest.raises(QueryError, match=r"add\(\) takes"):
            index.add(bad)
    assert len(index) == 6
    with pytest.raises(UserError, match="empty image"):
        index.search(np.zeros((0, 0, 3), np.uint8))


def test_a_reranker_k_beyond_the_rows_is_one_line_before_any_allocation(tmp_path):
    """head.reranker.k=100000 on 40 rows: the model used to be built for k first (a 40 GB allocation)."""
    from cbir_jax.training import rerank_training

    cfg = to_typed(compose_config("head=learned_rerank", "head.reranker.k=100000"))
    rows = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    labels = np.repeat(np.arange(4), 10)
    with pytest.raises(DataError, match="head.reranker.k=100000: the training episodes hold only") as e:
        rerank_training.train_reranker(cfg, rows, lambda: labels, rows[:0], None, tmp_path / "run")
    assert "\n" not in str(e.value)
