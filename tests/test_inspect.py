"""`lcpc inspect`: names unsupported ops and their nodes, exits 0; convert still exact."""

from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner
from conftest import EXAMPLE, reference, rel_err
from onnx import helper, numpy_helper

from lcpc import pipeline
from lcpc.cli import main
from lcpc.runtime.local import LocalEngine


def model_with_unknown_op() -> bytes:
    """conv -> LpNormalization over channels (not modelled) -> conv -> GAP -> Gemm."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in (("w1", (16, 3, 3, 3)), ("w2", (16, 16, 1, 1)), ("fc", (5, 16)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("LpNormalization", ["a"], ["n"], axis=1, p=2, name="mystery_norm"),
             helper.make_node("Conv", ["n", "w2"], ["b"], name="conv2"),
             helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_inspect_names_unsupported_op_and_node(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(model_with_unknown_op())
    result = CliRunner().invoke(main, ["inspect", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["unsupported"] == ["LpNormalization"]
    sync = next(s for s in data["syncs"] if s["op"] == "LpNormalization")
    assert sync["node"] == "mystery_norm" and "LpNormalization" in sync["reason"]
    assert sync["split_input_bytes"] == 16 * 8 * 8 * 4
    assert data["ops"]["Conv"] == {"split": 2}
    assert data["max_branches"] == 16
    text = CliRunner().invoke(main, ["inspect", str(path)]).stdout
    assert "mystery_norm" in text and "LpNormalization" in text


def test_convert_is_exact_with_forced_sync(tmp_path):
    data = model_with_unknown_op()
    for sync in ("all", "none"):
        out = tmp_path / sync
        manifest = pipeline.convert(data, out, 4, sync)
        assert manifest["unsupported_ops"] == ["LpNormalization"]
        forced = [d for d in manifest["decisions"] if d["action"] == "forced-sync"]
        assert [d["node"] for d in forced] == ["mystery_norm"]
        x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
        engine = LocalEngine(out)
        got = engine.run({"x": x})["y"]
        engine.close()
        # conv2 sees the gathered, replicated input: nothing left to cut, so even --sync none is exact
        assert rel_err(got, reference(data, {"x": x})[0]) < 1e-4


def test_inspect_example_largest_k():
    result = CliRunner().invoke(main, ["inspect", str(EXAMPLE), "--format", "json"])
    assert json.loads(result.stdout)["max_branches"] == 32
