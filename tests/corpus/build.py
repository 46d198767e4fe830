"""Build the corpus of broken inputs: ``python tests/corpus/build.py`` rewrites it.

Every file here is generated deterministically (same bytes on every run, checked by
``test_hostile.py::test_corpus_is_reproducible``) and listed in ``cases.json`` with
the words its error message must contain:

- ``models``: ONNX files ``lcpc convert`` must refuse (``expect``: message parts) or
  accept (``expect`` null): not ONNX, truncated, invalid graphs, opsets, shapes,
  huge claimed sizes, external data inside and outside the model's folder;
- ``inputs``: arrays ``lcpc run`` must refuse when fed to ``good.onnx`` converted
  with ``--branches 2``;
- ``manifests``: edits applied to a fresh ``good.onnx`` output folder that ``lcpc
  run`` must refuse (JSON-pointer ``set``/``remove``/``add``, raw text, and file
  actions on the stage files or the manifest);
- ``devices``: ``devices.yaml`` files (``devices/``) that ``lcpc convert --devices``, ``lcpc run
  --devices`` and ``lcpc serve --devices`` must refuse as themselves, or accept (``expect``
  null): YAML alias bombs wherever the alias sits, self-reference, deep nesting, values out
  of range or without a unit, unknown keys and devices, tags that would build objects;
- ``preprocess``: ``--preprocess`` specs ``lcpc convert`` must refuse (or accept);
- ``images``: image files (``images/``, written without Pillow so the bytes never change)
  that an image folder may hold: ``lcpc verify --data FOLDER`` must refuse the bad ones by
  name: truncated or corrupt JPEG and PNG, empty files, other formats, decompression-bomb
  headers;
- ``options``: command lines whose option values are out of range (recovery settings, labels
  that do not fit, timeouts, addresses, repeats), with the arrays they read (``options/``).
"""

from __future__ import annotations

import json
import pickle
import struct
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
SECRET = "../outside/secret.bin"  # tests put a real file there: it must never be opened
ONE = np.ones(1, np.int64)  # ConstantOfShape's fill value


def tiny(opset: int = 13, dims=("N", 3, 8, 8), elem=TensorProto.FLOAT, constant_weights: bool = False,
         ir_version: int = 7) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(8) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(4)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    nodes, inits = [], [numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "fc"),
                        numpy_helper.from_array(np.zeros(4, np.float32), "fcb")]
    if constant_weights:
        nodes.append(helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    nodes += [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"], axis=1),
              helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", elem, list(dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def rich() -> onnx.ModelProto:
    """More op variety for the fuzzer: BN, a Constant-node weight, Concat, MaxPool, a per-channel
    Mul and a Shape -> Gather -> Concat -> Reshape chain on a dynamic batch."""
    rng = np.random.default_rng(3)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    bn = [numpy_helper.from_array(v, n) for v, n in ((np.abs(f32(4)) + 0.5, "g"), (f32(4), "beta"),
                                                    (f32(4), "mean"), (np.abs(f32(4)) + 0.5, "var"))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["b1"]),
             helper.make_node("Relu", ["b1"], ["a"]),
             helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(f32(4, 3, 1, 1))),
             helper.make_node("Conv", ["x", "w2"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("MaxPool", ["c"], ["d"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Mul", ["d", "scale"], ["e"]),
             helper.make_node("GlobalAveragePool", ["e"], ["gp"]),
             helper.make_node("Shape", ["gp"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus_one"], ["shape"], axis=0),
             helper.make_node("Reshape", ["gp", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(f32(4, 3, 3, 3), "w1"), *bn,
             numpy_helper.from_array(np.abs(f32(1, 8, 1, 1)), "scale"), ints("zero", 0), ints("axes", [0]),
             ints("minus_one", [-1]), numpy_helper.from_array(f32(5, 8), "fc")]
    graph = helper.make_graph(nodes, "rich", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def around(nodes: list, inits: list, out: str) -> onnx.ModelProto:
    """``y = x + sum(out)``: a small valid model whose side computation ``nodes`` makes ``out``."""
    nodes = nodes + [helper.make_node("ReduceSum", [out], ["s"], keepdims=0),
                     helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
                     helper.make_node("Add", ["x", "sf"], ["y"])]
    graph = helper.make_graph(nodes, "side", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def loop(trips: int | None) -> onnx.ModelProto:
    """A Loop adding 1 to a counter ``trips`` times (a while loop on ``cond`` when None)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.INT64, [1])], [ints("one", [1])])
    inits = [numpy_helper.from_array(np.array(True), "cond"), ints("v0", [0])]
    if trips is not None:
        inits.append(ints("M", trips))
    return around([helper.make_node("Loop", ["M" if trips is not None else "", "cond", "v0"], ["count"],
                                    name="counter", body=body)], inits, "count")


def loop_reading_outer(trips: int) -> onnx.ModelProto:
    """A Loop whose body adds ``t``, a value of the enclosing graph, to its carried value."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "t"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 3, 8, 8])])
    inits = [numpy_helper.from_array(np.array(True), "cond"), ints("M", trips)]
    return around([helper.make_node("Relu", ["x"], ["t"]),
                   helper.make_node("Loop", ["M", "cond", "x"], ["acc"], name="accumulate", body=body)], inits, "acc")


def if_reading_outer() -> onnx.ModelProto:
    """An If on a computed condition whose branches read ``t`` of the enclosing graph."""
    def branch(op: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["t"], ["o"])], f"{op.lower()}_branch", [],
                                 [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 3, 8, 8])])
    return around([helper.make_node("Relu", ["x"], ["t"]),
                   helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
                   helper.make_node("Greater", ["total", "zero"], ["positive"]),
                   helper.make_node("If", ["positive"], ["chosen"], name="choose",
                                    then_branch=branch("Neg"), else_branch=branch("Abs"))],
                  [numpy_helper.from_array(np.array(0, np.float32), "zero")], "chosen")


def ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def edited(model: onnx.ModelProto, edit) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    edit(copy)
    return copy


def external(model: onnx.ModelProto, location: str, offset: int = 0, length: int | None = None) -> onnx.ModelProto:
    """``model`` with its Conv weight ``w`` moved to external data at ``location``."""
    def move(m):
        w = next(t for t in m.graph.initializer if t.name == "w")
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        entries = {"location": location, "offset": str(offset), "length": str(length if length is not None else 864)}
        for k, v in entries.items():
            w.external_data.add(key=k, value=v)
    return edited(model, move)


def in_subgraph(location: str) -> onnx.ModelProto:
    """An If whose then-branch holds a Constant with external data at ``location``."""
    value = numpy_helper.from_array(np.zeros(4, np.float32), "k")
    value.ClearField("raw_data")
    value.data_location = TensorProto.EXTERNAL
    value.external_data.add(key="location", value=location)
    then = helper.make_graph([helper.make_node("Constant", [], ["t"], value=value)], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])])
    other = helper.make_graph([helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(
        np.ones(4, np.float32)))], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])])
    return around([helper.make_node("If", ["cond"], ["out"], then_branch=then, else_branch=other)],
                  [numpy_helper.from_array(np.array(True), "cond")], "out")


def models() -> list[tuple[str, bytes, list[str] | None, list[str]]]:
    """(file, bytes, expected message parts or None for "converts", extra convert args)."""
    good = tiny()
    text = good.SerializeToString()
    no_graph = onnx.ModelProto(ir_version=7)
    no_graph.opset_import.add(domain="", version=13)
    cases = [
        ("good.onnx", good, None, []),
        ("constant_weights.onnx", tiny(constant_weights=True), None, []),
        ("opset9.onnx", tiny(opset=9), None, []),
        ("rich.onnx", rich(), None, []),
        ("not_onnx.onnx", b"this is not a model\n" * 10, ["not an ONNX model"], []),
        ("empty.onnx", b"", ["file is empty"], []),
        ("truncated.onnx", text[:len(text) // 2], ["not an ONNX model", "cannot parse"], []),
        ("random_bytes.onnx", np.random.default_rng(1).bytes(512), ["not an ONNX model"], []),
        ("no_graph.onnx", no_graph, ["no graph or no nodes"], []),
        ("invalid_utf8_name.onnx", text.replace(b"\x12\x04tiny", b"\x12\x04\xf4iny", 1), ["not valid UTF-8"], []),
        ("dangling_input.onnx", edited(good, lambda m: m.graph.node[0].input.__setitem__(0, "nope")),
         ["invalid ONNX graph", "'nope'"], []),
        ("cycle.onnx", edited(good, lambda m: m.graph.node[0].input.__setitem__(0, "r")),
         ["invalid ONNX graph"], []),
        ("unknown_op.onnx", edited(good, lambda m: setattr(m.graph.node[1], "op_type", "Frobnicate")),
         ["invalid ONNX graph", "Frobnicate"], []),
        ("initializer_claims_huge.onnx", edited(good, lambda m: m.graph.initializer[0].dims.__setitem__(0, 10**12)),
         ["tensor 'fc' claims dims [1000000000000, 8]", "cannot hold"], []),
        ("opset7.onnx", tiny(opset=7), ["opset 7 is too old"], []),
        ("opset99.onnx", edited(good, lambda m: setattr(m.opset_import[0], "version", 99)),
         ["opset 99 is newer than the installed onnx knows"], []),
        ("no_opset.onnx", edited(good, lambda m: m.opset_import.pop()), ["declares no ai.onnx opset"], []),
        ("ir_version99.onnx", tiny(ir_version=99), ["invalid ONNX graph", "ir_version 99"], []),
        ("no_input_shape.onnx", edited(good, lambda m: m.graph.input[0].type.tensor_type.ClearField("shape")),
         ["input 'x' has no shape", "--input-shape x:"], []),
        ("dynamic_spatial.onnx", tiny(dims=("N", 3, "H", "W")), ["dynamic dim 'H'", "--input-shape x:1x3xHxW"], []),
        ("batchnorm_mismatch.onnx", edited(rich(), lambda m: next(t for t in m.graph.initializer if t.name == "g")
                                           .CopyFrom(numpy_helper.from_array(np.ones(5, np.float32), "g"))),
         ["cannot infer the shapes", "Dimension mismatch"], []),
        ("opaque_output.onnx", edited(good, lambda m: setattr(m.graph.output[0].type.opaque_type, "name", "blob")),
         ["output 'y' is not a tensor"], []),
        ("sequence_input.onnx", edited(good, lambda m: m.graph.input[0].type.CopyFrom(
            helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 3, 8, 8])))),
         ["input 'x' is not a tensor"], []),
        ("string_input.onnx", tiny(elem=TensorProto.STRING), ["input 'x'", "STRING", "numeric inputs only"], []),
        ("huge_input_dim.onnx", tiny(dims=(1, 3, 10**12, 8)), ["input 'x' claims a dim of 1000000000000"], []),
        ("huge_input_total.onnx", tiny(dims=(1, 3, 1 << 24, 1 << 24)), ["input 'x'", "larger than lcpc's limit"], []),
        ("huge_constant_of_shape.onnx", around(
            [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=numpy_helper.from_array(ONE))],
            [ints("shape", [10**6, 10**6])], "big"), ["tensor 'big' would have shape (1000000, 1000000)"], []),
        ("huge_range.onnx", around([helper.make_node("Range", ["a", "b", "c"], ["big"])],
                                   [ints("a", 0), ints("b", 10**12), ints("c", 1)], "big"),
         ["tensor 'big' would have shape (1000000000000,)"], []),
        ("huge_expand.onnx", around([helper.make_node("Expand", ["one", "shape"], ["big"])],
                                    [ints("one", [1]), ints("shape", [10**5, 10**5])], "big"),
         ["tensor 'big' would have shape (100000, 100000)"], []),
        ("huge_tile.onnx", around([helper.make_node("Tile", ["one", "reps"], ["big"])],
                                  [ints("one", [[1]]), ints("reps", [10**6, 10**6])], "big"),
         ["tensor 'big' would have shape (1000000, 1000000)"], []),
        ("huge_reshape.onnx", around([helper.make_node("Reshape", ["x", "shape"], ["big"])],
                                     [ints("shape", [10**6, 10**6, 192])], "big"),
         ["tensor 'big' would have shape (1000000, 1000000, 192)"], []),
        ("huge_computed_shape.onnx", around(
            [helper.make_node("Mul", ["a", "b"], ["shape"]),
             helper.make_node("ConstantOfShape", ["shape"], ["big"], value=numpy_helper.from_array(ONE))],
            [ints("a", [1000, 1000]), ints("b", [1, 1000])], "big"),
         ["tensor 'big' would have shape (1000, 1000000)"], []),
        ("unbounded_loop.onnx", loop(10**12), ["Loop 'counter'", "no constant trip count of at most 65536"], []),
        ("while_loop.onnx", loop(None), ["Loop 'counter'", "no constant trip count"], []),
        ("bounded_loop.onnx", loop(10), None, []),
        ("loop_reading_outer.onnx", loop_reading_outer(3), None, ["--sync", "all"]),
        ("if_reading_outer.onnx", if_reading_outer(), ["node 'choose' (op If) reads t from the enclosing graph",
                                                       "Loop only"], []),
        ("subgraph_map_value.onnx", edited(loop(3), lambda m: m.graph.node[0].attribute[0].g.output[0].type.CopyFrom(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.BOOL, [])))),
         ["value 'cond_out' of subgraph 'body' is not a tensor"], []),
        ("long_shape_vector.onnx", around([helper.make_node("Range", ["a", "b", "c"], ["r"]),
                                           helper.make_node("Cast", ["r"], ["big"], to=TensorProto.INT32)],
                                          [ints("a", 0), ints("b", 10**7), ints("c", 1)], "big"), None, []),
        ("custom_op.onnx", edited(good, lambda m: (setattr(m.graph.node[1], "domain", "com.example"),
                                                    m.opset_import.add(domain="com.example", version=1))),
         ["cannot infer the shapes of r", "com.example"], []),
        ("external_ok.onnx", external(good, "external_ok.bin"), None, []),
        ("external_parent.onnx", external(good, SECRET), ["tensor 'w'", SECRET, "outside the model's folder"], []),
        ("external_absolute.onnx", external(good, "/etc/passwd"), ["'/etc/passwd'", "outside the model's folder"], []),
        ("external_in_subgraph.onnx", in_subgraph(SECRET), [SECRET, "outside the model's folder"], []),
        ("external_missing.onnx", external(good, "missing.bin"), ["'missing.bin'", "which is missing"], []),
        ("external_short.onnx", external(good, "external_short.bin"),
         ["external_short.bin", "does not hold the 864"], []),
        ("external_offset.onnx", external(good, "external_ok.bin", offset=10**15),
         ["at offset 1000000000000000", "does not hold"], []),
    ]
    return [(f, m if isinstance(m, bytes) else m.SerializeToString(), e, a) for f, m, e, a in cases]


def data_files() -> dict[str, bytes]:
    """Side files the models above point to."""
    w = next(t for t in tiny().graph.initializer if t.name == "w")
    return {"external_ok.bin": w.raw_data, "external_short.bin": w.raw_data[:100]}


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    import io
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def npz(arrays: dict[str, bytes]) -> bytes:
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in arrays.items():
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def inputs() -> list[tuple[str, bytes, list[str]]]:
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    nan, inf = x.copy(), x.copy()
    nan[0, 1, 2, 3] = np.nan
    inf[0, 0, 0, 0] = -np.inf
    header = npy(np.zeros(1, np.float32)).replace(b"(1,)", b"(1000000000000,)")
    return [
        ("good.npy", npy(x), []),
        ("wrong_shape.npy", npy(np.zeros((2, 3, 9, 9), np.float32)), ["shape (2, 3, 9, 9)", "(N, 3, 8, 8)"]),
        ("wrong_rank.npy", npy(np.zeros((3, 8, 8), np.float32)), ["shape (3, 8, 8)"]),
        ("scalar.npy", npy(np.float32(1.0)), ["shape ()"]),
        ("wrong_dtype.npy", npy(x.astype(np.float64)), ["dtype float64", "float32"]),
        ("int_dtype.npy", npy(x.astype(np.int64)), ["dtype int64"]),
        ("nan.npy", npy(nan), ["NaN or Inf"]),
        ("inf.npy", npy(inf), ["NaN or Inf"]),
        ("empty_batch.npy", npy(np.zeros((0, 3, 8, 8), np.float32)), ["empty batch"]),
        ("object.npy", npy(np.array([x, None], dtype=object), allow_pickle=True),
         ["Python objects", "never unpickles"]),
        ("pickle.npy", pickle.dumps(OrderedDict(x=x), protocol=4), ["not an .npy array", "never loaded"]),
        ("not_npy.npy", b"1,2,3\n4,5,6\n", ["not an .npy array"]),
        ("huge_header.npy", header, ["(1000000000000,)", "larger than lcpc's limit"]),
        ("truncated.npy", npy(x)[:-100], ["not a readable .npy/.npz"]),
        ("wrong_name.npz", npz({"image": npy(x)}), ["['image'] unknown", "['x'] missing"]),
        ("object_member.npz", npz({"x": npy(np.array([None], dtype=object), allow_pickle=True)}),
         ["object_member.npz[x]", "Python objects"]),
    ]


MANIFEST_CASES = [
    {"name": "tampered_stage", "edit": {"stage": "append"}, "expect": ["d0_l0.onnx", "sha256 differs"]},
    {"name": "stage_missing", "edit": {"stage": "delete"}, "expect": ["d0_l0.onnx", "is missing"]},
    {"name": "stage_symlink_outside", "edit": {"stage": "symlink_outside"},
     "expect": ["stage d0_l0 points outside its folder"]},
    {"name": "stage_swapped", "edit": {"stage": "swap_with_last"},
     "expect": ["d0_l0.onnx", "differ from what the manifest says"]},
    {"name": "stage_parent_path", "edit": {"set": "/stages/0/file", "value": "../d0_l0.onnx"},
     "expect": ["invalid manifest at stages/0/file"]},
    {"name": "stage_absolute_path", "edit": {"set": "/stages/0/file", "value": "/etc/passwd.onnx"},
     "expect": ["invalid manifest at stages/0/file"]},
    {"name": "manifest_missing", "edit": {"manifest": "delete"}, "expect": ["manifest.json", "missing"]},
    {"name": "manifest_symlink_outside", "edit": {"manifest": "symlink_outside"},
     "expect": ["manifest.json", "outside"]},
    {"name": "not_json", "edit": {"raw": "{this is not json"}, "expect": ["manifest.json", "not valid JSON"]},
    {"name": "not_utf8", "edit": {"raw_bytes": "ff fe 00 7b"}, "expect": ["not valid JSON"]},
    {"name": "nan_constant", "edit": {"raw_replace": ["\"branches\": 2", "\"branches\": NaN"]},
     "expect": ["not valid JSON", "NaN is not JSON"]},
    {"name": "duplicate_key", "edit": {"raw_replace": ["\"branches\": 2", "\"branches\": 2, \"branches\": 3"]},
     "expect": ["not valid JSON", "duplicate key 'branches'"]},
    {"name": "deep_nesting", "edit": {"raw": "[" * 100000 + "]" * 100000}, "expect": ["not valid JSON"]},
    {"name": "huge_integer", "edit": {"raw_replace": ["\"branches\": 2", "\"branches\": " + "9" * 5000]},
     "expect": ["not valid JSON"]},
    {"name": "wrong_format", "edit": {"set": "/format", "value": "pickle"}, "expect": ["invalid manifest at format"]},
    {"name": "not_an_object", "edit": {"raw": "[1, 2, 3]"}, "expect": ["invalid manifest at (top level)"]},
    {"name": "no_stages", "edit": {"remove": "/stages"}, "expect": ["invalid manifest", "'stages' is a required"]},
    {"name": "extra_field", "edit": {"add": "/evil", "value": "__import__('os')"},
     "expect": ["invalid manifest", "Additional properties"]},
    {"name": "unknown_device", "edit": {"set": "/stages/1/device", "value": 7},
     "expect": ["stage d1_l0 on unknown device 7"]},
    {"name": "missing_device", "edit": {"set": "/devices/1/id", "value": 0}, "expect": ["devices 0..1, each once"]},
    {"name": "transfer_bytes_lie", "edit": {"set": "/transfers/0/bytes", "value": 1},
     "expect": ["transfer 0 claims 1 bytes"]},
    {"name": "input_from_nowhere", "edit": {"set": "/stages/1/inputs/0/name", "value": "ghost"},
     "expect": ["stage d1_l0 needs 'ghost' on device 1", "nothing provides"]},
    {"name": "output_from_nowhere", "edit": {"set": "/outputs/0/local_name", "value": "ghost"},
     "expect": ["output 'y' needs 'ghost' on device 0"]},
    {"name": "duplicate_stage_id", "edit": {"set": "/stages/1/id", "value": "d0_l0"},
     "expect": ["stage ids and files must be unique"]},
    {"name": "shape_mismatch", "edit": {"set": "/stages/1/inputs/0/shape", "value": [1, 3, 8, 9]},
     "expect": ["stage d1_l0 expects 'x' as [1, 3, 8, 9] float32, but it is [1, 3, 8, 8] float32"]},
    {"name": "zero_batch", "edit": {"set": "/source/inputs/0/shape/0", "value": 0},
     "expect": ["model input 'x' has a zero dim in [0, 3, 8, 8]"]},
    {"name": "provided_twice", "edit": {"set": "/transfers/0/to/device", "value": 0},
     "expect": ["transfer 0 provides 'x' on device 0, which is already provided"]},
]


# ----------------------------------------------------------------------------- devices files
def alias_bomb(indent: str, depth: int = 9) -> str:
    """A YAML list whose nine-fold nested aliases expand to 9**depth strings (a few hundred bytes)."""
    lines = [f"{indent}- &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{indent}- &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


BOMB_EXPECT = ["YAML aliases", "expand to more than 10000 values"]


def devices_files() -> list[tuple[str, bytes, list[str] | None]]:
    """(file, bytes, expected message parts or None for "accepted")."""
    cases = [
        ("good.yaml", "devices:\n  dev0: {resource: board0, speed: 2}\nlinks:\n  default: {bandwidth: 100Mbit, "
                      "latency: 1ms}\noverhead: 0.3ms\nroute: direct\n", None),
        ("alias_ok.yaml", "devices:\n  dev0: &fast {speed: 2}\n  dev1: *fast\n", None),
        ("speeds_at_the_limits.yaml", "devices:\n  dev0: {speed: 1e-6}\n  dev1: {speed: 1e6}\n", None),
        ("empty.yaml", "", None),
        ("bomb_route.yaml", "route:\n" + alias_bomb("  "), BOMB_EXPECT),
        ("bomb_speed.yaml", "devices:\n  dev0:\n    speed:\n" + alias_bomb("      "), BOMB_EXPECT),
        ("bomb_resource.yaml", "devices:\n  dev0:\n    resource:\n" + alias_bomb("      "), BOMB_EXPECT),
        ("bomb_bandwidth.yaml", "links:\n  default:\n    bandwidth:\n" + alias_bomb("      "), BOMB_EXPECT),
        ("bomb_unknown_key.yaml", "spare:\n" + alias_bomb("  "), BOMB_EXPECT),
        ("bomb_merge_keys.yaml", "a0: &a0 {x0: 1, x1: 1, x2: 1, x3: 1, x4: 1, x5: 1, x6: 1, x7: 1}\n"
         + "".join(f"a{i}: &a{i} {{{', '.join(f'k{j}: *a{i - 1}' for j in range(9))}}}\n" for i in range(1, 9)),
         BOMB_EXPECT),
        ("alias_cycle.yaml", "devices: &top\n  dev0: *top\n", ["refers to the value that contains it"]),
        ("deep_nesting.yaml", "devices: " + "[" * 2000 + "\n", ["brackets nested more than 64 deep"]),
        ("deep_block_nesting.yaml", "- " * 5000 + "x\n", ["nested too deeply"]),
        ("malformed.yaml", "devices: [\n", ["not valid YAML"]),
        ("two_documents.yaml", "route: direct\n---\nroute: ray\n", ["not valid YAML"]),
        ("python_object.yaml", "!!python/object/apply:os.system ['echo pwned']\n", ["not valid YAML"]),
        ("huge_integer.yaml", "devices:\n  dev0: {speed: " + "9" * 5000 + "}\n", ["not valid YAML"]),
        ("not_a_mapping.yaml", "- dev0\n- dev1\n", ["expected a mapping, got list"]),
        ("devices_a_list.yaml", "devices: [dev0, dev1]\n", ["devices: expected a mapping, got list"]),
        ("unknown_key.yaml", "nodes: {}\n", ["unknown key(s) nodes"]),
        ("unknown_device.yaml", "devices:\n  dev9: {speed: 2}\n", ["device 'dev9' is not in the plan"]),
        ("speed_negative.yaml", "devices:\n  dev0: {speed: -1}\n", ["devices.dev0", "speed must be positive"]),
        ("speed_zero.yaml", "devices:\n  dev1: {speed: 0}\n", ["devices.dev1", "speed must be positive"]),
        ("speed_nan.yaml", "devices:\n  dev0: {speed: .nan}\n", ["speed must be positive, got nan"]),
        ("speed_tiny.yaml", "devices:\n  dev0: {speed: 1e-300}\n",
         ["speed 1e-300 is out of range", "1e-06..1e+06 (relative to a device of speed 1)"]),
        ("speed_huge.yaml", "devices:\n  dev0: {speed: 1e308}\n", ["speed 1e308 is out of range"]),
        ("speed_huge_unit.yaml", "devices:\n  dev1: {speed: 1.0e308x}\n", ["speed 1.0e308x is out of range"]),
        ("speed_inf.yaml", "devices:\n  dev0: {speed: .inf}\n", ["speed inf is out of range"]),
        ("speed_word.yaml", "devices:\n  dev0: {speed: fast}\n", ["speed fast is not a number with a unit (x)"]),
        ("bandwidth_word.yaml", "links:\n  default: {bandwidth: abc}\n",
         ["links.default", "bandwidth abc is not a number with a unit"]),
        ("bandwidth_tiny.yaml", "links:\n  dev0: {bandwidth: 1bit}\n", ["bandwidth 1bit is out of range"]),
        ("latency_zero.yaml", "links:\n  default: {latency: 0}\n", ["latency must be positive"]),
        ("latency_huge.yaml", "links:\n  default: {latency: 1e9s}\n", ["latency 1e9s is out of range"]),
        ("overhead_word.yaml", "overhead: soon\n", ["overhead soon is not a number with a unit"]),
        ("resource_list.yaml", "devices:\n  dev0: {resource: [board0, board1]}\n", ["resource must be a name"]),
        ("route_unknown.yaml", "route: carrier-pigeon\n", ["route carrier-pigeon: choose direct or ray"]),
    ]
    files = [(f, t.encode(), e) for f, t, e in cases]
    files.append(("not_utf8.yaml", b"devices:\n  dev0: {resource: \xff\xfe}\n", ["not valid YAML"]))
    return files


# ----------------------------------------------------------------------------- preprocessing specs
PREPROCESS_CASES = [  # (spec, expected message parts or None); the model takes x[N, 3, 8, 8]
    ("size=8x8,mean=127,std=128", None),
    ("size=8", None),
    ("size=0x8", ["--preprocess: size=(0, 8)", "two positive integers"]),
    ("size=-8", ["size=(-8, -8)"]),
    ("size=abc", ["--preprocess: size=abc: expected HxW"]),
    ("size=8x", ["size=8x: expected HxW"]),
    ("size=8x8x3", ["size=(8, 8, 3)"]),
    ("size=100000x100000", ["size=(100000, 100000)", "at most 16384 pixels"]),
    ("size=" + "9" * 5000, ["expected HxW"]),
    ("size=8x8,std=0", ["std=(0.0,)", "must not contain 0"]),
    ("size=8x8,std=0/1/1", ["std=(0.0, 1.0, 1.0)", "must not contain 0"]),
    ("size=8x8,std=1e-300", ["reaches 2.55e+302", "beyond float32's range"]),
    ("size=8x8,scale=1e308", ["reaches inf", "beyond float32's range"]),
    ("size=8x8,dtype=float16,std=0.001", ["beyond float16's range"]),
    ("size=8x8,scale=-1", ["scale=-1.0", "must be positive"]),
    ("size=8x8,scale=x", ["scale=x: expected a number"]),
    ("size=8x8,mean=nan", ["mean=(nan,)", "finite"]),
    ("size=8x8,mean=1/2", ["mean=(1.0, 2.0)", "1 or 3"]),
    ("size=8x8,crop_fraction=0", ["crop_fraction=0.0", "(0, 1]"]),
    ("size=8x8,layout=CHW", ["layout='CHW'", "NCHW, NHWC"]),
    ("size=8x8,colour=RGB", ["unknown key(s) colour"]),
    ("size=8x8,size=8x8", ["size is given twice"]),
    ("size=8x8,,std=1", ["'' is not KEY=VALUE"]),
    ("size", ["'size' is not KEY=VALUE"]),
    ("mean=1", ["'size' (H, W) is required"]),
    # well-formed, but the images it makes cannot feed x[N, 3, 8, 8]: refused at convert, not at run time
    ("size=9x8", ["the model input 'x' has shape [1, 3, 8, 8]", "gives [1, 3, 9, 8]"]),
    ("size=8x8,channels=L", ["gives [1, 1, 8, 8]"]),
    ("size=8x8,layout=NHWC", ["gives [1, 8, 8, 3]"]),
]


# ----------------------------------------------------------------------------- images
def zlib_stored(data: bytes) -> bytes:
    """``data`` as a zlib stream of stored (uncompressed) blocks: the same bytes from every zlib."""
    blocks = [data[i:i + 65535] for i in range(0, len(data), 65535)] or [b""]
    body = b"".join(struct.pack("<BHH", int(n == len(blocks) - 1), len(b), 0xFFFF ^ len(b)) + b
                    for n, b in enumerate(blocks))
    return b"\x78\x01" + body + struct.pack(">I", zlib.adler32(data))


def png(width: int, height: int, rows: bytes | None = None, crc_ok: bool = True) -> bytes:
    """An RGB PNG (8 bits) whose header claims ``width`` x ``height``; ``rows`` are the filtered
    scanlines (default: a small gradient of the claimed size)."""
    def chunk(kind: bytes, data: bytes, ok: bool = True) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) ^ (0 if ok else 1))
    if rows is None:
        rows = b"".join(b"\0" + bytes((10 * x + 20 * y) % 256 for x in range(width) for _ in range(3))
                        for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0), crc_ok)
            + chunk(b"IDAT", zlib_stored(rows)) + chunk(b"IEND", b""))


# an 8x8 baseline JPEG (two colour halves), made once by Pillow (quality 75)
JPEG = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300080606070605080707070909080a0c140d0c0b0b0c1912130f141d"
    "1a1f1e1d1a1c1c20242e2720222c231c1c2837292c30313434341f27393d38323c2e333432ffdb0043010909090c0b0c180d0d18"
    "32211c21323232323232323232323232323232323232323232323232323232323232323232323232323232323232323232323232"
    "3232ffc00011080008000803012200021101031101ffc4001f000001050101010101010000000000000000010203040506070809"
    "0a0bffc400b5100002010303020403050504040000017d01020300041105122131410613516107227114328191a1082342b1c115"
    "52d1f02433627282090a161718191a25262728292a3435363738393a434445464748494a535455565758595a636465666768696a"
    "737475767778797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9ca"
    "d2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffc4001f01000301010101010101010100000000000001"
    "02030405060708090a0bffc400b51100020102040403040705040400010277000102031104052131061241510761711322328108"
    "144291a1b1c109233352f0156272d10a162434e125f11718191a262728292a35363738393a434445464748494a53545556575859"
    "5a636465666768696a737475767778797a82838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9"
    "bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae2e3e4e5e6e7e8e9eaf2f3f4f5f6f7f8f9faffda000c03010002110311003f00c6"
    "d23fe5b7fc07fad14515c0f73c1e2cff0091c56ffb77ff004989ffd9")
GIF = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")
BOMB_IMAGE = ["more pixels than lcpc decodes", "decompression bomb"]
NOT_AN_IMAGE = ["cannot read it as an image"]


def images() -> list[tuple[str, bytes, list[str] | None]]:
    """(file, bytes, expected message parts or None for "read"); each goes in a folder beside good.png."""
    good = png(8, 8)
    return [
        ("good.png", good, None),
        ("good.jpg", JPEG, None),
        ("jpeg_named.png", JPEG, None),  # read by its content, and it is a JPEG
        ("larger.png", png(32, 24), None),
        ("empty.png", b"", ["cannot read it as an image (the file is empty)"]),
        ("empty.jpg", b"", ["the file is empty"]),
        ("text.png", b"this is not an image\n", NOT_AN_IMAGE + ["not a JPEG or PNG"]),
        ("gif.png", GIF, NOT_AN_IMAGE + ["not a JPEG or PNG"]),
        ("truncated.jpg", JPEG[:len(JPEG) // 2], NOT_AN_IMAGE),
        ("corrupt.jpg", JPEG[:600] + bytes(30) + JPEG[630:], NOT_AN_IMAGE),
        ("no_scan.jpg", JPEG.replace(b"\xff\xda", b"\xff\xd9", 1), NOT_AN_IMAGE),
        ("truncated.png", good[:len(good) // 2], NOT_AN_IMAGE),
        ("bad_crc.png", png(8, 8, crc_ok=False), NOT_AN_IMAGE),
        ("short_rows.png", png(8, 8, rows=b"\0" * 10), NOT_AN_IMAGE),
        ("bomb.png", png(100_000, 100_000, rows=b"\0" * 16), BOMB_IMAGE),
        ("bomb_just_over.png", png(10_000, 9_000, rows=b"\0" * 16), BOMB_IMAGE),
        ("bomb_wide.png", png(2**31 - 1, 1, rows=b"\0" * 16), BOMB_IMAGE),
    ]


# ----------------------------------------------------------------------------- option values
def option_files() -> dict[str, bytes]:
    """Training inputs for the digits example (40 samples) and labels that do not fit them."""
    x = np.random.default_rng(5).standard_normal((40, 1, 8, 8)).astype(np.float32)
    return {"train.npy": npy(x), "labels_short.npy": npy(np.zeros(5, np.int64)),
            "labels_out_of_range.npy": npy(np.full(40, 99, np.int64)),
            "labels_negative.npy": npy(np.full(40, -1, np.int64)),
            "labels_float.npy": npy(np.zeros(40, np.float64)),
            "labels_2d.npy": npy(np.zeros((40, 3), np.int64))}


# Placeholders: {cut} a digits folder with cut layers, {good} good.onnx converted at K=2, {model} the
# digits model, {input} good.npy, {out} the output folder (must not appear), {options} this folder.
OPTION_CASES = [
    {"name": "recover_epochs_negative", "args": ["recover", "{cut}", "--data", "{options}/train.npy", "-o", "{out}",
                                                 "--epochs", "-1"], "expect": ["epochs -1", "(--epochs)"]},
    {"name": "recover_views_zero", "args": ["recover", "{cut}", "--data", "{options}/train.npy", "-o", "{out}",
                                            "--epochs", "1", "--views", "0"], "expect": ["views 0", "(--views)"]},
    {"name": "recover_views_huge", "args": ["recover", "{cut}", "--data", "{options}/train.npy", "-o", "{out}",
                                            "--epochs", "1", "--views", "100000"], "expect": ["from 1 to 64"]},
    {"name": "recover_lr_negative", "args": ["recover", "{cut}", "--data", "{options}/train.npy", "-o", "{out}",
                                             "--epochs", "1", "--lr", "-1"], "expect": ["lr -1.0", "(--lr)"]},
    {"name": "recover_lr_nan", "args": ["recover", "{cut}", "--data", "{options}/train.npy", "-o", "{out}",
                                        "--epochs", "1", "--lr", "nan"], "expect": ["lr nan", "above 0"]},
    {"name": "recover_temperature_zero", "args": ["recover", "{cut}", "--data", "{options}/train.npy", "-o", "{out}",
                                                  "--epochs", "1", "--temperature", "0"],
     "expect": ["temperature 0.0", "(--temperature)"]},
    {"name": "recover_temperature_huge", "args": ["recover", "{cut}", "--data", "{options}/train.npy", "-o", "{out}",
                                                  "--epochs", "1", "--temperature", "1e300"],
     "expect": ["temperature 1e+300", "at most 100"]},
    {"name": "recover_labels_short", "args": ["recover", "{cut}", "--data", "{options}/train.npy", "-o", "{out}",
                                              "--epochs", "0", "--labels", "{options}/labels_short.npy"],
     "expect": ["labels_short.npy: shape (5,); expected (40,)"]},
    {"name": "recover_labels_out_of_range", "args": ["recover", "{cut}", "--data", "{options}/train.npy", "-o", "{out}",
                                                     "--epochs", "0", "--labels", "{options}/labels_out_of_range.npy"],
     "expect": ["labels_out_of_range.npy: values 99..99 outside the model's classes 0..9"]},
    {"name": "recover_labels_negative", "args": ["recover", "{cut}", "--data", "{options}/train.npy", "-o", "{out}",
                                                 "--epochs", "0", "--labels", "{options}/labels_negative.npy"],
     "expect": ["labels_negative.npy: values -1..-1"]},
    {"name": "recover_labels_float", "args": ["recover", "{cut}", "--data", "{options}/train.npy", "-o", "{out}",
                                              "--epochs", "0", "--labels", "{options}/labels_float.npy"],
     "expect": ["labels_float.npy: dtype float64"]},
    {"name": "recover_labels_2d", "args": ["recover", "{cut}", "--data", "{options}/train.npy", "-o", "{out}",
                                           "--epochs", "0", "--labels", "{options}/labels_2d.npy"],
     "expect": ["labels_2d.npy: shape (40, 3)"]},
    {"name": "convert_recover_epochs_negative", "args": ["convert", "{model}", "-o", "{out}", "--recover",
                                                         "{options}/train.npy", "--epochs", "-1"],
     "expect": ["epochs -1"]},
    {"name": "convert_recover_labels_short", "args": ["convert", "{model}", "-o", "{out}", "--recover",
                                                      "{options}/train.npy", "--epochs", "0", "--labels",
                                                      "{options}/labels_short.npy"],
     "expect": ["shape (5,); expected (40,)"]},
    {"name": "run_timeout_local", "args": ["run", "{good}", "-i", "{input}", "--timeout", "5"],
     "expect": ["--timeout does not apply to the local engine"]},
    {"name": "run_timeout_zero", "args": ["run", "{good}", "-i", "{input}", "--engine", "ray", "--timeout", "0"],
     "expect": ["--timeout 0.0", "above 0"], "needs": "ray"},
    {"name": "run_timeout_negative", "args": ["run", "{good}", "-i", "{input}", "--engine", "ray", "--timeout", "-1"],
     "expect": ["--timeout -1.0"], "needs": "ray"},
    {"name": "run_timeout_nan", "args": ["run", "{good}", "-i", "{input}", "--engine", "ray", "--timeout", "nan"],
     "expect": ["--timeout nan"], "needs": "ray"},
    {"name": "serve_timeout_inf", "args": ["serve", "{good}", "-i", "{input}", "--engine", "ray", "--timeout", "inf"],
     "expect": ["--timeout inf"], "needs": "ray"},
    {"name": "run_address_closed_port", "args": ["run", "{good}", "-i", "{input}", "--engine", "ray", "--address",
                                                 "127.0.0.1:1"],
     "expect": ["cannot reach Ray at 127.0.0.1:1", "ray start --head"], "needs": "ray"},
    {"name": "run_address_malformed", "args": ["run", "{good}", "-i", "{input}", "--engine", "ray", "--address",
                                               "head-node"], "expect": ["--address head-node: expected HOST:PORT"],
     "needs": "ray"},
    {"name": "run_address_bad_port", "args": ["run", "{good}", "-i", "{input}", "--engine", "ray", "--address",
                                              "head:99999"], "expect": ["--address head:99999"], "needs": "ray"},
    {"name": "serve_repeat_zero", "args": ["serve", "{good}", "-i", "{input}", "--repeat", "0"],
     "expect": ["--repeat 0"]},
]


def cases() -> dict:
    return {
        "models": [{"file": f, "expect": e, "args": a} for f, _, e, a in models()],
        "inputs": [{"file": f, "expect": e} for f, _, e in inputs()],
        "manifests": MANIFEST_CASES,
        "devices": [{"file": f, "expect": e} for f, _, e in devices_files()],
        "preprocess": [{"spec": spec, "expect": e} for spec, e in PREPROCESS_CASES],
        "images": [{"file": f, "expect": e} for f, _, e in images()],
        "options": OPTION_CASES,
    }


def build(root: Path = HERE) -> list[Path]:
    """Write the corpus under ``root``; returns the files written."""
    written = []
    for sub, files in (("models", [(f, b) for f, b, _, _ in models()] + list(data_files().items())),
                       ("inputs", [(f, b) for f, b, _ in inputs()]),
                       ("devices", [(f, b) for f, b, _ in devices_files()]),
                       ("images", [(f, b) for f, b, _ in images()]),
                       ("options", list(option_files().items()))):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (root / sub / name).write_bytes(data)
            written.append(root / sub / name)
    (root / "cases.json").write_text(json.dumps(cases(), indent=1) + "\n")
    return written + [root / "cases.json"]


if __name__ == "__main__":
    print(f"wrote {len(build())} files under {HERE}")
