"""Issue 3, Done-means 2: one focused test per graph shape seen in real exported CNNs.

Each test builds its model here (ONNX text syntax; weights are random initializers made
from the graph's extra inputs, see :func:`make`), checks that ``--sync all`` equals
onnxruntime on the original for K in {2, 4} (and that the bytes moved equal the
manifest's), and checks the plan: which tensors are split, how channels are grouped,
and that every forced sync is a decision whose reason names the op.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from click.testing import CliRunner
from conftest import reference, rel_err, run_folder
from onnx import TensorProto, helper, numpy_helper

from lcpc import frontend, planner
from lcpc import pipeline
from lcpc.cli import main
from lcpc.errors import LcpcError

KS = (2, 4)
INT64_MAX = 9223372036854775807


# ----------------------------------------------------------------------------- helpers
def make(text: str, data: tuple[str, ...] = ("input",), seed: int = 0) -> onnx.ModelProto:
    """Parse ``text``; each unnamed node is named after its first output; every graph
    input not in ``data`` becomes a random initializer:
    He-normal for rank >= 2 (fan-in = product of the trailing dims), uniform(0.7, 1.3) for
    names ending in ``var``/``scale`` (BatchNormalization), uniform(0.05, 0.3) for
    ``slope`` (PRelu), N(0, 0.1) otherwise (biases)."""
    model = onnx.parser.parse_model(text)
    for n in model.graph.node:
        n.name = n.name or n.output[0]
    rng = np.random.default_rng(seed)
    keep, inits = [], []
    for vi in model.graph.input:
        if vi.name in data:
            keep.append(vi)
            continue
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if len(shape) >= 2:
            value = rng.standard_normal(shape) * math.sqrt(2.0 / max(int(np.prod(shape[1:])), 1))
        elif vi.name.endswith(("var", "scale")):
            value = rng.uniform(0.7, 1.3, shape)
        elif vi.name.endswith("slope"):
            value = rng.uniform(0.05, 0.3, shape)
        else:
            value = rng.standard_normal(shape) * 0.1
        inits.append(numpy_helper.from_array(value.astype(np.float32), vi.name))
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.graph.initializer.extend(inits)
    onnx.checker.check_model(model, full_check=True)
    return model


def random_feeds(manifest: dict, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i["name"]: rng.standard_normal((batch * i["shape"][0], *i["shape"][1:])).astype(i["dtype"])
            for i in manifest["source"]["inputs"]}


def assert_exact(model: onnx.ModelProto, k: int, out: Path, sync: str = "all",
                 input_shapes: dict | None = None, batch: int = 1) -> dict:
    """Convert, run, compare every output with onnxruntime (1e-4 relative) and the bytes
    moved with the manifest, transfer by transfer; returns the manifest."""
    data = model.SerializeToString()
    manifest = pipeline.convert(data, out, k, sync, input_shapes)
    feeds = random_feeds(manifest, batch)
    got, stats, _ = run_folder(out, feeds)
    want = reference(data, feeds)
    assert [o["name"] for o in manifest["source"]["outputs"]] == [o.name for o in model.graph.output]
    for o, expected in zip(model.graph.output, want):
        assert got[o.name].shape == expected.shape, o.name
        assert rel_err(got[o.name], expected) <= 1e-4, o.name
    for t in manifest["transfers"]:
        assert stats.bytes_by_transfer[t["id"]] == stats.samples * t["bytes"], t
    return manifest


def plan_of(model: onnx.ModelProto, k: int, sync: str = "all", input_shapes: dict | None = None):
    graph, source = frontend.load(model.SerializeToString(), input_shapes)
    return planner.plan(graph, source, k, sync)


def forced(manifest: dict) -> dict[str, dict]:
    """Forced-sync decisions by node name."""
    return {d["node"]: d for d in manifest["decisions"] if d["action"] == "forced-sync"}


def assert_even_split(p, tensor: str) -> None:
    """``tensor`` is split and each branch owns between floor(C/K) and ceil(C/K) channels."""
    assert p.layouts[tensor] == "S", (tensor, p.layouts[tensor])
    owned = np.bincount(p.branches(tensor), minlength=p.k)
    c = len(p.branches(tensor))
    assert owned.min() >= c // p.k and owned.max() <= math.ceil(c / p.k), (tensor, owned.tolist())


HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
HEAD = """
  p = GlobalAveragePool ({x})
  f = Flatten (p)
  y = Gemm <transB = 1> (f, fc, fcb)"""


# ----------------------------------------------------------------------------- Split / Slice
C2F = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w1, float[16] b1, float[8,8,3,3] w2, float[8] b2,
        float[8,8,3,3] w3, float[8] b3, float[16,24,1,1] w4, float[16] b4, float[10,16] fc, float[10] fcb)
        => (float[1,10] y) {
  c1 = Conv <pads = [1,1,1,1]> (input, w1, b1)
  s1 = Sigmoid (c1)
  x = Mul (c1, s1)
  %s
  h = Conv <pads = [1,1,1,1]> (b, w2, b2)
  hr = Relu (h)
  h2 = Conv <pads = [1,1,1,1]> (hr, w3, b3)
  bb = Add (b, h2)
  cat = Concat <axis = 1> (a, b, bb)
  c4 = Conv (cat, w4, b4)
  r4 = Relu (c4)""" + HEAD.format(x="r4") + "\n}"

SPLITS = {
    "split_sizes": "sz = Constant <value = int64[2] {8, 8}> ()\n  a, b = Split <axis = 1> (x, sz)",
    "slice_torch": ("z = Constant <value = int64[1] {0}> ()\n  e = Constant <value = int64[1] {8}> ()\n"
                    f"  big = Constant <value = int64[1] {{{INT64_MAX}}}> ()\n  ax = Constant <value = int64[1] {{1}}> ()\n"
                    "  a = Slice (x, z, e, ax)\n  b = Slice (x, e, big, ax)"),
    "slice_negative": ("z = Constant <value = int64[1] {0}> ()\n  m = Constant <value = int64[1] {-8}> ()\n"
                       "  big = Constant <value = int64[1] {16}> ()\n  ax = Constant <value = int64[1] {-3}> ()\n"
                       "  a = Slice (x, z, m, ax)\n  b = Slice (x, m, big, ax)"),
}


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("variant", list(SPLITS))
def test_c2f_channel_split_and_slice(variant, k, tmp_path):
    model = make(C2F % SPLITS[variant])
    manifest = assert_exact(model, k, tmp_path / "out")
    assert forced(manifest) == {}
    p = plan_of(model, k)
    for t in ("x", "a", "b", "bb", "cat"):
        assert_even_split(p, t)
    # a channel of the halves is owned where the same channel of x is
    assert np.array_equal(np.concatenate([p.branches("a"), p.branches("b")]), p.branches("x"))
    assert np.array_equal(p.branches("cat"), np.concatenate([p.branches(t) for t in ("a", "b", "bb")]))


def test_split_opset18_num_outputs(tmp_path):
    text = C2F.replace('"" : 17', '"" : 18') % "a, b = Split <axis = 1, num_outputs = 2> (x)"
    model = make(text)
    for k in KS:
        assert forced(assert_exact(model, k, tmp_path / f"k{k}")) == {}


# ----------------------------------------------------------------------------- Concat of many branches
INCEPTION = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[8,16,1,1] w1, float[8] b1,
        float[16,16,3,3] w2, float[16] b2, float[8,16,3,3] w3a, float[8] b3a, float[8,8,3,3] w3b, float[8] b3b,
        float[16,16,1,1] w4, float[16] b4, float[48] bn_scale, float[48] bn_bias, float[48] bn_mean,
        float[48] bn_var, float[16,48,1,1] w5, float[16] b5, float[10,16] fc, float[10] fcb) => (float[1,10] y) {
  x0 = Conv <pads = [1,1,1,1]> (input, w0, b0)
  x = Relu (x0)
  c1 = Conv (x, w1, b1)
  c2 = Conv <pads = [1,1,1,1]> (x, w2, b2)
  c3a = Conv <pads = [1,1,1,1]> (x, w3a, b3a)
  r3a = Relu (c3a)
  c3 = Conv <pads = [1,1,1,1]> (r3a, w3b, b3b)
  mp = MaxPool <kernel_shape = [3,3], pads = [1,1,1,1], strides = [1,1]> (x)
  c4 = Conv (mp, w4, b4)
  cat = Concat <axis = 1> (c1, c2, c3, c4)
  bn = BatchNormalization <epsilon = 0.001> (cat, bn_scale, bn_bias, bn_mean, bn_var)
  r = Relu (bn)
  c5 = Conv (r, w5, b5)""" + HEAD.format(x="c5") + "\n}"


@pytest.mark.parametrize("k", KS)
def test_concat_of_four_branches(k, tmp_path):
    model = make(INCEPTION)
    assert forced(assert_exact(model, k, tmp_path / "out")) == {}
    p = plan_of(model, k)
    for t in ("c1", "c2", "c3", "c4", "cat", "bn"):
        assert_even_split(p, t)
    assert np.array_equal(p.branches("cat"), np.concatenate([p.branches(t) for t in ("c1", "c2", "c3", "c4")]))


# ----------------------------------------------------------------------------- squeeze-excite
SE_CONV = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[8,16,1,1] wr, float[8] br,
        float[16,8,1,1] we, float[16] be, float[10,16] fc, float[10] fcb) => (float[1,10] y) {
  x0 = Conv <pads = [1,1,1,1]> (input, w0, b0)
  x = HardSwish (x0)
  g = GlobalAveragePool (x)
  r0 = Conv (g, wr, br)
  r = Relu (r0)
  e = Conv (r, we, be)
  s = HardSigmoid <alpha = 0.16666667, beta = 0.5> (e)
  z = Mul (x, s)""" + HEAD.format(x="z") + "\n}"

SE_GEMM = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[8,16] wr, float[8] br,
        float[16,8] we, float[16] be, float[10,16] fc, float[10] fcb) => (float[1,10] y) {
  x0 = Conv <pads = [1,1,1,1]> (input, w0, b0)
  x = Relu (x0)
  g = GlobalAveragePool (x)
  gf = Flatten (g)
  r0 = Gemm <transB = 1> (gf, wr, br)
  r = Relu (r0)
  e = Gemm <transB = 1> (r, we, be)
  s = Sigmoid (e)
  shape = Constant <value = int64[4] {0, 16, 1, 1}> ()
  s4 = Reshape (s, shape)
  z = Mul (x, s4)""" + HEAD.format(x="z") + "\n}"


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("text", [SE_CONV, SE_GEMM], ids=["convs", "gemm"])
def test_squeeze_excite(text, k, tmp_path):
    model = make(text)
    manifest = assert_exact(model, k, tmp_path / "out")
    assert forced(manifest) == {}
    p = plan_of(model, k)
    for t in ("x", "r0", "e", "s", "z"):
        assert_even_split(p, t)
    assert np.array_equal(p.branches("s"), p.branches("x"))  # the scale of channel c is where c is
    assert {"r0", "e"} <= set(manifest["sync"]["exchanges"])  # the SE layers mix split channels exactly


# ----------------------------------------------------------------------------- grouped / depthwise
GROUPED = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[32,4,3,3] wg, float[32] bg,
        float[16,32,1,1] w2, float[16] b2, float[10,16] fc, float[10] fcb) => (float[1,10] y) {
  x0 = Conv <pads = [1,1,1,1]> (input, w0, b0)
  x = Relu (x0)
  g0 = Conv <pads = [1,1,1,1], group = 4> (x, wg, bg)
  g = Relu (g0)
  c2 = Conv (g, w2, b2)""" + HEAD.format(x="c2") + "\n}"


@pytest.mark.parametrize("k", KS)
def test_grouped_conv_keeps_each_group_on_one_branch(k, tmp_path):
    model = make(GROUPED)
    assert forced(assert_exact(model, k, tmp_path / "out")) == {}
    p = plan_of(model, k)
    x, g = p.branches("x"), p.branches("g")
    for grp in range(4):
        owners = set(x[4 * grp:4 * grp + 4].tolist()) | set(g[8 * grp:8 * grp + 8].tolist())
        assert len(owners) == 1, (grp, owners)
    assert np.bincount(g, minlength=k).tolist() == [32 // k] * k


def test_grouped_conv_refuses_more_branches_than_groups(tmp_path):
    with pytest.raises(LcpcError, match=r"larger than the channel space.*--branches 4 or fewer"):
        pipeline.convert(make(GROUPED).SerializeToString(), tmp_path / "out", 8, "all")
    assert not (tmp_path / "out").exists()


DEPTHWISE = HEADER + """
agraph (float[1,3,16,16] input, float[8,3,3,3] w0, float[8] b0, float[16,1,3,3] wd, float[16] bd,
        float[16,16,1,1] w2, float[16] b2, float[10,16] fc, float[10] fcb) => (float[1,10] y) {
  x0 = Conv <pads = [1,1,1,1]> (input, w0, b0)
  lo = Constant <value = float {0.0}> ()
  hi = Constant <value = float {6.0}> ()
  x = Clip (x0, lo, hi)
  d0 = Conv <pads = [1,1,1,1], group = 8> (x, wd, bd)
  d = Relu (d0)
  c2 = Conv (d, w2, b2)""" + HEAD.format(x="c2") + "\n}"


@pytest.mark.parametrize("k", KS)
def test_depthwise_with_channel_multiplier(k, tmp_path):
    model = make(DEPTHWISE)
    assert forced(assert_exact(model, k, tmp_path / "out")) == {}
    p = plan_of(model, k)
    x, d = p.branches("x"), p.branches("d")
    assert np.array_equal(d, np.repeat(x, 2))  # outputs 2c, 2c+1 live with input channel c
    assert_even_split(p, "d")


# ----------------------------------------------------------------------------- per-channel ops
PRELU = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[16,1,1] p_slope,
        float[1] q_slope, float[16,16,3,3] w1, float[16] b1, float[10,16] fc, float[10] fcb) => (float[1,10] y) {
  x0 = Conv <pads = [1,1,1,1]> (input, w0, b0)
  x = PRelu (x0, p_slope)
  c1 = Conv <pads = [1,1,1,1]> (x, w1, b1)
  z = PRelu (c1, q_slope)""" + HEAD.format(x="z") + "\n}"


@pytest.mark.parametrize("k", KS)
def test_prelu_per_channel_slopes(k, tmp_path):
    model = make(PRELU)
    assert forced(assert_exact(model, k, tmp_path / "out")) == {}
    p = plan_of(model, k)
    assert_even_split(p, "x")
    assert_even_split(p, "z")


PAD = HEADER + """
agraph (float[1,3,16,16] input, float[8,3,3,3] w0, float[8] b0, float[16,8,3,3] w1, float[16] b1,
        float[16,16,3,3] w2, float[16] b2, float[10,16] fc, float[10] fcb) => (float[1,10] y) {
  stem_pads = Constant <value = int64[8] {0, 0, 0, 0, 0, 0, 1, 1}> ()
  xp = Pad <mode = "constant"> (input, stem_pads)
  x0 = Conv <strides = [2,2]> (xp, w0, b0)
  x = Relu (x0)
  pads = Constant <value = int64[8] {0, 0, 0, 1, 0, 0, 2, 1}> ()
  xq = Pad <mode = "constant"> (x, pads)
  c1 = Conv (xq, w1, b1)
  r1 = LeakyRelu <alpha = 0.1> (c1)
  rpads = Constant <value = int64[8] {0, 0, 1, 1, 0, 0, 1, 1}> ()
  r1p = Pad <mode = "reflect"> (r1, rpads)
  c2 = Conv (r1p, w2, b2)""" + HEAD.format(x="c2") + "\n}"


@pytest.mark.parametrize("k", KS)
def test_asymmetric_pad_before_valid_conv(k, tmp_path):
    model = make(PAD)
    assert forced(assert_exact(model, k, tmp_path / "out")) == {}
    p = plan_of(model, k)
    assert p.layouts["xp"] == "R"  # the padded image is replicated
    for t in ("xq", "r1p"):
        assert_even_split(p, t)


POOL = HEADER + """
agraph (float[1,3,15,15] input, float[16,3,3,3] w0, float[16] b0, float[16,16,3,3] w1, float[16] b1,
        float[10,16] fc, float[10] fcb) => (float[1,10] y) {
  x0 = Conv <pads = [1,1,1,1]> (input, w0, b0)
  x = Relu (x0)
  m = MaxPool <kernel_shape = [2,2], strides = [2,2], ceil_mode = 1> (x)
  c1 = Conv <pads = [1,1,1,1]> (m, w1, b1)
  a = AveragePool <kernel_shape = [3,3], strides = [2,2], pads = [1,1,1,1], ceil_mode = 1,
                   count_include_pad = 0> (c1)""" + HEAD.format(x="a") + "\n}"


@pytest.mark.parametrize("k", KS)
def test_pooling_with_ceil_mode(k, tmp_path):
    model = make(POOL)
    assert forced(assert_exact(model, k, tmp_path / "out")) == {}
    p = plan_of(model, k)
    assert p.graph.info("m").shape == (1, 16, 8, 8)  # ceil: 8, not 7
    assert_even_split(p, "m")
    assert_even_split(p, "a")


# ----------------------------------------------------------------------------- FPN necks
FPN = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[16,16,3,3] w1, float[16] b1,
        float[8,16,1,1] w2, float[8] b2, float[16,24,3,3] w3, float[16] b3, float[10,16] fc, float[10] fcb)
        => (float[1,10] y) {
  x0 = Conv <pads = [1,1,1,1]> (input, w0, b0)
  x = Relu (x0)
  d0 = Conv <pads = [1,1,1,1], strides = [2,2]> (x, w1, b1)
  d = Relu (d0)
  l = Conv (d, w2, b2)
  %s
  cat = Concat <axis = 1> (x, up)
  c3 = Conv <pads = [1,1,1,1]> (cat, w3, b3)""" + HEAD.format(x="c3") + "\n}"

UPSAMPLES = {
    "resize_scales": ('sc = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()\n'
                      '  up = Resize <mode = "nearest"> (l, , sc)'),
    "resize_sizes": ('sz = Constant <value = int64[4] {1, 8, 16, 16}> ()\n'
                     '  up = Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric", '
                     'nearest_mode = "floor"> (l, , , sz)'),
    "resize_linear": ('sc = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()\n'
                      '  up = Resize <mode = "linear"> (l, , sc)'),
}


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("variant", list(UPSAMPLES))
def test_fpn_resize_then_concat_with_skip(variant, k, tmp_path):
    model = make(FPN % UPSAMPLES[variant])
    assert forced(assert_exact(model, k, tmp_path / "out")) == {}
    p = plan_of(model, k)
    for t in ("up", "cat"):
        assert_even_split(p, t)
    assert np.array_equal(p.branches("up"), p.branches("l"))


def test_upsample_opset9_is_upgraded(tmp_path):
    rng = np.random.default_rng(0)

    def w(*shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * math.sqrt(2 / np.prod(shape[1:]))
                                        ).astype(np.float32))

    inits = [w(8, 3, 3, 3), w(8, 8, 1, 1), w(10, 16)]
    for t, name in zip(inits, ("w0", "w1", "fc")):
        t.name = name
    inits += [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fcb")]
    nodes = [helper.make_node("Conv", ["input", "w0"], ["x0"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["x0"], ["x"]),
             helper.make_node("Conv", ["x", "w1"], ["l"]),
             helper.make_node("Upsample", ["l", "scales"], ["up"], mode="nearest"),
             helper.make_node("MaxPool", ["up"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Concat", ["x", "m"], ["cat"], axis=1),
             helper.make_node("GlobalAveragePool", ["cat"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "upsample9", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                  [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    for k in KS:
        assert forced(assert_exact(model, k, tmp_path / f"k{k}")) == {}


# ----------------------------------------------------------------------------- ConvTranspose
DECONV = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[16,8,2,2] wt, float[8] bt,
        float[16,8,3,3] w2, float[16] b2, float[10,16] fc, float[10] fcb) => (float[1,10] y) {
  x0 = Conv <pads = [1,1,1,1], strides = [2,2]> (input, w0, b0)
  x = Relu (x0)
  t0 = ConvTranspose <kernel_shape = [2,2], strides = [2,2]> (x, wt, bt)
  t = Relu (t0)
  c2 = Conv <pads = [1,1,1,1]> (t, w2, b2)""" + HEAD.format(x="c2") + "\n}"

DECONV_GROUPED = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[16,1,4,4] wt,
        float[16,16,3,3] w2, float[16] b2, float[10,16] fc, float[10] fcb) => (float[1,10] y) {
  x0 = Conv <pads = [1,1,1,1], strides = [2,2]> (input, w0, b0)
  x = Relu (x0)
  t = ConvTranspose <kernel_shape = [4,4], strides = [2,2], pads = [1,1,1,1], group = 16> (x, wt)
  c2 = Conv <pads = [1,1,1,1]> (t, w2, b2)""" + HEAD.format(x="c2") + "\n}"


@pytest.mark.parametrize("k", KS)
def test_conv_transpose(k, tmp_path):
    model = make(DECONV)
    manifest = assert_exact(model, k, tmp_path / "out")
    assert forced(manifest) == {}
    p = plan_of(model, k)
    assert_even_split(p, "t")
    assert "ConvTranspose" in {d["op"] for d in manifest["decisions"] if d["action"] == "exchange"}


@pytest.mark.parametrize("k", KS)
def test_grouped_conv_transpose_is_exact(k, tmp_path):
    """Depthwise deconvolution (learned bilinear upsampling): exact whether split or synced."""
    manifest = assert_exact(make(DECONV_GROUPED), k, tmp_path / "out")
    for d in forced(manifest).values():
        assert d["op"] == "ConvTranspose" and "ConvTranspose" in d["reason"], d


@pytest.mark.parametrize("k", KS)
def test_grouped_conv_transpose_is_split(k):
    p = plan_of(make(DECONV_GROUPED), k)
    assert_even_split(p, "t")
    assert np.array_equal(p.branches("t"), p.branches("x"))


# ----------------------------------------------------------------------------- Paddle: Constant weights
def as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move every initializer into a Constant node, as Paddle2ONNX exports weights."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
              for t in out.graph.initializer]
    nodes = consts + list(out.graph.node)
    del out.graph.initializer[:]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out, full_check=True)
    return out


@pytest.mark.parametrize("k", KS)
def test_weights_in_constant_nodes(k, tmp_path):
    plain = make(SE_GEMM)
    paddle = as_constant_nodes(plain)
    assert not paddle.graph.initializer
    manifest = assert_exact(paddle, k, tmp_path / "out")
    assert forced(manifest) == {}
    reference_manifest = pipeline.convert(plain.SerializeToString(), tmp_path / "plain", k, "all")
    assert manifest["totals"]["original"]["params"] == reference_manifest["totals"]["original"]["params"] > 0
    assert manifest["totals"]["bytes_per_inference"] == reference_manifest["totals"]["bytes_per_inference"]
    assert plan_of(paddle, k).layouts == plan_of(plain, k).layouts


# ----------------------------------------------------------------------------- un-fused BatchNormalization
BN = HEADER + """
agraph (float[1,3,16,16] input, float[3] bi_scale, float[3] bi_bias, float[3] bi_mean, float[3] bi_var,
        float[16,3,3,3] w0, float[16] b0, float[16,16,3,3] w1, float[16] b1, float[16] ba_scale,
        float[16] ba_bias, float[16] ba_mean, float[16] ba_var, float[32] bc_scale, float[32] bc_bias,
        float[32] bc_mean, float[32] bc_var, float[16,32,1,1] w2, float[10,16] fc, float[10] fcb)
        => (float[1,10] y) {
  xi = BatchNormalization (input, bi_scale, bi_bias, bi_mean, bi_var)
  x0 = Conv <pads = [1,1,1,1]> (xi, w0, b0)
  x = Relu (x0)
  c1 = Conv <pads = [1,1,1,1]> (x, w1, b1)
  s = Add (x, c1)
  sb = BatchNormalization (s, ba_scale, ba_bias, ba_mean, ba_var)
  sr = Relu (sb)
  cat = Concat <axis = 1> (x, sr)
  cb = BatchNormalization (cat, bc_scale, bc_bias, bc_mean, bc_var)
  cr = Relu (cb)
  c2 = Conv (cr, w2)""" + HEAD.format(x="c2") + "\n}"


@pytest.mark.parametrize("k", KS)
def test_unfused_batchnorm(k, tmp_path):
    model = make(BN)
    assert forced(assert_exact(model, k, tmp_path / "out")) == {}
    p = plan_of(model, k)
    assert [n.op for n in p.graph.nodes].count("BatchNormalization") == 3  # none follows a Conv
    assert p.layouts["xi"] == "R"
    for t in ("sb", "cb"):
        assert_even_split(p, t)


# ----------------------------------------------------------------------------- Identity chains
IDENTITY = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[16,16,3,3] w1, float[16] b1,
        float[10,16] fc, float[10] fcb) => (float[1,10] out) {
  i0 = Identity (input)
  x0 = Conv <pads = [1,1,1,1]> (i0, w0, b0)
  i1 = Identity (x0)
  i2 = Identity (i1)
  x = Relu (i2)
  i3 = Identity (x)
  c1 = Conv <pads = [1,1,1,1]> (i3, w1, b1)
  i4 = Identity (c1)""" + HEAD.format(x="i4") + """
  i5 = Identity (y)
  out = Identity (i5)
}"""


@pytest.mark.parametrize("k", KS)
def test_identity_chains(k, tmp_path):
    model = make(IDENTITY)
    assert forced(assert_exact(model, k, tmp_path / "out")) == {}
    p = plan_of(model, k)
    assert p.graph.outputs == ["out"]
    assert_even_split(p, next(n.outputs[0] for n in p.graph.nodes if n.op == "Relu"))


# ----------------------------------------------------------------------------- several outputs
DETECT = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[24,16,3,3] w1, float[24] b1,
        float[32,24,3,3] w2, float[32] b2, float[18,16,1,1] h3, float[18] hb3, float[18,24,1,1] h4,
        float[18] hb4, float[18,32,1,1] h5, float[18] hb5)
        => (float[1,18,16,16] p3, float[1,18,8,8] p4, float[1,18,4,4] p5, float[1,32,4,4] feat,
            float[1,18,336] boxes) {
  x0 = Conv <pads = [1,1,1,1]> (input, w0, b0)
  x3 = Relu (x0)
  x4a = Conv <pads = [1,1,1,1], strides = [2,2]> (x3, w1, b1)
  x4 = Relu (x4a)
  x5a = Conv <pads = [1,1,1,1], strides = [2,2]> (x4, w2, b2)
  feat = Relu (x5a)
  p3 = Conv (x3, h3, hb3)
  p4 = Conv (x4, h4, hb4)
  p5 = Conv (feat, h5, hb5)
  s3 = Constant <value = int64[3] {1, 18, 256}> ()
  s4 = Constant <value = int64[3] {1, 18, 64}> ()
  s5 = Constant <value = int64[3] {1, 18, 16}> ()
  r3 = Reshape (p3, s3)
  r4 = Reshape (p4, s4)
  r5 = Reshape (p5, s5)
  boxes = Concat <axis = 2> (r3, r4, r5)
}"""


@pytest.mark.parametrize("k", KS)
def test_detection_heads_several_outputs(k, tmp_path):
    model = make(DETECT)
    manifest = assert_exact(model, k, tmp_path / "out")
    assert [o["name"] for o in manifest["outputs"]] == ["p3", "p4", "p5", "feat", "boxes"]
    assert forced(manifest) == {}
    p = plan_of(model, k)
    for t in ("x3", "x4", "feat"):
        assert_even_split(p, t)
    merged = {d["node"] for d in manifest["decisions"] if d["action"] == "merge"}
    assert merged == {n.name for n in p.graph.nodes if n.outputs[0] in ("p3", "p4", "p5")}


# ----------------------------------------------------------------------------- dynamic batch
DYNAMIC = HEADER + """
agraph (float[N,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[16,16,3,3] w1, float[16] b1,
        float[10,16] fc, float[10] fcb) => (float[N,10] y) {
  x0 = Conv <pads = [1,1,1,1]> (input, w0, b0)
  x = Relu (x0)
  c1 = Conv <pads = [1,1,1,1], strides = [2,2]> (x, w1, b1)""" + HEAD.format(x="c1") + "\n}"


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("pinned", [None, 2])
def test_dynamic_batch(pinned, k, tmp_path):
    model = make(DYNAMIC)
    shapes = None if pinned is None else {"input": (pinned, 3, 16, 16)}
    manifest = assert_exact(model, k, tmp_path / "out", input_shapes=shapes, batch=3)
    assert manifest["source"]["inputs"][0]["shape"] == [pinned or 1, 3, 16, 16]


# ----------------------------------------------------------------------------- tf2onnx: input:0, NHWC
def tf2onnx_model(nhwc_inside: bool) -> onnx.ModelProto:
    """What tf2onnx writes for a Keras CNN: ``input:0`` NHWC with unknown dims, a Transpose to
    NCHW, conv biases, MatMul + Add classifier, ``Identity:0`` output; with ``nhwc_inside`` the
    Keras layers between convs stay in NHWC (Transpose pairs around them, bias on the last axis)."""
    rng = np.random.default_rng(0)

    def init(name, *shape, scale=None):
        std = math.sqrt(2 / np.prod(shape[1:])) if scale is None else scale
        return numpy_helper.from_array((rng.standard_normal(shape) * std).astype(np.float32), name)

    inits = [init("conv1/kernel", 16, 3, 3, 3), init("conv1/bias", 16, scale=0.1),
             init("conv2/kernel", 16, 16, 3, 3), init("bn/bias", 16, scale=0.1),
             init("dense/kernel", 16, 10, scale=0.25), init("dense/bias", 10, scale=0.1),
             numpy_helper.from_array(np.array([2, 3], np.int64), "squeeze/axes")]
    nodes = [helper.make_node("Transpose", ["input:0"], ["conv1/nchw"], name="conv1/transpose", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["conv1/nchw", "conv1/kernel", "conv1/bias"], ["conv1/BiasAdd:0"],
                              name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv1/BiasAdd:0"], ["conv1/Relu:0"], name="conv1/Relu"),
             helper.make_node("Conv", ["conv1/Relu:0", "conv2/kernel"], ["conv2/Conv2D:0"], name="conv2",
                              pads=[1, 1, 1, 1])]
    if nhwc_inside:
        nodes += [helper.make_node("Transpose", ["conv2/Conv2D:0"], ["conv2/nhwc"], name="conv2/to_nhwc",
                                   perm=[0, 2, 3, 1]),
                  helper.make_node("Add", ["conv2/nhwc", "bn/bias"], ["bn/add:0"], name="bn/add"),
                  helper.make_node("Relu", ["bn/add:0"], ["bn/Relu:0"], name="bn/Relu"),
                  helper.make_node("ReduceMean", ["bn/Relu:0"], ["gap/Mean:0"], name="gap", axes=[1, 2],
                                   keepdims=0)]
    else:
        nodes += [helper.make_node("Add", ["conv2/Conv2D:0", "bn/bias4"], ["bn/add:0"], name="bn/add"),
                  helper.make_node("Relu", ["bn/add:0"], ["bn/Relu:0"], name="bn/Relu"),
                  helper.make_node("GlobalAveragePool", ["bn/Relu:0"], ["gap/pool:0"], name="gap"),
                  helper.make_node("Squeeze", ["gap/pool:0", "squeeze/axes"], ["gap/Mean:0"], name="gap/squeeze")]
        inits.append(numpy_helper.from_array(numpy_helper.to_array(inits[3]).reshape(16, 1, 1), "bn/bias4"))
    nodes += [helper.make_node("MatMul", ["gap/Mean:0", "dense/kernel"], ["dense/MatMul:0"], name="dense/MatMul"),
              helper.make_node("Add", ["dense/MatMul:0", "dense/bias"], ["dense/BiasAdd:0"], name="dense/BiasAdd"),
              helper.make_node("Softmax", ["dense/BiasAdd:0"], ["dense/Softmax:0"], name="dense/Softmax", axis=-1),
              helper.make_node("Identity", ["dense/Softmax:0"], ["Identity:0"], name="Identity")]
    graph = helper.make_graph(nodes, "tf2onnx", [helper.make_tensor_value_info(
        "input:0", TensorProto.FLOAT, ["unk__6", "unk__7", "unk__8", 3])],
        [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, ["unk__9", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tf2onnx")
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("nhwc_inside", [False, True], ids=["nchw_body", "nhwc_body"])
def test_tf2onnx_names_and_nhwc_input(nhwc_inside, k, tmp_path):
    model = tf2onnx_model(nhwc_inside)
    path, out = tmp_path / "model.onnx", tmp_path / "out"
    onnx.save_model(model, path)
    result = CliRunner().invoke(main, ["convert", str(path), "--branches", str(k), "--sync", "all",
                                       "--input-shape", "input:0:1x16x16x3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    got, stats, manifest = run_folder(out, {"input:0": x})
    want = reference(model.SerializeToString(), {"input:0": x})[0]
    assert rel_err(got["Identity:0"], want) <= 1e-4
    assert manifest["source"]["inputs"][0]["shape"] == [1, 16, 16, 3]
    for t in manifest["transfers"]:
        assert stats.bytes_by_transfer[t["id"]] == 2 * t["bytes"]
    p = plan_of(model, k, input_shapes={"input:0": (1, 16, 16, 3)})
    assert p.layouts["conv1/nchw"] == "R"      # the input Transpose runs on the replicated image
    assert_even_split(p, "conv1/Relu:0")
    if not nhwc_inside:
        assert forced(manifest) == {}


@pytest.mark.parametrize("k", KS)
def test_nhwc_body_is_split_without_a_sync(k, tmp_path):
    manifest = pipeline.convert(tf2onnx_model(True).SerializeToString(), tmp_path / "out", k, "none",
                             {"input:0": (1, 16, 16, 3)})
    assert forced(manifest) == {}
    gathers = [t for t in manifest["transfers"] if t["kind"] == "gather"]
    assert not gathers or {t["tensor"] for t in gathers} == {"gap/Mean:0"}  # only the classifier merge


def nhwc(body: str, params: str = "", c2_in: int = 8) -> str:
    """conv -> ``ta`` = Transpose to NHWC -> ``body`` (ends in ``s``, NHWC) -> back to NCHW -> conv."""
    return HEADER + f"""
agraph (float[1,3,8,8] input, float[8,3,3,3] w0{params}, float[8,{c2_in},3,3] w2, float[10,8] fc,
        float[10] fcb) => (float[1,10] y) {{
  a = Conv <pads = [1,1,1,1]> (input, w0)
  ta = Transpose <perm = [0,2,3,1]> (a)
  {body}
  back = Transpose <perm = [0,3,1,2]> (s)
  c2 = Conv <pads = [1,1,1,1]> (back, w2)""" + HEAD.format(x="c2") + "\n}"


NHWC_LAYERS = {  # name -> (model, the forced syncs by node)
    "bias_on_last_axis": (nhwc("s = Add (ta, bias)", ", float[8] bias"), {}),
    "bias_shaped_like_h": (nhwc("s = Add (ta, hb)", ", float[8,1] hb"), {}),  # H == C: broadcast over H
    "scale_1x1x1xC": (nhwc("s = Mul (ta, sc)", ", float[1,1,1,8] sc"), {}),
    "prelu_slope_c": (nhwc("s = PRelu (ta, p_slope)", ", float[8] p_slope"), {}),
    "concat_axis_3": (nhwc("tb = Transpose <perm = [0,2,3,1]> (a)\n  s = Concat <axis = 3> (ta, tb)",
                           c2_in=16), {}),
    "split_axis_minus_1": (nhwc("sz = Constant <value = int64[2] {4, 4}> ()\n  u, v = Split <axis = -1> (ta, sz)"
                                "\n  s = Add (u, v)", c2_in=4), {}),
    "matmul_on_last_axis": (nhwc("d = MatMul (ta, m1)\n  s = Relu (d)", ", float[8,16] m1", c2_in=16), {}),
    "reducemean_keepdims": (nhwc("s = ReduceMean <axes = [1,2], keepdims = 1> (ta)"), {}),
    "softmax_over_channels": (nhwc("s = Softmax <axis = -1> (ta)"), {"s": "Softmax"}),
}


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name", list(NHWC_LAYERS))
def test_nhwc_layers_between_transposes(name, k, tmp_path):
    """Keras layers tf2onnx leaves in NHWC: the channel axis is tracked through the
    Transposes (no sync) unless the layer really mixes channels."""
    text, syncs = NHWC_LAYERS[name]
    model = make(text)
    manifest = assert_exact(model, k, tmp_path / "out")
    assert {n: d["op"] for n, d in forced(manifest).items()} == syncs
    for d in forced(manifest).values():
        assert d["op"] in d["reason"], d


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("flatten", ["f = Flatten (ta)",
                                     "sh = Constant <value = int64[2] {1, -1}> ()\n  f = Reshape (ta, sh)"],
                         ids=["Flatten", "Reshape"])
def test_keras_flatten_after_nhwc_transpose(flatten, k, tmp_path):
    """Flattening an NHWC tensor interleaves the channels (c fastest): exact either way."""
    text = HEADER + f"""
agraph (float[1,3,8,8] input, float[8,3,3,3] w0, float[10,128] fc, float[10] fcb) => (float[1,10] y) {{
  x = Conv <pads = [1,1,1,1]> (input, w0)
  m = MaxPool <kernel_shape = [2,2], strides = [2,2]> (x)
  ta = Transpose <perm = [0,2,3,1]> (m)
  {flatten}
  y = Gemm <transB = 1> (f, fc, fcb)
}}"""
    assert_exact(make(text), k, tmp_path / "out")


# ----------------------------------------------------------------------------- blocks lcpc syncs around
ATTENTION = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[8,16,1,1] wq, float[8,16,1,1] wk,
        float[16,8,1,1] wv, float[16,16,3,3] w2, float[16] b2, float[10,16] fc, float[10] fcb) => (float[1,10] y) {
  x0 = Conv <pads = [1,1,1,1], strides = [2,2]> (input, w0, b0)
  x = Relu (x0)
  q = Conv (x, wq)
  kk = Conv (x, wk)
  kt = Transpose <perm = [0,1,3,2]> (kk)
  att = MatMul (q, kt)
  sm = Softmax <axis = 1> (att)
  v = Conv (sm, wv)
  z = Add (x, v)
  c2 = Conv <pads = [1,1,1,1]> (z, w2, b2)""" + HEAD.format(x="c2") + "\n}"

SHUFFLE = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[16,4,3,3] wg, float[16,16,1,1] w2,
        float[16] b2, float[10,16] fc, float[10] fcb) => (float[1,10] y) {
  x0 = Conv <pads = [1,1,1,1], strides = [2,2]> (input, w0, b0)
  x = Relu (x0)
  g = Conv <pads = [1,1,1,1], group = 4> (x, wg)
  s5 = Constant <value = int64[5] {1, 4, 4, 8, 8}> ()
  r5 = Reshape (g, s5)
  tr = Transpose <perm = [0,2,1,3,4]> (r5)
  s4 = Constant <value = int64[4] {1, 16, 8, 8}> ()
  sh = Reshape (tr, s4)
  c2 = Conv (sh, w2, b2)""" + HEAD.format(x="c2") + "\n}"

UNKNOWN = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[16,16,3,3] w2, float[16] b2,
        float[10,16] fc, float[10] fcb) => (float[1,10] y) {
  x0 = Conv <pads = [1,1,1,1], strides = [2,2]> (input, w0, b0)
  x = Relu (x0)
  ax = Constant <value = int64 {1}> ()
  cs = CumSum (x, ax)
  c2 = Conv <pads = [1,1,1,1]> (cs, w2, b2)""" + HEAD.format(x="c2") + "\n}"


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("text, syncs, unsupported", [
    (ATTENTION, {"att": "MatMul"}, []),  # kt transposes spatial axes only; Softmax sees the MatMul output
    (SHUFFLE, {"r5": "Reshape"}, []),
    (UNKNOWN, {"cs": "CumSum"}, ["CumSum"]),
], ids=["attention", "channel_shuffle", "unknown_op"])
def test_channel_mixing_blocks_get_an_exact_sync(text, syncs, unsupported, k, tmp_path):
    """Ops that mix channels outside lcpc's model: exact under --sync all, a forced sync whose
    reason names the op, the gathered bytes in the manifest, unknown ops listed by name."""
    model = make(text)
    manifest = assert_exact(model, k, tmp_path / "out")
    decisions = forced(manifest)
    assert set(decisions) == set(syncs)  # node names are their first outputs (see make)
    for node, op in syncs.items():
        assert decisions[node]["op"] == op and op in decisions[node]["reason"], decisions[node]
    assert manifest["unsupported_ops"] == unsupported
    inputs = {n.name: set(n.input) for n in model.graph.node}
    gathered = {t["tensor"] for t in manifest["transfers"] if t["kind"] == "gather"}
    for node in decisions:
        assert inputs[node] & gathered, node  # the sync's cost is in the manifest's transfers
    # --sync none keeps the sync exact: the ops behind it see whole tensors
    none = pipeline.convert(model.SerializeToString(), tmp_path / "none", k, "none")
    assert forced(none).keys() == decisions.keys()


@pytest.mark.parametrize("k", KS)
def test_softmax_over_channels_is_synced(k, tmp_path):
    text = HEADER + """
agraph (float[1,3,16,16] input, float[16,3,3,3] w0, float[16] b0, float[16,16,1,1] w1, float[10,16] fc,
        float[10] fcb) => (float[1,10] y) {
  x0 = Conv <pads = [1,1,1,1]> (input, w0, b0)
  x = Relu (x0)
  a = Conv (x, w1)
  sm = Softmax <axis = 1> (a)
  z = Mul (x, sm)""" + HEAD.format(x="z") + "\n}"
    manifest = assert_exact(make(text), k, tmp_path / "out")
    d = forced(manifest)["sm"]
    assert d["op"] == "Softmax" and "Softmax" in d["reason"] and "channel" in d["reason"]
