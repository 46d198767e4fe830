"""Channel spaces narrower than K, and grouped convs on the replicated image."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import reference, rel_err
from onnx import helper, numpy_helper

from lcpc import frontend, planner
from lcpc import pipeline
from lcpc.errors import LcpcError
from lcpc.plan import Cause
from lcpc.runtime.local import LocalEngine


def build(nodes, weights, out_channels=10) -> bytes:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(np.prod(s[1:]) or 1)).astype(np.float32), n)
             for n, s in weights.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, out_channels])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def se_model() -> bytes:
    """conv 32 -> squeeze-excite with a 4-channel bottleneck -> conv 32 -> head."""
    n = helper.make_node
    return build([n("Conv", ["x", "w0"], ["a"], pads=[1, 1, 1, 1]), n("Relu", ["a"], ["r"]),
                  n("GlobalAveragePool", ["r"], ["p"]), n("Conv", ["p", "s1"], ["q"]), n("Relu", ["q"], ["qr"]),
                  n("Conv", ["qr", "s2"], ["e"]), n("Sigmoid", ["e"], ["es"]), n("Mul", ["r", "es"], ["m"]),
                  n("Conv", ["m", "w1"], ["b"], pads=[1, 1, 1, 1]), n("Relu", ["b"], ["br"]),
                  n("GlobalAveragePool", ["br"], ["g"]), n("Flatten", ["g"], ["f"]),
                  n("Gemm", ["f", "fc"], ["y"], transB=1)],
                 {"w0": (32, 3, 3, 3), "s1": (4, 32, 1, 1), "s2": (32, 4, 1, 1), "w1": (32, 32, 3, 3), "fc": (10, 32)})


def run(data: bytes, folder, k: int, sync: str) -> tuple[dict, np.ndarray, np.ndarray]:
    manifest = pipeline.convert(data, folder, k, sync)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    engine = LocalEngine(folder)
    got = engine.run({"x": x})["y"]
    engine.close()
    return manifest, got, reference(data, {"x": x})[0]


@pytest.mark.parametrize("sync", ["all", "none"])
def test_narrow_bottleneck_runs_whole_behind_a_sync(sync, tmp_path):
    manifest, got, want = run(se_model(), tmp_path / "out", 8, sync)
    narrow = [d for d in manifest["decisions"] if d["cause"] == Cause.NARROW]
    assert [d["node"] for d in narrow] == ["Conv_3"]  # the 32 -> 4 squeeze and narrow[0]["bytes"] > 0
    if sync == "all":
        assert rel_err(got, want) < 1e-4


def test_narrow_bottleneck_splits_when_k_fits():
    graph, source = frontend.load(se_model())
    p = planner.plan(graph, source, 4, "none")
    assert p.layouts["q"] == "S" and not [d for d in p.decisions.values() if d.action == "forced-sync"]


def test_k_that_leaves_most_compute_unsplit_is_refused():
    graph, source = frontend.load(se_model())
    with pytest.raises(LcpcError, match="use --branches 4 or fewer"):
        planner.plan(graph, source, 40, "none")


@pytest.mark.parametrize("op, shape", [("Conv", (24, 1, 3, 3)), ("ConvTranspose", (3, 8, 3, 3))])
@pytest.mark.parametrize("k", [2, 4, 5])
def test_grouped_conv_on_the_image_splits_any_k(op, shape, k, tmp_path):
    """3 groups on the 3-channel image: K is not limited by the groups, and it stays exact."""
    n = helper.make_node
    data = build([n(op, ["x", "w", "b"], ["a"], group=3, pads=[1, 1, 1, 1]), n("Relu", ["a"], ["r"]),
                  n("GlobalAveragePool", ["r"], ["p"]), n("Flatten", ["p"], ["f"]),
                  n("Gemm", ["f", "fc"], ["y"], transB=1)], {"w": shape, "b": (24,), "fc": (10, 24)})
    manifest, got, want = run(data, tmp_path / "out", k, "none")
    assert not [d for d in manifest["decisions"] if d["action"] == "forced-sync"]
    assert rel_err(got, want) < 1e-4  # nothing to cut: the image is replicated, the head is exact
