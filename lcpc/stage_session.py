"""One onnxruntime session for one stage file, shared by every engine.

Guarantees:
- ``open_stage`` builds the session from the very bytes whose sha256 was checked
  (``manifest.read_stage``), so no external data or swapped file is ever loaded;
- the session's inputs and outputs must be exactly those the manifest declares for
  the stage (names, shapes, dtypes), else an ``LcpcError`` naming the file and stage;
- a file onnxruntime cannot load is an ``LcpcError`` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from lcpc.errors import LcpcError
from lcpc.safety import first_line


def open_stage(data: bytes, stage: dict, where: str | Path, threads: int = 1) -> ort.InferenceSession:
    """A checked CPU session for ``stage`` built from ``data`` (the stage file's checked bytes)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise LcpcError(f"{where}: onnxruntime cannot load it: {first_line(exc)}") from None
    _check_signature(session, stage, where)
    return session


def _check_signature(session: ort.InferenceSession, stage: dict, where: str | Path) -> None:
    """The stage file's inputs and outputs are the ones the manifest names, with its shapes and dtypes."""
    for kind, declared, actual in (("inputs", stage["inputs"], session.get_inputs()),
                                   ("outputs", stage["outputs"], session.get_outputs())):
        have = {a.name: (list(a.shape), a.type) for a in actual}
        want = {d["name"]: (d["shape"], f"tensor({_ORT_TYPES.get(d['dtype'], d['dtype'])})") for d in declared}
        if have != want:
            raise LcpcError(f"{where}: its {kind} differ from what the manifest says for stage {stage['id']}")


_ORT_TYPES = {"float32": "float", "float64": "double", "bool": "bool"}


