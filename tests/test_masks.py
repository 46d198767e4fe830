"""The cut plan equals the original graph with block-diagonal weight masks — the
identity recovery relies on to train an LCP model as one graph."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import reference, rel_err

from lcpc import frontend, planner
from lcpc import pipeline
from lcpc.ir import Graph, to_onnx
from lcpc.weights import weight_masks
from lcpc.runtime.local import LocalEngine


@pytest.mark.parametrize("name", ["resnet_basic", "vgg", "mobilenet_v3", "inception", "densenet"])
@pytest.mark.parametrize("k", [2, 4])
def test_masked_graph_equals_cut_plan(name, k, tmp_path, zoo_bytes):
    g, source = frontend.load(zoo_bytes[name])
    plan = planner.plan(g, source, k, "none")
    masks = weight_masks(plan)
    assert set(masks) == set(plan.cut_nodes())
    for node_name, mask in masks.items():
        density = mask.mean()
        assert abs(density - 1 / k) < 0.15, (node_name, density)
    consts = dict(g.constants)
    for n in g.nodes:
        if n.name in masks:
            consts[n.inputs[1]] = consts[n.inputs[1]] * masks[n.name]
    masked = Graph(g.nodes, g.inputs, g.outputs, g.tensors, consts, g.opset)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    want = reference(to_onnx(masked).SerializeToString(), {"input": x})[0]
    pipeline.convert(zoo_bytes[name], tmp_path / "out", k, "none")
    engine = LocalEngine(tmp_path / "out")
    got = engine.run({"input": x})["logits"]
    engine.close()
    assert rel_err(got, want) < 1e-4
    assert rel_err(got, reference(zoo_bytes[name], {"input": x})[0]) > 1e-2  # the cut does change the model
