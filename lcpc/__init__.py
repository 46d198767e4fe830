"""lcpc: compile image CNNs (ONNX) into LCP form.

K narrow, almost-independent branches, one per edge device, meeting only at a few
chosen points. Two halves meet at the written folder (``manifest.json`` plus one ONNX
file per stage):

- the compiler: ``frontend.load -> analysis.analyse -> planner.plan (passes) -> lower ->
  [compress ->] targets.onnx``, strung together by ``lcpc.pipeline`` (convert, recover,
  verify);
- the runtime (``lcpc.runtime``): reads only a written folder, through the typed
  ``runtime.manifest`` view, and runs it in the one run order (``runtime.order``):
  ``lcpc.Deployment``, the local and Ray engines, serving, bench. It imports nothing of
  the compiler;
- ``lcpc.perf``: what a plan costs, counted, modelled and measured, and the network model.

Every public step raises :class:`lcpc.errors.LcpcError` with a message a user can act on
when the input is bad.

Guarantees:
- ``lcpc.passes`` and ``lcpc.targets`` import the same way from a wheel, an editable
  install and a source checkout (where they are the top-level ``passes/`` and
  ``targets/`` folders beside this package), in every process that imports ``lcpc``
  (Ray workers included), with nothing added to ``sys.path``;
- ``import lcpc`` is light: ``lcpc.Deployment`` is imported on first use.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

__all__ = ["Deployment", "__version__"]

_HERE = Path(__file__).resolve().parent
# In a wheel the installer puts passes/ and targets/ inside the package; in a checkout they sit
# beside it (pyproject.toml maps them with package-dir) and this finder maps them the same way.
_CHECKOUT = {f"{__name__}.{name}": _HERE.parent / name for name in ("passes", "targets")
             if not (_HERE / name).is_dir() and (_HERE.parent / name / "__init__.py").is_file()}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``lcpc.passes`` and ``lcpc.targets`` in a source checkout's top-level folders."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        folder = _CHECKOUT.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


if _CHECKOUT:
    sys.meta_path.insert(0, _CheckoutFinder())


def __getattr__(name: str):
    """``lcpc.Deployment`` (the Python API for serving a folder), imported on first use so that
    ``import lcpc`` stays light."""
    if name == "Deployment":
        from lcpc.runtime.deployment import Deployment

        return Deployment
    raise AttributeError(f"module 'lcpc' has no attribute {name!r}")
