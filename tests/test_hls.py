"""``lcpc export-hls`` / the C++ emulation: one branch compiled and checked against onnxruntime (float at
fixed<16,6>, and int8 at ``--precision from-int8``), the per-branch table against counts taken from the stage
files themselves, and an op hls4ml lacks refused by node and op.

Compiling one hls4ml project's emulation takes about 15-25 s on the 2-core CI machine, so only one branch is
compiled here; ``benchmarks/hls.py`` exports and checks every branch of the recovered digits plan.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import EXAMPLE
from lcpc.errors import LcpcError
from lcpc.pipeline import convert as convert_model
from lcpc.runtime import manifest as mf
from lcpc.runtime.session import open_stage
from lcpc.targets import hls, hls_verify


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hls") / "digits"
    convert_model(EXAMPLE, folder, 4, "none")
    return folder


def _counts(path) -> tuple[int, int]:
    """(MACs, weights) of a stage file's Conv and Gemm nodes, counted from the ONNX file alone."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.output)}
    macs = weights = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            w = init[node.input[1]]
            weights += w.size
            out = shapes[node.output[0]]
            macs += w.size * (out[2] * out[3] if node.op_type == "Conv" else 1)
    return macs, weights


def test_export_table_and_one_branch_emulated(digits, tmp_path):
    pytest.importorskip("hls4ml", reason="hls4ml is not installed (pip install 'lcpc[hls]')")
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    out = tmp_path / "hls"
    record = hls.export(digits, out, hls.Options(precision="fixed<16,6>", reuse=4, board="pynq-z2"))
    assert json.loads((out / hls.FILE).read_text()) == json.loads(json.dumps(record))
    manifest = mf.read(digits)
    kinds = {s["id"]: s["kind"] for s in record["stages"]}
    assert kinds == {s.id: "software" if s.level == 1 else "hls" for s in manifest.stages}  # the head's merge
    rows = {r["project"]: r for r in hls.table(record)}
    assert len(rows) == 4
    for project, row in rows.items():
        macs, weights = _counts(digits / f"{project}.onnx")
        assert (row["macs"], row["weights"], row["weight_bits"]) == (macs, weights, 16 * weights)
        assert 0 < row["dsp"] <= -(-weights // 4) + len(record["stages"][0]["layers"])  # about weights / reuse
        assert (out / project / "build_lib.sh").is_file()
    assert "| d1_l0 | dev1 |" in hls.render_table(record)

    stage = next(s for s in record["stages"] if s["id"] == "d1_l0")
    emulation = hls_verify.compile_project(out, stage, timeout=600)
    x = np.load(EXAMPLE.parent / "test.npy")[:40]
    spec = next(s for s in manifest.stages if s.id == "d1_l0")
    session = open_stage(mf.read_stage(digits, spec), spec, "d1_l0")
    for i in range(len(x)):
        want = session.run(None, {"input": x[i:i + 1]})[0]
        got = emulation({"input": x[i:i + 1]})[0]
        assert got.shape == want.shape
        # fixed<16,6>, rounded: 10 fraction bits through ten layers
        np.testing.assert_allclose(got, want, atol=0.08 * max(1.0, float(np.abs(want).max())))


def test_from_int8_takes_the_int8_grids_and_one_branch_matches_its_int8_stage(tmp_path):
    """``--precision from-int8`` end to end: every stage of a ``--quantize int8-all --calib`` plan is
    int8 (unmeasured, so no timing decides it), its weights become 8-bit fixed types, and the
    compiled branch agrees with onnxruntime running the same int8 stage."""
    pytest.importorskip("hls4ml", reason="hls4ml is not installed (pip install 'lcpc[hls]')")
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    x = np.load(EXAMPLE.parent / "test.npy")
    folder = tmp_path / "int8"
    convert_model(EXAMPLE, folder, 4, "none", calib=x[:64], quantize="int8-all")
    out = tmp_path / "hls"
    record = hls.export(folder, out, hls.Options(precision="from-int8", reuse=4, board="pynq-z2"))
    assert record["precision"] == "from-int8"
    stage = next(s for s in record["stages"] if s["id"] == "d1_l0")
    weighted = [layer for layer in stage["layers"] if "weight" in layer["precision"]]
    assert weighted and all(layer["precision"]["weight"].startswith("fixed<8,") for layer in weighted)
    assert all(row["weight_bits"] == 8 * row["weights"] for row in hls.table(record))

    emulation = hls_verify.compile_project(out, stage, timeout=600)
    manifest = mf.read(folder)
    spec = next(s for s in manifest.stages if s.id == "d1_l0")
    session = open_stage(mf.read_stage(folder, spec), spec, "d1_l0")
    for i in range(40):
        want = session.run(None, {"input": x[i:i + 1]})[0]
        got = emulation({"input": x[i:i + 1]})[0]
        # 8-bit weights in one fixed type per layer (the int8 scales are per channel): 1.7% at worst on 200 images
        np.testing.assert_allclose(got, want, atol=0.04 * max(1.0, float(np.abs(want).max())))


def test_an_op_hls4ml_lacks_is_refused_by_name(tmp_path, zoo_bytes):
    folder = tmp_path / "mobilenet"
    convert_model(zoo_bytes["mobilenet_v2"], folder, 2, "none")
    out = tmp_path / "hls"
    with pytest.raises(LcpcError, match=r"d0_l0\.onnx: node '[^']+' \(op Clip\) cannot become an FPGA layer: "
                                        r"hls4ml has no layer for it"):
        hls.export(folder, out, hls.Options())
    assert not out.exists() and not any(tmp_path.glob(".hls*"))


@pytest.mark.parametrize("text, message", [("fixed<16>", "expected fixed<W,I>"), ("fixed<80,6>", "width 2..64"),
                                           ("fixed<16,6,RND,NOPE>", "overflow one of")])
def test_bad_precision_is_one_clear_error(text, message):
    with pytest.raises(LcpcError, match=message):
        hls.Options(precision=text).check()


def test_fixed_types():
    assert str(hls.FixedType.parse("fixed<16,6>")) == "fixed<16,6,RND,SAT>"
    assert str(hls.FixedType.parse("ap_fixed<8,3,TRN,WRAP>")) == "fixed<8,3,TRN,WRAP>"
    assert hls.FixedType.parse("fixed<16,6>").fitting(np.array([0.9, -0.2])).integer == 1
    assert hls.FixedType.parse("fixed<16,6>").fitting(np.array([3.5])).integer == 3
    grid = hls.FixedType.covering(0.05, 0, "uint8")  # 0 .. 12.75 in steps of 0.05
    assert grid.integer == 5 and 2 ** -(grid.width - grid.integer) <= 0.05
