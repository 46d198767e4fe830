"""Sync placement: every:N, named nodes, and auto under a byte budget (issue 4, done-means 2)."""

from __future__ import annotations

import pytest
from conftest import EXAMPLE, ZOO

from lcpc import frontend, planner
from lcpc.calibrate import run_graph
from lcpc.weights import masked_graph
from lcpc.errors import LcpcError
from lcpc.fidelity import compare
from lcpc.lower import lower

sys_path_examples = pytest.importorskip("examples.digits.data")


@pytest.fixture(scope="module")
def digits():
    graph, source = frontend.load(EXAMPLE)
    x_train = sys_path_examples.load_split()[0]
    return graph, source, x_train[:48]


def exchanged(plan):
    return [d.node for d in plan.decisions.values() if d.action == "exchange"]


def test_every_n(digits):
    graph, source, _ = digits
    layers = planner.plan(graph, source, 4, "none").cuttable()
    p = planner.plan(graph, source, 4, "every:3")
    assert exchanged(p) == layers[2::3]
    assert set(p.cut_nodes()) == set(layers) - set(layers[2::3])
    assert exchanged(planner.plan(graph, source, 4, "every:1")) == layers
    with pytest.raises(LcpcError, match="positive integer"):
        planner.plan(graph, source, 4, "every:0")


def test_named_nodes(digits):
    graph, source, _ = digits
    layers = planner.plan(graph, source, 4, "none").cuttable()
    p = planner.plan(graph, source, 4, f"{layers[1]},{layers[4]}")
    assert exchanged(p) == [layers[1], layers[4]]
    with pytest.raises(LcpcError, match="not a layer between split tensors"):
        planner.plan(graph, source, 4, "no_such_conv")


def test_exchanges_cost_bytes_and_buy_fidelity(digits):
    graph, source, calib = digits
    plans = {s: planner.plan(graph, source, 4, s) for s in ("none", "every:2", "all")}
    sent = {s: lower(p).bytes_per_inference() for s, p in plans.items()}
    assert sent["none"] < sent["every:2"] < sent["all"]
    ref = run_graph(graph, calib)
    kl = {s: compare(ref, run_graph(masked_graph(p, set(p.cut_nodes())), calib))["kl_divergence"]
          for s, p in plans.items()}
    assert kl["all"] < 1e-9 < kl["none"]


@pytest.mark.parametrize("budget_factor", [1.0, 1.5, 3.0, 20.0])
def test_auto_respects_budget_and_never_worse_than_none(digits, budget_factor):
    graph, source, calib = digits
    none = planner.plan(graph, source, 4, "none")
    floor = lower(none).bytes_per_inference()
    budget = int(floor * budget_factor)
    p = planner.plan(graph, source, 4, "auto", calib=calib, comm_budget=budget)
    assert lower(p).bytes_per_inference() <= budget
    ref = run_graph(graph, calib)
    kl_none = compare(ref, run_graph(masked_graph(none, set(none.cut_nodes())), calib))["kl_divergence"]
    kl_auto = compare(ref, run_graph(masked_graph(p, set(p.cut_nodes())), calib))["kl_divergence"]
    assert kl_auto <= kl_none
    if budget_factor >= 20:
        assert exchanged(p) and kl_auto < kl_none


def test_auto_refuses_budget_below_floor_and_missing_data(digits):
    graph, source, calib = digits
    with pytest.raises(LcpcError, match="below the"):
        planner.plan(graph, source, 4, "auto", calib=calib, comm_budget=10)
    with pytest.raises(LcpcError, match="--calib"):
        planner.plan(graph, source, 4, "auto")


def test_energy_partition_keeps_more_than_contiguous(zoo_bytes):
    for name in ZOO:
        graph, source = frontend.load(zoo_bytes[name])
        for k in (2, 4):
            p = planner.plan(graph, source, k, "none")
            energy = p.partition_energy
            assert energy["kept"] > energy["kept_contiguous"], (name, k, energy)
            assert p.partition_method == "energy"
            c = planner.plan(graph, source, k, "none", "contiguous")
            assert c.partition_energy["kept"] == pytest.approx(energy["kept_contiguous"])


def test_auto_larger_budget_never_worse(digits):
    """Backward elimination gives one path of plans: a larger budget never gives a higher
    calibration KL, no plan exceeds its budget, and the exact plan's budget gives KL 0."""
    graph, source, calib = digits
    floor = lower(planner.plan(graph, source, 4, "none")).bytes_per_inference()
    exact = lower(planner.plan(graph, source, 4, "all")).bytes_per_inference()
    ref = run_graph(graph, calib)
    calls = []
    kls, chosen = [], []
    for budget in [floor, *(int(floor + (exact - floor) * f) for f in (0.05, 0.15, 0.3, 0.6)), exact]:
        p = planner.plan(graph, source, 4, "auto", calib=calib, comm_budget=budget,
                         progress=lambda *a: calls.append(a))
        assert lower(p).bytes_per_inference() <= budget
        kls.append(compare(ref, run_graph(masked_graph(p, set(p.cut_nodes())), calib))["kl_divergence"])
        chosen.append(len(exchanged(p)))
    assert all(b <= a + 1e-12 for a, b in zip(kls, kls[1:])), kls
    assert kls[-1] < 1e-9 and chosen[0] == 0 and chosen[-1] == len(planner.plan(graph, source, 4, "all").cuttable())
    assert len(set(kls)) >= 4  # the budgets in between buy something
    n = len(planner.plan(graph, source, 4, "none").cuttable())
    assert calls[n * (n + 1) // 2 - 1][:2] == (n * (n + 1) // 2,) * 2
