"""Orbax checkpoints of the training state, plus the facts needed to rebuild the model from a run dir.

Parameters and optimizer state are separate items, so evaluation restores the parameters alone, onto
the head's own structure: a missing, extra or mis-shaped leaf is an error, never a partial load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from cbir_jax.core.errors import CheckpointError

MODEL_FILE = "model.json"


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


CHECKPOINT_DIRS = {"last": "checkpoints", "best": "best"}  # best: the best-on-validation parameters


def manager(
    run_dir: str | Path, max_to_keep: int = 2, create: bool = True, subdir: str = "checkpoints"
) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        Path(run_dir).resolve() / subdir,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create),
    )


def save_params(mngr: ocp.CheckpointManager, step: int, params: Any) -> None:
    """Parameters alone (the best-on-validation copy needs no optimizer state)."""
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)


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


def save(mngr: ocp.CheckpointManager, step: int, params: Any, train_state: dict[str, Any]) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(params=ocp.args.StandardSave(params), train_state=ocp.args.StandardSave(train_state)),
    )


def restore_all(
    mngr: ocp.CheckpointManager, params_like: Any, train_state_like: dict[str, Any], run_dir: str | Path = ""
) -> tuple[Any, Any]:
    """Parameters and optimizer state of the latest step (for resuming); a mismatch is one line."""
    try:
        out = mngr.restore(
            mngr.latest_step(),
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params_like)),
                train_state=ocp.args.StandardRestore(_abstract(train_state_like)),
            ),
        )
    except Exception as e:  # orbax reports mismatches with several exception types
        raise CheckpointError(f"train.resume=true: the checkpoints in {run_dir} do not fit this head ({_first_line(e)})") from None
    return out["params"], out["train_state"]


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def restore_params(run_dir: str | Path, params_like: Any, which: str = "last") -> Any:
    """The parameters of a run (`last`: its latest step; `best`: its best-on-validation step), restored
    exactly onto `params_like`'s structure and shapes."""
    if which not in CHECKPOINT_DIRS:
        raise CheckpointError(f"eval.select={which!r}: valid are {', '.join(CHECKPOINT_DIRS)}")
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIRS[which]
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint={run_dir}: no {CHECKPOINT_DIRS[which]} folder")
    mngr = manager(run_dir, create=False, subdir=CHECKPOINT_DIRS[which])
    try:
        if mngr.latest_step() is None:
            raise CheckpointError(f"checkpoint={run_dir}: the checkpoints folder is empty")
        out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params_like))))
    except CheckpointError:
        raise
    except Exception as e:  # orbax reports mismatches with several exception types
        raise CheckpointError(f"checkpoint={run_dir}: parameters do not match the head ({_first_line(e)})") from None
    finally:
        mngr.close()
    return out["params"]


def write_model_info(run_dir: str | Path, info: dict[str, Any]) -> None:
    """Written last, atomically: its presence marks a finished run (see `runs`)."""
    from cbir_jax.core.files import atomic_write_text

    atomic_write_text(Path(run_dir) / MODEL_FILE, json.dumps(info, indent=2))


def read_model_info(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MODEL_FILE
    if not path.exists():
        raise CheckpointError(f"checkpoint={run_dir}: no {MODEL_FILE}; not a finished cbir_jax training run")
    return json.loads(path.read_text())
