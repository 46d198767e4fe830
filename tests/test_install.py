"""How lcpc imports: the runtime apart from the compiler, and the same packages from a checkout,
an editable install and a wheel, in every process an engine starts.

Each check runs in a fresh interpreter, so what this test process already imported proves nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE, ROOT

COMPILER = ("lcpc.frontend", "lcpc.planner", "lcpc.plan", "lcpc.analysis", "lcpc.lower", "lcpc.pipeline",
            "lcpc.passes", "lcpc.targets", "onnx_graphsurgeon")


def _python(code: str, cwd: Path, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter started in ``cwd``, without the current folder on its path
    (as a console script runs: ``lcpc`` is found where it is installed, not in ``cwd``)."""
    prelude = "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_the_runtime_loads_nothing_of_the_compiler(tmp_path):
    """``import lcpc; lcpc.Deployment`` and every runtime module, serving a folder end to end, load no
    module of the front end, planner, passes or onnx-graphsurgeon (the check would fail if one did:
    the same code asserts that ``lcpc.cli`` does load them)."""
    from lcpc import pipeline

    pipeline.convert(EXAMPLE, tmp_path / "out", 2, "none")
    x = tmp_path / "x.npy"
    code = f"""
import numpy as np
import lcpc
from lcpc.runtime import bench, deployment, engine, feeds, local, manifest, mpi, order, serving, session
from lcpc.perf import devices, measured, network
np.save({str(x)!r}, np.zeros((2, 1, 8, 8), np.float32))
with lcpc.Deployment({str(tmp_path / 'out')!r}) as dep:
    report = dep.serve(deployment.requests_from_source({str(x)!r}, dep.manifest)[0])
assert report.answered == 2, report
loaded = sorted(m for m in {COMPILER!r} if m in sys.modules)
assert not loaded, loaded
import lcpc.cli
assert all(m in sys.modules for m in ("lcpc.frontend", "lcpc.passes", "onnx_graphsurgeon"))
print("ok")
"""
    result = _python(code, tmp_path, {"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """lcpc installed as a regular (non-editable) package into a folder of its own."""
    target, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    for name in ("lcpc", "passes", "targets"):  # a copy, so the build leaves nothing in the checkout
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", str(target), str(source)],
                           capture_output=True, text=True, timeout=300)
    if build.returncode != 0:
        pytest.skip(f"cannot build the package here: {build.stderr.strip().splitlines()[-1:]}")
    assert (target / "lcpc" / "passes" / "__init__.py").is_file() and (target / "lcpc" / "targets").is_dir()
    return target


def test_wheel_imports_its_own_subpackages_from_anywhere(wheel, tmp_path):
    """From another folder, the installed copy is used whole: ``lcpc.passes`` and ``lcpc.targets``
    come from the wheel, not from a checkout."""
    code = """
import lcpc, lcpc.passes, lcpc.targets, lcpc.runtime.ray
print(lcpc.__file__, lcpc.passes.__file__, lcpc.targets.__file__, lcpc.runtime.ray.__file__)
"""
    result = _python(code, tmp_path, {"PYTHONPATH": str(wheel)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(p.startswith(str(wheel)) for p in result.stdout.split()), result.stdout


def test_ray_engine_from_the_checkout_root_under_a_regular_install(wheel, tmp_path):
    """The reported failure: with lcpc installed as a wheel, ``lcpc run OUT --engine ray`` started
    in the clone's root, where Ray's workers put the source ``lcpc/`` first on their path. The actors
    must import the engine (``lcpc.runtime.ray``) and the run must equal the local engine."""
    pytest.importorskip("ray")
    from lcpc import pipeline

    pipeline.convert(EXAMPLE, tmp_path / "out", 2, "none")
    code = f"""
import json, numpy as np
from lcpc.cli import main
x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
np.save({str(tmp_path / 'x.npy')!r}, x)
for engine in ("local", "ray"):
    args = ["run", {str(tmp_path / 'out')!r}, "--input", {str(tmp_path / 'x.npy')!r}, "--engine", engine,
            "--output", {str(tmp_path)!r} + f"/{{engine}}.npz"]
    if engine == "ray":
        args += ["--ray-mode", "actor-calls", "--timeout", "120"]
    try:
        main(args, standalone_mode=False)
    except SystemExit as exc:
        assert not exc.code, exc.code
import lcpc
print(lcpc.__file__)
"""
    result = _python(code, ROOT, {"PYTHONPATH": str(wheel)}, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith(str(wheel))
    import numpy as np

    local, ray = np.load(tmp_path / "local.npz"), np.load(tmp_path / "ray.npz")
    assert set(local) == set(ray) and all(np.array_equal(local[k], ray[k]) for k in local)
