"""Every onnxruntime session lcpc opens, opened here: one set of options, one error message.

Guarantees:
- ``open_session`` is the only place a ``SessionOptions`` is made: the CPU provider,
  onnxruntime's default graph optimisation and sequential execution, one inter-op
  thread, ``threads`` intra-op threads (``None``: onnxruntime's default, every core),
  warnings off (``quiet`` silences errors too, for probes that expect to fail); a model
  onnxruntime cannot load is an ``LcpcError`` naming ``where``;
- ``open_stage`` builds a stage's session from the very bytes whose sha256 was checked
  (``manifest.read_stage``), so no external data or swapped file is ever loaded, and
  its inputs and outputs must be exactly those the manifest declares for the stage
  (names, shapes, dtypes), else an ``LcpcError`` naming the file and stage.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from lcpc.errors import LcpcError
from lcpc.runtime.manifest import Stage
from lcpc.safety import first_line


def open_session(model: bytes | str | Path, where: str | Path, threads: int | None = 1,
                 quiet: bool = False) -> ort.InferenceSession:
    """A CPU session for ``model`` (its bytes, or a path: then external weight files beside it load too)."""
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4 if quiet else 3
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise LcpcError(f"{where}: onnxruntime cannot load it: {first_line(exc)}") from None


def open_stage(data: bytes, stage: Stage, where: str | Path, threads: int = 1) -> ort.InferenceSession:
    """A checked session for ``stage`` built from ``data`` (the stage file's checked bytes)."""
    session = open_session(data, where, threads)
    for kind, declared, actual in (("inputs", stage.inputs, session.get_inputs()),
                                   ("outputs", stage.outputs, session.get_outputs())):
        have = {a.name: (list(a.shape), a.type) for a in actual}
        want = {d.name: (list(d.shape), f"tensor({_ORT_TYPES.get(d.dtype, d.dtype)})") for d in declared}
        if have != want:
            raise LcpcError(f"{where}: its {kind} differ from what the manifest says for stage {stage.id}")
    return session


_ORT_TYPES = {"float32": "float", "float64": "double", "bool": "bool"}
