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
  actions on the stage files or the manifest).
"""

from __future__ import annotations

import json
import pickle
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


def cases() -> dict:
    return {
        "models": [{"file": f, "expect": e, "args": a} for f, _, e, a in models()],
        "inputs": [{"file": f, "expect": e} for f, _, e in inputs()],
        "manifests": MANIFEST_CASES,
    }


def build(root: Path = HERE) -> list[Path]:
    """Write the corpus under ``root``; returns the files written."""
    written = []
    for sub, files in (("models", [(f, b) for f, b, _, _ in models()] + list(data_files().items())),
                       ("inputs", [(f, b) for f, b, _ in inputs()])):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (root / sub / name).write_bytes(data)
            written.append(root / sub / name)
    (root / "cases.json").write_text(json.dumps(cases(), indent=1) + "\n")
    return written + [root / "cases.json"]


if __name__ == "__main__":
    print(f"wrote {len(build())} files under {HERE}")
