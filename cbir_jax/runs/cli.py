"""Shared plumbing of the entry points: known errors become one line on stderr, not a stack trace."""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from cbir_jax.core.config import Config
from cbir_jax.core.config_checks import validate
from cbir_jax.core.errors import CheckpointError, ConfigError, Interrupted, Terminated, UserError

T = TypeVar("T")
# OS errors a user's environment causes (a path that is missing, not writable, or on a full disk): one line
# naming the path. Any other OSError is unexpected and keeps its traceback.
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG,
     errno.EIO, errno.ENOTDIR, errno.EISDIR}
)
log = logging.getLogger("cbir_jax")


def one_line(error: BaseException) -> tuple[str, int] | None:
    """(message, exit code) for a failure the user can fix, or None for a bug (which keeps its traceback)."""
    if isinstance(error, UserError):
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__, error.exit_code
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS and error.filename is not None:
        return f"{error.filename}: {error.strerror}", 2
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", Interrupted.exit_code
    return None


def run_or_exit(fn: Callable[[], T]) -> T:
    """Runs an entry point; a user error (bad value, path, data or checkpoint) exits 2 with one line.

    CBIR_JAX_DEBUG=1 re-raises instead, with the full traceback.
    """
    # Orbax narrates every save at INFO through absl; keep the run log about the run.
    logging.getLogger("absl").setLevel(logging.WARNING)
    for name in ("absl", "asyncio"):
        if not any(isinstance(f, _OrbaxReRaises) for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(_OrbaxReRaises())
    if not getattr(sys.excepthook, "quiet_closed_loop", False):
        sys.excepthook = _quiet_closed_loop(sys.excepthook)
        previous_unraisable = sys.unraisablehook
        sys.unraisablehook = lambda u: None if _closed_loop(u.exc_type, u.exc_value) else previous_unraisable(u)
    # A log file on a full disk must not print a traceback per record: the error itself is reported.
    logging.raiseExceptions = False
    _sigterm_raises()
    try:
        with logging_redirect_tqdm():  # a log line during a bar is printed above it, not through it
            return fn()
    except (UserError, OSError, KeyboardInterrupt) as e:
        known = one_line(e)
        if known is None or os.environ.get("CBIR_JAX_DEBUG"):
            raise
        exit_with(*known)


class _OrbaxReRaises(logging.Filter):
    """Drops Orbax's tracebacks of background save failures (a full disk gives a dozen): Orbax re-raises
    the same exception in the main thread, where it is reported once (one line, or a traceback if a bug)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        if "orbax" in record.pathname:
            return False
        # asyncio's "Task exception was never retrieved" for Orbax's other writes of the same failed save
        from cbir_jax.training.checkpointing import disk_full

        return not (record.name == "asyncio" and record.exc_info[1] is not None and disk_full(record.exc_info[1]))


def _closed_loop(kind: Any, value: Any) -> bool:
    return kind is RuntimeError and str(value) == "Event loop is closed"


def _quiet_closed_loop(previous: Callable[..., Any]) -> Callable[..., Any]:
    """TensorStore reports, through sys.excepthook, each write still pending when a failed Orbax save
    closes its event loop ("Event loop is closed"); the save's error itself is reported once."""

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not _closed_loop(kind, value):
            previous(kind, value, tb)

    hook.quiet_closed_loop = True  # type: ignore[attr-defined]
    return hook


def _sigterm_raises() -> None:
    """SIGTERM (SLURM, Kubernetes) becomes `Terminated`: one line and exit 143, as Ctrl-C is one line and 130.
    Training replaces this with a flag it reads at each step boundary (`trainer.train`)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, frame: Any) -> None:
        raise Terminated("terminated (SIGTERM)")

    signal.signal(signal.SIGTERM, handle)


def exit_with(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def to_typed(cfg: DictConfig) -> Config:
    """The composed config as the typed `Config` dataclass, with every value in its range."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    return validate(OmegaConf.to_object(merged))


def written(out_dir: Path) -> list[str]:
    """The folder's files and folders at the top level, Hydra's `.hydra/` and the log included, sorted."""
    out_dir = Path(out_dir)
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir()) if out_dir.is_dir() else []


def print_outputs(out_dir: Path, names: Iterable[str] | None = None) -> None:
    """The last line of every command: where it wrote, and everything it wrote there: `names` (for a command
    that writes into a shared folder, e.g. report), else every entry of the folder (`written`)."""
    names = written(out_dir) if names is None else sorted(names)
    print(f"outputs: {out_dir}/ ({', '.join(names) or 'nothing written'})", flush=True)


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def overridden_keys() -> frozenset[str]:
    """Top-level config keys the user set on this command line (`data=folder` -> {"data"})."""
    from hydra.core.hydra_config import HydraConfig

    return frozenset(o.lstrip("+~").split("=")[0].split(".")[0] for o in HydraConfig.get().overrides.task)


class RunGuard(Callback):
    """A Hydra callback that checks the output folder before Hydra writes anything into it.

    Hydra saves `.hydra/config.yaml` before the task starts, so a check inside the task comes too late to
    protect a finished run. Registered in `configs/config.yaml` under `hydra.callbacks`.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from cbir_jax.runs import lifecycle

        app = str(config.hydra.job.name)
        try:
            checkpoint = config.get("checkpoint")
            if checkpoint and app != "train" and not Path(str(checkpoint)).is_dir():  # before Hydra makes <it>/eval/
                raise CheckpointError(f"checkpoint={checkpoint}: no such run folder")
            lifecycle.check_output_dir(Path(str(config.hydra.run.dir)), config, app=app)
        except Exception as e:  # fail closed: Hydra would turn an exception here into a warning and go on
            known = one_line(e)
            if known is None or os.environ.get("CBIR_JAX_DEBUG"):
                traceback.print_exc()  # a bug in the guard keeps its traceback, and still stops the command
                sys.exit(1)
            exit_with(*known)


class SweepSummary(Callback):
    """A Hydra callback that ends a multirun with where it wrote and how to tabulate it: each job's own last
    line names only its folder. Registered in `configs/config.yaml` under `hydra.callbacks`."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        print(sweep_summary(Path(str(config.hydra.sweep.dir))), flush=True)


def sweep_summary(sweep_dir: Path) -> str:
    """The multirun's last lines: its folder and jobs, then the `report` command for it."""
    jobs = sorted(p.name for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()) if sweep_dir.is_dir() else []
    return (f"sweep: {sweep_dir}/ ({len(jobs)} job{'s' if len(jobs) != 1 else ''}: {', '.join(jobs) or 'none'})\n"
            f"report: python -m cbir_jax.report {sweep_dir}")


# What a saved index fixes for itself: a command given one of these beside `index=` would silently ignore it.
INDEX_FIXES = ("data", "checkpoint", "backbone", "head", "features")


def refuse_overrides(index_path: str, overridden: frozenset[str]) -> None:
    """One line for `search index=FILE data=...` (and the like): the index already decides those keys."""
    for key in INDEX_FIXES:
        if key in overridden:
            raise ConfigError(f"index={index_path} holds its gallery, backbone, post-processing and scorer: drop {key}=")
