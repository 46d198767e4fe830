"""Coverage-guided fuzzing of the model loader and the manifest reader with atheris
(libFuzzer), when it is installed: ``python tests/fuzz_atheris.py MANIFEST_FOLDER
CORPUS_DIR -runs=N``. The first input byte picks the target; the rest is a model (for
``frontend.load``) or a manifest (written into MANIFEST_FOLDER for ``manifest.read``).
Anything but a result or an ``LcpcError`` with a one-line message is a crash.
``test_fuzz.py::test_atheris`` runs it for a bounded time."""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["lcpc"]):
    from lcpc import frontend
    from lcpc.runtime import manifest as mf
    from lcpc.errors import LcpcError

FOLDER = Path(sys.argv.pop(1))


def one_input(data: bytes) -> None:
    if not data:
        return
    try:
        if data[0] % 2:
            frontend.load(data[1:])
        else:
            (FOLDER / "manifest.json").write_bytes(data[1:])
            mf.read(FOLDER)
    except LcpcError as exc:
        if not str(exc).strip() or "\n" in str(exc):
            raise AssertionError(f"bad message: {exc!r}") from None


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
