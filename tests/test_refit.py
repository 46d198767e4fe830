"""Cheap recovery (numpy + onnxruntime): stats and least-squares refit of the cut layers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import EXAMPLE, rel_err

from lcpc import frontend, planner
from lcpc.calibrate import run_graph
from lcpc.weights import masked_graph
from lcpc import pipeline
from lcpc.cli import main
from lcpc.fidelity import compare
from lcpc.lower import lower
from lcpc.passes.recover import refit
from lcpc.targets import onnx as onnx_target
from lcpc.runtime.local import LocalEngine

data = pytest.importorskip("examples.digits.data")


@pytest.fixture(scope="module")
def split():
    return data.load_split()


@pytest.fixture(scope="module")
def digits_plan():
    graph, source = frontend.load(EXAMPLE)
    return planner.plan(graph, source, 4, "none")


def test_lsq_refit_recovers_held_out_agreement(split, digits_plan, tmp_path):
    x_train, _, x_test, y_test = split
    recovered, report = refit.run(digits_plan, x_train[:512], "lsq")
    assert report["before"]["top1_agreement"] < 0.3 < 0.95 < report["after"]["top1_agreement"]
    # held-out: the test split was never seen by the refit
    reference = run_graph(digits_plan.graph, x_test)
    cut = compare(reference, run_graph(masked_graph(digits_plan, set(digits_plan.cut_nodes())), x_test), y_test)
    fixed = compare(reference, run_graph(recovered.graph, x_test), y_test)
    assert cut["candidate_accuracy"] < 0.3
    assert fixed["candidate_accuracy"] > 0.95
    # the cut structure is intact: the lowered plan computes the refitted graph exactly
    onnx_target.write(recovered, lower(recovered), tmp_path / "out")
    engine = LocalEngine(tmp_path / "out")
    got = engine.run({"input": x_test[:8]})["logits"]
    engine.close()
    assert rel_err(got, run_graph(recovered.graph, x_test[:8])) < 1e-4


def test_stats_refit_changes_only_kept_blocks(split, digits_plan):
    recovered, report = refit.run(digits_plan, split[0][:256], "stats")
    assert report["after"]["kl_divergence"] < report["before"]["kl_divergence"]
    from lcpc.weights import weight_masks

    for name, mask in weight_masks(digits_plan).items():
        node = next(n for n in digits_plan.graph.nodes if n.name == name)
        w = recovered.graph.constants[node.inputs[1]]
        assert np.all(w * (1 - mask) == 0)


def test_recover_cli_refit_only(split, tmp_path):
    x_train, _, x_test, y_test = split
    pipeline.convert(EXAMPLE, tmp_path / "cut", 4, "none")
    np.save(tmp_path / "train.npy", x_train)
    result = CliRunner().invoke(main, ["recover", str(tmp_path / "cut"), "--data", str(tmp_path / "train.npy"),
                                       "--epochs", "0", "-o", str(tmp_path / "rec")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "rec" / "manifest.json").read_text())
    assert manifest["fidelity"]["recovery"]["refit"]["after"]["top1_agreement"] > 0.95
    assert manifest["sync"]["cuts"] == json.loads((tmp_path / "cut" / "manifest.json").read_text())["sync"]["cuts"]
    np.save(tmp_path / "test.npy", x_test)
    np.save(tmp_path / "labels.npy", y_test)
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "rec"), "--data", str(tmp_path / "test.npy"),
                                       "--labels", str(tmp_path / "labels.npy"), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["candidate_accuracy"] > 0.95


def test_recover_refuses_exact_plan(tmp_path):
    pipeline.convert(EXAMPLE, tmp_path / "all", 2, "all")
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 8, 8), np.float32))
    result = CliRunner().invoke(main, ["recover", str(tmp_path / "all"), "--data", str(tmp_path / "x.npy"),
                                       "--epochs", "0", "-o", str(tmp_path / "rec")])
    assert result.exit_code == 1 and "nothing to recover" in result.stderr


def test_convert_with_recover_in_one_step(split, tmp_path):
    np.save(tmp_path / "train.npy", split[0][:400])
    out = tmp_path / "rec"
    result = CliRunner().invoke(main, ["convert", str(EXAMPLE), "-k", "4", "--recover", str(tmp_path / "train.npy"),
                                       "--epochs", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fidelity"]["recovery"]["refit"]["after"]["top1_agreement"] > 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec", "train.npy"]  # no staging left behind


def test_refit_needs_no_torch(split, digits_plan, no_torch):
    """The refit is numpy + onnxruntime: it runs with torch unimportable, and it refits the
    classifier downstream of the cut too (a dense layer that is not itself cut)."""
    layers = [n.name for n in refit.refit_layers(digits_plan)]
    assert "/fc/Gemm" in layers and "/fc/Gemm" not in digits_plan.cut_nodes()
    assert set(digits_plan.cut_nodes()) <= set(layers)
    recovered, report = refit.run(digits_plan, split[0][:300], holdout=0.2)
    assert report["samples"] == {"train": 240, "heldout": 60}
    assert report["after"]["kl_divergence"] < report["before"]["kl_divergence"]
    fc = recovered.graph.constants["fc.weight"]
    assert np.any(fc != digits_plan.graph.constants["fc.weight"])


def test_strong_ridge_keeps_the_prior(digits_plan, split):
    """lam -> infinity pulls every refit block back to its current (kept original) weights."""
    recovered, _ = refit.run(digits_plan, split[0][:100], ridge=1e9)
    masked = masked_graph(digits_plan, set(digits_plan.cut_nodes()))
    for name, value in masked.constants.items():
        assert np.allclose(recovered.graph.constants[name], value, rtol=1e-5, atol=1e-6), name
