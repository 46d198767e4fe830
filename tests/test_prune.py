"""Structured pruning: a pruned plan computes what the unpruned plan computes with the
removed channels' consumer columns zeroed; balanced branches; real savings; recover."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conftest import EXAMPLE, run_folder
from lcpc import frontend, ops, planner
from lcpc.pipeline import convert as convert_model
from lcpc.compress import run_program
from lcpc.errors import LcpcError
from lcpc.lower import lower
from lcpc.passes import prune
from lcpc.weights import DenseWeight


def zeroed(plan, record: prune.Pruning):
    """The oracle: the unpruned plan whose dense layers ignore the removed channels."""
    g, a = plan.graph, plan.analysis
    removed = {int(a.classes[t][i]) for t, idx in record.removed.items() for i in idx}
    updates = {}
    for n in g.nodes:
        b = a.behaviours[n.name]
        if isinstance(b, ops.Dense) and n.inputs[0] in a.classes:
            drop = np.nonzero(np.isin(a.classes[n.inputs[0]], list(removed)))[0]
            if len(drop):
                view = DenseWeight.of(n, b)
                w = g.constants[view.weight].copy()
                view.oi(w)[:, drop] = 0
                updates[view.weight] = w
    return replace(plan, graph=g.with_constants(updates))


def _plan(model, k=4, sync="none"):
    graph, source = frontend.load(model, None)
    return planner.plan(graph, source, k, sync)


@pytest.mark.parametrize("name", ["digits", "resnet_basic", "mobilenet_v3", "inception", "densenet",
                                  "grouped_resnext"])
@pytest.mark.parametrize("sync", ["none", "all"])
def test_pruned_plan_equals_zeroed_plan(name, sync, zoo_bytes):
    plan = _plan(EXAMPLE if name == "digits" else zoo_bytes[name], 4, sync)
    pruned, record = prune.run(plan, 0.3)
    assert record.removed
    shape = plan.graph.info(plan.graph.inputs[0]).shape
    x = np.random.default_rng(0).standard_normal((2, *shape[1:])).astype(np.float32)
    want, _ = run_program(lower(zeroed(plan, record)), x)
    got, _ = run_program(lower(pruned), x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert sorted(pruned.cut_nodes()) == sorted(plan.cut_nodes())


def test_branches_stay_balanced_and_tensors_shrink():
    plan = _plan(EXAMPLE)
    pruned, _ = prune.run(plan, 0.3)
    for t, layout in plan.layouts.items():
        if layout != "S" or t in plan.graph.outputs:
            continue
        before = np.bincount(plan.branches(t), minlength=plan.k)
        after = np.bincount(pruned.branches(t), minlength=plan.k)
        assert after.min() >= 1 and after.max() - after.min() <= before.max() - before.min() + 1
        assert pruned.graph.info(t).shape[plan.analysis.axis(t)] == after.sum() <= before.sum()


def test_pruning_saves_flops_and_file_bytes(tmp_path):
    x = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    m = convert_model(EXAMPLE, tmp_path / "p", 4, prune=0.3, calib=x)
    v = m["compression"]["variants"]
    assert v["lcp+prune"]["flops"] <= 0.75 * v["lcp"]["flops"]
    assert v["lcp+prune"]["file_bytes"] <= 0.80 * v["lcp"]["file_bytes"]
    _, stats, manifest = run_folder(tmp_path / "p", {"input": x})
    assert stats.total() == manifest["totals"]["bytes_per_inference"] * len(x)
    from lcpc import report

    for fmt in ("text", "markdown"):
        text = report.render(manifest, fmt)
        assert "lcp+prune" in text and "original" in text and "stage files" in text


def test_recover_replays_the_pruning(tmp_path):
    from lcpc import stored_plan
    from lcpc.pipeline import recover

    convert_model(EXAMPLE, tmp_path / "p", 2, prune=0.3)
    plan, _ = stored_plan.load(tmp_path / "p")
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    ref, _, manifest = run_folder(tmp_path / "p", {"input": x[:4]})
    got, _ = run_program(lower(plan), x[:4])
    assert np.allclose(got, ref["logits"], atol=1e-5)
    out = recover(tmp_path / "p", x, tmp_path / "r", epochs=0)
    assert out["compression"]["prune"] == manifest["compression"]["prune"]
    assert [s["inputs"] for s in out["stages"]] == [s["inputs"] for s in manifest["stages"]]


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, float("nan")])
def test_bad_ratio_is_one_clear_error(ratio, tmp_path):
    with pytest.raises(LcpcError, match="--prune"):
        convert_model(EXAMPLE, tmp_path / "o", 2, prune=ratio)
    assert not (tmp_path / "o").exists()


def test_zero_ratio_changes_nothing():
    plan = _plan(EXAMPLE)
    pruned, record = prune.run(plan, 0.0)
    assert not record.removed and pruned is plan


def test_reconstruction_with_data_keeps_the_pruned_model_accurate():
    from examples.digits.data import load_split
    from lcpc.calibrate import run_graph

    x_train, _, x_test, y_test = load_split()
    plan = _plan(EXAMPLE, 4, "all")
    plain, _ = prune.run(plan, 0.3)
    refit, record = prune.run(plan, 0.3, x_train[:512])
    assert record.reconstructed and record.removed
    acc = {name: float((run_graph(p.graph, x_test).argmax(1) == y_test).mean()) for name, p in
           (("plain", plain), ("refit", refit))}
    assert acc["refit"] >= 0.97 and acc["refit"] > acc["plain"], acc


def test_recover_refits_a_reconstructed_pruning_again(tmp_path):
    from examples.digits.data import load_split
    from lcpc.pipeline import recover

    x_train = load_split()[0]
    convert_model(EXAMPLE, tmp_path / "p", 2, prune=0.3, calib=x_train[:128])
    out = recover(tmp_path / "p", x_train[:256], tmp_path / "r", epochs=0)
    assert out["compression"]["prune"]["reconstructed"] and "wire" not in out["compression"]
    assert out["fidelity"]["recovery"]["refit"]["after"]["top1_agreement"] >= 0.9


@pytest.mark.parametrize("n,ratio,removed", [(8, 0.3, 2), (16, 0.3, 5), (24, 0.3, 8), (64, 0.3, 16), (128, 0.3, 40),
                                             (512, 0.3, 152), (24, 0.1, 2), (4, 0.0, 0)])
def test_kept_widths_align_to_8_when_close_to_the_ratio(n, ratio, removed):
    assert prune.how_many(n, ratio) == removed
