"""The manifest: one JSON file that says what runs where and what crosses the network.

Guarantees:
- ``validate`` checks a manifest against the JSON Schema shipped in the package
  (``lcpc/schema/manifest-1.schema.json``) and the cross-references the schema
  cannot express (stage ids unique, transfers between known devices, files unique);
- ``read`` never evaluates or unpickles anything; it refuses a manifest that fails
  validation, names a file outside its folder, or whose stage file's sha256 differs
  from the recorded one (tamper check) — each with an ``LcpcError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from lcpc.errors import LcpcError

MANIFEST = "manifest.json"
SCHEMA = "manifest-1.schema.json"
MAX_MANIFEST_BYTES = 64 << 20


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(resources.files("lcpc").joinpath("schema", SCHEMA).read_text())


def validate(manifest: Any, where: str = MANIFEST) -> None:
    validator = jsonschema.Draft202012Validator(schema())
    error = next(iter(sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))), None)
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise LcpcError(f"{where}: invalid manifest at {path}: {error.message[:200]}")
    k = manifest["branches"]
    ids = [s["id"] for s in manifest["stages"]]
    files = [s["file"] for s in manifest["stages"]]
    if len(set(ids)) != len(ids) or len(set(files)) != len(files):
        raise LcpcError(f"{where}: invalid manifest: stage ids and files must be unique")
    if len(manifest["devices"]) != k:
        raise LcpcError(f"{where}: invalid manifest: {k} branches but {len(manifest['devices'])} devices")
    for s in manifest["stages"]:
        if s["device"] >= k:
            raise LcpcError(f"{where}: invalid manifest: stage {s['id']} on unknown device {s['device']}")
    for t in manifest["transfers"]:
        if t["from"]["device"] >= k or t["to"]["device"] >= k:
            raise LcpcError(f"{where}: invalid manifest: transfer {t['id']} between unknown devices")
        expected = int(np.prod(t["shape"], dtype=np.int64)) * np.dtype(t["dtype"]).itemsize
        if t["bytes"] != expected:
            raise LcpcError(f"{where}: invalid manifest: transfer {t['id']} claims {t['bytes']} bytes for "
                            f"shape {t['shape']} {t['dtype']}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read(folder: str | Path) -> dict[str, Any]:
    """Load and check ``folder/manifest.json`` and every stage file it names."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise LcpcError(f"{folder}: no such folder (expected the output of `lcpc convert`)")
    if not path.is_file():
        raise LcpcError(f"{path}: missing; is {folder} an lcpc output folder?")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise LcpcError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES >> 20} MiB; refusing to read it")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LcpcError(f"{path}: not valid JSON ({exc})") from None
    validate(manifest, str(path))
    root = folder.resolve()
    for stage in manifest["stages"]:
        file = (folder / stage["file"]).resolve()
        if file.parent != root:
            raise LcpcError(f"{path}: stage {stage['id']} points outside its folder ({stage['file']})")
        if not file.is_file():
            raise LcpcError(f"{path}: stage file {stage['file']} is missing")
        if sha256_file(file) != stage["sha256"]:
            raise LcpcError(f"{folder / stage['file']}: sha256 differs from the manifest; the file was "
                            f"changed after conversion (re-run `lcpc convert`)")
    return manifest


def tensor_entry(name: str, shape, dtype, source: dict | None = None) -> dict[str, Any]:
    entry = {"name": name, "shape": [int(d) for d in shape], "dtype": np.dtype(dtype).name}
    if source is not None:
        entry["source"] = source
    return entry
