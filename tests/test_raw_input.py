"""uint8 input on the wire: with the preprocessing known, the model input is fed and sent as the raw
image (a quarter of the float32 bytes), each consuming stage applies the preprocessing, and the
outputs equal the float input preprocessed in numpy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import EXAMPLE, reference, run_folder
from lcpc import pipeline
from lcpc.cli import main
from lcpc.errors import LcpcError
from lcpc.images import Preprocessing, load_folder
from lcpc.runtime.manifest import read

# sklearn's digits are integers 0..16; the example model takes them divided by 16
DIGITS = Preprocessing(size=(8, 8), channels="L", scale=1 / 16, mean=(0.0,), std=(1.0,))
RGB = Preprocessing(size=(32, 32), scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def digits_raw() -> np.ndarray:
    x = np.load(EXAMPLE.parent / "sample.npy")
    return np.round(x * 16).astype(np.uint8)


def convert_pair(model, tmp_path, k, sync, prep):
    raw = pipeline.convert(model, tmp_path / f"raw-{sync}", k, sync, preprocessing=prep.to_dict())
    flt = pipeline.convert(model, tmp_path / f"float-{sync}", k, sync)
    return (tmp_path / f"raw-{sync}", raw), (tmp_path / f"float-{sync}", flt)


@pytest.mark.parametrize("sync", ["none", "all"])
def test_digits_raw_input_equals_float_and_quarter_bytes(tmp_path, sync):
    (raw_dir, raw_m), (float_dir, float_m) = convert_pair(EXAMPLE, tmp_path, 4, sync, DIGITS)
    assert raw_m["source"]["feeds"] == [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "uint8"}]
    assert "feeds" not in float_m["source"]
    x = digits_raw()
    got, raw_stats, _ = run_folder(raw_dir, {"input": x})
    want, float_stats, _ = run_folder(float_dir, {"input": DIGITS.normalize(x)})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    raw_in = [t for t in raw_m["transfers"] if t["kind"] == "input"]
    float_in = [t for t in float_m["transfers"] if t["kind"] == "input"]
    assert len(raw_in) == len(float_in) == 3
    for r, f in zip(raw_in, float_in):
        assert r["dtype"] == "uint8" and 4 * r["bytes"] == f["bytes"]
        assert raw_stats.bytes_by_transfer[r["id"]] == len(x) * r["bytes"]  # measured equals the manifest
        assert 4 * raw_stats.bytes_by_transfer[r["id"]] == float_stats.bytes_by_transfer[f["id"]]
    for t in raw_m["transfers"]:
        assert raw_stats.bytes_by_transfer[t["id"]] == len(x) * t["bytes"]
    assert float_m["totals"]["bytes_per_inference"] - raw_m["totals"]["bytes_per_inference"] == \
        sum(f["bytes"] - r["bytes"] for r, f in zip(raw_in, float_in))


def test_every_consuming_stage_starts_with_the_prologue(tmp_path):
    (raw_dir, m), _ = convert_pair(EXAMPLE, tmp_path, 4, "none", DIGITS)
    fed = {(0, "input")} | {(t["to"]["device"], t["to"]["name"]) for t in m["transfers"] if t["kind"] == "input"}
    consumers = [s for s in m["stages"] if any((s["device"], i["name"]) in fed for i in s["inputs"])]
    assert {s["device"] for s in consumers} == {0, 1, 2, 3}
    for s in consumers:
        graph = onnx.load(raw_dir / s["file"]).graph
        raw = next(i for i in graph.input if (s["device"], i.name) in fed)
        assert raw.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        chain = [n for n in graph.node if raw.name in n.input]
        assert [n.op_type for n in chain] == ["Cast"]  # the uint8 image feeds only the prologue


def test_zoo_rgb_raw_input_equals_the_original(tmp_path, zoo_bytes):
    model = zoo_bytes["resnet_basic"]
    folder = tmp_path / "rgb"
    m = pipeline.convert(model, folder, 3, "all", preprocessing=RGB.to_dict())
    assert m["source"]["feeds"][0]["dtype"] == "uint8"
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    got, stats, _ = run_folder(folder, {"input": x})
    want = np.concatenate([reference(model, {"input": RGB.normalize(x[i:i + 1])})[0] for i in range(2)])
    np.testing.assert_allclose(got[m["outputs"][0]["name"]], want, rtol=1e-4, atol=1e-5)
    for t in m["transfers"]:
        assert stats.bytes_by_transfer[t["id"]] == 2 * t["bytes"]


def test_input_wire_choice(tmp_path):
    wrong = Preprocessing(size=(16, 16), channels="L")
    for wire in ("auto", "float", "uint8", "encoded"):  # images that cannot feed the model: refused whatever the wire
        with pytest.raises(LcpcError, match=r"--preprocess: the model input 'input' has shape \[1, 1, 8, 8\], "
                                            r"the preprocessing .* gives \[1, 1, 16, 16\]"):
            pipeline.convert(EXAMPLE, tmp_path / wire, 2, "none", preprocessing=wrong.to_dict(), input_wire=wire)
        assert not (tmp_path / wire).exists()
    with pytest.raises(LcpcError, match="needs the preprocessing"):
        pipeline.convert(EXAMPLE, tmp_path / "u8", 2, "none", input_wire="uint8")
    m = pipeline.convert(EXAMPLE, tmp_path / "float", 2, "none", preprocessing=DIGITS.to_dict(), input_wire="float")
    assert "feeds" not in m["source"] and m["transfers"][0]["dtype"] == "float32"


def test_float_feed_to_a_raw_folder_says_what_to_do(tmp_path):
    (raw_dir, _), _ = convert_pair(EXAMPLE, tmp_path, 2, "none", DIGITS)
    np.save(tmp_path / "x.npy", DIGITS.normalize(digits_raw()))
    result = CliRunner().invoke(main, ["run", str(raw_dir), "--input", str(tmp_path / "x.npy")])
    assert result.exit_code != 0 and "takes the raw image as uint8" in result.output
    assert "Traceback" not in result.output
    np.save(tmp_path / "u8.npy", digits_raw())
    out = CliRunner().invoke(main, ["run", str(raw_dir), "--input", str(tmp_path / "u8.npy"),
                                    "--stats", str(tmp_path / "s.json")])
    assert out.exit_code == 0, out.output
    stats = json.loads((tmp_path / "s.json").read_text())
    assert all(r["bytes"] == 16 * r["manifest_bytes_per_inference"] for r in stats["transfers"])


def test_manifest_feeds_are_validated(tmp_path):
    (raw_dir, m), _ = convert_pair(EXAMPLE, tmp_path, 2, "none", DIGITS)
    from lcpc.runtime.manifest import validate

    validate(m)
    bad = json.loads(json.dumps(m))
    bad["source"]["feeds"][0]["dtype"] = "float32"
    with pytest.raises(LcpcError, match="must be the uint8 image"):
        validate(bad)
    bad = json.loads(json.dumps(m))
    bad["source"]["preprocessing"] = None
    with pytest.raises(LcpcError, match="without source.preprocessing"):
        validate(bad)
    bad = json.loads(json.dumps(m))
    bad["source"]["feeds"][0]["colour"] = "RGB"
    with pytest.raises(LcpcError, match="invalid manifest"):
        validate(bad)
    assert read(raw_dir).json["source"]["feeds"] == m["source"]["feeds"]


@pytest.mark.parametrize("prep", [
    Preprocessing(size=(2, 3), mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0), scale=1 / 255),
    Preprocessing(size=(2, 3), mean=(3.0, 2.0, 1.0), std=(8.0, 4.0, 2.0), layout="NHWC", channels="BGR"),
    Preprocessing(size=(2, 3), channels="L", mean=(127.0,), std=(128.0,)),
])
def test_raw_then_normalize_is_apply(tmp_path, prep):
    Image = pytest.importorskip("PIL.Image")
    pixels = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(pixels).save(tmp_path / "imgs" / "a.png")
    x, _ = load_folder(tmp_path / "imgs", prep)
    raw, _ = load_folder(tmp_path / "imgs", prep, raw=True)
    assert raw.dtype == np.uint8 and raw.shape == x.shape == prep.input_shape(1)
    np.testing.assert_array_equal(prep.normalize(raw), x)


def test_verify_reads_raw_images_for_a_raw_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    (raw_dir, _), _ = convert_pair(EXAMPLE, tmp_path, 4, "all", DIGITS)
    (tmp_path / "imgs").mkdir()
    for i, sample in enumerate(digits_raw()[:6]):
        Image.fromarray(sample[0]).save(tmp_path / "imgs" / f"{i}.png")
    result = CliRunner().invoke(main, ["verify", str(raw_dir), "--data", str(tmp_path / "imgs"), "--format", "json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["samples"] == 6 and figures["top1_agreement"] == 1.0 and figures["max_rel_logit_error"] < 1e-4


def test_uint8_input_does_not_combine_with_compression_yet(tmp_path):
    with pytest.raises(LcpcError, match="--input-wire uint8 does not combine"):
        pipeline.convert(EXAMPLE, tmp_path / "q", 2, "none", preprocessing=DIGITS.to_dict(), input_wire="uint8",
                         wire="int8")
    assert not (tmp_path / "q").exists()
    m = pipeline.convert(EXAMPLE, tmp_path / "auto", 2, "none", preprocessing=DIGITS.to_dict(), wire="int8")
    assert "feeds" not in m["source"]  # auto keeps the float input under compression
