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
    back = (q.quantize(x).astype(np.float32) - q.zero_point[0]) * np.float32(q.scale[0])
    assert np.abs(back - x).max() <= q.scale[0] / 2 * (1 + 1e-4) + 1e-7
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


@pytest.mark.parametrize("lo, hi", [((0.0, -2.0, 0.5), (6.0, 1.0, 0.5)), ((0.0, 0.0), (3.0, 40.0))])
def test_per_channel_error_is_half_of_each_channels_step(lo, hi):
    q = WireQuant.from_range(np.array(lo), np.array(hi), "calibration", axis=1)
    assert q.axis == 1 and len(q.scale) == len(lo) and q.dtype == ("uint8" if min(lo) >= 0 else "int8")
    x = np.stack([np.linspace(a, b, 501, dtype=np.float32) for a, b in zip(lo, hi)])[None]  # (1, C, 501)
    back = (q.quantize(x).astype(np.float32) - np.array(q.zero_point)[None, :, None]) * \
        np.array(q.scale, np.float32)[None, :, None]
    step = np.array(q.scale)[None, :, None]
    assert (np.abs(back - x) <= step / 2 * (1 + 1e-4) + 1e-7).all()
    assert np.array(q.scale)[np.argmax(np.array(hi) - np.array(lo))] == max(q.scale)  # each channel its own step


@pytest.fixture(scope="module")
def coded(tmp_path_factory, digits_calib):
    calib, _ = digits_calib
    root = tmp_path_factory.mktemp("coded")
    for wire in ("int8", "int8-channel"):
        for code in ("none", "deflate"):
            convert_model(EXAMPLE, root / f"{wire}-{code}", 4, "none", calib=calib, wire=wire, wire_code=code)
    return root


def test_per_channel_scales_are_recorded_and_used(coded, digits_calib):
    _, x_test = digits_calib
    y, stats, m = run_folder(coded / "int8-channel-none", {"input": x_test[:64]})
    channel = [t for t in m["transfers"] if isinstance(t["quantization"]["scale"], list)]
    assert channel and all(t["quantization"]["axis"] == 1 and len(t["quantization"]["scale"]) == t["shape"][1]
                           for t in channel)
    assert all(stats.bytes_by_transfer[t["id"]] == 64 * t["bytes"] for t in m["transfers"])
    y8, _, _ = run_folder(coded / "int8-none", {"input": x_test[:64]})
    assert (y["logits"].argmax(1) == y8["logits"].argmax(1)).mean() >= 0.95


@pytest.mark.parametrize("wire", ["int8", "int8-channel"])
def test_deflate_is_lossless_and_counts_the_coded_bytes(coded, digits_calib, wire):
    """The coded folder computes exactly what the uncoded one does; its engines count the coded bytes,
    which the manifest's nominal (mean on --calib) predicts closely, and fewer than the int8 ones."""
    _, x_test = digits_calib
    plain, plain_stats, _ = run_folder(coded / f"{wire}-none", {"input": x_test[:100]})
    got, stats, m = run_folder(coded / f"{wire}-deflate", {"input": x_test[:100]})
    assert np.array_equal(got["logits"], plain["logits"])
    coded_ = [t for t in m["transfers"] if t.get("coding") == "deflate"]
    assert coded_ and all(t["bytes"] < np.prod(t["shape"]) for t in coded_)  # coded only where it shrinks
    assert all(np.prod(t["shape"]) <= 16 for t in m["transfers"] if "coding" not in t)  # the 10 logits stay
    assert stats.total() < plain_stats.total()
    assert abs(stats.total() / (100 * m["totals"]["bytes_per_inference"]) - 1) < 0.1
    assert m["compression"]["wire_code"] == "deflate"


def test_deflate_needs_an_int8_wire(tmp_path):
    from lcpc.errors import LcpcError

    with pytest.raises(LcpcError, match="--wire-code deflate codes int8 messages"):
        convert_model(EXAMPLE, tmp_path / "x", 2, "none", wire_code="deflate")
