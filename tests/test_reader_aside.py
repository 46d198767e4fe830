"""``reader.read_model_and_weights``: the weights read from the file straight into arrays give the
same model, checks and hash as ``read_model``, and files laid out unusually take the plain path."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from conftest import EXAMPLE
from onnx import TensorProto, helper, numpy_helper

from lcpc import frontend, reader
from lcpc.errors import LcpcError


def _mixed_model() -> onnx.ModelProto:
    """Initializers of every kind: large plain ones (float32, float16, int64, bool), a large
    bfloat16 one (not a plain type), a large one in float_data, small ones."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 3, 8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(5000).astype(np.float16), "half"),
             numpy_helper.from_array(np.arange(6000, dtype=np.int64), "longs"),
             numpy_helper.from_array(rng.random(9000) > 0.5, "mask"),
             helper.make_tensor("listed", TensorProto.FLOAT, [5000], rng.standard_normal(5000).tolist()),
             numpy_helper.from_array(np.ones(3, np.float32), "small")]
    bf16 = helper.make_tensor("bf16", TensorProto.BFLOAT16, [5000],
                              rng.integers(0, 1 << 16, 5000, dtype=np.uint16).tobytes(), raw=True)
    inits.append(bf16)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _same_as_plain(path) -> dict[str, np.ndarray]:
    """read_model_and_weights(path) against read_model(path); returns the weights set aside."""
    plain, src = reader.read_model(path)
    model, weights, src2 = reader.read_model_and_weights(path)
    assert src2 == src
    assert src.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for t in model.graph.initializer:
        if t.name in weights:
            assert not t.HasField("raw_data")
            t.raw_data = weights[t.name].tobytes()
    assert model.SerializeToString() == plain.SerializeToString()
    for t in plain.graph.initializer:
        if t.name in weights:
            np.testing.assert_array_equal(weights[t.name], numpy_helper.to_array(t))
    return weights


def test_mixed_initializers_match_the_plain_reader(tmp_path):
    path = tmp_path / "mixed.onnx"
    onnx.save(_mixed_model(), path)
    weights = _same_as_plain(path)
    assert set(weights) == {"w", "half", "longs", "mask"}  # not bf16, not float_data, not small
    # each weight owns its memory, so folding can free one without keeping the others' bytes
    assert all(w.base is None or w.base.nbytes == w.nbytes for w in weights.values())
    assert all(w.flags.writeable and w.flags.aligned for w in weights.values())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_benchmark_models_hold_no_weights_in_the_protobuf(name, tmp_path):
    from benchmarks import models

    path = tmp_path / f"{name}.onnx"
    onnx.save(models.build(name, width=0.25), path)
    _same_as_plain(path)
    model, weights, _ = reader.read_model_and_weights(path)
    size = path.stat().st_size
    assert sum(w.nbytes for w in weights.values()) > 0.8 * size
    assert model.ByteSize() < 0.2 * size


def test_example_model_loads_the_same_from_a_path(tmp_path):
    from_path, _ = frontend.load(EXAMPLE)
    from_bytes, _ = frontend.load(EXAMPLE.read_bytes())
    assert sorted(from_path.constants) == sorted(from_bytes.constants)
    for name, value in from_bytes.constants.items():
        np.testing.assert_array_equal(from_path.constants[name], value)


def _tensor_field(t: onnx.TensorProto) -> bytes:
    body = t.SerializeToString()
    return b"\x2a" + _varint(len(body)) + body  # GraphProto.initializer


def _graph_field(body: bytes) -> bytes:
    return b"\x3a" + _varint(len(body)) + body  # ModelProto.graph


def _varint(n: int) -> bytes:
    return reader._varint(n)


def test_raw_data_given_twice_takes_the_last_as_protobuf_does(tmp_path):
    """A second ModelProto.graph field merges into the first; its initializer holds raw data twice."""
    t = numpy_helper.from_array(np.arange(5000, dtype=np.float32), "twice")
    body = t.SerializeToString() + b"\x4a" + _varint(20000) + np.full(5000, 7, np.float32).tobytes()
    extra = _graph_field(b"\x2a" + _varint(len(body)) + body)
    path = tmp_path / "twice.onnx"
    path.write_bytes(_mixed_model().SerializeToString() + extra)
    weights = _same_as_plain(path)
    assert "twice" not in weights


def test_unusual_layouts_take_the_plain_path(tmp_path):
    data = _mixed_model().SerializeToString()
    group = b"\xa3\x06" + b"\xa4\x06"  # an empty group in unknown field 100: protobuf skips it
    path = tmp_path / "group.onnx"
    path.write_bytes(data + group)
    assert _same_as_plain(path) == {}


@pytest.mark.parametrize("cut", [1, 100, 0.5])
def test_truncated_files_fail_as_with_the_plain_reader(tmp_path, cut):
    data = _mixed_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[:-cut] if isinstance(cut, int) else data[:int(len(data) * cut)])
    with pytest.raises(LcpcError) as plain:
        reader.read_model(path)
    with pytest.raises(LcpcError) as aside:
        reader.read_model_and_weights(path)
    assert str(aside.value) == str(plain.value)


def test_stand_in_of_wrong_size_is_put_back_and_refused(tmp_path):
    """dims that do not match the raw data: not set aside, so the plain check reports it."""
    t = numpy_helper.from_array(np.arange(5000, dtype=np.float32), "bad")
    del t.dims[:]
    t.dims.extend([6000])
    model = _mixed_model()
    model.graph.initializer.append(t)
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(LcpcError, match="'bad'.*does not match its dims"):
        reader.read_model_and_weights(path)


def _conv_bn(opset: int, weights_as_inputs: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(v.astype(np.float32), n)
              for n, v in zip("sbmv", (rng.random(32) + 0.5, rng.standard_normal(32), rng.standard_normal(32),
                                       rng.random(32) + 0.5))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])]
    if weights_as_inputs:  # IR < 4 exporters list initializers among the graph inputs
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "cbn", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3 if weights_as_inputs else 7
    return model


@pytest.mark.parametrize("opset, listed", [(17, False), (11, False), (9, False), (17, True)])
def test_file_and_bytes_load_the_same(tmp_path, opset, listed):
    """Old opsets put the set-aside weights back for the version converter; weights listed as
    graph inputs (IR 3) are weights either way."""
    model = _conv_bn(opset, listed)
    path = tmp_path / "cbn.onnx"
    onnx.save(model, path)
    assert reader.read_model_and_weights(path)[1]  # the conv weight was set aside
    from_path, src = frontend.load(path)
    from_bytes, _ = frontend.load(model.SerializeToString())
    assert src.opset == opset and from_path.inputs == from_bytes.inputs == ["x"]
    assert sorted(from_path.constants) == sorted(from_bytes.constants)
    for name, value in from_bytes.constants.items():
        np.testing.assert_array_equal(from_path.constants[name], value)
