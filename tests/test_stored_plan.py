"""The manifest carries the plan: a folder's plan is read back, never planned again.

- recovery works on a folder written with a partition method that is not the default,
  with the planner and every planning pass unavailable, and keeps the folder's branches;
- the plan read back equals the plan that was written (layouts, branches, decisions);
- a folder of an older manifest format, or one whose model changed, is refused clearly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import EXAMPLE, rel_err, run_folder

from lcpc import frontend, pipeline, planner, stored_plan
from lcpc.errors import LcpcError
from lcpc.lower import lower
from lcpc.calibrate import run_graph
from lcpc.passes import cut, layouts, partition
from lcpc.passes.recover import refit
from lcpc.plan import Action, Cause
from lcpc.weights import masked_graph


@pytest.fixture(scope="module")
def contiguous(tmp_path_factory):
    out = tmp_path_factory.mktemp("stored") / "contiguous"
    pipeline.convert(EXAMPLE, out, 4, "every:3", partition="contiguous")
    return out


def test_plan_read_back_equals_the_plan_written(contiguous):
    graph, source = frontend.load(EXAMPLE)
    written = planner.plan(graph, source, 4, "every:3", "contiguous")
    read, manifest = stored_plan.load(contiguous)
    assert read.k == written.k and read.partition_method == "contiguous" and read.sync_policy == "every:3"
    assert dict(read.layouts) == dict(written.layouts)
    assert dict(read.branch_of_class) == dict(written.branch_of_class)
    assert read.decisions == written.decisions
    assert {d.action for d in read.decisions.values()} >= {Action.CUT, Action.EXCHANGE, Action.MERGE}
    assert read.decisions[read.nodes_with(Action.EXCHANGE)[0]].cause == Cause.POLICY
    # the same stages and bytes as the folder
    assert lower(read).bytes_per_inference() == manifest.bytes_per_inference == \
        manifest.json["totals"]["bytes_per_inference"]


def test_recover_does_not_plan_again(contiguous, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("recover planned again")

    for module in (planner, partition, layouts, cut):
        monkeypatch.setattr(module, "plan" if module is planner else "run", refuse)
    x = np.load(EXAMPLE.parent / "sample.npy")
    data = np.concatenate([x + np.float32(0.01 * i) for i in range(8)])  # a few dozen inputs for the refit
    manifest = pipeline.recover(contiguous, data, tmp_path / "rec", epochs=0)
    before = json.loads((contiguous / "manifest.json").read_text())
    assert manifest["plan"] == before["plan"] and manifest["sync"]["partition"] == "contiguous"
    assert manifest["sync"]["cuts"] == before["sync"]["cuts"]
    assert manifest["totals"]["comparison"]["model_parallel"] == before["totals"]["comparison"]["model_parallel"]
    figures = manifest["fidelity"]["recovery"]["refit"]
    assert figures["after"]["kl_divergence"] < figures["before"]["kl_divergence"]
    # the written stages compute the refit plan (the same pass on the same samples, as one graph)
    monkeypatch.undo()
    plan, _ = stored_plan.load(contiguous)
    refit_plan, _ = refit.run(plan, data, "lsq")  # the pipeline's call: same seed, same split
    out, _, _ = run_folder(tmp_path / "rec", {"input": x})
    assert rel_err(out["logits"], run_graph(masked_graph(refit_plan), x)) < 1e-4
    assert rel_err(out["logits"], run_graph(masked_graph(plan), x)) > 1e-2  # the refit changed the model


def edited_copy(src, folder, edit):
    """A copy of folder ``src`` whose manifest went through ``edit``."""
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def test_older_manifest_format_is_refused(contiguous, tmp_path):
    folder = edited_copy(contiguous, tmp_path / "old", lambda m: m.update(version=1))
    with pytest.raises(LcpcError, match="manifest format 1; this lcpc reads format 2: convert the model again"):
        stored_plan.load(folder)


def test_plan_that_does_not_match_the_model_is_refused(contiguous, tmp_path):
    folder = edited_copy(contiguous, tmp_path / "edited",
                         lambda m: m["plan"]["branch_of_class"].pop(next(iter(m["plan"]["branch_of_class"]))))
    with pytest.raises(LcpcError, match="does not match the channel analysis"):
        stored_plan.load(folder)
