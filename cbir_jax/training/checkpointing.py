"""Orbax checkpoints that prove themselves, plus the facts needed to rebuild the model from a run dir.

Orbax makes a step appear atomically (it writes `<step>.orbax-checkpoint-tmp*` and renames it when done;
`cleanup_tmp_directories` removes what a kill left behind), but it keeps no checksum of the data: a flipped
bit in an array file is restored silently. So every step gets a commit file, `<step>/cbir_jax.sha256.json`,
holding the SHA-256 of each item's arrays. It is written only once Orbax has finished the step (the final
folder exists), and a restore recomputes the hashes of what it read. A step whose hash does not match, whose
files cannot be read, or that was never committed is named in one line and skipped for the newest intact one.

Parameters and optimizer state are separate items, so evaluation restores the parameters alone, onto
the head's own structure: a missing, extra or mis-shaped leaf is an error, never a partial load. The loop's
host state (the running loss of an unfinished logging window) is a JSON item, so a resumed run logs exactly
what the uninterrupted one did.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cbir_jax.core.errors import CheckpointError
from cbir_jax.core.files import atomic_write_text

log = logging.getLogger(__name__)

MODEL_FILE = "model.json"
COMMIT_FILE = "cbir_jax.sha256.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # an unfinished Orbax save: never a step
LOOP_ITEM = "loop"  # the training loop's host state (JSON), beside the array items
CHECKPOINT_DIRS = {"last": "checkpoints", "best": "best"}  # best: the best-on-validation parameters
# Keys model.json must hold, with their types: a file that lacks one is damaged, and says so in one line.
MODEL_KEYS = {"head": str, "feature_dim": int, "backbone": str, "backbone_fingerprint": str, "backbone_feature_dim": int}


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def digest(tree: Any) -> str:
    """SHA-256 of a tree of arrays: every leaf's path, dtype, shape and bytes, in tree order."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _json_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a full disk or quota, however Orbax or TensorStore wrapped it."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


class Damaged(Exception):
    """One step that cannot be used (internal: the caller names it and moves on to an older step)."""


class Checkpoints:
    """An Orbax `CheckpointManager` whose steps carry a committed SHA-256 and are verified on restore.

    `save` is asynchronous (Orbax's); `commit` writes the hash of every save Orbax has finished, cheaply
    enough to call after each training step; `wait` blocks until the saves are done and committed.
    """

    def __init__(self, run_dir: str | Path, subdir: str = "checkpoints", max_to_keep: int = 2, create: bool = True):
        self.dir = Path(run_dir).resolve() / subdir
        self.manager = manager(run_dir, max_to_keep, create=create, subdir=subdir)
        self._pending: dict[int, dict[str, str]] = {}
        self._cleaning_up = False

    # -- writing ---------------------------------------------------------------------------------------
    def save(self, step: int, items: dict[str, Any], loop: dict[str, Any] | None = None, wait: bool = False) -> None:
        """Starts saving `items` (name -> tree of arrays) and `loop` (JSON) as `step`; a full disk is one line."""
        self.commit()
        hashes = {name: digest(tree) for name, tree in items.items()}
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        if loop is not None:
            hashes[LOOP_ITEM] = _json_digest(loop)
            args[LOOP_ITEM] = ocp.args.JsonSave(loop)
        try:
            if step in self.manager.all_steps():  # e.g. a best step validated again after a resume
                self.manager.wait_until_finished()
                self.manager.delete(step)
            self.manager.save(step, args=ocp.args.Composite(**args), force=True)
        except Exception as e:
            self._raise_if_disk_full(e, step)
            raise
        self._pending[step] = hashes
        if wait:
            self.wait()

    def commit(self) -> None:
        """Writes the commit file of every save Orbax has finished (its final folder exists); never blocks."""
        for step in sorted(self._pending):
            final = self.dir / str(step)
            if not final.is_dir():
                if self.manager.is_saving_in_progress():
                    continue
                if not final.is_dir():  # (looked at again: it may have been renamed in between)
                    self._pending.pop(step)  # failed, or deleted by max_to_keep: nothing to commit
                    continue
            try:
                atomic_write_text(final / COMMIT_FILE, json.dumps({"step": step, "sha256": self._pending[step]}))
            except OSError as e:  # e.g. a later save, still in flight, filled the disk first
                self._raise_if_disk_full(e, max(self._pending))
                raise
            self._pending.pop(step)

    def wait(self) -> None:
        """Blocks until every save has finished and is committed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._raise_if_disk_full(e, max(self._pending, default=None))
            raise
        self.commit()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def _raise_if_disk_full(self, error: BaseException, step: int | None) -> None:
        if disk_full(error):
            if self._cleaning_up:  # a commit inside the cleanup below failed too: the outer call reports
                return
            self._cleaning_up = True
            try:
                self._pending.pop(step, None)
                with contextlib.suppress(Exception):  # earlier saves still in flight finish and are committed
                    self.manager.wait_until_finished()
                # The failed save holds the space the earlier steps' commit files need: its temporary folder,
                # or its final one where only its commit file did not fit (uncommitted, it is never restored).
                failed = list(self.dir.glob(f"*{TMP_SUFFIX}*"))
                if step is not None and not (self.dir / str(step) / COMMIT_FILE).exists():
                    failed.append(self.dir / str(step))
                for folder in failed:
                    shutil.rmtree(folder, ignore_errors=True)
                with contextlib.suppress(OSError):
                    self.commit()
            finally:
                self._cleaning_up = False
            self._pending.clear()
            kept = self.committed_steps()
            raise CheckpointError(
                f"disk full while writing checkpoint {step} in {self.dir}; "
                + (f"earlier checkpoints kept: steps {', '.join(map(str, kept))}" if kept else "no earlier checkpoint")
                + "; free space and resume with train.resume=true"
            ) from None

    # -- reading ---------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps Orbax has finished, newest first (unfinished temporary folders are not steps)."""
        self.manager.reload()
        return sorted(self.manager.all_steps(), reverse=True)

    def committed_steps(self) -> list[int]:
        return [s for s in self.steps() if (self.dir / str(s) / COMMIT_FILE).is_file()]

    def latest_intact_step(self) -> int | None:
        """The newest step with a commit file (what a restore would try first)."""
        return next(iter(self.committed_steps()), None)

    def restore(self, likes: dict[str, Any], steps: Iterable[int] | None = None) -> tuple[int, dict[str, Any]]:
        """The newest intact step of `steps` (default: all), its items restored onto `likes`' structures and
        verified against the committed hashes; damaged steps are named and skipped. Returns (step, items),
        with the loop item where the step has one."""
        candidates = self.steps() if steps is None else sorted(steps, reverse=True)
        # A run saved before commit files existed has none: its steps are used unverified, as before.
        legacy = not any((self.dir / str(s) / COMMIT_FILE).exists() for s in self.steps())
        problems = []
        for step in candidates:
            try:
                out = self._restore_step(step, likes, legacy)
            except Damaged as e:
                log.warning("checkpoint %s is damaged (%s); skipping it", self.dir / str(step), e)
                problems.append(f"step {step}: {e}")
                continue
            if problems:
                log.warning("using checkpoint %s, the newest intact one", self.dir / str(step))
            return step, out
        if not candidates:
            raise CheckpointError(f"{self.dir}: no checkpoint")
        raise CheckpointError(f"{self.dir}: no intact checkpoint ({'; '.join(problems)})"[:600])

    def _restore_step(self, step: int, likes: dict[str, Any], legacy: bool) -> dict[str, Any]:
        folder = self.dir / str(step)
        hashes: dict[str, str] = {}
        if not legacy:
            try:
                commit = json.loads((folder / COMMIT_FILE).read_text())
                hashes = commit["sha256"]
                if not isinstance(hashes, dict) or commit.get("step") != step:
                    raise TypeError
            except FileNotFoundError:
                raise Damaged(f"no {COMMIT_FILE}: its save never completed") from None
            except (OSError, ValueError, TypeError, KeyError):
                raise Damaged(f"{COMMIT_FILE} is unreadable") from None
        self._check_fits(step, likes)
        args = {name: ocp.args.StandardRestore(_abstract(like)) for name, like in likes.items()}
        with_loop = (folder / LOOP_ITEM).is_dir()
        if with_loop:
            args[LOOP_ITEM] = ocp.args.JsonRestore()
        try:
            out = dict(self.manager.restore(step, args=ocp.args.Composite(**args)))
        except Exception as e:  # TensorStore and Orbax report unreadable data with many exception types
            raise Damaged(f"unreadable: {_first_line(e)}") from None
        for name in list(likes) + ([LOOP_ITEM] if with_loop else []):
            if name not in hashes and legacy:
                continue
            got = _json_digest(out[name]) if name == LOOP_ITEM else digest(out[name])
            if hashes.get(name) != got:
                raise Damaged(f"the SHA-256 of its {name} does not match the one committed with it")
        return out

    def _check_fits(self, step: int, likes: dict[str, Any]) -> None:
        """A checkpoint of another head is not damage: one line saying it does not fit. Parameters compare
        leaf by leaf (path, shape, dtype); other items (optimizer state, whose named tuples Orbax stores
        as plain containers) by their shapes and dtypes."""
        for name, like in likes.items():
            try:
                tree = ocp.StandardCheckpointHandler().metadata(epath.Path(self.dir / str(step) / name)).tree
            except Exception as e:  # a missing or unreadable _METADATA, in whatever way Orbax reports it
                raise Damaged(f"unreadable {name} metadata: {_first_line(e)}") from None
            want, have = _leaves(like), _leaves(tree)
            if name != "params":
                want, have = sorted(want.values(), key=str), sorted(have.values(), key=str)
            if want != have:
                raise CheckpointError(f"the checkpoint {self.dir / str(step)} does not fit this model ({name}: "
                                      f"{_difference(want, have)})")

    def close_quietly(self) -> None:
        self.manager.close()


def _leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    return {jax.tree_util.keystr(p): (tuple(getattr(x, "shape", ())), str(np.dtype(getattr(x, "dtype", "V"))))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _difference(want: Any, have: Any) -> str:
    if isinstance(want, dict):
        missing = sorted(k for k in want if want[k] != have.get(k))
        extra = sorted(set(have) - set(want))
        first = (missing + extra)[0]
        return f"{len(missing)} leaves missing or mis-shaped, {len(extra)} extra, e.g. {first}"
    return f"{len(want)} leaves expected, {len(have)} stored, or of other shapes"


def manager(
    run_dir: str | Path, max_to_keep: int = 2, create: bool = True, subdir: str = "checkpoints"
) -> ocp.CheckpointManager:
    """Orbax's manager of one checkpoint folder; a writer removes the temporary folders a kill left."""
    return ocp.CheckpointManager(
        Path(run_dir).resolve() / subdir,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create, cleanup_tmp_directories=create),
    )


def available(run_dir: str | Path, which: str) -> bool:
    """Whether the run holds a `which` (last | best) checkpoint."""
    path = Path(run_dir) / CHECKPOINT_DIRS[which]
    return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


def resolve(run_dir: str | Path, select: str) -> str:
    """The checkpoint `eval.select` means for this run: `best` falls back to `last` where the run had no
    validation rows (and so no best checkpoint)."""
    if select not in CHECKPOINT_DIRS:
        raise CheckpointError(f"eval.select={select!r}: valid are {', '.join(CHECKPOINT_DIRS)}")
    return "last" if select == "best" and not available(run_dir, "best") else select


def _first_line(error: BaseException) -> str:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line.split(" See full TensorStore details")[0][:200]  # the rest is a repr of a bound method


def restore_params(run_dir: str | Path, params_like: Any, which: str = "last") -> Any:
    """The parameters of a run (`last`: its newest intact step; `best`: its best-on-validation step),
    restored exactly onto `params_like`'s structure and shapes, and verified against their hash."""
    if which not in CHECKPOINT_DIRS:
        raise CheckpointError(f"eval.select={which!r}: valid are {', '.join(CHECKPOINT_DIRS)}")
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIRS[which]
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint={run_dir}: no {CHECKPOINT_DIRS[which]} folder")
    ckpts = Checkpoints(run_dir, CHECKPOINT_DIRS[which], create=False)
    try:
        if not ckpts.steps():
            raise CheckpointError(f"checkpoint={run_dir}: the {CHECKPOINT_DIRS[which]} folder holds no checkpoint")
        _, out = ckpts.restore({"params": params_like})
    finally:
        ckpts.close_quietly()
    return out["params"]


def write_model_info(run_dir: str | Path, info: dict[str, Any]) -> None:
    """Written last, atomically: its presence marks a finished run (see `runs`)."""
    atomic_write_text(Path(run_dir) / MODEL_FILE, json.dumps(info, indent=2))


def read_model_info(run_dir: str | Path) -> dict[str, Any]:
    """model.json, checked: a truncated or edited file is one line naming it, not a traceback later."""
    path = Path(run_dir) / MODEL_FILE
    if not path.exists():
        raise CheckpointError(f"checkpoint={run_dir}: no {MODEL_FILE}; not a finished cbir_jax training run")
    try:
        info = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged (not valid JSON: {_first_line(e)})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} is damaged (not a JSON object)")
    bad = [k for k, t in MODEL_KEYS.items() if not isinstance(info.get(k), t) or isinstance(info.get(k), bool)]
    if bad:
        raise CheckpointError(f"{path} is damaged ({', '.join(bad)} missing or of the wrong type)")
    if info["feature_dim"] < 1:
        raise CheckpointError(f"{path} is damaged (feature_dim={info['feature_dim']})")
    return info
