"""Branch dropout (``lcpc recover --branch-dropout``): what the student computes with a branch
dropped is what the runtime answers with that device left out (``lcpc run --without``), so the
model is trained for the answer it will give; the setting is range-checked and refused where
there is nothing to drop; the generator draws nothing without it (earlier runs reproduce)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import EXAMPLE

from lcpc import frontend, planner
from lcpc.cli import main
from lcpc.errors import LcpcError
from lcpc.pipeline import convert
from lcpc.runtime.local import LocalEngine
from lcpc.weights import weight_masks

torch = pytest.importorskip("torch")
from lcpc.passes.recover import distil  # noqa: E402
from lcpc.passes.recover.student import Student  # noqa: E402


@pytest.mark.parametrize("model, k", [("digits", 4), ("vgg", 3)])
def test_student_with_branches_dropped_answers_as_the_runtime_without_them(model, k, zoo_bytes, tmp_path):
    """Per sample a different set of branches kept; each sample's logits equal the degraded
    answer of the converted folder run without the devices of the dropped branches."""
    data = EXAMPLE.read_bytes() if model == "digits" else zoo_bytes[model]
    graph, source = frontend.load(data)
    plan = planner.plan(graph, source, k, "none")
    folder = tmp_path / model
    manifest = convert(data, folder, k, "none")
    merged = distil.merged_branches(plan, 0.5)
    assert set(merged) == set(plan.merges) == set(manifest["plan"]["merges"])
    student = Student(plan.graph, weight_masks(plan), merged=merged).eval()
    assert student.branch_count() == k
    keeps = [[True] * k, [True, False] + [True] * (k - 2), [True] + [False] * (k - 1)]
    if k == 4:
        keeps.append([True, False, True, False])
    name = plan.graph.inputs[0]
    shape = list(graph.info(name).shape)
    x = np.random.default_rng(0).standard_normal([len(keeps)] + shape[1:]).astype(np.float32)
    with torch.no_grad(), student.dropping(torch.tensor(keeps)):
        got = student(torch.from_numpy(x)).numpy()
    with torch.no_grad():
        undropped = student(torch.from_numpy(x)).numpy()
    with LocalEngine(folder) as engine:
        for i, keep in enumerate(keeps):
            without = [f"dev{d}" for d in range(k) if not keep[d]]
            want = next(iter(engine.run({name: x[i:i + 1]}, without=without).values()))
            np.testing.assert_allclose(got[i:i + 1], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_array_equal(got[0], undropped[0])          # all kept: the input as it is
    assert not np.allclose(got[1], undropped[1])                 # a branch dropped changes the answer


def test_the_recipe_refuses_a_probability_out_of_range():
    for p in (-0.1, 1.0, 2, float("nan"), True):
        with pytest.raises(LcpcError, match=r"branch_dropout .* \(--branch-dropout\)"):
            distil.Recipe(branch_dropout=p)
    result = CliRunner().invoke(main, ["recover", "nowhere", "--data", "x.npy", "--branch-dropout", "1", "-o", "o"])
    assert result.exit_code == 1 and "--branch-dropout" in result.output and result.output.count("\n") == 1


def test_a_plan_with_nothing_merged_at_the_head_has_no_branch_to_drop():
    graph, source = frontend.load(EXAMPLE)
    plan = replace(planner.plan(graph, source, 2, "none"), merges={})  # e.g. a segmentation head: no classifier
    assert distil.merged_branches(plan, 0.0) == {}
    with pytest.raises(LcpcError, match="merges no layer at the head .* leave it out"):
        distil.merged_branches(plan, 0.25)


def test_dropout_trains_with_branches_dropped_and_warns_where_the_plan_cannot_degrade():
    """A short run: the drawn masks reach the student (the training loss differs from the same
    run without dropout, which draws nothing extra), the export keeps the cut, and a plan whose
    branches exchange is told it cannot answer with a device missing."""
    x = np.load(EXAMPLE.parent / "train.npy")[:96]
    graph, source = frontend.load(EXAMPLE)
    torch.set_num_threads(1)
    losses = {}
    for p in (0.0, 0.5):
        plan = planner.plan(graph, source, 4, "none")
        _, report = distil.run(plan, x, epochs=1, batch_size=16, branch_dropout=p)
        losses[p] = [h["loss"] for h in report["history"]]
        assert report["recipe"]["branch_dropout"] == p
        assert not any("cannot answer" in w for w in report["warnings"])
    assert losses[0.0] != losses[0.5]
    plan = planner.plan(graph, source, 4, "all")
    _, report = distil.run(plan, x, epochs=1, batch_size=16, branch_dropout=0.25, original=graph)
    assert any("cannot answer without one; convert with --sync none" in w for w in report["warnings"])
