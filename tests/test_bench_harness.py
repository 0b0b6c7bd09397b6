"""The benchmark harness: ours and peers alternate in fresh processes, results pool per side (no timing asserted)."""

from __future__ import annotations

import os

import numpy as np

from benchmarks import table
from benchmarks.harness import Side, aggregate, alternate, order, peer_env, run_process

OURS = Side("ours", "benchmarks.harness:selftest", {"reps": 2}, peer=False)
PEER = Side("peer", "benchmarks.harness:selftest", {"reps": 3})


def test_order_alternates_ours_first():
    assert [s.name for s in order([OURS, PEER], 3)] == ["ours", "peer"] * 3


def test_peer_env_removes_both_openblas_overrides_and_nothing_else():
    env = {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "1048576", "OPENBLAS_NUM_THREADS": "2", "PATH": "/bin"}
    assert peer_env(env) == {"OPENBLAS_NUM_THREADS": "2", "PATH": "/bin"}


def test_aggregate_pools_repetitions_over_processes():
    outs = [{"times": {"a": [3.0, 1.0]}, "info": {"i": 1}}, {"times": {"a": [2.0, 4.0, 5.0]}, "info": {"i": 2}}]
    r = aggregate(outs)
    assert r.best("a") == 1.0
    assert r.median("a") == 3.0  # of all five repetitions
    assert r.per_process_best == {"a": [1.0, 2.0]}
    assert r.info == {"i": 2} and r.processes == 2


def test_alternate_spawns_in_order_and_groups_by_side():
    calls = []

    def spawn(side):
        calls.append(side.name)
        return {"times": {"x": [float(len(calls))]}}

    res = alternate([OURS, PEER], 2, spawn=spawn)
    assert calls == ["ours", "peer", "ours", "peer"]
    assert res["ours"].times["x"] == [1.0, 3.0] and res["peer"].times["x"] == [2.0, 4.0]


def test_rate_row_is_the_ratio_of_bests():
    ours = aggregate([{"times": {"c": [0.5, 1.0]}}])
    peer = aggregate([{"times": {"c": [2.0, 1.0, 4.0]}}])
    r = table.rate_row("job", "items/s", "peer", 10, ours, peer, "c")
    assert (r["ours"], r["ours_median"], r["peer"], r["peer_median"]) == (20.0, 10 / 0.75, 10.0, 5.0)
    assert "| 2 |" in table.markdown([r])[-1]


def test_worker_round_trip_in_fresh_processes():
    res = alternate([OURS, PEER], 2)
    assert len(res["ours"].times["sum"]) == 4 and len(res["peer"].times["sum"]) == 6
    np.testing.assert_array_equal(res["peer"].arrays["x"], [0, 1, 2])
    assert isinstance(res["peer"].info["blas"], list)
    # The peer's process never sees the OpenBLAS overrides; ours sees whatever this environment has.
    assert res["peer"].info["openblas_vars"] == []
    assert res["ours"].info["openblas_vars"] == sorted(v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                                                       if v in os.environ)


def test_a_failing_side_names_itself():
    try:
        run_process(Side("broken", "benchmarks.harness:no_such_function"))
    except RuntimeError as e:
        assert "broken" in str(e) and "no_such_function" in str(e)
    else:
        raise AssertionError("a failing worker must raise")


def test_a_tiny_ranking_job_end_to_end():
    from benchmarks import ranking

    rows = ranking.fixed_metric_rows([2000], rounds=1, reps=1, big_rounds=1, big_reps=1)
    assert len(rows) == 2 * len(ranking.BATCHES) * 2  # cosine and L2 × B × {faiss, numpy}
    for r in rows:
        assert r["ours"] > 0
        if r["peer"] is not None:
            assert "agreement 1.000" in r["note"]
