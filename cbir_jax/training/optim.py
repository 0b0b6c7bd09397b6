"""The optimiser and its learning-rate schedule, by name (`train.optimizer`, `train.schedule`): one place for
every trainer, so the pair heads and the learned re-ranker step alike."""

from __future__ import annotations

from typing import Callable

import optax

from cbir_jax.core.registry import Registry

OPTIMIZERS: Registry[Callable[..., optax.GradientTransformation]] = Registry("optimizer")
OPTIMIZERS.register("adamw")(lambda lr, cfg: optax.adamw(lr, weight_decay=cfg.weight_decay))
OPTIMIZERS.register("adam")(lambda lr, cfg: optax.adam(lr))
OPTIMIZERS.register("sgd")(lambda lr, cfg: optax.sgd(lr, momentum=0.9))


def learning_rate_schedule(cfg, total_steps: int) -> optax.ScalarOrSchedule:
    """`train.schedule`: a schedule of the update count, or a constant as a plain float (a schedule would add
    a counter to the optimizer state, and checkpoints of constant-rate runs would no longer restore)."""
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.learning_rate, min(cfg.warmup_steps, max(total_steps - 1, 0)), max(total_steps, 1)
        )
    if cfg.schedule == "constant":
        return cfg.learning_rate
    raise ValueError(f"train.schedule={cfg.schedule!r}: valid are cosine, constant")  # the schema rules it out


def learning_rate_at(schedule: optax.ScalarOrSchedule, step: int) -> float:
    """The rate the update that produced `step` used (optax counts updates from 0)."""
    return float(schedule(max(step - 1, 0))) if callable(schedule) else float(schedule)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    opt = OPTIMIZERS.get(cfg.optimizer)(learning_rate_schedule(cfg, total_steps), cfg)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt) if cfg.grad_clip else opt
