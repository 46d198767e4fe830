"""The manifest: one JSON file that says what runs where and what crosses the network.

Guarantees:
- ``validate`` checks a manifest against the JSON Schema shipped in the package
  (``lcpc/schema/manifest-2.schema.json``) and the cross-references the schema
  cannot express: stage ids and files unique, devices and transfers between known
  devices, byte counts that match shapes, and a dataflow in which every stage input,
  transfer and model output is provided, exactly once, before it is needed, with the
  shape and dtype its consumer expects (the model input as ``feeds`` gives it) — so a
  runtime that follows a valid manifest never looks up a value that is not there; a manifest of another format version is
  refused with a message that says which version wrote it and to convert again;
- ``read`` parses strict JSON only (no NaN/Infinity, no duplicate keys) and never
  evaluates or unpickles anything; it refuses a manifest that fails validation, a
  manifest or stage file outside its folder (``..``, absolute paths, symlinks that
  leave it), and a stage file whose sha256 differs from the recorded one (tamper
  check) — each with an ``LcpcError`` naming the file;
- ``feeds`` is what a runtime is fed: ``source.feeds`` when the folder takes the raw
  uint8 image (optional; then ``source.preprocessing`` must be there, and each feed is a
  model input of the same shape, as uint8), else ``source.inputs``;
- ``read_stage`` returns a stage file's bytes after the same containment and sha256
  checks on exactly those bytes, so a runtime loads what was checked.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from lcpc.errors import LcpcError
from lcpc.safety import inside, printable

MANIFEST = "manifest.json"
VERSION = 2
SCHEMA = f"manifest-{VERSION}.schema.json"
MAX_MANIFEST_BYTES = 64 << 20


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(resources.files("lcpc").joinpath("schema", SCHEMA).read_text())


def validate(manifest: Any, where: str = MANIFEST) -> None:
    if isinstance(manifest, dict) and manifest.get("format") == "lcpc-manifest" \
            and manifest.get("version") != VERSION:
        raise LcpcError(f"{where}: written by lcpc {printable(str(manifest.get('lcpc_version', '?')), 40)} in "
                        f"manifest format {printable(str(manifest.get('version')), 20)}; this lcpc reads format "
                        f"{VERSION}: convert the model again with this version")
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(manifest), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        error = errors[0]
        path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise LcpcError(f"{where}: invalid manifest at {printable(path, 200)}: {printable(error.message, 200)}")
    k = manifest["branches"]
    ids = [s["id"] for s in manifest["stages"]]
    files = [s["file"] for s in manifest["stages"]]
    if len(set(ids)) != len(ids) or len(set(files)) != len(files):
        raise LcpcError(f"{where}: invalid manifest: stage ids and files must be unique")
    if sorted(d["id"] for d in manifest["devices"]) != list(range(k)):
        raise LcpcError(f"{where}: invalid manifest: {k} branches need devices 0..{k - 1}, each once")
    for i in manifest["source"]["inputs"]:
        if 0 in i["shape"]:
            raise LcpcError(f"{where}: invalid manifest: model input '{printable(i['name'], 200)}' has a zero "
                            f"dim in {i['shape']}")
    _check_feeds(manifest, where)
    if any(b >= k for b in manifest["plan"]["branch_of_class"].values()):
        raise LcpcError(f"{where}: invalid manifest: the plan assigns channels to a branch outside 0..{k - 1}")
    for s in manifest["stages"]:
        if s["device"] >= k:
            raise LcpcError(f"{where}: invalid manifest: stage {s['id']} on unknown device {s['device']}")
    for o in manifest["outputs"]:
        if o["device"] >= k:
            raise LcpcError(f"{where}: invalid manifest: output '{printable(o['name'], 200)}' on unknown "
                            f"device {o['device']}")
    for t in manifest["transfers"]:
        if t["from"]["device"] >= k or t["to"]["device"] >= k:
            raise LcpcError(f"{where}: invalid manifest: transfer {t['id']} between unknown devices")
        expected = math.prod(t["shape"]) * np.dtype(t["dtype"]).itemsize
        if t["bytes"] != expected:
            raise LcpcError(f"{where}: invalid manifest: transfer {t['id']} claims {t['bytes']} bytes for "
                            f"shape {t['shape']} {t['dtype']}")
    _check_dataflow(manifest, where)


def feeds(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The tensors a runtime is fed: the raw uint8 images when the folder takes them, else the model's inputs."""
    return manifest["source"].get("feeds") or manifest["source"]["inputs"]


def takes_raw_images(manifest: dict[str, Any]) -> bool:
    return "feeds" in manifest["source"]


def _check_feeds(manifest: dict[str, Any], where: str) -> None:
    source = manifest["source"]
    if "feeds" not in source:
        return
    if source["preprocessing"] is None:
        raise LcpcError(f"{where}: invalid manifest: source.feeds (raw images) without source.preprocessing")
    inputs = {i["name"]: i for i in source["inputs"]}
    names = [f["name"] for f in source["feeds"]]
    if sorted(names) != sorted(inputs):
        raise LcpcError(f"{where}: invalid manifest: source.feeds must name the model inputs "
                        f"{printable(sorted(inputs), 200)}, each once")
    for f in source["feeds"]:
        if f["dtype"] != "uint8" or f["shape"] != inputs[f["name"]]["shape"] or "source" in f:
            raise LcpcError(f"{where}: invalid manifest: feed '{printable(f['name'], 200)}' must be the uint8 "
                            f"image of the model input's shape {inputs[f['name']]['shape']}")


def _check_dataflow(manifest: dict[str, Any], where: str) -> None:
    """Replay the run order (input transfers; then per level: stages, then transfers)."""
    values: dict[tuple[int, str], tuple] = {}

    def give(device: int, name: str, spec: dict, what: str) -> None:
        if (device, name) in values:
            raise LcpcError(f"{where}: invalid manifest: {what} provides '{printable(name, 200)}' on device "
                            f"{device}, which is already provided")
        values[(device, name)] = (tuple(spec["shape"]), spec["dtype"])

    def need(device: int, name: str, spec: dict | None, what: str) -> None:
        have = values.get((device, name))
        if have is None:
            raise LcpcError(f"{where}: invalid manifest: {what} needs '{printable(name, 200)}' on device "
                            f"{device}, which nothing provides before it")
        if spec is not None and have != (tuple(spec["shape"]), spec["dtype"]):
            raise LcpcError(f"{where}: invalid manifest: {what} expects '{printable(name, 200)}' as "
                            f"{list(spec['shape'])} {spec['dtype']}, but it is {list(have[0])} {have[1]}")

    for i in feeds(manifest):
        give(0, i["name"], i, "model input")
    stages, transfers = defaultdict(list), defaultdict(list)
    for s in manifest["stages"]:
        stages[s["level"]].append(s)
    for t in manifest["transfers"]:
        if t["kind"] == "input":
            need(t["from"]["device"], t["from"]["name"], t, f"transfer {t['id']}")
            give(t["to"]["device"], t["to"]["name"], t, f"transfer {t['id']}")
        else:
            transfers[t["level"]].append(t)
    for level in sorted(set(stages) | set(transfers)):
        for s in stages[level]:
            for i in s["inputs"]:
                need(s["device"], i["name"], i, f"stage {s['id']}")
        for s in stages[level]:
            for o in s["outputs"]:
                give(s["device"], o["name"], o, f"stage {s['id']}")
        for t in transfers[level]:
            need(t["from"]["device"], t["from"]["name"], t, f"transfer {t['id']}")
            give(t["to"]["device"], t["to"]["name"], t, f"transfer {t['id']}")
    names = [o["name"] for o in manifest["outputs"]]
    if len(set(names)) != len(names):
        raise LcpcError(f"{where}: invalid manifest: output names must be unique")
    for o in manifest["outputs"]:
        need(o["device"], o["local_name"], None, f"output '{printable(o['name'], 200)}'")


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


def read(folder: str | Path) -> dict[str, Any]:
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
        manifest = _strict_json(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else printable(str(exc), 200)
        raise LcpcError(f"{printable(path)}: not valid JSON ({reason})") from None
    validate(manifest, printable(path))
    for stage in manifest["stages"]:
        read_stage(folder, stage)
    return manifest


def read_stage(folder: str | Path, stage: dict[str, Any]) -> bytes:
    """The bytes of ``stage``'s file, checked: inside ``folder`` and matching the recorded sha256."""
    folder = Path(folder)
    where = printable(folder / MANIFEST)
    file = inside(folder, stage["file"])
    if file is None or file.parent != Path(folder).resolve():
        raise LcpcError(f"{where}: stage {stage['id']} points outside its folder ({printable(stage['file'], 200)})")
    if not file.is_file():
        raise LcpcError(f"{where}: stage file {stage['file']} is missing")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != stage["sha256"]:
        raise LcpcError(f"{printable(folder / stage['file'])}: sha256 differs from the manifest; the file was "
                        f"changed after conversion (re-run `lcpc convert`)")
    return data


def tensor_entry(name: str, shape, dtype, source: dict | None = None) -> dict[str, Any]:
    entry = {"name": name, "shape": [int(d) for d in shape], "dtype": np.dtype(dtype).name}
    if source is not None:
        entry["source"] = source
    return entry
