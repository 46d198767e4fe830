"""Channels-last bodies: the channel axis is tracked through Transposes, and a
channels-last MatMul (a ConvNeXt-style linear layer) is a dense layer that can be cut."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import reference, rel_err

from lcpc import frontend, planner
from lcpc import pipeline
from lcpc.runtime.local import LocalEngine

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[1,3,16,16] input) => (float[1,10] y) {
  x = Conv <pads = [1,1,1,1]> (input, w0)
  h = Transpose <perm = [0,2,3,1]> (x)
  a = MatMul (h, l1)
  b = Add (a, l1b)
  g = Relu (b)
  c = MatMul (g, l2)
  back = Transpose <perm = [0,3,1,2]> (c)
  z = Add (x, back)
  p = GlobalAveragePool (z)
  f = Flatten (p)
  y = Gemm <transB = 1> (f, fc, fcb)
}
"""


def model_bytes() -> bytes:
    model = onnx.parser.parse_model(MODEL)
    rng = np.random.default_rng(0)
    weights = {"w0": (16, 3, 3, 3), "l1": (16, 32), "l1b": (32,), "l2": (32, 16), "fc": (10, 16), "fcb": (10,)}
    for name, shape in weights.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name))
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def test_channel_axis_is_tracked():
    graph, source = frontend.load(model_bytes())
    p = planner.plan(graph, source, 4, "none")
    a = p.analysis
    assert [a.axis(t) for t in ("x", "h", "a", "g", "c", "back", "z")] == [1, 3, 3, 3, 3, 1, 1]
    assert {t: p.layouts[t] for t in ("h", "a", "g", "c", "back")} == dict.fromkeys(("h", "a", "g", "c", "back"), "S")
    assert set(p.cut_nodes()) == {n.name for n in graph.nodes if n.op == "MatMul"}
    assert not [d for d in p.decisions.values() if d.action == "forced-sync"]


@pytest.mark.parametrize("k", [2, 4])
def test_channels_last_exact_and_cut(k, tmp_path):
    data = model_bytes()
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    want = reference(data, {"input": x})[0]
    for sync in ("all", "none"):
        manifest = pipeline.convert(data, tmp_path / sync, k, sync)
        engine = LocalEngine(tmp_path / sync)
        got = engine.run({"input": x})["y"]
        engine.close()
        if sync == "all":
            assert rel_err(got, want) < 1e-4
        else:  # branches meet only at the classifier: no gather of the channels-last body
            assert {t["tensor"] for t in manifest["transfers"] if t["kind"] == "gather"} <= {"f"}
            assert rel_err(got, want) > 1e-3
