"""Front end: round trip, BN folding, Constant-node weights, opset upgrade, input pinning."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import EXAMPLE, reference, rel_err, run_folder
from onnx import helper, numpy_helper

from lcpc import frontend
from lcpc.cli import main
from lcpc.errors import LcpcError
from lcpc.ir import to_onnx


@pytest.mark.parametrize("name", ["resnet_basic", "densenet", "mobilenet_v3", "vgg"])
def test_roundtrip_identical_outputs(name, zoo_bytes):
    graph, _ = frontend.load(zoo_bytes[name])
    again = to_onnx(graph).SerializeToString()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert rel_err(reference(again, {"input": x})[0], reference(zoo_bytes[name], {"input": x})[0]) < 1e-5


def test_batchnorm_after_conv_is_folded(zoo_bytes):
    graph, _ = frontend.load(zoo_bytes["resnet_basic"])
    assert "BatchNormalization" not in {n.op for n in graph.nodes}
    # densenet's BN follows Concat/Relu (pre-activation): those stay, exactly
    graph, _ = frontend.load(zoo_bytes["densenet"])
    assert "BatchNormalization" in {n.op for n in graph.nodes}


def tiny_model(opset: int, constant_weights: bool = False, dims=("N", 3, 8, 8)) -> bytes:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((4, 8)).astype(np.float32)
    nodes = []
    inits = [numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(np.zeros(4, np.float32), "fcb")]
    if constant_weights:
        nodes.append(helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    nodes += [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [dims[0], 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model.SerializeToString()


def test_constant_node_weights_count_as_weights():
    graph, _ = frontend.load(tiny_model(13, constant_weights=True))
    assert "Constant" not in {n.op for n in graph.nodes}
    conv = next(n for n in graph.nodes if n.op == "Conv")
    assert conv.inputs[1] in graph.constants


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_old_opsets_upgrade(opset):
    graph, source = frontend.load(tiny_model(opset))
    assert source.opset == opset and graph.opset == frontend.TARGET_OPSET


def test_opset_too_old():
    with pytest.raises(LcpcError, match="opset 7 is too old"):
        frontend.load(tiny_model(7))


def test_dynamic_batch_defaults_to_one_and_pins():
    graph, _ = frontend.load(tiny_model(13))
    assert graph.info("x").shape == (1, 3, 8, 8)
    graph, _ = frontend.load(tiny_model(13, dims=("N", 3, "H", "W")), {"x": (1, 3, 16, 16)})
    assert graph.info("x").shape == (1, 3, 16, 16)


def test_dynamic_spatial_dims_need_pinning():
    with pytest.raises(LcpcError, match="--input-shape x:1x3xHxW"):
        frontend.load(tiny_model(13, dims=("N", 3, "H", "W")))


def test_input_shape_with_colon_in_name():
    assert frontend.parse_input_shapes(["input:0:1x224x224x3"]) == {"input:0": (1, 224, 224, 3)}


def test_example_model_loads_and_matches():
    graph, source = frontend.load(EXAMPLE)
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    assert rel_err(reference(to_onnx(graph).SerializeToString(), {"input": x})[0],
                   reference(EXAMPLE, {"input": x})[0]) < 1e-5
    assert len(source.sha256) == 64


# PaddlePaddle and some other exporters write dim_value -1 for a dynamic dim.
def test_minus_one_dims_are_dynamic_and_pin():
    graph, _ = frontend.load(tiny_model(13, dims=(-1, 3, -1, -1)), {"x": (1, 3, 48, 192)})
    assert graph.info("x").shape == (1, 3, 48, 192) and graph.info("y").shape == (1, 4)


def test_lone_minus_one_batch_dim_becomes_one():
    graph, _ = frontend.load(tiny_model(13, dims=(-1, 3, 8, 8)))
    assert graph.info("x").shape == (1, 3, 8, 8)


def test_minus_one_spatial_dims_need_pinning():
    with pytest.raises(LcpcError, match=r"dynamic dim '-1' at axis 2; pin it with --input-shape x:1x3x\?x\?"):
        frontend.load(tiny_model(13, dims=(-1, 3, -1, -1)))


def test_fixed_dims_still_conflict_with_minus_one_model():
    with pytest.raises(LcpcError, match="dim 4 conflicts with the model's fixed dim 3"):
        frontend.load(tiny_model(13, dims=(-1, 3, -1, -1)), {"x": (1, 4, 48, 192)})


@pytest.mark.parametrize("opset", [11, 17])
def test_minus_one_dims_through_the_cli_are_exact(tmp_path, opset):
    model = tiny_model(opset, dims=(-1, 3, -1, -1))
    path, out = tmp_path / "paddle.onnx", tmp_path / "out"
    path.write_bytes(model)
    result = CliRunner().invoke(main, ["convert", str(path), "--branches", "2", "--sync", "all",
                                       "--input-shape", "x:1x3x48x192", "-o", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    x = np.random.default_rng(0).standard_normal((1, 3, 48, 192)).astype(np.float32)
    got, _, manifest = run_folder(out, {"x": x})
    assert rel_err(got["y"], reference(model, {"x": x})[0]) < 1e-4
    assert manifest["source"]["inputs"][0]["shape"] == [1, 3, 48, 192]
