"""Control flow (issue 8): a bounded Loop converts, its stages pass the full ONNX checker, and
the plan computes what onnxruntime computes on the original model.

Loop is an op lcpc does not model, so it runs whole behind an exact sync; what has to hold is
the plumbing around it: scalar constants stay scalars in the stage files (the trip count and
the condition), values a Loop body reads from the enclosing graph become explicit inputs (so
lowering places and renames them), a constant Loop does not stop the rest of the model from
being folded, and an If that reads enclosing values is refused by name.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import reference, rel_err, run_folder
from corpus import build as corpus
from onnx import helper, numpy_helper

from lcpc import frontend
from lcpc.cli import main
from lcpc.errors import LcpcError
from lcpc.ir import to_onnx

CORPUS = Path(__file__).resolve().parent / "corpus"


def convert(tmp_path: Path, model: onnx.ModelProto, *args) -> Path:
    path, out = tmp_path / "model.onnx", tmp_path / "out"
    path.write_bytes(model.SerializeToString())
    result = CliRunner().invoke(main, ["convert", str(path), "-o", str(out), *map(str, args)])
    assert result.exit_code == 0, result.output + result.stderr
    return out


def check_stages_and_outputs(out: Path, model: onnx.ModelProto) -> None:
    stages = sorted(out.glob("*.onnx"))
    assert stages
    for stage in stages:
        onnx.checker.check_model(onnx.load(stage), full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    got, _, _ = run_folder(out, {"x": x})
    want = reference(model.SerializeToString(), {"x": x})[0]
    assert rel_err(got["y"], want) < 1e-6


@pytest.mark.parametrize("sync", ["none", "all"])
@pytest.mark.parametrize("k", [2, 3])
def test_bounded_loop_converts_and_runs_exactly(tmp_path, sync, k):
    model = corpus.loop(10)
    out = convert(tmp_path, model, "--branches", k, "--sync", sync)
    check_stages_and_outputs(out, model)


def test_loop_trip_count_stays_a_scalar(tmp_path):
    out = convert(tmp_path, corpus.loop(4), "--branches", 2)
    loops = [(stage, n) for stage in out.glob("*.onnx") for n in onnx.load(stage).graph.node if n.op_type == "Loop"]
    assert len(loops) == 1
    stage, node = loops[0]
    inits = {t.name: t for t in onnx.load(stage).graph.initializer}
    assert list(inits[node.input[0]].dims) == [] and list(inits[node.input[1]].dims) == []


@pytest.mark.parametrize("sync", ["none", "all"])
def test_loop_body_reading_the_enclosing_graph(tmp_path, sync):
    model = corpus.loop_reading_outer(3)
    graph, _ = frontend.load(model.SerializeToString())
    loop = next(n for n in graph.nodes if n.op == "Loop")
    assert "t" in loop.inputs  # the outer value is now an explicit input
    out = convert(tmp_path, model, "--branches", 2, "--sync", sync)
    check_stages_and_outputs(out, model)


def test_constant_loop_does_not_stop_folding():
    """A Loop with constant inputs is left alone; a Transpose of a weight elsewhere still folds."""
    model = corpus.loop(10)
    w = np.random.default_rng(0).standard_normal((3, 3, 3, 3)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w, "w_t"))
    model.graph.node.insert(0, helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0, 2, 3]))
    model.graph.node[-1].output[0] = "z"
    model.graph.node.append(helper.make_node("Conv", ["z", "w"], ["y"], pads=[1, 1, 1, 1]))
    graph, _ = frontend.load(model.SerializeToString())
    assert "Transpose" not in {n.op for n in graph.nodes}
    conv = next(n for n in graph.nodes if n.op == "Conv")
    assert conv.inputs[1] in graph.constants
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert rel_err(reference(to_onnx(graph).SerializeToString(), {"x": x})[0],
                   reference(model.SerializeToString(), {"x": x})[0]) < 1e-6


def test_if_reading_the_enclosing_graph_is_refused_by_name():
    with pytest.raises(LcpcError, match=r"node 'choose' \(op If\) reads t from the enclosing graph"):
        frontend.load(corpus.if_reading_outer().SerializeToString())
