"""int8 stages: standard ONNX that onnxruntime runs, ~4x smaller weights, top-1 kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import EXAMPLE, run_folder
from lcpc.pipeline import convert as convert_model
from lcpc.ir import Graph, Node, TensorInfo
from lcpc.compress import quantize as quant


@pytest.fixture(scope="module")
def folders(tmp_path_factory, digits_calib):
    calib, _ = digits_calib
    root = tmp_path_factory.mktemp("quant")
    convert_model(EXAMPLE, root / "float", 2, sync="all")
    convert_model(EXAMPLE, root / "int8", 2, sync="all", calib=calib, quantize="int8-all")
    return root


def test_int8_stages_are_standard_onnx_and_agree(folders, digits_calib):
    _, x_test = digits_calib
    y32, _, m32 = run_folder(folders / "float", {"input": x_test})
    y8, _, m8 = run_folder(folders / "int8", {"input": x_test})
    for s in m8["stages"]:
        model = onnx.load(folders / "int8" / s["file"])
        onnx.checker.check_model(model, full_check=True)
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    formats = {s["format"]["format"] for s in m8["stages"]}
    assert "int8" in formats
    agree = (y8["logits"].argmax(1) == y32["logits"].argmax(1)).mean()
    assert agree >= 0.99
    w32 = sum(s["weight_bytes"] for s in m32["stages"])
    w8 = sum(s["weight_bytes"] for s in m8["stages"])
    assert w32 >= 3.0 * w8, (w32, w8)


def test_choose_keeps_float_when_int8_is_slower(monkeypatch):
    g = _tiny_conv()
    monkeypatch.setattr(quant, "measure", lambda variants, feeds, repeat=None:
                        {k: (1.0 if k == "float" else 2.0) for k in variants})
    chosen, choice = quant.choose(g, ["dynamic"], None)
    assert chosen is g and choice.format == "float" and "slow" in choice.reason
    monkeypatch.setattr(quant, "measure", lambda variants, feeds, repeat=None:
                        {k: (1.0 if k == "float" else 0.5) for k in variants})
    chosen, choice = quant.choose(g, ["dynamic"], None)
    assert choice.format == "dynamic" and any(n.op == "ConvInteger" for n in chosen.nodes)


def test_dynamic_quantization_runs_without_data():
    g = _tiny_conv()
    q = quant.quantize_graph(g, "dynamic")
    from lcpc.ir import to_onnx

    x = np.random.default_rng(0).standard_normal((1, 8, 6, 6)).astype(np.float32)
    ref = ort.InferenceSession(to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    out = ort.InferenceSession(to_onnx(q).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert out[0].shape == ref[0].shape
    assert np.abs(out[0] - ref[0]).max() <= 0.05 * np.abs(ref[0]).max()


def _tiny_conv() -> Graph:
    w = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2
    return Graph([Node("conv", "Conv", ["x", "w"], ["y"], {"pads": [1, 1, 1, 1]})], ["x"], ["y"],
                 {"x": TensorInfo((1, 8, 6, 6), np.dtype(np.float32)), "y": TensorInfo((1, 16, 6, 6),
                                                                                        np.dtype(np.float32))},
                 {"w": w}, 17)


def test_quantize_without_the_tools_is_one_clear_error(monkeypatch, tmp_path):
    from lcpc.errors import LcpcError

    monkeypatch.setattr(quant, "available", lambda: False)
    with pytest.raises(LcpcError, match="quantization tools"):
        convert_model(EXAMPLE, tmp_path / "o", 2, quantize="int8")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("shape", [(4, 1, 8, 4), (4, 8, 8), (0, 1, 8, 8)])
def test_calibration_array_of_the_wrong_shape_is_one_clear_error(shape, tmp_path):
    from click.testing import CliRunner

    from lcpc.cli import main

    np.save(tmp_path / "bad.npy", np.zeros(shape, np.float32))
    for flags in (["--wire", "int8"], ["--quantize", "int8"], ["--prune", "0.3"]):
        result = CliRunner().invoke(main, ["convert", str(EXAMPLE), "-k", "2", "--calib", str(tmp_path / "bad.npy"),
                                           "-o", str(tmp_path / "o"), *flags])
        assert result.exit_code == 1 and "calibration array of shape" in result.output
        assert "Traceback" not in result.output and not (tmp_path / "o").exists()
