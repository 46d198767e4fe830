"""Issue 4, done-means 4: the fidelity figures of `lcpc verify` against a hand
computation; `evaluate` on the digits example (exact plan: agreement 1, equal
accuracy; pure cut: far from it); reading image folders with a preprocessing spec."""

from __future__ import annotations

import json
import math
import shutil
import sys

import numpy as np
import onnx
import pytest
from conftest import EXAMPLE, SHARED, reference
from onnx import TensorProto, helper, numpy_helper

from examples.digits.data import load_split
from lcpc import pipeline
from lcpc.errors import LcpcError
from lcpc.fidelity import compare
from lcpc.images import Preprocessing, load_folder

# ----------------------------------------------------------------------------- compare, by hand
# Six classes, so top-5 can differ. Sample 0: the candidate is the reference shifted by
# +1 (same softmax). Samples 1 and 2: logits are ln of weights w = (9, 5, 4, 3, 2, 1)
# (sum 24), so softmax = w / 24, and the candidate swaps two classes; sample 2 is also
# shifted by +1000 (a naive softmax overflows there).
LN_W = np.log([9.0, 5.0, 4.0, 3.0, 2.0, 1.0])
REF = np.array([[3, 1, 0, -1, -2, -4], LN_W, LN_W + 1000.0])
CAND = np.array([[4, 2, 1, 0, -1, -3], LN_W[[1, 0, 2, 3, 4, 5]], LN_W[[0, 1, 2, 3, 5, 4]] + 1000.0])
LABELS = np.array([0, 1, 3])


def test_compare_matches_hand_computation():
    got = compare(REF, CAND, LABELS)
    # top-1: ref (0, 0, 0), cand (0, 1, 0)
    assert got["top1_agreement"] == pytest.approx(2 / 3)
    # top-5 leaves out the smallest class: ref (5, 5, 5), cand (5, 5, 4) -> 5/5, 5/5, 4/5
    assert got["top5_overlap"] == pytest.approx((1 + 1 + 0.8) / 3)
    assert got["top5_k"] == 5
    # KL of a two-class swap (i, j): (p_i - p_j) ln(p_i / p_j); sample 0 is 0 (shift)
    kl = [0.0, (9 - 5) / 24 * math.log(9 / 5), (2 - 1) / 24 * math.log(2)]
    assert got["kl_divergence"] == pytest.approx(sum(kl) / 3, rel=1e-9)
    # per sample max|r - c| / max|r|: 1/4, ln(9/5)/ln 9, ln 2/(1000 + ln 9)
    rel = [1 / 4, math.log(9 / 5) / math.log(9), math.log(2) / (1000 + math.log(9))]
    assert got["max_rel_logit_error"] == pytest.approx(max(rel), rel=1e-9)
    assert max(rel) == rel[1] > 0.26  # per-sample normalisation, not one global maximum
    # labels (0, 1, 3): ref right on sample 0 only, cand on samples 0 and 1
    assert got["reference_accuracy"] == pytest.approx(1 / 3)
    assert got["candidate_accuracy"] == pytest.approx(2 / 3)
    assert (got["samples"], got["classes"]) == (3, 6)


def test_compare_four_classes_and_identity():
    ref = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 5.0, 2.0], [2.0, 0.0, 0.0, 1.0]])
    cand = ref[:, ::-1].copy()  # every top-1 changes; the top-4 set of 4 classes cannot
    got = compare(ref, cand)
    assert got["top1_agreement"] == 0.0
    assert (got["top5_k"], got["top5_overlap"]) == (4, 1.0)
    # sample 0: |(1,2,3,4) - (4,3,2,1)| max 3 over max|r| 4; sample 1: |0-2|,|-1-5|,.. max 6 over 5
    assert got["max_rel_logit_error"] == pytest.approx(6 / 5)
    assert got["reference_accuracy"] is None and got["candidate_accuracy"] is None
    same = compare(ref, ref, np.array([3, 2, 0]))
    assert same["kl_divergence"] == 0.0 and same["max_rel_logit_error"] == 0.0
    assert same["top1_agreement"] == same["top5_overlap"] == same["reference_accuracy"] == 1.0
    json.dumps(got)  # plain Python numbers, ready for --format json


def test_compare_kl_direction():
    """KL(p || q) with p = softmax(ln 3, ln 1) = (3/4, 1/4) and q uniform:
    3/4 ln(3/2) + 1/4 ln(1/2) = 3/4 ln 3 - ln 2 (the reverse, KL(q || p), is ln 2 - 1/2 ln 3)."""
    got = compare(np.log([[3.0, 1.0]]), np.zeros((1, 2)))
    assert got["kl_divergence"] == pytest.approx(0.75 * math.log(3) - math.log(2), rel=1e-12)
    assert (got["top5_k"], got["top5_overlap"], got["top1_agreement"]) == (2, 1.0, 1.0)  # tie: class 0


@pytest.mark.parametrize("ref, cand, labels, match", [
    (np.zeros((3, 4)), np.zeros((3, 5)), None, "differ in shape"),
    (np.zeros(4), np.zeros(4), None, "expected \\(samples, classes\\)"),
    (np.zeros((2, 4)), np.array([[0, 0, 0, np.nan]] * 2), None, "candidate logits: contains NaN"),
    (np.zeros((2, 4)), np.zeros((2, 4)), np.array([0, 4]), "outside the model's classes 0..3"),
    (np.zeros((2, 4)), np.zeros((2, 4)), np.array([0, 1, 2]), "labels: shape"),
    (np.zeros((2, 4)), np.zeros((2, 4)), np.array([0.0, 1.0]), "integer class indices"),
])
def test_compare_refuses_bad_input(ref, cand, labels, match):
    with pytest.raises(LcpcError, match=match):
        compare(ref, cand, labels)


# ----------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def digits_test():
    _, _, x, y = load_split()
    return x, y


@pytest.fixture(scope="module")
def digits_exact(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "k4_all"
    pipeline.convert(EXAMPLE, out, 4, "all")
    return out


def test_evaluate_exact_plan_on_digits(digits_exact, digits_test):
    x, y = digits_test
    got = pipeline.verify(digits_exact, x, y, batch_size=100)
    original_accuracy = float(np.mean(reference(EXAMPLE, {"input": x})[0].argmax(1) == y))
    assert original_accuracy == pytest.approx(448 / 450)  # examples/digits/metrics.json
    assert got["samples"] == 450 and got["top1_agreement"] == 1.0 and got["top5_overlap"] == 1.0
    assert got["max_rel_logit_error"] < 1e-4 and got["kl_divergence"] < 1e-8
    assert got["reference_accuracy"] == got["candidate_accuracy"] == original_accuracy
    assert (got["branches"], got["sync"], got["output"]) == (4, "all", "logits")
    assert got["original"]["matches_manifest"] and got["original"]["path"] == str(EXAMPLE)


def test_evaluate_pure_cut_is_far_from_the_original(tmp_path, digits_test):
    x, y = digits_test
    pipeline.convert(EXAMPLE, tmp_path / "out", 4, "none")
    got = pipeline.verify(tmp_path / "out", x, y)
    assert got["top1_agreement"] < 0.5 and got["candidate_accuracy"] < 0.5
    assert got["kl_divergence"] > 0.5 and got["max_rel_logit_error"] > 0.1
    assert got["reference_accuracy"] == pytest.approx(448 / 450)


def fixed_batch_digits() -> bytes:
    model = onnx.load(str(EXAMPLE))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    return model.SerializeToString()


def test_evaluate_pads_fixed_and_planned_batches(tmp_path, digits_test):
    """Original with a fixed batch of 1 (run per sample), plan pinned to batch 3,
    7 samples: the last group is padded, and padding is never scored."""
    x, y = digits_test[0][:7], digits_test[1][:7]
    pipeline.convert(EXAMPLE, tmp_path / "out", 2, "all", input_shapes={"input": (3, 1, 8, 8)})
    got = pipeline.verify(tmp_path / "out", x.astype(np.float64), y, original_model=fixed_batch_digits(), batch_size=4)
    assert got["samples"] == 7 and got["top1_agreement"] == 1.0 and got["max_rel_logit_error"] < 1e-4
    assert got["reference_accuracy"] == float(np.mean(reference(EXAMPLE, {"input": x})[0].argmax(1) == y))
    assert got["original"] == {"path": "<bytes>", "sha256": got["original"]["sha256"], "matches_manifest": False}


def test_evaluate_needs_the_original_model(tmp_path, digits_test, zoo_bytes):
    x = digits_test[0][:4]
    pipeline.convert(EXAMPLE.read_bytes(), tmp_path / "from_bytes", 2, "all")
    with pytest.raises(LcpcError, match="not there; pass --model PATH"):
        pipeline.verify(tmp_path / "from_bytes", x)
    assert pipeline.verify(tmp_path / "from_bytes", x, original_model=EXAMPLE)["original"]["matches_manifest"]

    copy = tmp_path / "model.onnx"
    shutil.copy(EXAMPLE, copy)
    pipeline.convert(copy, tmp_path / "from_copy", 2, "all")
    copy.write_bytes(zoo_bytes["vgg"])
    with pytest.raises(LcpcError, match="sha256 differs .* pass --model PATH"):
        pipeline.verify(tmp_path / "from_copy", x)
    with pytest.raises(LcpcError, match="original model takes input shape"):
        pipeline.verify(tmp_path / "from_copy", x, original_model=copy)


def two_input_model() -> bytes:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"]),
         helper.make_node("Conv", ["s", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["c"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "fc"], ["y"])],
        "two_inputs", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "fc")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_evaluate_refuses_bad_data(digits_exact, digits_test, tmp_path):
    x = digits_test[0][:4]
    with pytest.raises(LcpcError, match=r"data: shape \(4, 1, 8, 4\).*\(N, 1, 8, 8\)"):
        pipeline.verify(digits_exact, x[..., :4])
    with pytest.raises(LcpcError, match="dtype uint8, the model takes float32"):
        pipeline.verify(digits_exact, (x * 255).astype(np.uint8))
    with pytest.raises(LcpcError, match="labels: shape"):
        pipeline.verify(digits_exact, x, np.zeros(5, dtype=np.int64))
    pipeline.convert(two_input_model(), tmp_path / "two", 2, "all")
    with pytest.raises(LcpcError, match="2 inputs; verify takes single-input models"):
        pipeline.verify(tmp_path / "two", np.zeros((1, 3, 8, 8), np.float32))


# ----------------------------------------------------------------------------- images
def write_images(folder):
    from PIL import Image

    folder.mkdir()
    a = np.zeros((2, 4, 3), np.uint8)  # H=2, W=4: R = 10 col + 100 row, G = 50, B = 200 - 10 col
    for r in range(2):
        for c in range(4):
            a[r, c] = (10 * c + 100 * r, 50, 200 - 10 * c)
    Image.fromarray(a).save(folder / "a.png")
    Image.new("RGB", (10, 6), (255, 0, 128)).save(folder / "b.jpg", quality=100, subsampling=0)
    Image.fromarray(np.array([[0, 255], [64, 128]], np.uint8)).save(folder / "c.PNG")  # grayscale
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    Image.new("RGB", (2, 2)).save(folder / "sub" / "ignored.png")


def test_load_folder_by_hand(tmp_path):
    write_images(tmp_path / "imgs")
    prep = Preprocessing(size=(2, 2), mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0))
    x, names = load_folder(tmp_path / "imgs", prep)
    assert names == ["a.png", "b.jpg", "c.PNG"]
    assert x.shape == (3, 3, 2, 2) and x.dtype == np.float32
    # a.png: 4x2 already covers 2x2, no resampling; centre crop keeps columns 1 and 2
    np.testing.assert_array_equal(x[0, 0], [[(10 - 1) / 2, (20 - 1) / 2], [(110 - 1) / 2, (120 - 1) / 2]])
    np.testing.assert_array_equal(x[0, 1], np.full((2, 2), (50 - 2) / 4))
    np.testing.assert_array_equal(x[0, 2], [[(190 - 3) / 8, (180 - 3) / 8]] * 2)
    # b.jpg: solid (255, 0, 128), 10x6 resized to 3x2 then cropped: still solid (JPEG: +-2 levels)
    for c, (v, m, s) in enumerate(zip((255, 0, 128), (1, 2, 3), (2, 4, 8))):
        assert np.abs(x[1, c] - (v - m) / s).max() <= 2 / s
    # c.PNG: grayscale -> (v, v, v)
    for c, (m, s) in enumerate(zip((1, 2, 3), (2, 4, 8))):
        np.testing.assert_array_equal(x[2, c], (np.array([[0, 255], [64, 128]]) - m) / s)


def test_load_folder_bgr_nhwc_gray_and_crop_fraction(tmp_path):
    write_images(tmp_path / "imgs")
    bgr = Preprocessing(size=(2, 2), mean=(3.0, 2.0, 1.0), std=(8.0, 4.0, 2.0), layout="NHWC",
                        channels="BGR", dtype="float64", scale=0.5)
    x, _ = load_folder(tmp_path / "imgs", bgr)
    assert x.shape == (3, 2, 2, 3) and x.dtype == np.float64
    np.testing.assert_array_equal(x[0, :, :, 0], [[(190 * 0.5 - 3) / 8, (180 * 0.5 - 3) / 8]] * 2)  # B first
    np.testing.assert_array_equal(x[0, :, :, 2], [[(5 - 1) / 2, (10 - 1) / 2], [(55 - 1) / 2, (60 - 1) / 2]])
    gray, _ = load_folder(tmp_path / "imgs", Preprocessing(size=(2, 2), channels="L"))
    assert gray.shape == (3, 1, 2, 2)
    np.testing.assert_array_equal(gray[2, 0], [[0, 255], [64, 128]])
    # size 1x1 with crop_fraction 0.5: a.png needs no resampling (covers 2x2); centre pixel (0, 1)
    one, _ = load_folder(tmp_path / "imgs", Preprocessing(size=(1, 1), crop_fraction=0.5))
    np.testing.assert_array_equal(one[0, :, 0, 0], [10, 50, 190])
    stretch, _ = load_folder(tmp_path / "imgs", Preprocessing(size=(2, 4), resize="stretch"))
    np.testing.assert_array_equal(stretch[0, 0], [[0, 10, 20, 30], [100, 110, 120, 130]])


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("source, size, crop_fraction", [
    ((512, 320), (224, 224), 1.0), ((426, 320), (224, 224), 0.875), ((97, 61), (40, 30), 0.5), ((30, 40), (50, 60), 1.0),
])
def test_resizing_the_crop_equals_resizing_the_image_then_cropping(interpolation, source, size, crop_fraction):
    """The shorter-side resize resamples only the kept pixels: within Pillow's two-pass rounding
    of resizing the whole image and cropping (2 levels on a few values), exactly for nearest."""
    from PIL import Image

    iw, ih = source
    yy, xx = np.mgrid[0:ih, 0:iw]
    smooth = 127 + 90 * np.sin(xx / 9.0)[..., None] * np.cos(yy / 7.0)[..., None] * np.array([1.0, 0.6, -0.8])
    noise = np.random.default_rng(iw).normal(0, 6, (ih, iw, 3))
    image = Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))
    prep = Preprocessing(size=size, crop_fraction=crop_fraction, interpolation=interpolation)
    h, w = size
    s = max(h / ih, w / iw) / crop_fraction
    nw, nh = max(w, round(iw * s)), max(h, round(ih * s))
    left, top = (nw - w) // 2, (nh - h) // 2
    resample = {"nearest": 0, "bilinear": 2, "bicubic": 3}[interpolation]
    whole = np.asarray(image.resize((nw, nh), resample).crop((left, top, left + w, top + h))).transpose(2, 0, 1)
    diff = np.abs(prep.raw(image).astype(int) - whole)
    if interpolation == "nearest":
        assert diff.max() == 0
    else:
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01


def test_load_folder_errors(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    prep = Preprocessing(size=(2, 2))
    with pytest.raises(LcpcError, match="empty: no images found"):
        load_folder(tmp_path / "empty", prep)
    with pytest.raises(LcpcError, match="no such folder"):
        load_folder(tmp_path / "missing", prep)
    write_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "b2_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(LcpcError, match="b2_broken.jpg: cannot read it as an image"):
        load_folder(tmp_path / "imgs", prep)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(LcpcError, match=r"needs Pillow: pip install 'lcpc\[images\]'"):
        load_folder(tmp_path / "imgs", prep)


@pytest.mark.parametrize("kwargs, match", [
    ({"size": (0, 224)}, "size=\\(0, 224\\): must be two positive integers"),
    ({"size": (224,)}, "size"),
    ({"size": (2, 2), "mean": (1.0, 2.0)}, "mean=\\(1.0, 2.0\\): must be 1 or 3"),
    ({"size": (2, 2), "channels": "L", "std": (1.0, 2.0, 3.0)}, "std=.*must be 1 or 1"),
    ({"size": (2, 2), "std": (0.0,)}, "std=.*must not contain 0"),
    ({"size": (2, 2), "layout": "CHW"}, "layout='CHW': must be one of NCHW, NHWC"),
    ({"size": (2, 2), "crop_fraction": 1.5}, "crop_fraction=1.5"),
    ({"size": (2, 2), "scale": float("nan")}, "scale=nan"),
    ({"size": (2, 2), "dtype": "int8"}, "dtype='int8'"),
])
def test_preprocessing_validates_itself(kwargs, match):
    with pytest.raises(LcpcError, match=match):
        Preprocessing(**kwargs)


def test_preprocessing_round_trips_through_json():
    prep = Preprocessing(size=(224, 224), scale=1 / 255, crop_fraction=0.875,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channels="BGR")
    stored = json.loads(json.dumps(prep.to_dict()))
    assert stored["size"] == [224, 224] and Preprocessing.from_dict(stored) == prep
    with pytest.raises(LcpcError, match="unknown key\\(s\\) colour"):
        Preprocessing.from_dict({**stored, "colour": "RGB"})
    with pytest.raises(LcpcError, match="'size' \\(H, W\\) is required"):
        Preprocessing.from_dict({"mean": [0]})


# ----------------------------------------------------------------------------- real photos
LITE0 = SHARED / "models" / "efficientnet_lite0.onnx"
PHOTOS = SHARED / "photos"


@pytest.mark.skipif(not (LITE0.is_file() and PHOTOS.is_dir()), reason="../shared models/photos not present")
def test_efficientnet_lite0_on_photos(tmp_path):
    prep = Preprocessing(size=(224, 224), mean=(127.0,), std=(128.0,))  # its training preprocessing
    x, names = load_folder(PHOTOS, prep)
    assert x.shape == (len(names), 3, 224, 224) and len(names) >= 10
    assert -1.0 <= x.min() and x.max() <= 1.0  # (0 - 127) / 128 .. (255 - 127) / 128
    pipeline.convert(LITE0, tmp_path / "out", 2, "all")
    got = pipeline.verify(tmp_path / "out", x)
    assert got["top1_agreement"] == 1.0 and got["max_rel_logit_error"] < 1e-4
    top1 = dict(zip(names, np.concatenate([reference(LITE0, {"input": s[None]})[0] for s in x]).argmax(1)))
    print({n: int(c) for n, c in top1.items()})
    # ImageNet classes: 301 ladybug, 971 bubble, 985 daisy
    assert top1["20_LadyBird.jpg"] == 301 and top1["14_Aqua.jpg"] == 971
    assert top1["17_FreshFlower.jpg"] == top1["25_YellowFlower.jpg"] == 985
    assert len(set(top1.values())) >= 6
