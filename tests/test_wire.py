"""int8 on the wire: real bytes, runtime counts equal the manifest, fidelity against fp32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import EXAMPLE, run_folder
from lcpc.pipeline import convert as convert_model
from lcpc.compress.wire import WireQuant


@pytest.fixture(scope="module")
def folders(tmp_path_factory, digits_calib):
    calib, _ = digits_calib
    root = tmp_path_factory.mktemp("wire")
    out = {}
    for wire in ("fp32", "int8"):
        convert_model(EXAMPLE, root / wire, 2, sync="all", calib=calib if wire == "int8" else None, wire=wire)
        out[wire] = root / wire
    return out


def test_int8_wire_moves_4x_fewer_bytes_and_counts_them(folders, digits_calib):
    _, x_test = digits_calib
    y32, s32, m32 = run_folder(folders["fp32"], {"input": x_test})
    y8, s8, m8 = run_folder(folders["int8"], {"input": x_test})
    assert m32["totals"]["bytes_per_inference"] >= 3.5 * m8["totals"]["bytes_per_inference"]
    for stats, manifest in ((s32, m32), (s8, m8)):  # transfer by transfer, runtime = manifest
        for t in manifest["transfers"]:
            assert stats.bytes_by_transfer[t["id"]] == t["bytes"] * stats.samples
    for t in m8["transfers"]:
        assert t["dtype"] in ("uint8", "int8") and t["quantization"]["range_from"] == "calibration"
    agree = (y8["logits"].argmax(1) == y32["logits"].argmax(1)).mean()
    assert agree >= 0.995


def test_quantize_dequantize_live_in_the_stage_files(folders):
    from lcpc.runtime import manifest as mf

    manifest = mf.read(folders["int8"]).json
    ops = {s["id"]: {n.op_type for n in onnx.load(folders["int8"] / s["file"]).graph.node}
           for s in manifest["stages"]}
    senders = {t["from"]["stage"] for t in manifest["transfers"]}
    receivers = {t["to"]["stage"] for t in manifest["transfers"]}
    assert all("QuantizeLinear" in ops[s] for s in senders)
    assert all("DequantizeLinear" in ops[s] for s in receivers)


def test_default_ranges_without_calibration(tmp_path):
    manifest = convert_model(EXAMPLE, tmp_path / "o", 2, wire="int8")
    assert {t["quantization"]["range_from"] for t in manifest["transfers"]} == {"default"}
    x = np.random.default_rng(1).random((4, 1, 8, 8), dtype=np.float32)
    y, stats, m = run_folder(tmp_path / "o", {"input": x})
    assert stats.total() == m["totals"]["bytes_per_inference"] * 4 and np.isfinite(y["logits"]).all()


@pytest.mark.parametrize("lo,hi", [(0.0, 6.0), (-3.0, 1.0), (-1e-3, 5.0), (0.0, 0.0)])
def test_wire_quant_error_is_half_a_step(lo, hi):
    q = WireQuant.from_range(lo, hi, "calibration")
    x = np.linspace(lo, hi, 1001, dtype=np.float32)
    back = (q.quantize(x).astype(np.float32) - q.zero_point) * np.float32(q.scale)
    assert np.abs(back - x).max() <= q.scale / 2 * (1 + 1e-4) + 1e-7
    assert q.dtype == ("uint8" if lo >= 0 else "int8")


def test_recover_keeps_the_int8_wire_and_stages(tmp_path, digits_calib):
    from lcpc.pipeline import recover

    calib, x_test = digits_calib
    convert_model(EXAMPLE, tmp_path / "q", 2, calib=calib, quantize="int8-all", wire="int8")
    out = recover(tmp_path / "q", calib, tmp_path / "r", epochs=0)
    assert out["compression"] == {"quantize": "int8-all", "wire": "int8"}
    assert all(t["dtype"] in ("uint8", "int8") for t in out["transfers"])
    assert any((s.get("format") or {}).get("format") == "int8" for s in out["stages"])
    _, stats, m = run_folder(tmp_path / "r", {"input": x_test[:8]})
    assert stats.total() == m["totals"]["bytes_per_inference"] * 8
