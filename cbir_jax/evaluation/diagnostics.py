"""Diagnostics of labels and scorers: why a learned head ranks well or badly, in numbers.

Pure functions over arrays, each answering one question (the entry point is `cbir_jax.diagnose`):

- label quality: does the target separate same-class from different-class pairs (`roc_auc`), and how far
  is it from the metric the features already give (`spearman` with cosine)?
- fit: does the head reproduce its target's *order* (`spearman` of output vs target)?
- per-image vs pair effects (`additive_share`): t_ij ~ mu + a_i + a_j. A target whose variance is mostly
  per-image says "image i is similar to everything", which a per-query ranking cannot use: for one query
  only a_j varies, and the same a_j lifts the same gallery items for every query (hubs).
- hubness (`hubness`): how unevenly the top-k slots are shared out among gallery items.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import scipy.stats


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2 (Mann-Whitney U).

    0.5 is chance; below 0.5 the score is *inverted* with respect to the positives.
    """
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = scipy.stats.rankdata(scores)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (nan when either side is constant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(a, b).statistic)


def pair_part(i: np.ndarray, j: np.ndarray, t: np.ndarray, n: int) -> np.ndarray:
    """What is left of t_ij after the least-squares per-image fit t ~ mu + a_i + a_j: the pair effect r_ij."""
    t = np.asarray(t, np.float64)
    centred = t - t.mean()
    m = len(t)
    rows = np.concatenate([np.arange(m), np.arange(m)])
    design = scipy.sparse.csr_matrix((np.ones(2 * m), (rows, np.concatenate([i, j]))), shape=(m, n))
    a = scipy.sparse.linalg.lsqr(design, centred, atol=1e-10, btol=1e-10, iter_lim=5000)[0]
    return centred - design @ a


def additive_share(i: np.ndarray, j: np.ndarray, t: np.ndarray, n: int) -> float:
    """Share of the variance of targets t_ij explained by per-image terms: least squares t ~ mu + a_i + a_j.

    1 means the target is a sum of per-image properties (no pair information at all); 0 means none of it is.
    """
    t = np.asarray(t, np.float64)
    total = float(np.sum((t - t.mean()) ** 2))
    if total == 0:
        return float("nan")
    resid = pair_part(i, j, t, n)
    return float(1.0 - (resid @ resid) / total)


def k_occurrence(top_ids: np.ndarray, n: int) -> np.ndarray:
    """N_k: how often each of the n gallery items appears in the queries' top-k lists (top_ids (B, k))."""
    ids = np.asarray(top_ids).ravel()
    return np.bincount(ids[ids >= 0], minlength=n)


def hubness(top_ids: np.ndarray, n: int, top_share: float = 0.01) -> dict[str, float]:
    """Skewness of the k-occurrence distribution and the share of all top-k slots taken by the `top_share`
    most frequent gallery items (uniform: `top_share`; one item in every list: 1/k at least)."""
    counts = k_occurrence(top_ids, n)
    slots = counts.sum()
    n_top = max(1, int(round(top_share * n)))
    share = float(np.sort(counts)[::-1][:n_top].sum() / slots) if slots else float("nan")
    skew = float(scipy.stats.skew(counts)) if np.ptp(counts) > 0 else 0.0
    return {"skewness": skew, "top1pct_share": share}


def label_quality(targets: np.ndarray, same_class: np.ndarray | None, cosine: np.ndarray) -> dict[str, float]:
    """ROC-AUC of the target for same- vs different-class pairs (if labels exist) and Spearman with cosine."""
    out = {"spearman_with_cosine": spearman(targets, cosine)}
    if same_class is not None:
        out["auc_same_class"] = roc_auc(targets, same_class)
        out["mean_target_same"] = float(np.mean(targets[same_class])) if same_class.any() else float("nan")
        out["mean_target_different"] = float(np.mean(targets[~same_class])) if (~same_class).any() else float("nan")
    return out


# --- One run's diagnostics: labels, fit, ranking and hubness on real rows ------------------------------------


def ranking_diagnostics(metrics: dict[str, float], top_ids: np.ndarray, n: int, k: int = 10) -> dict[str, float]:
    """Leave-one-out MAP@R and P@1 (`retrieval.leave_one_out`) beside the hubness of the top-k lists."""
    hub = hubness(np.asarray(top_ids)[:, :k], n)
    return {
        "map_at_r": metrics["map_at_r"],
        "precision_at_1": metrics["precision_at_1"],
        f"n{k}_skewness": hub["skewness"],
        f"n{k}_top1pct_share": hub["top1pct_share"],
    }


def pair_diagnostics(
    values: np.ndarray, targets: np.ndarray, cosine: np.ndarray, same_class: np.ndarray | None, i, j, n: int
) -> dict[str, float]:
    """How a scorer's (or a label's) values on pairs relate to the targets, to cosine and to the classes."""
    out = {
        "spearman_with_target": spearman(values, targets),
        # the part a per-query ranking can use: both sides with their per-image terms removed
        "spearman_pair_part": spearman(pair_part(i, j, values, n), pair_part(i, j, targets, n)),
        "spearman_with_cosine": spearman(values, cosine),
        "additive_share": additive_share(i, j, values, n),
    }
    if same_class is not None:
        out["auc_same_class"] = roc_auc(values, same_class)
    return out
