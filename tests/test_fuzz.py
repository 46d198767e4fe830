"""Issue 5, done-means 3 (and issue 25): fuzz everything lcpc reads from elsewhere.

Hypothesis fuzzers, each asserting that the code under test either returns a
result or raises ``LcpcError`` with a non-empty one-line message — any other exception
type is a bug, and a hang is stopped by a per-example watchdog that dumps the stack and
fails the run; the issue-25 fuzzers also fail on any Python warning:

- ``frontend.load`` on byte mutations (bit flips, truncations, splices, overwrites) of
  the small valid corpus models;
- ``frontend.load`` on structural mutations: any field of any protobuf message of a
  valid model set to an edge value (negative, 0, 2^31, 2^63-1, 10^12, NaN, names that
  escape the folder, control characters), repeated fields dropped or duplicated; the
  model is loaded from a folder whose neighbour ``outside/secret.bin`` must never be
  opened;
- ``manifest.read`` (and, when it accepts, ``LocalEngine`` and one run) on mutated
  manifests: JSON values replaced, removed, duplicated or swapped, and raw text edits;
- ``devices.load`` on mutated ``devices.yaml`` files (the corpus's, with anchors, aliases, merge
  keys, brackets, tags and edge numbers spliced in);
- ``parse_preprocessing`` on specs built from edge keys and values; an accepted spec must
  normalise the darkest and brightest pixels to finite numbers without a warning;
- ``load_folder`` on mutated JPEG and PNG bytes (header sizes included);
- when atheris is installed, coverage-guided fuzzing of the model loader and the manifest reader
  (``fuzz_atheris.py``).

CI runs a fixed, derandomised set of examples (well under a minute on 2 cores).
``LCPC_FUZZ_EXAMPLES=N`` runs N fresh random examples per fuzzer instead.
"""

from __future__ import annotations

import copy
import faulthandler
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from audit import audited, opened
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from lcpc import frontend
from lcpc.runtime import manifest as mf
from lcpc import pipeline
from lcpc.cli import parse_preprocessing
from lcpc.errors import LcpcError
from lcpc.images import Preprocessing, load_folder
from lcpc.perf import devices
from lcpc.runtime.local import LocalEngine

CORPUS = Path(__file__).resolve().parent / "corpus" / "models"


def _generated_seeds() -> list[bytes]:
    """Small valid models with the ops whose values decide sizes and running times."""
    from corpus.build import around, ints, loop
    from onnx import helper

    sizes = around([helper.make_node("Range", ["a", "b", "c"], ["r"]),
                    helper.make_node("ConstantOfShape", ["shape"], ["k"],
                                     value=numpy_helper.from_array(np.ones(1, np.int64))),
                    helper.make_node("Tile", ["k", "reps"], ["t"]),
                    helper.make_node("ReduceSum", ["r"], ["rs"], keepdims=0),
                    helper.make_node("Expand", ["rs", "shape"], ["e"]),
                    helper.make_node("Add", ["t", "e"], ["big"])],
                   [ints("a", 0), ints("b", 100), ints("c", 1), ints("shape", [2, 3]), ints("reps", [2, 1])], "big")
    return [loop(3).SerializeToString(), sizes.SerializeToString()]


SEEDS = [(CORPUS / f).read_bytes() for f in ("good.onnx", "rich.onnx", "constant_weights.onnx", "opset9.onnx")]
SEEDS += _generated_seeds()
WATCHDOG_S = 60  # one example taking this long is a hang: dump the stacks and stop the run

_EXPLORE = int(os.environ.get("LCPC_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int):
    return settings(max_examples=_EXPLORE or examples, derandomize=not _EXPLORE, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def outcome(call, quiet: bool = False) -> str:
    """Run ``call`` under the watchdog: 'ok', or 'refused' for an LcpcError with a proper message;
    ``quiet``: a Python warning is an error too."""
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("error")
            call()
        return "ok"
    except LcpcError as exc:
        message = str(exc)
        assert message.strip() and "\n" not in message, repr(message)
        return "refused"
    finally:
        faulthandler.cancel_dump_traceback_later()


STATS: dict[str, dict[str, int]] = {}


def count(fuzzer: str, result: str) -> None:
    STATS.setdefault(fuzzer, {}).setdefault(result, 0)
    STATS[fuzzer][result] += 1


@pytest.fixture(scope="module", autouse=True)
def report_stats():
    yield
    for fuzzer, results in STATS.items():
        print(f"\n{fuzzer}: {sum(results.values())} examples, {results}", file=sys.stderr)


# ----------------------------------------------------------------------------- byte mutations
@st.composite
def mutated_bytes(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "flip", "truncate", "splice", "overwrite", "delete", "duplicate"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "splice":
            other = draw(st.sampled_from(SEEDS))
            start = draw(st.integers(0, len(other) - 1))
            data[pos:pos] = other[start:start + draw(st.integers(1, 64))]
        elif kind == "overwrite":
            chunk = draw(st.sampled_from([b"\xff\xff\xff\xff\x0f", b"\x80" * 10 + b"\x01", b"\x00", b"\x7f"])
                         | st.binary(min_size=1, max_size=8))
            data[pos:pos + len(chunk)] = chunk
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        else:
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 32))]
    return bytes(data)


@fuzz_settings(400)
@given(data=mutated_bytes())
def test_load_survives_byte_mutations(data):
    count("bytes", outcome(lambda: frontend.load(data)))


# ----------------------------------------------------------------------------- structural mutations
INTS = [0, 1, -1, 2, 3, 4, 7, 8, 9, 13, 17, 99, 255, 2**24 + 1, 2**31 - 1, 2**31, -(2**31), 2**32,
        2**63 - 1, -(2**63), 10**12]
FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-45, 1e38, math.inf, -math.inf, math.nan]
STRINGS = ["", "x", "y", "w", "c", "r", "N", "Conv", "Relu", "Reshape", "Loop", "If", "Scan", "ConstantOfShape",
           "Range", "Expand", "Tile", "Resize", "NonZero", "com.example", "ai.onnx", "location",
           "../outside/secret.bin", "/etc/passwd", "external_ok.bin", "\x1b[2J\x1b[31m", "a" * 300]
RAW = [b"", b"\x00", b"\x00" * 4, b"\xff" * 7, b"../outside/secret.bin",
       *(np.array(v, np.int64).tobytes() for v in (10**12, -1, 0, 2**62, [10**6, 10**6], [0, 10**12], [-1, 3]))]


def _messages(msg, out: list) -> list:
    out.append(msg)
    for fd, value in msg.ListFields():
        if fd.type == fd.TYPE_MESSAGE:
            for v in (value if fd.is_repeated else [value]):
                _messages(v, out)
    return out


def _edge_value(draw, fd):
    if fd.type == fd.TYPE_ENUM:
        return draw(st.sampled_from([v.number for v in fd.enum_type.values]))
    if fd.type in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
        return draw(st.sampled_from(FLOATS))
    if fd.type == fd.TYPE_STRING:
        return draw(st.sampled_from(STRINGS))
    if fd.type == fd.TYPE_BYTES:
        return draw(st.sampled_from(RAW))
    if fd.type == fd.TYPE_BOOL:
        return draw(st.booleans())
    return draw(st.sampled_from(INTS))


def _mutate(draw, model: onnx.ModelProto) -> None:
    msg = draw(st.sampled_from(_messages(model, [])))
    if isinstance(msg, onnx.TensorProto) and draw(st.booleans()):  # a consistent tensor of another shape
        shape = draw(st.lists(st.integers(0, 5), max_size=4))
        dtype = draw(st.sampled_from([np.float32, np.int64, np.int32, np.float16, np.bool_, np.uint8]))
        value = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) - 2
        msg.CopyFrom(numpy_helper.from_array(value.astype(dtype), msg.name))
        return
    fd = draw(st.sampled_from(list(msg.DESCRIPTOR.fields)))
    repeated = fd.is_repeated
    if fd.type == fd.TYPE_MESSAGE:
        if repeated:
            items = getattr(msg, fd.name)
            action = draw(st.sampled_from(["drop", "duplicate", "clear"]))
            if action == "clear" or not items:
                msg.ClearField(fd.name)
            elif action == "drop":
                del items[draw(st.integers(0, len(items) - 1))]
            else:
                items.add().CopyFrom(items[draw(st.integers(0, len(items) - 1))])
        else:
            msg.ClearField(fd.name)
        return
    try:
        if repeated:
            items = getattr(msg, fd.name)
            if items and draw(st.booleans()):
                index = draw(st.integers(0, len(items) - 1))
                if draw(st.booleans()):
                    del items[index]
                else:
                    items[index] = _edge_value(draw, fd)
            else:
                items.append(_edge_value(draw, fd))
        else:
            setattr(msg, fd.name, _edge_value(draw, fd))
    except (ValueError, TypeError):  # out of range for this field's type: leave it
        pass


@st.composite
def mutated_models(draw) -> bytes:
    model = onnx.load_model_from_string(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        _mutate(draw, model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-model")
    (root / "model").mkdir()
    (root / "outside").mkdir()
    shutil.copy(CORPUS / "external_ok.bin", root / "model" / "external_ok.bin")
    shutil.copy(CORPUS / "external_ok.bin", root / "outside" / "secret.bin")
    return root


@fuzz_settings(400)
@given(data=mutated_models())
def test_load_survives_structural_mutations(model_folder, data):
    path = model_folder / "model" / "m.onnx"
    path.write_bytes(data)
    with audited() as events:
        result = outcome(lambda: frontend.load(path))
    assert not opened(events, model_folder / "outside" / "secret.bin")
    count("structure", result)


# ----------------------------------------------------------------------------- manifests
@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("fuzz-manifest") / "out"
    pipeline.convert(CORPUS / "good.onnx", out, 2)
    return out, (out / "manifest.json").read_text()


def _paths(doc, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


JSON_EDGES = st.sampled_from([None, True, 0, -1, 1, 2, 3, 63, 64, 10**20, 0.5, "", "x", "d0_l0", "d1_l0",
                              "d0_l0.onnx", "../d0_l0.onnx", "/etc/passwd", "x", "y", [], {}, [1, 3, 8, 8]])
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)


@st.composite
def mutated_manifests(draw, text: str) -> str:
    if draw(st.integers(0, 4)) == 0:  # raw text edits
        data = bytearray(text.encode())
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(data) - 1))
            if draw(st.booleans()):
                data[pos] = draw(st.sampled_from(b'{}[]",:0-9eE.\\ na'))
            else:
                del data[pos:pos + draw(st.integers(1, 40))]
        return data.decode("utf-8", errors="replace")
    doc = json.loads(text)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths[1:]))
        parent, key = _get(doc, path[:-1]), path[-1]
        action = draw(st.sampled_from(["edge", "edge", "value", "remove", "duplicate", "swap"]))
        if action == "edge":
            parent[key] = copy.deepcopy(draw(JSON_EDGES))  # the sampled lists are shared
        elif action == "value":
            parent[key] = draw(JSON_VALUES)
        elif action == "remove":
            del parent[key]
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        else:
            other = draw(st.sampled_from(paths[1:]))
            if other[:len(path)] != path and path[:len(other)] != other:
                value = copy.deepcopy(_get(doc, other))
                parent[key] = value
    return json.dumps(doc)


def _run_engine(folder: Path) -> None:
    engine = LocalEngine(folder)
    try:
        specs = engine.inputs
        if all(math.prod(s.shape) <= 1 << 16 for s in specs):
            engine.run({s.name: np.zeros(s.shape, s.dtype) for s in specs})
    finally:
        engine.close()


@fuzz_settings(400)
@given(data=st.data())
def test_manifest_read_survives_mutations(converted, data):
    folder, text = converted
    mutated = data.draw(mutated_manifests(text))
    (folder / "manifest.json").write_text(mutated)
    try:
        result = outcome(lambda: mf.read(folder))
        if result == "ok":
            result = "engine " + outcome(lambda: _run_engine(folder))
    finally:
        (folder / "manifest.json").write_text(text)
    count("manifest", result)


# ----------------------------------------------------------------------------- devices files
ACCEPTED_DEVICES = ("good.yaml", "alias_ok.yaml", "speeds_at_the_limits.yaml", "empty.yaml")
DEVICE_SEEDS = sorted((CORPUS.parent / "devices").iterdir()) + [CORPUS.parent / "devices" / f
                                                                for f in ACCEPTED_DEVICES * 8]
YAML_PIECES = [b"&a ", b"*a", b"&b [*a, *a, *a, *a]", b"<<: *a\n", b"[", b"]", b"{", b"}", b"- ", b": ", b", ",
               b"\n", b"  ", b"? ", b"---\n", b"%YAML 1.1\n", b"!!python/object/apply:os.system ", b"!!binary ",
               b"!!float ", b"1e308", b"1e-300", b"1e6", b"1e-6", b".nan", b".inf", b"-1", b"0", b"9" * 400, b"x",
               b"bit", b"Gbit/s", b"ms", b"us", b"dev0", b"dev9", b"speed", b"resource", b"bandwidth", b"latency",
               b"route", b"ray", b"devices", b"links", b"default", b"overhead", b"'", b'"', b"\xff", b"\x00",
               b"\x1b[2J", b"\t"]


@st.composite
def mutated_yaml(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(DEVICE_SEEDS)).read_bytes())
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "insert", "insert", "delete", "flip", "repeat"]))
        if kind == "insert":
            data[pos:pos] = draw(st.sampled_from(YAML_PIECES))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "repeat":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 24))] * draw(st.integers(2, 40))
    return bytes(data)


def _load_devices(path: Path) -> None:
    """Load ``path``; what it accepts lies in range (``devices.RANGES``)."""
    net = devices.load(path)
    net.check_names(["dev0", "dev1", "dev2", "dev3"])
    for d in net.devices.values():
        assert 1e-6 <= d.speed <= 1e6 and isinstance(d.resource, str), d
    for link in [net.default_link, *net.links.values()]:
        assert 1e3 / 8 <= link.bandwidth <= 1e15 / 8 and 1e-9 <= link.latency <= 3600, link


@fuzz_settings(300)
@given(data=mutated_yaml())
def test_devices_file_survives_mutations(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz-devices.yaml"
    path.write_bytes(data)
    count("devices", outcome(lambda: _load_devices(path), quiet=True))


# ----------------------------------------------------------------------------- preprocessing specs
NUMBERS = ["0", "-1", "nan", "inf", "-inf", "1e-300", "1e308", "1e-45", "1e-3", "1e5", "65504", "abc", "", "9" * 30]
SPEC_VALUES = {  # per key: values it takes, then edge values
    "size": ["8x8", "8", "224x224", "1x1", "16384x1", "0x8", "-1", "1e3", "8x", "100000x100000", "16385", "x"],
    "mean": ["0", "127", "0.485/0.456/0.406", "1/2", "1/2/3/4", *NUMBERS],
    "std": ["1", "128", "0.229/0.224/0.225", "0/1/1", *NUMBERS],
    "scale": ["1", "0.00392", *NUMBERS], "crop_fraction": ["0.875", "1", "1e-4", "1.5", *NUMBERS],
    "resize": ["stretch", "shorter_side", "crop"], "interpolation": ["bicubic", "nearest", "lanczos"],
    "layout": ["NCHW", "NHWC", "CHW"], "channels": ["RGB", "BGR", "L", "RGBA"],
    "dtype": ["float16", "float32", "float64", "int8"], "colour": ["RGB"], "": ["1"], " size ": ["8x8"]}


@st.composite
def preprocess_specs(draw) -> str:
    keys = (["size"] if draw(st.integers(0, 9)) else []) + draw(st.lists(st.sampled_from(list(SPEC_VALUES)),
                                                                        max_size=4))
    items = []
    for key in keys:
        values = SPEC_VALUES[key]
        value = values[0] if draw(st.integers(0, 2)) == 0 else draw(st.sampled_from(values))
        items.append(f"{key}{'=' if draw(st.integers(0, 19)) else draw(st.sampled_from(['', '==', ' = ']))}{value}")
    return ",".join(items)


def _normalise_extremes(spec: str) -> None:
    """Parse ``spec``; when accepted, the darkest and brightest pixels normalise to finite numbers."""
    prep = Preprocessing.from_dict(parse_preprocessing(spec))
    c, (h, w) = prep.num_channels, prep.size
    raw = np.zeros((2, c, 1, 1) if prep.layout == "NCHW" else (2, 1, 1, c), np.uint8)
    raw[1] = 255
    x = prep.normalize(raw)
    assert np.isfinite(x).all() and x.dtype == np.dtype(prep.dtype), (spec, x)
    assert prep.input_shape(1) in ((1, c, h, w), (1, h, w, c))


@fuzz_settings(300)
@given(spec=preprocess_specs())
def test_preprocess_specs_are_parsed_or_refused(spec):
    count("preprocess", outcome(lambda: _normalise_extremes(spec), quiet=True))


# ----------------------------------------------------------------------------- image files
def _image_seeds() -> list[bytes]:
    from corpus.build import JPEG, png
    return [png(8, 8), png(5, 3), JPEG]


IMAGE_SEEDS = _image_seeds()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(IMAGE_SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "flip", "overwrite", "truncate", "delete", "duplicate", "size"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.sampled_from([b"\xff\xff", b"\x00\x00", b"\xff\xd9", b"\xff\xda", b"IEND", b"IDAT"])
                         | st.binary(min_size=1, max_size=6))
            data[pos:pos + len(chunk)] = chunk
        elif kind == "truncate":
            del data[pos:]
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif kind == "duplicate":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 32))]
        else:  # a header size: PNG's IHDR width/height, or a JPEG frame's
            at = 16 + 4 * draw(st.integers(0, 1)) if data[:4] == b"\x89PNG" else max(data.find(b"\xff\xc0"), 0) + 5
            data[at:at + 4] = draw(st.sampled_from([0, 1, 255, 40_000, 65_535, 2**31 - 1, 2**32 - 1])).to_bytes(4, "big")
    return bytes(data)


@fuzz_settings(200)
@given(data=mutated_images(), name=st.sampled_from(["x.png", "x.jpg"]))
def test_image_folder_survives_mutations(tmp_path_factory, data, name):
    folder = tmp_path_factory.getbasetemp() / "fuzz-images"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / name).write_bytes(data)
    count("images", outcome(lambda: load_folder(folder, Preprocessing(size=(8, 8))), quiet=True))


# ----------------------------------------------------------------------------- atheris (optional)
def test_atheris(converted, tmp_path):
    """Coverage-guided, when atheris is installed: both targets, seeded from the corpus."""
    pytest.importorskip("atheris")
    folder, text = converted
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for n, seed in enumerate(SEEDS):
        (seeds / f"model{n}").write_bytes(b"\x01" + seed)
    (seeds / "manifest").write_bytes(b"\x00" + text.encode())
    work = tmp_path / "manifest"
    shutil.copytree(folder, work)
    runs = _EXPLORE or 1500
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("fuzz_atheris.py")), str(work), str(seeds),
                             f"-runs={runs}", "-max_total_time=60", f"-seed={1 if not _EXPLORE else 2 + os.getpid()}",
                             "-rss_limit_mb=4096", "-max_len=65536"],
                            capture_output=True, text=True, timeout=300)
    tail = result.stderr[-3000:]
    assert result.returncode == 0, tail
    done = [ln for ln in result.stderr.splitlines() if ln.startswith("Done ")]
    print(f"\natheris: {done[-1] if done else tail[-300:]}", file=sys.stderr)
