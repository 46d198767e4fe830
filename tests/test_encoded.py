"""The camera's own image file on the wire (``--input-wire encoded``) and the broadcast tree.

Exactness: the folder fed a file gives what the original model gives for the same file through the
same decoding (``images.decode``) and normalisation. Bytes: every input transfer counts the file's
real size. The network model: the binomial tree by hand, and ``--broadcast auto`` never predicted
slower than point to point."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import EXAMPLE, SHARED, reference
from hypothesis import given, settings
from hypothesis import strategies as st

from lcpc.cli import main
from lcpc.errors import LcpcError
from lcpc.images import Preprocessing, decode
from lcpc.perf import network
from lcpc.pipeline import convert, verify
from lcpc.runtime.deployment import Deployment, requests_from_source
from lcpc.runtime.feeds import Stats, encoded
from lcpc.runtime.local import LocalEngine
from lcpc.runtime.manifest import Manifest
from lcpc.runtime.order import broadcast_tree

PIL = pytest.importorskip("PIL.Image")
DIGITS = {"size": [8, 8], "channels": "L", "scale": 0.0625}
RGB = {"size": [32, 32], "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory):
    """Test digits as lossless 8x8 PNGs (pixels 0..16), and the float images they decode to."""
    folder = tmp_path_factory.mktemp("pngs")
    x = np.load(EXAMPLE.parent / "test.npy")[:12]
    for i, img in enumerate(x):
        PIL.fromarray(np.rint(img[0] * 16).astype(np.uint8), mode="L").save(folder / f"{i:02d}.png")
    return folder, x


@pytest.fixture(scope="module")
def rgb_jpegs(tmp_path_factory):
    """Photo-like JPEGs of other sizes than the model's 32x32 (decoding resizes and crops them)."""
    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(48, 64), (40, 40), (64, 36), (33, 90)]):
        base = np.linspace(0, 255, h * w * 3).reshape(h, w, 3)
        PIL.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)).save(
            folder / f"{i}.jpg", quality=85)
    return folder


def _files(folder):
    return sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))


@pytest.mark.parametrize("orientation, undo", [(1, None), (3, "ROTATE_180"), (6, "ROTATE_270"), (8, "ROTATE_90")])
def test_exif_orientation_is_undone_before_resizing(orientation, undo):
    """A camera's JPEG stored sideways with an EXIF Orientation tag decodes upright: the same pixels
    as the upright image, and a copy is made only when the tag asks for a turn."""
    rng = np.random.default_rng(orientation)
    stored = PIL.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = PIL.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif)  # lossless: the pixels compare exactly
    upright = stored.transpose(getattr(PIL.Transpose, undo)) if undo else stored
    prep = Preprocessing.from_dict(RGB)
    assert np.array_equal(decode(buf.getvalue(), prep)[0], prep.raw(upright))


def test_digits_from_png_files_equal_the_original_and_count_the_files(tmp_path, digit_pngs):
    folder, x = digit_pngs
    m = convert(EXAMPLE, tmp_path / "enc", 4, "all", preprocessing=DIGITS, input_wire="encoded")
    assert m["source"]["encoded"]["nominal_bytes"] == 64 // 10 and m["broadcast"] in ("p2p", "tree")
    inputs = [t for t in m["transfers"] if t["kind"] == "input"]
    assert inputs and all(t["encoded"] and t["bytes"] == 6 for t in inputs)
    with LocalEngine(tmp_path / "enc") as engine:
        for path, want_x in zip(_files(folder), x):
            blob = path.read_bytes()
            stats = Stats()
            got = engine.run({"input": encoded(blob)}, stats)["logits"]
            want = reference(EXAMPLE, {"input": want_x[None]})[0]  # PNG is lossless: the float test image
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            assert all(stats.bytes_by_transfer[t["id"]] == len(blob) for t in inputs)
            assert all(stats.bytes_by_transfer[t["id"]] == t["bytes"] for t in m["transfers"] if t["kind"] != "input")


@pytest.mark.parametrize("sync", ["all", "none"])
def test_rgb_jpegs_equal_the_original_fed_the_same_decoding(tmp_path, rgb_jpegs, zoo_bytes, sync):
    convert(zoo_bytes["resnet_basic"], tmp_path / "enc", 3, sync, preprocessing=RGB, input_wire="encoded",
            broadcast="tree")
    convert(zoo_bytes["resnet_basic"], tmp_path / "raw", 3, sync, preprocessing=RGB, input_wire="uint8")
    prep = Preprocessing.from_dict(RGB)
    with LocalEngine(tmp_path / "enc") as enc, LocalEngine(tmp_path / "raw") as raw:
        assert enc.manifest.broadcast == "tree" and enc.manifest.input_wire == "encoded"
        for path in _files(rgb_jpegs):
            blob = path.read_bytes()
            pixels = decode(blob, prep)
            got = next(iter(enc.run({"input": encoded(blob)}).values()))
            assert np.array_equal(got, next(iter(raw.run({"input": pixels}).values())))  # the same computation
            if sync == "all":
                want = reference(zoo_bytes["resnet_basic"], {"input": prep.normalize(pixels)})[0]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bad_feeds_and_unfit_models_are_refused(tmp_path, digit_pngs):
    convert(EXAMPLE, tmp_path / "enc", 2, "all", preprocessing=DIGITS, input_wire="encoded")
    with LocalEngine(tmp_path / "enc") as engine:
        with pytest.raises(LcpcError, match="fed the image file itself"):
            engine.run({"input": np.zeros((1, 1, 8, 8), np.uint8)})
        with pytest.raises(LcpcError, match="cannot read it as an image"):
            engine.run({"input": encoded(b"not an image at all")})
    with pytest.raises(LcpcError, match="--input-wire encoded needs the preprocessing"):
        convert(EXAMPLE, tmp_path / "x", 2, "all", input_wire="encoded")
    with pytest.raises(LcpcError, match="does not combine with --prune"):
        convert(EXAMPLE, tmp_path / "y", 2, "none", preprocessing=DIGITS, input_wire="encoded", prune=0.2,
                calib=np.zeros((4, 1, 8, 8), np.float32))


def test_serve_sends_files_and_verify_decodes_them_like_the_folder(tmp_path, digit_pngs):
    folder, x = digit_pngs
    convert(EXAMPLE, tmp_path / "enc", 4, "all", preprocessing=DIGITS, input_wire="encoded")
    manifest = Deployment(tmp_path / "enc").manifest
    requests, n = requests_from_source(folder, manifest)
    assert n == len(x) and [r.id for r in requests] == [p.name for p in _files(folder)]
    with Deployment(tmp_path / "enc") as dep:
        report = dep.serve(requests)
    assert report.answered == n and not report.failures
    sizes = sum(p.stat().st_size for p in _files(folder))
    assert dep.stats.total() - n * sum(t.bytes for t in manifest.transfers if t.kind != "input") == \
        sizes * len(manifest.order.inputs)
    y = np.load(EXAMPLE.parent / "test_labels.npy")[:len(x)]
    got = verify(tmp_path / "enc", [p.read_bytes() for p in _files(folder)], y)
    assert got["top1_agreement"] == 1.0 and got["max_rel_logit_error"] < 1e-5
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "enc"), "--data", str(folder), "--format", "json"])
    assert result.exit_code == 0 and json.loads(result.output)["top1_agreement"] == 1.0


def test_tree_arrivals_by_hand(tmp_path):
    """Seven receivers of n bytes over links of bandwidth bw and latency lat: round r's messages leave
    when their senders have the input; the head's uplink carries it only three times."""
    assert broadcast_tree(range(1, 8)) == [(0, 1), (0, 2), (1, 3), (0, 4), (1, 5), (2, 6), (3, 7)]
    n, bw, lat = 10_000, 1e6, 1e-3
    net = network.Network(default_link=network.Link(bw, lat))
    sizes = dict.fromkeys(range(1, 8), n)
    hop = n / bw + 2 * lat
    assert network.broadcast_time(sizes, net, "tree") == pytest.approx(3 * hop)
    assert network.broadcast_time(sizes, net, "p2p") == pytest.approx(7 * n / bw + 2 * lat)
    assert network.choose_broadcast(sizes, net) == "tree"
    assert network.choose_broadcast({1: 10, 2: 10, 3: 10}, net) == "p2p"  # tiny messages: latency decides


@settings(max_examples=60, deadline=None)
@given(k=st.integers(2, 9), size=st.integers(1, 10_000_000), mbit=st.floats(1, 10_000), lat_ms=st.floats(0.01, 20))
def test_auto_broadcast_is_never_predicted_slower(k, size, mbit, lat_ms):
    net = network.Network(default_link=network.Link(mbit * 1e6 / 8, lat_ms / 1e3))
    sizes = dict.fromkeys(range(1, k), size)
    chosen = network.choose_broadcast(sizes, net)
    assert network.broadcast_time(sizes, net, chosen) <= network.broadcast_time(sizes, net, "p2p")


def test_report_uses_the_measured_files(tmp_path, digit_pngs):
    folder, _ = digit_pngs
    convert(EXAMPLE, tmp_path / "enc", 4, "none", preprocessing=DIGITS, input_wire="encoded", broadcast="p2p")
    spec = tmp_path / "net.yaml"
    spec.write_text("links:\n  default: {bandwidth: 100Mbit, latency: 1ms}\n")
    median = int(np.median([p.stat().st_size for p in _files(folder)]))
    result = CliRunner().invoke(main, ["report", str(tmp_path / "enc"), "--network", str(spec), "--images",
                                       str(folder)])
    assert result.exit_code == 0, result.output
    assert f"the input ({median} bytes, the image file (measured size)" in result.output
    assert "broadcast p2p: every device has it after" in result.output and "tree would take" in result.output


PHOTOS, LITE0 = SHARED / "photos", SHARED / "models" / "efficientnet_lite0.onnx"


@pytest.mark.skipif(not (LITE0.is_file() and PHOTOS.is_dir()), reason="../shared models/photos not present")
def test_photos_through_efficientnet_lite0_equal_the_original(tmp_path):
    prep = {"size": [224, 224], "mean": [127.0], "std": [128.0]}
    convert(LITE0, tmp_path / "enc", 2, "all", preprocessing=prep, input_wire="encoded")
    files = sorted(PHOTOS.glob("*.jpg"))[:4]
    got = verify(tmp_path / "enc", [p.read_bytes() for p in files])
    assert got["top1_agreement"] == 1.0 and got["max_rel_logit_error"] < 1e-4
    assert Manifest.parse(json.loads((tmp_path / "enc" / "manifest.json").read_text())).encoded
    assert io.BytesIO(files[0].read_bytes()).getbuffer().nbytes == files[0].stat().st_size
