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

It trains in the one training loop (`trainer.train`): resume, patience, the divergence guard and model
selection are the pair heads'. Selection: MAP@R on the validation rows (`data.split.val_fraction`, carved
from the training categories), every `val_every` epochs, each validation image a leave-one-out query
against the others (`retrieval.leave_one_out`); the best parameters are the ones kept and evaluated.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbir_jax.core.errors import ConfigError
from cbir_jax.core.registry import Registry
from cbir_jax.data import DataError
from cbir_jax.labels import pair_labels
from cbir_jax.scoring import learned_rerank
from cbir_jax.training import checkpointing, selection, trainer

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


@dataclasses.dataclass
class EpisodeBatches:
    """The re-ranker's batch source (`trainer.BatchSource`): each step shuffles the training rows into
    `queries_per_step` queries and a gallery of the rest, with their relevance."""

    features: jax.Array
    relevance: np.ndarray  # (N, N) bool
    n_query: int
    seed: int
    steps_per_epoch: int

    @classmethod
    def build(cls, cfg, train_x: np.ndarray, train_labels: Callable[[], np.ndarray | None]) -> "EpisodeBatches":
        rcfg = cfg.head.reranker
        n = len(train_x)
        n_query = min(rcfg.queries_per_step, n // 2)
        if n - n_query <= rcfg.k + 1:
            raise DataError(f"head.reranker.k={rcfg.k}: the training episodes hold only {n - n_query} gallery rows; lower k")
        relevance = TARGETS.get(rcfg.targets)(train_x, train_labels, rcfg)
        return cls(jnp.asarray(train_x), relevance, n_query, cfg.seed, max(1, -(-n // n_query)))

    def epoch(self, epoch: int) -> Callable[[int], tuple]:
        rng = np.random.default_rng([self.seed, epoch + 1])  # seeded by the epoch counted from 1
        perms = [rng.permutation(len(self.relevance)) for _ in range(self.steps_per_epoch)]

        def batch(b: int) -> tuple:
            qi, gi = perms[b][: self.n_query], perms[b][self.n_query:]
            return self.features[qi], self.features[gi], jnp.asarray(self.relevance[np.ix_(qi, gi)])

        return batch


def train_reranker(
    cfg, train_x: np.ndarray, train_labels: Callable[[], np.ndarray | None],
    val_x: np.ndarray, val_y: np.ndarray | None, run_dir: Path,
) -> tuple[Any, dict[str, Any]]:
    """Trains on episodes of the training rows in the one training loop (`trainer.train`); returns the
    `eval.select` parameters (best on validation, where there are enough validation rows) and a summary."""
    spec = cfg.head.reranker
    source = EpisodeBatches.build(cfg, train_x, train_labels)  # checks k against the rows before allocating for it
    model = learned_rerank.build_model(spec)
    params = learned_rerank.init_params(model, spec, jax.random.key(cfg.seed))

    def make_scorer(p):
        return learned_rerank.learned_scorer(model, p, spec, cfg.head.name)

    keeper = None
    if val_y is not None and len(val_y) > spec.k + 2:  # every validation row needs k neighbours besides itself
        keeper = selection.BestKeeper(run_dir, selection.Validator(val_x, val_y), make_scorer)
    elif cfg.train.patience is not None:
        raise ConfigError(f"train.patience needs more than head.reranker.k + 2 = {spec.k + 2} validation rows")
    log.info("re-ranker: %d training rows, %d steps of %d queries", len(train_x), source.steps_per_epoch * cfg.train.epochs,
             source.n_query)
    started = time.time()
    last = trainer.train(cfg, params, source, lambda tx: make_step(model, spec, tx, spec.temperature), run_dir, keeper,
                         validate_every=spec.val_every, title=f"head={cfg.head.name} (targets={spec.targets})")
    chosen = selection.selected_params(cfg.eval.select, run_dir, last, keeper)
    sel = keeper.selection if keeper is not None else None
    summary = {"best_epoch": sel.best_epoch if sel else cfg.train.epochs,
               "best_val_map_at_r": sel.best_value if sel else None,
               "train_seconds": round(time.time() - started, 1), "steps": source.steps_per_epoch * cfg.train.epochs}
    log.info("re-ranker: best validation MAP@R %s at epoch %s (%.0f s)", summary["best_val_map_at_r"], summary["best_epoch"],
             summary["train_seconds"])
    return chosen, summary


def restore_scorer(cfg, run_dir: Path, info: dict[str, Any], name: str = "learned_rerank"):
    """The trained re-ranker of a run directory as a Scorer, shaped as `model.json` says it was trained
    (with `base=tuned` its k and alphas were chosen on validation rows during training)."""
    saved = info.get("reranker", {}).get("config")
    spec = type(cfg.head.reranker)(**saved) if saved else cfg.head.reranker
    model = learned_rerank.build_model(spec)
    like = learned_rerank.init_params(model, spec, jax.random.key(0))
    which = checkpointing.resolve(run_dir, cfg.eval.select)  # runs before the one loop kept only their best, as last
    return learned_rerank.learned_scorer(model, checkpointing.restore_params(run_dir, like, which), spec, name)
