"""The training loop: sampled pairs, heuristic targets, one jitted Optax step, Orbax checkpoints.

Reproducible and resumable: epoch e's pairs come from a generator seeded with (seed, e), so a resumed
run sees exactly the batches the uninterrupted run would have seen. With a `selection.BestKeeper`, the
head is validated before the first step and after every epoch (records with `val_*` keys in
metrics.jsonl; `epoch` there counts the epochs done), the best parameters are kept, and training stops
early after `train.patience` validations without a new best. Every record goes through
`metrics_log.MetricsLog` (metrics.jsonl and TensorBoard alike); `curves.png` is drawn from the log at the end.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from cbir_jax.training import checkpointing, curves, guards, losses, optim, pairs, selection
from cbir_jax.training.metrics_log import MetricsLog
from cbir_jax.scoring import heads
from cbir_jax.labels import pair_labels
from cbir_jax.core.errors import CheckpointError, DivergedError, Interrupted

log = logging.getLogger(__name__)

def make_train_step(head: nn.Module, tx: optax.GradientTransformation, loss_fn) -> Callable:
    @jax.jit
    def step(params, opt_state, features, i, j, targets):
        def objective(p):
            return loss_fn(head.apply({"params": p}, features[i], features[j]), targets)

        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def train_head(
    cfg,
    head: nn.Module,
    features: np.ndarray,
    context: pair_labels.PairContext,
    run_dir: Path,
    keeper: "selection.BestKeeper | None" = None,
) -> dict[str, Any]:
    """Trains `head` on pairs of `features` rows; returns the final parameters (the best ones are on disk
    with `keeper`).

    Ctrl-C and divergence stop it with one line, after any checkpoint being written has completed.
    """
    state: dict[str, Any] = {}  # the loop's manager and step, for the messages below
    try:
        return _train_head(cfg, head, features, context, run_dir, state, keeper)
    except (KeyboardInterrupt, DivergedError) as e:
        if "mngr" not in state:
            raise
        state["progress"].close()  # ends the bar's line: the error is a line of its own
        state["mngr"].wait_until_finished()  # an async save in flight completes: checkpoints stay consistent
        state["mngr"].reload()  # steps finalised by the wait are not in its cached list yet
        last = state["mngr"].latest_step()
        kept = f"last checkpoint: step {last}" if last is not None else "no checkpoint yet"
        if isinstance(e, DivergedError):
            raise DivergedError(f"{e}; {kept} (kept in {run_dir / 'checkpoints'})") from None
        raise Interrupted(
            f"interrupted at step {state['step']} ({kept}); resume with train.resume=true hydra.run.dir={run_dir}"
        ) from None


def _train_head(cfg, head, features, context, run_dir: Path, state: dict[str, Any], keeper=None) -> dict[str, Any]:
    params = heads.init_params(head, features.shape[1], jax.random.key(cfg.seed))
    n = len(features)
    batch = min(cfg.train.batch_size, cfg.pairs.pairs_per_epoch)
    steps_per_epoch = max(1, cfg.pairs.pairs_per_epoch // batch)
    total_steps = steps_per_epoch * cfg.train.epochs
    tx = optim.make_optimizer(cfg.train, total_steps)
    opt_state = tx.init(params)
    step_fn = make_train_step(head, tx, losses.get_loss(cfg.loss))
    nbrs = pairs.neighbours(features, cfg.pairs.hard_k) if cfg.pairs.hard_fraction > 0 else None

    mngr = checkpointing.manager(run_dir, cfg.train.max_to_keep)
    step = 0
    if cfg.train.resume and mngr.latest_step() is not None:
        params, train_state = checkpointing.restore_all(mngr, params, {"opt_state": opt_state, "step": jnp.asarray(0)}, run_dir)
        opt_state, step = train_state["opt_state"], int(train_state["step"])
        log.info("resumed from step %d of %d", step, total_steps)
    elif mngr.latest_step() is not None:
        raise CheckpointError(
            f"{run_dir} already holds checkpoints; pass train.resume=true to continue them"
        )

    feats = jnp.asarray(features)
    lr = optim.learning_rate_schedule(cfg.train, total_steps)
    with MetricsLog(run_dir, keep_up_to=step) as metrics:  # each step once, also after a resume
        progress = tqdm(total=total_steps, initial=step, desc="train", unit="step", mininterval=2.0)
        state.update(mngr=mngr, step=step, progress=progress)
        loss_sum, loss_count = 0.0, 0
        if keeper is not None and step % steps_per_epoch == 0 and not keeper.already_validated(step):
            # the starting point is a candidate too: a residual head that training only hurts keeps its base metric
            metrics.write({"step": step, "epoch": step // steps_per_epoch, **keeper.validate(step, step // steps_per_epoch, params)})
        stopped = keeper is not None and keeper.selection.should_stop(cfg.train.patience)
        while step < total_steps and not stopped:
            epoch, offset = divmod(step, steps_per_epoch)
            i, j, targets = pairs.epoch_batches(cfg, context, n, nbrs, epoch, steps_per_epoch, batch)
            for b in range(offset, steps_per_epoch):
                params, opt_state, loss = step_fn(params, opt_state, feats, i[b], j[b], targets[b])
                step += 1
                state["step"] = step
                guards.check_loss(step, float(loss))  # stops before a NaN reaches the log or a checkpoint
                loss_sum, loss_count = loss_sum + float(loss), loss_count + 1
                progress.update(1)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    record = {"step": step, "epoch": epoch, "loss": loss_sum / loss_count,
                              "learning_rate": optim.learning_rate_at(lr, step)}
                    metrics.write(record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}")
                    loss_sum, loss_count = 0.0, 0
                if step % cfg.train.checkpoint_every == 0 or b == steps_per_epoch - 1:
                    guards.check_params(step, params)
                    checkpointing.save(mngr, step, params, {"opt_state": opt_state, "step": jnp.asarray(step)})
            if keeper is not None:
                metrics.write({"step": step, "epoch": epoch + 1, **keeper.validate(step, epoch + 1, params)})
                stopped = keeper.selection.should_stop(cfg.train.patience)
                if stopped:
                    log.info("early stop after epoch %d: no better validation %s for %d epochs (best: step %d)",
                             epoch + 1, keeper.metric, cfg.train.patience, keeper.selection.best_step)
        progress.close()
    curves.write_curves(run_dir, title=f"head={cfg.head.name} labels={cfg.labels.name} loss={cfg.loss.name}")
    if mngr.latest_step() != step:  # e.g. a resumed run that was already complete
        checkpointing.save(mngr, step, params, {"opt_state": opt_state, "step": jnp.asarray(step)})
    mngr.wait_until_finished()
    mngr.close()
    if keeper is not None:
        keeper.close()
    return params
