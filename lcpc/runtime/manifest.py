"""The manifest: one JSON file that says what runs where and what crosses the network,
and the typed view every runner reads it through.

Guarantees:
- ``validate`` checks a manifest against the JSON Schema shipped in the package
  (``lcpc/schema/manifest-2.schema.json``), then builds the typed view (``Manifest``:
  frozen ``Stage``, ``Transfer``, ``Device``, ``Output``, ``Tensor`` values) once and
  checks on it what the schema cannot express: stage ids and files unique, devices and
  transfers between known devices, byte counts that match shapes, and a dataflow in
  which every stage input, transfer and model output is provided, exactly once, before
  it is needed, with the shape and dtype its consumer expects (the model input as
  ``feeds`` gives it), replayed in the one run order (``lcpc.runtime.order``) — so a
  runtime that follows a valid manifest never looks up a value that is not there; a
  manifest of another format version is refused with a message that says which
  version wrote it and to convert again;
- ``read`` parses strict JSON only (no NaN/Infinity, no duplicate keys) and never
  evaluates or unpickles anything; it refuses a manifest that fails validation, a
  manifest or stage file outside its folder (``..``, absolute paths, symlinks that
  leave it), and a stage file whose sha256 differs from the recorded one (tamper
  check) — each with an ``LcpcError`` naming the file — and returns the typed view,
  whose ``json`` is the validated document itself (for reports);
- ``Manifest.feeds`` is what a runtime is fed: ``source.feeds`` when the folder takes
  the raw uint8 image (then ``source.preprocessing`` is there, and each feed is a model
  input of the same shape, as uint8), else the model's inputs;
- ``read_stage`` returns a stage file's bytes after the same containment and sha256
  checks on exactly those bytes, so a runtime loads what was checked;
- ``read_original`` returns the bytes of the model a folder was converted from: the file
  the manifest names only when its sha256 is the recorded one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import jsonschema
import numpy as np

from lcpc.errors import LcpcError
from lcpc.runtime.degrade import Merge
from lcpc.runtime.order import RunOrder, broadcast_tree
from lcpc.safety import inside, printable

MANIFEST = "manifest.json"
VERSION = 2
SCHEMA = f"manifest-{VERSION}.schema.json"
MAX_MANIFEST_BYTES = 64 << 20


# ----------------------------------------------------------------------------- the typed view
@dataclass(frozen=True)
class Tensor:
    """A named tensor of a static shape and a dtype (numpy's name for it)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def parse(cls, entry: Mapping[str, Any]) -> Tensor:
        return cls(entry["name"], tuple(entry["shape"]), entry["dtype"])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Device:
    id: int
    name: str
    role: str                   # head | branch
    speed: float | None = None  # relative compute speed the plan was sized for (devices.yaml), if any


@dataclass(frozen=True)
class Stage:
    """One ONNX file that runs on one device at one level."""

    id: str
    device: int
    level: int
    file: str
    sha256: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    flops: int
    params: int
    weight_bytes: int
    peak_activation_bytes: int


@dataclass(frozen=True)
class Transfer:
    """One message per inference: ``src_name`` on device ``src`` arrives as ``dst_name`` on ``dst``."""

    id: int
    tensor: str        # the original model tensor it carries (a slice or partial of it)
    kind: str          # input | gather | reduce | broadcast
    src: int
    src_name: str
    dst: int
    dst_name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int         # per inference (an encoded image: nominal; engines count the real file's bytes)
    level: int         # sent after this level's stages (input transfers: before level 0)
    encoded: bool = False   # the model input as the image file (JPEG/PNG bytes), decoded by the receiver
    coding: str | None = None   # deflate: the int8 value entropy-coded (``runtime.coding``), bytes nominal


@dataclass(frozen=True)
class Output:
    """A model output: held as ``local_name`` on ``device``, returned as ``name``."""

    name: str
    device: int
    local_name: str


@dataclass(frozen=True)
class Manifest:
    """The typed view of one validated manifest (see the module docstring)."""

    json: Mapping[str, Any]
    branches: int
    devices: tuple[Device, ...]
    stages: tuple[Stage, ...]
    transfers: tuple[Transfer, ...]
    outputs: tuple[Output, ...]
    inputs: tuple[Tensor, ...]        # the model's inputs
    feeds: tuple[Tensor, ...]         # what a runtime is fed (the raw uint8 images, or the inputs)
    preprocessing: Mapping[str, Any] | None
    sync_policy: str

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Manifest:
        """The view of a document the schema accepted (``validate`` checks the rest)."""
        source = m["source"]
        inputs = tuple(Tensor.parse(i) for i in source["inputs"])
        return cls(
            json=m, branches=m["branches"],
            devices=tuple(Device(d["id"], d["name"], d["role"], d.get("speed")) for d in m["devices"]),
            stages=tuple(Stage(s["id"], s["device"], s["level"], s["file"], s["sha256"],
                               tuple(Tensor.parse(i) for i in s["inputs"]),
                               tuple(Tensor.parse(o) for o in s["outputs"]),
                               s["flops"], s["params"], s["weight_bytes"], s["peak_activation_bytes"])
                         for s in m["stages"]),
            transfers=tuple(Transfer(t["id"], t["tensor"], t["kind"], t["from"]["device"], t["from"]["name"],
                                     t["to"]["device"], t["to"]["name"], tuple(t["shape"]), t["dtype"], t["bytes"],
                                     t["level"], t.get("encoded", False), t.get("coding"))
                            for t in m["transfers"]),
            outputs=tuple(Output(o["name"], o["device"], o["local_name"]) for o in m["outputs"]),
            inputs=inputs,
            feeds=tuple(Tensor.parse(f) for f in source["feeds"]) if "feeds" in source else inputs,
            preprocessing=source["preprocessing"], sync_policy=m["sync"]["policy"])

    @cached_property
    def merge(self) -> tuple[Merge | None, str]:
        """(the merge the head can answer from with devices missing, "") or (None, why it cannot)."""
        return Merge.parse(self.json.get("degrade"), {s.id: s for s in self.stages})

    @property
    def takes_raw_images(self) -> bool:
        """The folder is fed the uint8 image (or its file: ``encoded``) and applies the preprocessing itself."""
        return "feeds" in self.json["source"]

    @property
    def encoded(self) -> bool:
        """The folder is fed image files (JPEG/PNG bytes), which each device that reads the image decodes."""
        return "encoded" in self.json["source"]

    @property
    def broadcast(self) -> str:
        """How the model input reaches its receivers: ``p2p`` or ``tree`` (``order.broadcast_tree``)."""
        return str(self.json.get("broadcast", "p2p"))

    def broadcast_edges(self, skip: Collection[int] = ()) -> list[tuple[int, int]]:
        """(sender, receiver) of the model input to every device that reads it (but ``skip``), in order."""
        receivers = list(dict.fromkeys(t.dst for t in self.order.inputs if t.dst not in skip))
        if self.broadcast == "tree":
            return broadcast_tree(receivers)
        return [(0, r) for r in receivers]

    @property
    def input_wire(self) -> str:
        """How the model input travels: ``encoded``, ``uint8`` (the raw image) or ``float``."""
        return "encoded" if self.encoded else "uint8" if self.takes_raw_images else "float"

    @cached_property
    def order(self) -> RunOrder[Stage, Transfer]:
        return RunOrder(self.stages, self.transfers)

    @property
    def names(self) -> dict[int, str]:
        """Device id -> device name."""
        return {d.id: d.name for d in self.devices}

    @property
    def bytes_per_inference(self) -> int:
        return sum(t.bytes for t in self.transfers)

    def stages_on(self, device: int) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.device == device)


# ----------------------------------------------------------------------------- validation
@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(resources.files("lcpc").joinpath("schema", SCHEMA).read_text())


def validate(document: Any, where: str = MANIFEST) -> Manifest:
    """Check ``document`` (see the module docstring); returns its typed view."""
    if isinstance(document, dict) and document.get("format") == "lcpc-manifest" \
            and document.get("version") != VERSION:
        raise LcpcError(f"{where}: written by lcpc {printable(str(document.get('lcpc_version', '?')), 40)} in "
                        f"manifest format {printable(str(document.get('version')), 20)}; this lcpc reads format "
                        f"{VERSION}: convert the model again with this version")
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        error = errors[0]
        path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise LcpcError(f"{where}: invalid manifest at {printable(path, 200)}: {printable(error.message, 200)}")
    m = Manifest.parse(document)

    def fail(what: str) -> NoReturn:
        raise LcpcError(f"{where}: invalid manifest: {what}")

    k = m.branches
    if len({s.id for s in m.stages}) != len(m.stages) or len({s.file for s in m.stages}) != len(m.stages):
        fail("stage ids and files must be unique")
    if sorted(d.id for d in m.devices) != list(range(k)):
        fail(f"{k} branches need devices 0..{k - 1}, each once")
    for i in m.inputs:
        if 0 in i.shape:
            fail(f"model input '{printable(i.name, 200)}' has a zero dim in {list(i.shape)}")
    _check_feeds(m, fail)
    if any(b >= k for b in document["plan"]["branch_of_class"].values()):
        fail(f"the plan assigns channels to a branch outside 0..{k - 1}")
    for s in m.stages:
        if s.device >= k:
            fail(f"stage {s.id} on unknown device {s.device}")
    for o in m.outputs:
        if o.device >= k:
            fail(f"output '{printable(o.name, 200)}' on unknown device {o.device}")
    for t in m.transfers:
        if t.src >= k or t.dst >= k:
            fail(f"transfer {t.id} between unknown devices")
        if t.encoded:
            if not (m.encoded and t.kind == "input" and t.dtype == "uint8"):
                fail(f"transfer {t.id} is marked encoded, but only the model input of a folder fed image files is")
        elif t.coding is not None:
            if t.dtype not in ("int8", "uint8"):
                fail(f"transfer {t.id} is coded ({t.coding}) but carries {t.dtype}, not an int8 value")
        elif t.bytes != math.prod(t.shape) * np.dtype(t.dtype).itemsize:
            fail(f"transfer {t.id} claims {t.bytes} bytes for shape {list(t.shape)} {t.dtype}")
    if m.encoded and (not m.takes_raw_images or any(t.kind == "input" and not t.encoded for t in m.transfers)
                      or any(f.shape[0] != 1 for f in m.feeds)):
        fail("source.encoded needs source.feeds of one image, and every input transfer marked encoded")
    _check_dataflow(m, fail)
    _check_degrade(m, fail)
    return m


def _check_feeds(m: Manifest, fail: Callable[[str], NoReturn]) -> None:
    if not m.takes_raw_images:
        return
    if m.preprocessing is None:
        fail("source.feeds (raw images) without source.preprocessing")
    inputs = {i.name: i for i in m.inputs}
    if sorted(f.name for f in m.feeds) != sorted(inputs):
        fail(f"source.feeds must name the model inputs {printable(sorted(inputs), 200)}, each once")
    for f, entry in zip(m.feeds, m.json["source"]["feeds"]):
        if f.dtype != "uint8" or f.shape != inputs[f.name].shape or "source" in entry:
            fail(f"feed '{printable(f.name, 200)}' must be the uint8 image of the model input's shape "
                 f"{list(inputs[f.name].shape)}")


def _check_degrade(m: Manifest, fail: Callable[[str], NoReturn]) -> None:
    section = m.json.get("degrade")
    if not section or section["stage"] is None:
        return
    stages = {s.id: s for s in m.stages}
    if section["stage"] not in stages or stages[section["stage"]].device != 0 or "inputs" not in section:
        fail("degrade.stage must be a stage of the head, with the contributions it merges")
    names = {i.name for i in stages[section["stage"]].inputs}
    for c in section["inputs"]:
        if c["name"] not in names or c["device"] >= m.branches:
            fail(f"degrade: contribution '{printable(c['name'], 200)}' of device {c['device']} is not an input "
                 f"of stage {section['stage']}")


def _check_dataflow(m: Manifest, fail: Callable[[str], NoReturn]) -> None:
    """Replay the run order, checking that every value is given once before it is needed."""
    values: dict[tuple[int, str], tuple] = {}

    def give(device: int, name: str, shape, dtype: str, what: str) -> None:
        if (device, name) in values:
            fail(f"{what} provides '{printable(name, 200)}' on device {device}, which is already provided")
        values[(device, name)] = (tuple(shape), dtype)

    def need(device: int, name: str, spec: tuple | None, what: str) -> None:
        have = values.get((device, name))
        if have is None:
            fail(f"{what} needs '{printable(name, 200)}' on device {device}, which nothing provides before it")
        if spec is not None and have != spec:
            fail(f"{what} expects '{printable(name, 200)}' as {list(spec[0])} {spec[1]}, but it is "
                 f"{list(have[0])} {have[1]}")

    def run_level(stages) -> None:
        for s in stages:
            for i in s.inputs:
                need(s.device, i.name, (i.shape, i.dtype), f"stage {s.id}")
        for s in stages:
            for o in s.outputs:
                give(s.device, o.name, o.shape, o.dtype, f"stage {s.id}")

    def move(t: Transfer) -> None:
        need(t.src, t.src_name, (t.shape, t.dtype), f"transfer {t.id}")
        give(t.dst, t.dst_name, t.shape, t.dtype, f"transfer {t.id}")

    for f in m.feeds:
        give(0, f.name, f.shape, f.dtype, "model input")
    m.order.walk(run_level, move)
    if len({o.name for o in m.outputs}) != len(m.outputs):
        fail("output names must be unique")
    for o in m.outputs:
        need(o.device, o.local_name, None, f"output '{printable(o.name, 200)}'")


# ----------------------------------------------------------------------------- reading a folder
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _strict_json(text: str) -> Any:
    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    def no_duplicates(pairs: list) -> dict:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate key '{printable(next(k for k in keys if keys.count(k) > 1), 100)}'")
        return dict(pairs)

    return json.loads(text, parse_constant=no_constants, object_pairs_hook=no_duplicates)


def read(folder: str | Path) -> Manifest:
    """Load and check ``folder/manifest.json`` and every stage file it names."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise LcpcError(f"{printable(folder)}: no such folder (expected the output of `lcpc convert`)")
    if not path.is_file():
        raise LcpcError(f"{printable(path)}: missing; is {printable(folder)} an lcpc output folder?")
    if inside(folder, MANIFEST) is None:
        raise LcpcError(f"{printable(path)}: is a link to a file outside {printable(folder)}; refusing to read it")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise LcpcError(f"{printable(path)}: manifest larger than {MAX_MANIFEST_BYTES >> 20} MiB; refusing to "
                        f"read it")
    try:
        document = _strict_json(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else printable(str(exc), 200)
        raise LcpcError(f"{printable(path)}: not valid JSON ({reason})") from None
    manifest = validate(document, printable(path))
    for stage in manifest.stages:
        read_stage(folder, stage)
    return manifest


def read_stage(folder: str | Path, stage: Stage) -> bytes:
    """The bytes of ``stage``'s file, checked: inside ``folder`` and matching the recorded sha256."""
    folder = Path(folder)
    where = printable(folder / MANIFEST)
    file = inside(folder, stage.file)
    if file is None or file.parent != Path(folder).resolve():
        raise LcpcError(f"{where}: stage {stage.id} points outside its folder ({printable(stage.file, 200)})")
    if not file.is_file():
        raise LcpcError(f"{where}: stage file {stage.file} is missing")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != stage.sha256:
        raise LcpcError(f"{printable(folder / stage.file)}: sha256 differs from the manifest; the file was "
                        f"changed after conversion (re-run `lcpc convert`)")
    return data


def read_original(manifest: Manifest, model: bytes | str | Path | None = None) -> tuple[bytes, str]:
    """The original model's bytes and where they came from (a path, or ``<bytes>``): ``model`` when
    given (bytes or a path), else the manifest's source file, checked against its sha256."""
    if isinstance(model, (bytes, bytearray)):
        return bytes(model), "<bytes>"
    if model is not None:
        path = Path(model)
        if not path.is_file():
            raise LcpcError(f"{printable(path)}: no such model file")
        return path.read_bytes(), str(path)
    source = manifest.json["source"]
    if not source["path"]:
        raise LcpcError("the manifest names no source model file (converted from bytes); pass --model PATH to "
                        "the original ONNX file")
    path = Path(source["path"])
    if not path.is_file():
        raise LcpcError(f"the original model {printable(source['path'])} recorded in the manifest is not there; "
                        f"pass --model PATH to the original ONNX file")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != source["sha256"]:
        raise LcpcError(f"{printable(path)}: sha256 differs from the model this folder was converted from; "
                        f"pass --model PATH to the original ONNX file")
    return data, str(path)
