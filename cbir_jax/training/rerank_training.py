"""Training the learned re-ranker (cbir_jax/scoring/learned_rerank.py) with the project's jitted Optax step.

Each step is an episode: the training rows are shuffled into `queries_per_step` queries and a gallery of
the rest, so no query is ever in the gallery it is scored against (training needs no leave-one-out
variants). The loss is a multi-positive softmax over the whole episode gallery: for every relevant item p
of a query, -log(e^{s_p/τ} / (e^{s_p/τ} + Σ_neg e^{s_n/τ})), i.e. each relevant item must beat every
irrelevant one, which is what MAP@R counts.

What "relevant" means is the training mode (`head.reranker.targets`):
- `supervised`: same class (reads the training rows' labels);
- `self_supervised`: no labels; the `pseudo_positives` nearest rows under DBA + α-QE run on the rows
  themselves (leave-one-out), i.e. pseudo-labels from the neighbourhood structure.

Model selection: MAP@R on the validation rows (`data.split.val_fraction`, carved from the training
categories), every `val_every` epochs, each validation image a leave-one-out query against the others;
the best parameters are the ones checkpointed and evaluated.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from cbir_jax.training import checkpointing, curves
from cbir_jax.scoring import learned_rerank
from cbir_jax.labels import pair_labels
from cbir_jax.data import DataError
from cbir_jax.core.errors import DivergedError
from cbir_jax.evaluation.metrics import MetricAccumulator
from cbir_jax.core.registry import Registry
from cbir_jax.training import optim
from cbir_jax.training.metrics_log import MetricsLog

log = logging.getLogger(__name__)

# targets name -> (training features, labels thunk, cfg) -> (N, N) bool relevance of training rows.
TARGETS: Registry[Callable[..., np.ndarray]] = Registry("re-ranker training targets")


@TARGETS.register("supervised")
def supervised_relevance(features: np.ndarray, labels: Callable[[], np.ndarray | None], cfg) -> np.ndarray:
    y = labels()
    if y is None:
        raise DataError("head.reranker.targets=supervised needs class labels; use targets=self_supervised")
    return y[:, None] == y[None, :]


@TARGETS.register("self_supervised")
def pseudo_relevance(features: np.ndarray, labels: Callable[[], np.ndarray | None], cfg) -> np.ndarray:
    """Each row's `pseudo_positives` nearest rows under DBA + α-QE (leave-one-out); never reads labels."""
    s = pair_labels.rerank_similarities(features, "dba_alpha_qe")
    np.fill_diagonal(s, -np.inf)
    top = np.argsort(-s, axis=1)[:, : cfg.pseudo_positives]
    rel = np.zeros(s.shape, bool)
    rel[np.arange(len(s))[:, None], top] = True
    return rel | rel.T


def episode_loss(model, spec, params, xq, xg, relevant, temperature: float) -> jax.Array:
    """Multi-positive softmax of one episode; queries without a relevant gallery item are left out."""
    rows = learned_rerank.prepare_gallery(model, params, spec, xg, loo=False)
    s = learned_rerank.score_queries(model, params, spec, rows, xq, jnp.full((xq.shape[0],), -1, jnp.int32))
    s = s / temperature
    neg = jax.nn.logsumexp(jnp.where(relevant, -jnp.inf, s), axis=1, keepdims=True)
    per_pair = jnp.logaddexp(0.0, neg - s)
    n_pos = relevant.sum(1)
    per_query = jnp.where(relevant, per_pair, 0.0).sum(1) / jnp.maximum(n_pos, 1)
    has = n_pos > 0
    return jnp.sum(jnp.where(has, per_query, 0.0)) / jnp.maximum(has.sum(), 1)


def make_step(model, spec, tx: optax.GradientTransformation, temperature: float) -> Callable:
    @jax.jit
    def step(params, opt_state, xq, xg, relevant):
        loss, grads = jax.value_and_grad(lambda p: episode_loss(model, spec, p, xq, xg, relevant, temperature))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _loo_scores(model, spec, params, x):
    rows = learned_rerank.prepare_gallery(model, params, spec, x, loo=True)
    return learned_rerank.score_queries(model, params, spec, rows, x, jnp.arange(x.shape[0], dtype=jnp.int32))


def validation_map_at_r(model, spec, params, x: np.ndarray, y: np.ndarray) -> float:
    """MAP@R with every row a leave-one-out query against the others (exact, as evaluation does)."""
    acc = MetricAccumulator()
    acc.add(np.asarray(_loo_scores(model, spec, params, jnp.asarray(x))), y[:, None] == y[None, :], np.arange(len(y)))
    return acc.result()["map_at_r"]


def train_reranker(
    cfg, train_x: np.ndarray, train_labels: Callable[[], np.ndarray | None],
    val_x: np.ndarray, val_y: np.ndarray | None, run_dir: Path,
) -> tuple[Any, dict[str, Any]]:
    """Trains on episodes of the training rows; returns the best-on-validation parameters and a summary."""
    rcfg = cfg.head.reranker
    spec = rcfg
    model = learned_rerank.build_model(spec)
    params = learned_rerank.init_params(model, spec, jax.random.key(cfg.seed))
    n = len(train_x)
    n_query = min(rcfg.queries_per_step, n // 2)
    if n - n_query <= spec.k + 1:
        raise DataError(
            f"head.reranker.k={spec.k}: the training episodes hold only {n - n_query} gallery rows; lower k"
        )
    relevance = TARGETS.get(rcfg.targets)(train_x, train_labels, rcfg)
    steps_per_epoch = max(1, -(-n // n_query))
    total = steps_per_epoch * cfg.train.epochs
    tx = optim.make_optimizer(cfg.train, total)
    opt_state = tx.init(params)
    step_fn = make_step(model, spec, tx, rcfg.temperature)
    has_val = val_y is not None and len(val_y) > spec.k + 2

    def validate(p) -> float | None:
        return validation_map_at_r(model, spec, p, val_x, val_y) if has_val else None

    best = {"val_map_at_r": validate(params), "epoch": 0, "params": params}
    log.info("re-ranker: %d training rows, %d steps; validation MAP@R untrained (DBA's weights on both sides): %s",
             n, total, best["val_map_at_r"])
    feats = jnp.asarray(train_x)
    started = time.time()
    lr = optim.learning_rate_schedule(cfg.train, total)
    with MetricsLog(run_dir, keep_up_to=-1) as metrics:  # it never resumes: nothing earlier is kept
        metrics.write({"step": 0, "epoch": 0, "val_map_at_r": best["val_map_at_r"]})
        progress = tqdm(total=total, desc="train re-ranker", unit="step", mininterval=2.0)
        step, losses = 0, []
        for epoch in range(1, cfg.train.epochs + 1):
            rng = np.random.default_rng([cfg.seed, epoch])
            for _ in range(steps_per_epoch):
                perm = rng.permutation(n)
                qi, gi = perm[:n_query], perm[n_query:]
                params, opt_state, loss = step_fn(params, opt_state, feats[qi], feats[gi], jnp.asarray(relevance[np.ix_(qi, gi)]))
                losses.append(float(loss))
                step += 1
                progress.update(1)
                if not np.isfinite(losses[-1]):
                    raise DivergedError(f"re-ranker training diverged: loss {losses[-1]} at step {step} (lower train.learning_rate)")
            record: dict[str, Any] = {"step": step, "epoch": epoch, "loss": float(np.mean(losses)),
                                      "learning_rate": optim.learning_rate_at(lr, step)}
            losses = []
            if has_val and (epoch % rcfg.val_every == 0 or epoch == cfg.train.epochs):
                record["val_map_at_r"] = validate(params)
                if record["val_map_at_r"] > best["val_map_at_r"]:
                    best = {"val_map_at_r": record["val_map_at_r"], "epoch": epoch, "params": params}
                progress.set_postfix(val=f"{record['val_map_at_r']:.4f}")
            metrics.write(record)
        progress.close()
    curves.write_curves(run_dir, title=f"head={cfg.head.name} (targets={rcfg.targets})")
    if not has_val:
        best = {"val_map_at_r": None, "epoch": cfg.train.epochs, "params": params}
    mngr = checkpointing.manager(run_dir, max_to_keep=1)
    checkpointing.save(mngr, step, best["params"], {"step": jnp.asarray(step)})
    mngr.wait_until_finished()
    mngr.close()
    summary = {"best_epoch": best["epoch"], "best_val_map_at_r": best["val_map_at_r"],
               "train_seconds": round(time.time() - started, 1), "steps": step}
    log.info("re-ranker: best validation MAP@R %s at epoch %d (%.0f s)", best["val_map_at_r"], best["epoch"], summary["train_seconds"])
    return best["params"], summary


def restore_scorer(cfg, run_dir: Path, info: dict[str, Any], name: str = "learned_rerank"):
    """The trained re-ranker of a run directory as a Scorer, shaped as `model.json` says it was trained
    (with `base=tuned` its k and alphas were chosen on validation rows during training)."""
    saved = info.get("reranker", {}).get("config")
    spec = type(cfg.head.reranker)(**saved) if saved else cfg.head.reranker
    model = learned_rerank.build_model(spec)
    like = learned_rerank.init_params(model, spec, jax.random.key(0))
    return learned_rerank.learned_scorer(model, checkpointing.restore_params(run_dir, like), spec, name)
