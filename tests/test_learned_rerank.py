"""The learned re-ranker: exact leave-one-out, query chunks, a planted toy where learning must help, and
save/restore through the entry points."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbir_jax.scoring import learned_rerank
from cbir_jax.scoring import rerank
from cbir_jax.training import rerank_training
from cbir_jax.core.config import LearnedRerankConfig, TrainConfig
from cbir_jax.evaluation.retrieval import evaluate_scorer

from helpers import compose_config

SPEC = LearnedRerankConfig(k=6, alpha=3.0, qe_k=4, qe_alpha=1.0, dim=16, depth=1, heads=2)


def _random_params(spec, seed=0):
    """Parameters with every leaf random (the output layer too, which training starts at zero)."""
    model = learned_rerank.build_model(spec)
    params = learned_rerank.init_params(model, spec, jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return model, jax.tree_util.tree_unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _clusters(rng, n_classes, per_class, dim=16, noise=0.6):
    centres = rng.normal(size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), per_class)
    x = centres[y] + noise * rng.normal(size=(len(y), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_untrained_model_is_exactly_dba_alpha_qe():
    x, _ = _clusters(np.random.default_rng(0), 5, 8)
    spec = LearnedRerankConfig(k=6, alpha=3.0, qe_k=4, qe_alpha=1.0, dim=16, depth=1, heads=2, query_side=False)
    model = learned_rerank.build_model(spec)
    ours = learned_rerank.learned_scorer(model, learned_rerank.init_params(model, spec, jax.random.key(0)), spec)
    dba = rerank.build_reranker("dba_alpha_qe", k=6, alpha=3.0, qe_k=4, qe_alpha=1.0)
    self_index = jnp.arange(len(x), dtype=jnp.int32)
    a = ours.score(*ours.prepare(jnp.asarray(x)), jnp.asarray(x), self_index)
    b = dba.score(*dba.prepare(jnp.asarray(x)), jnp.asarray(x), self_index)
    finite = np.isfinite(np.asarray(b))
    np.testing.assert_allclose(np.asarray(a)[finite], np.asarray(b)[finite], atol=1e-5)


def test_leave_one_out_equals_removing_the_query_from_the_gallery():
    """Query i scored against the full gallery (self_index=i) must equal query i scored against the
    gallery with row i deleted: i is in no neighbourhood, not its own and not any gallery row's."""
    x, _ = _clusters(np.random.default_rng(1), 4, 7)
    model, params = _random_params(SPEC)
    scorer = learned_rerank.learned_scorer(model, params, SPEC)
    full = scorer.prepare(jnp.asarray(x))
    for i in (0, 9, 27):
        loo = np.asarray(scorer.score(*full, jnp.asarray(x[i : i + 1]), jnp.array([i], jnp.int32)))[0]
        rest = np.delete(x, i, axis=0)
        removed = np.asarray(scorer.score(*scorer.prepare(jnp.asarray(rest)), jnp.asarray(x[i : i + 1]), jnp.array([-1], jnp.int32)))[0]
        assert loo[i] == -np.inf or not np.isfinite(loo[i]) or np.argmax(loo) != i
        np.testing.assert_allclose(np.delete(loo, i), removed, atol=1e-5)
        # Without variants (external queries): the same scores from explicit d_j and one GEMM.
        plain = learned_rerank.learned_scorer(model, params, SPEC, leave_one_out=False)
        direct = np.asarray(plain.score(*plain.prepare(jnp.asarray(rest)), jnp.asarray(x[i : i + 1]), jnp.array([-1], jnp.int32)))[0]
        np.testing.assert_allclose(direct, removed, atol=1e-5)


def test_query_chunks_score_exactly_as_one_batch():
    x, y = _clusters(np.random.default_rng(2), 4, 9)
    model, params = _random_params(SPEC, seed=3)
    scorer = learned_rerank.learned_scorer(model, params, SPEC)
    whole = evaluate_scorer(scorer, x, x, y, y, np.arange(len(y)), query_chunk=len(y))
    chunked = evaluate_scorer(scorer, x, x, y, y, np.arange(len(y)), query_chunk=5)
    assert chunked == pytest.approx(whole, abs=1e-9)


def test_top_k_with_a_small_gallery_chunk_equals_the_dense_ranking():
    """A re-ranker needs the whole gallery: ranking.top_k must not hand it chunks, whatever `chunk` says."""
    from cbir_jax.scoring import ranking

    x, _ = _clusters(np.random.default_rng(4), 4, 9)
    model, params = _random_params(SPEC, seed=5)
    scorer = learned_rerank.learned_scorer(model, params, SPEC)
    state = scorer.prepare(jnp.asarray(x))
    self_index = jnp.arange(6, dtype=jnp.int32)
    dense = np.array(scorer.score(*state, jnp.asarray(x[:6]), self_index))
    dense[np.arange(6), np.arange(6)] = -np.inf
    s, idx = ranking.top_k(scorer, state, jnp.asarray(x[:6]), k=5, chunk=4, self_index=self_index, exclude_self=True)
    np.testing.assert_array_equal(np.asarray(idx), np.argsort(-dense, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(np.asarray(s), np.sort(dense, axis=1)[:, ::-1][:, :5], atol=1e-6)


def _confusable(rng, n_classes, per_class, dim=24):
    """Classes whose members lie on a tight core, plus per class a few look-alikes of *another* class
    placed between the two: cosine (and DBA's fixed weights) pull them in; the neighbourhood structure
    (look-alikes are not similar to each other's neighbours) tells them apart."""
    centres = rng.normal(size=(n_classes, dim))
    xs, ys = [], []
    for c in range(n_classes):
        core = centres[c] + 0.55 * rng.normal(size=(per_class, dim))
        other = (c + 1) % n_classes
        fakes = 0.55 * centres[c] + 0.45 * centres[other] + 0.5 * rng.normal(size=(3, dim))
        xs += [core, fakes]
        ys += [np.full(per_class, c), np.full(3, other)]
    x = np.concatenate(xs)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.concatenate(ys)


def test_training_on_planted_structure_beats_alpha_qe_and_its_own_start(tmp_path):
    rng = np.random.default_rng(0)
    train_x, train_y = _confusable(rng, 10, 12)
    test_x, test_y = _confusable(rng, 8, 12)  # other classes: what is learned must transfer
    cfg = compose_config("head=learned_rerank", "seed=0")
    from cbir_jax.runs.cli import to_typed

    cfg = to_typed(cfg)
    cfg.head.reranker = LearnedRerankConfig(k=8, qe_k=5, dim=16, depth=1, heads=2, queries_per_step=40, val_every=100)
    cfg.train = TrainConfig(epochs=40, learning_rate=3e-3, warmup_steps=5)
    params, summary = rerank_training.train_reranker(cfg, train_x, lambda: train_y, train_x[:0], None, tmp_path)
    spec = cfg.head.reranker
    model = learned_rerank.build_model(spec)
    loo = np.arange(len(test_y))

    def map_at_r(scorer):
        return evaluate_scorer(scorer, test_x, test_x, test_y, test_y, loo)["map_at_r"]

    trained = map_at_r(learned_rerank.learned_scorer(model, params, spec))
    start = map_at_r(learned_rerank.learned_scorer(model, learned_rerank.init_params(model, spec, jax.random.key(0)), spec))
    alpha_qe = map_at_r(rerank.build_reranker("alpha_qe"))
    assert trained > alpha_qe and trained > start + 0.01, (trained, start, alpha_qe)
    assert summary["steps"] == 40 * 4 and (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_train_then_evaluate_restores_the_same_reranker(tmp_path):
    from omegaconf import OmegaConf

    from cbir_jax.runs.cli import to_typed
    from cbir_jax.evaluate import evaluate
    from cbir_jax.train import train

    overrides = ["head=learned_rerank", "head.reranker.k=5", "head.reranker.qe_k=3", "head.reranker.dim=16",
                 "head.reranker.depth=1", "head.reranker.queries_per_step=16", "head.reranker.val_every=1",
                 "train.epochs=2", "data.split.val_fraction=0.4",
                 "head.reranker.base=tuned", "eval.baselines=[cosine,dba_alpha_qe]", "eval.tuned_baselines=[dba_alpha_qe]"]
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    cfg = compose_config(*overrides)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    trained = train(to_typed(cfg), run)
    # 4 validation photos x 4 views: 16 rows, enough for the tuning grid's k=10 and the re-ranker's k=5
    tuned = [name for name in trained if name.startswith("dba_alpha_qe[val:")]
    assert len(tuned) == 1 and "learned_rerank" in trained
    again = evaluate(compose_config(*overrides, f"checkpoint={run}"), tmp_path / "eval")
    assert again["learned_rerank"] == pytest.approx(trained["learned_rerank"], abs=1e-9)


def test_the_reranker_resumes_bit_identically_in_the_one_loop(tmp_path, monkeypatch):
    """The re-ranker trains in the pair heads' loop: a run stopped by Ctrl-C mid-epoch and resumed ends with
    exactly the parameters and validation history of the uninterrupted run; without train.resume=true the
    loop refuses to overwrite its checkpoints."""
    from cbir_jax.core.errors import CheckpointError, Interrupted
    from cbir_jax.runs.cli import to_typed
    from cbir_jax.training import guards

    rng = np.random.default_rng(1)
    x, y = _confusable(rng, 6, 10)
    cfg = to_typed(compose_config("head=learned_rerank", "seed=0"))
    cfg.head.reranker = LearnedRerankConfig(k=5, qe_k=3, dim=8, depth=1, heads=2, queries_per_step=16, val_every=1)
    cfg.train = TrainConfig(epochs=3, learning_rate=3e-3, warmup_steps=2, checkpoint_every=2)
    args = (x[:48], lambda: y[:48], x[48:], y[48:])
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    params, summary = rerank_training.train_reranker(cfg, *args, full)
    stop_at = summary["steps"] // 3 + 2  # inside the second epoch, after one validation and one checkpoint
    check = guards.check_loss

    def ctrl_c(step, loss):
        if step == stop_at:
            raise KeyboardInterrupt
        check(step, loss)

    monkeypatch.setattr(guards, "check_loss", ctrl_c)
    with pytest.raises(Interrupted, match="train.resume=true"):
        rerank_training.train_reranker(cfg, *args, stopped)
    monkeypatch.setattr(guards, "check_loss", check)
    with pytest.raises(CheckpointError, match="train.resume=true"):
        rerank_training.train_reranker(cfg, *args, stopped)
    cfg.train.resume = True
    again, _ = rerank_training.train_reranker(cfg, *args, stopped)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)
    history = [json.loads((run / "best.json").read_text())["history"] for run in (full, stopped)]
    assert history[0] == history[1] and len(history[0]) == 4  # untrained, then after each of the 3 epochs
