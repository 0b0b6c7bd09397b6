"""The one training loop: a batch source per kind of scorer, one jitted Optax step, Orbax checkpoints.

Every learned scorer trains here: the pair heads on sampled pairs with heuristic targets (`PairBatches`)
and the learned re-ranker on episodes (`rerank_training.EpisodeBatches`). So both get the same:

- resume, bit-identical: a source's epoch e is a pure function of (seed, e), so a resumed run sees exactly
  the batches the uninterrupted run would have seen, from the restored step on;
- best-on-validation selection through one `selection.BestKeeper` (validated before the first step and
  every `validate_every` epochs; records with `val_*` keys in metrics.jsonl, their `epoch` counting the
  epochs done), with early stopping after `train.patience` validations without a new best;
- the divergence guard (`guards`), Ctrl-C handling, and `metrics_log.MetricsLog` (metrics.jsonl and
  TensorBoard alike); `curves.png` is drawn from the log at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbir_jax.core.errors import CheckpointError, DivergedError, Interrupted, Terminated
from cbir_jax.core.progress import progress
from cbir_jax.labels import pair_labels
from cbir_jax.training import checkpointing, curves, guards, optim, pairs, selection
from cbir_jax.training.metrics_log import MetricsLog, flat_params, read_records

log = logging.getLogger(__name__)

StepFn = Callable[..., tuple[Any, Any, jax.Array]]  # (params, opt_state, *batch) -> (params, opt_state, loss)


class BatchSource(Protocol):
    """What one kind of scorer trains on: `epoch(e)` gives that epoch's step -> batch arguments, a pure
    function of (seed, e) so that resume is exact."""

    steps_per_epoch: int

    def epoch(self, epoch: int) -> Callable[[int], tuple]: ...


@dataclasses.dataclass
class PairBatches:
    """Pairs of training rows (half random, half feature-space neighbours) with heuristic targets."""

    cfg: Any
    context: pair_labels.PairContext
    features: jax.Array
    neighbours: np.ndarray | None
    batch: int
    steps_per_epoch: int

    @classmethod
    def build(cls, cfg, features: np.ndarray, context: pair_labels.PairContext) -> "PairBatches":
        batch = min(cfg.train.batch_size, cfg.pairs.pairs_per_epoch)
        nbrs = pairs.neighbours(features, cfg.pairs.hard_k) if cfg.pairs.hard_fraction > 0 else None
        return cls(cfg, context, jnp.asarray(features), nbrs, batch, max(1, cfg.pairs.pairs_per_epoch // batch))

    def epoch(self, epoch: int) -> Callable[[int], tuple]:
        i, j, targets = pairs.epoch_batches(self.cfg, self.context, len(self.features), self.neighbours, epoch,
                                            self.steps_per_epoch, self.batch)
        return lambda b: (self.features, i[b], j[b], targets[b])


def pair_head_step(head: nn.Module, loss_fn: Callable) -> Callable[[optax.GradientTransformation], StepFn]:
    """The jitted step of a pair head: its loss on a batch of (i, j) pairs of the feature rows."""

    def make(tx: optax.GradientTransformation) -> StepFn:
        @jax.jit
        def step(params, opt_state, features, i, j, targets):
            def objective(p):
                return loss_fn(head.apply({"params": p}, features[i], features[j]), targets)

            loss, grads = jax.value_and_grad(objective)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        return step

    return make


def train(
    cfg,
    params: Any,
    source: BatchSource,
    make_step: Callable[[optax.GradientTransformation], StepFn],
    run_dir: Path,
    keeper: "selection.BestKeeper | None" = None,
    *,
    validate_every: int = 1,
    title: str = "",
) -> Any:
    """Trains `params` for `train.epochs` epochs of `source`; returns the final parameters (the best ones
    are on disk with `keeper`).

    Ctrl-C, SIGTERM (what SLURM and Kubernetes send) and divergence stop it with one line, after any
    checkpoint being written has completed; SIGTERM waits for the step in progress to end.
    """
    state: dict[str, Any] = {}  # the loop's checkpoints and step, for the messages below
    with _sigterm_stops(state):
        try:
            return _train(cfg, params, source, make_step, Path(run_dir), state, keeper, validate_every, title)
        except (KeyboardInterrupt, DivergedError, Terminated) as e:
            if "ckpts" not in state:
                raise
            state["progress"].close()  # ends the bar's line: the error is a line of its own
            state["ckpts"].wait()  # an async save in flight completes and is committed: checkpoints stay consistent
            last = state["ckpts"].latest_intact_step()
            kept = f"last checkpoint: step {last}" if last is not None else "no checkpoint yet"
            if isinstance(e, DivergedError):
                raise DivergedError(f"{e}; {kept} (kept in {run_dir / 'checkpoints'})") from None
            how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            cls = Terminated if isinstance(e, Terminated) else Interrupted
            raise cls(
                f"{how} at step {state['step']} ({kept}); resume with train.resume=true hydra.run.dir={run_dir}"
            ) from None
        except CheckpointError:  # e.g. a full disk: the message starts on a line of its own
            if "progress" in state:
                state["progress"].close()
            raise


class _sigterm_stops:
    """While training, SIGTERM sets a flag the loop reads after each step (so it stops at a step boundary
    and the checkpoint in flight completes), instead of killing the process mid-write."""

    def __init__(self, state: dict[str, Any]):
        self.state = state
        self.previous: Any = None

    def __enter__(self) -> None:
        self.state["stop"] = False
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.state["stop"] = True

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _logged_validation(run_dir: Path, step: int) -> bool:
    return any(r.get("step") == step and "best_step" in r for r in read_records(run_dir))


def _train(cfg, params, source: BatchSource, make_step, run_dir: Path, state: dict[str, Any], keeper,
           validate_every: int, title: str) -> Any:
    steps_per_epoch = source.steps_per_epoch
    epochs = cfg.train.epochs
    total_steps = steps_per_epoch * epochs
    tx = optim.make_optimizer(cfg.train, total_steps)
    opt_state = tx.init(params)
    step_fn = make_step(tx)

    initial = params
    ckpts = checkpointing.Checkpoints(run_dir, max_to_keep=cfg.train.max_to_keep)
    step = 0
    loss_sum, loss_count = 0.0, 0  # the logging window in progress (saved with each checkpoint: exact logs)
    if ckpts.steps() and not cfg.train.resume:
        raise CheckpointError(f"{run_dir} already holds checkpoints; pass train.resume=true to continue them")
    if ckpts.steps():
        step, out = ckpts.restore({"params": params, "train_state": {"opt_state": opt_state, "step": jnp.asarray(0)}})
        params, opt_state = out["params"], out["train_state"]["opt_state"]
        loop = out.get(checkpointing.LOOP_ITEM) or {}
        loss_sum, loss_count = float(loop.get("loss_sum", 0.0)), int(loop.get("loss_count", 0))
        log.info("resumed from step %d of %d", step, total_steps)
    if keeper is not None:  # also a run killed before its first checkpoint, with best.json already written
        keeper.resume(step, step // steps_per_epoch, {0: initial, step: params}, ckpts)

    def validates_after(epochs_done: int) -> bool:
        return epochs_done == 0 or epochs_done % validate_every == 0 or epochs_done == epochs

    def save(at: int) -> None:
        ckpts.save(at, {"params": params, "train_state": {"opt_state": opt_state, "step": jnp.asarray(at)}},
                   loop={"loss_sum": loss_sum, "loss_count": loss_count})

    lr = optim.learning_rate_schedule(cfg.train, total_steps)
    params_shown = flat_params(dataclasses.asdict(cfg)) if dataclasses.is_dataclass(cfg) else {}
    # each step once, also after a resume
    with MetricsLog(run_dir, keep_up_to=step, logger=getattr(cfg, "logger", None), params=params_shown) as metrics:
        bar = progress(total=total_steps, initial=step, desc="train", unit="step", mininterval=2.0)
        state.update(ckpts=ckpts, step=step, progress=bar)
        done = step // steps_per_epoch
        if keeper is not None and step % steps_per_epoch == 0 and validates_after(done):
            # the starting point is a candidate too: a residual head that training only hurts keeps its base metric
            if not keeper.already_validated(step):
                metrics.write({"step": step, "epoch": done, **keeper.validate(step, done, params)})
            elif not _logged_validation(run_dir, step):  # killed between best.json and its log record
                metrics.write(keeper.record_of(step))
        stopped = keeper is not None and keeper.selection.should_stop(cfg.train.patience)
        while step < total_steps and not stopped:
            epoch, offset = divmod(step, steps_per_epoch)
            batch = source.epoch(epoch)
            for b in range(offset, steps_per_epoch):
                params, opt_state, loss = step_fn(params, opt_state, *batch(b))
                step += 1
                state["step"] = step
                guards.check_loss(step, float(loss))  # stops before a NaN reaches the log or a checkpoint
                loss_sum, loss_count = loss_sum + float(loss), loss_count + 1
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    record = {"step": step, "epoch": epoch, "loss": loss_sum / loss_count,
                              "learning_rate": optim.learning_rate_at(lr, step)}
                    metrics.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    loss_sum, loss_count = 0.0, 0
                if step % cfg.train.checkpoint_every == 0 or b == steps_per_epoch - 1:
                    guards.check_params(step, params)
                    save(step)
                ckpts.commit()
                if state["stop"]:
                    raise Terminated("SIGTERM")
            if keeper is not None and validates_after(epoch + 1):
                ckpts.wait()  # the step validated is committed first: best.json never runs ahead of checkpoints/
                metrics.write({"step": step, "epoch": epoch + 1, **keeper.validate(step, epoch + 1, params)})
                stopped = keeper.selection.should_stop(cfg.train.patience)
                if stopped:
                    log.info("early stop after epoch %d: no better validation %s for %d validations (best: step %d)",
                             epoch + 1, keeper.metric, cfg.train.patience, keeper.selection.best_step)
        bar.close()
    curves.write_curves(run_dir, title=title)
    ckpts.wait()
    if ckpts.latest_intact_step() != step:  # e.g. a resumed run that was already complete
        save(step)
    ckpts.close()
    if keeper is not None:
        keeper.close()
    return params
