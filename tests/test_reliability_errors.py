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
        ("eval.tuned_baselines=[dba]", "[alpha_qe, dba_alpha_qe, diffusion]"),
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
