"""The one error path: what a user can cause is a `UserError`, printed as one line; the rest is a bug.

Why a base class and not `ValueError`: numpy, JAX and our own code raise `ValueError` for programming
mistakes too, and those must keep their traceback. Every module raises a subclass of `UserError` (with
a message of one line) for a bad value, path, file or run folder, and `cli.run_or_exit` prints it.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix; `str(e)` is one line and the process exits with `exit_code`."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config value out of its range (e.g. `train.learning_rate=-1`), found before any work is done."""


class RunDirError(UserError):
    """A run folder that must not be written: a finished run, or a resume that does not fit it."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or run folder that cannot be used (missing, damaged, of another backbone); one line."""


class DivergedError(UserError):
    """Training produced a non-finite loss or parameters; the last good checkpoint is kept."""


class Interrupted(UserError):
    """Ctrl-C: stopped cleanly at a step; the message says how to resume."""

    exit_code = 130  # the shell's convention for SIGINT, so scripts and sweepers can tell it apart


class Terminated(Interrupted):
    """SIGTERM (what SLURM and Kubernetes send before killing a job): handled as Ctrl-C is."""

    exit_code = 143  # 128 + SIGTERM, what the job would have exited with unhandled


class MissingFileError(UserError, FileNotFoundError):
    """A file the config names does not exist (e.g. `backbone.weights=PATH`)."""
