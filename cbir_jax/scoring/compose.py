"""The scorer a trained pair head is evaluated with: its pair form, then what `head` adds on top of it
(a re-ranker on a learned embedding, the CSLS hubness correction). Each addition applies to the fast and
the naive pair form alike, so `fast` never changes results."""

from __future__ import annotations

import flax.linen as nn

from cbir_jax.core import vectors
from cbir_jax.scoring import heads, rerank
from cbir_jax.scoring.hubness import with_csls
from cbir_jax.scoring.scorers import Scorer, pair_scorer


def embedding_reranker(name: str, head: heads.CosineResidual, params, reranker: str) -> Scorer:
    """`reranker` run on the head's learned embedding of gallery and queries: needs the whole gallery."""
    inner = rerank.build_reranker(reranker)

    def embed(p, x):
        return vectors.l2_normalise(head.apply({"params": p}, x, method=head.embed))

    def prepare(gallery):
        rows, shared = inner.prepare(embed(params, gallery))
        return rows, (params, shared)

    def score(rows, shared, queries, self_index):
        p, inner_shared = shared
        return inner.score(rows, inner_shared, embed(p, queries), self_index)

    return Scorer(name=name, prepare=prepare, score=score, chunkable=False)


def head_scorer(head_cfg, head: nn.Module, params, *, fast: bool = True) -> Scorer:
    """The head's pair scorer (fast form unless `fast=False`), re-ranked on its embedding if `head.rerank`,
    hubness-corrected if `head.csls_k`."""
    if getattr(head, "rerank", "none") != "none":
        scorer = embedding_reranker(head_cfg.name, head, params, head.rerank)
    else:
        scorer = pair_scorer(head_cfg.name, head, params, fast=fast)
    k = getattr(head_cfg, "csls_k", 0) or 0
    return with_csls(scorer, k) if k > 0 else scorer
