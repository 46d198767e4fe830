"""``--sync auto`` chosen after recovery (issue 12, done-means 3): the candidate plans are the
same for every budget, the chosen one is the best-scored affordable one, so a larger
budget never scores worse; ``convert --sync auto --recover`` writes what a separate
``recover`` of the chosen plan writes, and records every candidate's score."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import EXAMPLE

from lcpc import frontend, pipeline, planner, report
from lcpc.lower import lower
from lcpc.passes import cut
from lcpc.plan import Action
from lcpc.runtime.local import LocalEngine

data = pytest.importorskip("examples.digits.data")


@pytest.fixture(scope="module")
def digits():
    x_train, y_train, x_test, _ = data.load_split()
    graph, source = frontend.load(EXAMPLE)
    calib = x_train[:48]
    path = cut.auto_path(planner.plan(graph, source, 4, "none"), calib)
    return graph, source, calib, path, x_train[:320], y_train[:320], x_test[:64]


def hashed_scores(plans, sizes):
    """Arbitrary but fixed scores per plan (any ranking at all must give monotone choices)."""
    out = []
    for plan in plans:
        h = hashlib.sha256(",".join(sorted(plan.nodes_with(Action.EXCHANGE))).encode()).digest()
        out.append({"agreement": h[0] / 255, "kl": h[1] / 255})
    return out


def test_spread_is_budget_free_and_spans_none_to_exact(digits):
    *_, path, _, _, _ = digits
    picks = cut.spread(path, 6)
    sizes = [p["bytes"] for p in picks]
    assert sizes == sorted(set(sizes)) and len(sizes) == min(6, len({p["bytes"] for p in path}))
    assert sizes[0] == min(p["bytes"] for p in path) and sizes[-1] == max(p["bytes"] for p in path)
    assert picks[0]["exchanges"] == [] and len(picks[-1]["exchanges"]) == len(path[0]["exchanges"])


def test_larger_budget_never_scores_worse_and_stays_within(digits):
    graph, source, calib, path, *_ = digits
    seen = []

    def select(plans, sizes):
        scores = hashed_scores(plans, sizes)
        seen.append([(size, (s["agreement"], s["kl"])) for size, s in zip(sizes, scores)])
        return scores

    sizes = sorted({p["bytes"] for p in path})
    previous = None
    for budget in sizes + [sizes[-1] * 2]:
        p = planner.plan(graph, source, 4, "auto", calib=calib, comm_budget=budget, select=select)
        sent = lower(p).bytes_per_inference()
        assert sent <= budget
        score = hashed_scores([p], [sent])[0]
        candidates = seen[-1]
        assert all(size <= budget for size, _ in candidates)
        best = max((a, -kl) for _, (a, kl) in candidates)
        assert (score["agreement"], -score["kl"]) == best
        if previous is not None:
            assert (score["agreement"], -score["kl"]) >= previous
            assert set(seen[-2]) <= set(seen[-1])  # the affordable candidates only grow
        previous = (score["agreement"], -score["kl"])


def test_convert_auto_recover_writes_the_recovered_choice(digits, tmp_path):
    graph, source, calib, path, x_train, y_train, x_test = digits
    budget = cut.spread(path, 6)[2]["bytes"]
    scores = pipeline.RecoveredScores(x_train, y_train, epochs=0)
    m = pipeline.convert_and_recover(EXAMPLE, tmp_path / "auto", x_train, labels=y_train, epochs=0, branches=4,
                                     sync="auto", calib=calib, comm_budget=budget, scores=scores)
    assert m["totals"]["bytes_per_inference"] <= budget
    choice = m["fidelity"]["sync_auto"]
    assert len(choice["candidates"]) == 3 and choice["budget"] == budget
    assert choice["chosen"] == cut.pick(scores.last)
    assert all(len(c["kl_samples"]) == len(scores.last[0]["kl_samples"]) > 10 for c in scores.last)
    assert choice["candidates"][0]["agreement"] > 0.5  # pure LCP, after the refit (before it: about 10%)
    text = report.render(m, "text")
    assert "--sync auto chose after recovery, within" in text and "(chosen)" in text
    assert "scored_before_pruning" not in choice and "before --prune" not in text
    chosen = choice["candidates"][choice["chosen"]]
    assert sorted(m["sync"]["exchanges"]) == chosen["exchanges"]
    assert m["totals"]["bytes_per_inference"] == chosen["bytes_per_inference"]
    # the reused in-memory recovery is exactly what `lcpc recover` of the same plan writes
    named = ",".join(chosen["exchanges"]) or "none"
    pipeline.convert(EXAMPLE, tmp_path / "cut", 4, named)
    pipeline.recover(tmp_path / "cut", x_train, tmp_path / "again", labels=y_train, epochs=0)
    logits = []
    for folder in ("auto", "again"):
        engine = LocalEngine(tmp_path / folder)
        logits.append(engine.run({graph.inputs[0]: x_test[:8]})[graph.outputs[0]])
        engine.close()
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_convert_auto_recover_with_prune_says_the_choice_was_scored_unpruned(digits, tmp_path):
    graph, source, calib, path, x_train, y_train, x_test = digits
    budget = cut.spread(path, 6)[1]["bytes"]
    m = pipeline.convert_and_recover(EXAMPLE, tmp_path / "auto", x_train, labels=y_train, epochs=0, branches=4,
                                     sync="auto", calib=calib, comm_budget=budget, prune=0.25)
    assert m["compression"]["prune"] and m["totals"]["bytes_per_inference"] <= budget
    assert m["fidelity"]["sync_auto"]["scored_before_pruning"] is True
    assert "scored before --prune" in report.render(m, "text")


def test_convert_auto_recover_at_exact_budget_writes_the_exact_plan(digits, tmp_path):
    graph, source, calib, path, x_train, _, x_test = digits
    exact = max(p["bytes"] for p in path)
    calls = []

    class Exact(pipeline.RecoveredScores):
        def _score(self, plan, key):
            calls.append(len(plan.cut_nodes()))
            return {"agreement": 0.5, "kl": 1.0} if plan.cut_nodes() else super()._score(plan, key)

    m = pipeline.convert_and_recover(EXAMPLE, tmp_path / "out", x_train, epochs=0, branches=4, sync="auto",
                                     calib=calib, comm_budget=exact, scores=Exact(x_train, epochs=0))
    assert m["sync"]["cuts"] == [] and m["totals"]["bytes_per_inference"] == exact
    assert 0 in calls and len(calls) == len(cut.spread(path, 6))
    assert not any(p.name.startswith(".lcpc-convert-") for p in tmp_path.iterdir())


def test_pick_spends_bytes_only_on_a_gain_the_heldout_data_shows():
    rng = np.random.default_rng(0)
    base = 0.2 + rng.exponential(0.05, 200)

    def score(kl):
        return {"agreement": 1.0, "kl": float(kl.mean()), "kl_samples": kl}

    noise = score(base + rng.normal(0, 0.05, 200) - 0.002)                # lower mean, within the noise
    clear = score(base * 0.5)                                               # lower on every sample
    assert noise["kl"] < score(base)["kl"]
    assert cut.pick([score(base), noise]) == 0
    assert cut.pick([score(base), clear]) == 1
    assert cut.pick([score(base), noise, clear]) == 2
    assert cut.pick([score(base), clear, noise]) == 1
    exact = {**score(np.zeros(200)), "exact": True}
    assert cut.pick([score(base), exact]) == 1 and cut.pick([exact]) == 0
    assert cut.pick([score(base * 1e-6), exact]) == 1  # the original itself, even against a near-perfect plan
    # more candidates only extend the scan: the kept mean KL never rises
    scores = [score(base * f + rng.normal(0, 0.01, 200) * f) for f in (1, 0.98, 0.7, 0.71, 0.3, 0.0)]
    kept = [scores[cut.pick(scores[:m])]["kl"] for m in range(1, len(scores) + 1)]
    assert kept == sorted(kept, reverse=True) and kept[-1] == 0
