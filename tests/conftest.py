"""Shared fixtures: the zoo, the example model, helpers to convert and run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from examples.zoo import ZOO

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits" / "digits_cnn.onnx"
SHARED = ROOT.parent / "shared"


def reference(model: bytes | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model.read_bytes() if isinstance(model, Path) else model
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_folder(folder, feeds: dict[str, np.ndarray]):
    """Run a converted folder with the local engine: (outputs, Stats, the manifest's JSON)."""
    from lcpc.runtime.feeds import Stats
    from lcpc.runtime.local import LocalEngine

    stats = Stats()
    with LocalEngine(folder) as engine:
        return engine.run(feeds, stats), stats, engine.manifest.json


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture(scope="session")
def zoo_bytes() -> dict[str, bytes]:
    return {name: build().SerializeToString() for name, build in ZOO.items()}


@pytest.fixture
def no_torch(monkeypatch):
    """``import torch`` (and its submodules) raises ImportError for the rest of the test."""
    import builtins

    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)


@pytest.fixture(scope="session")
def digits_calib():
    """(256 digits training images for calibration, the digits test images)."""
    from examples.digits.data import load_split

    x_train, _, x_test, _ = load_split()
    return x_train[:256], x_test


@pytest.fixture(scope="session")
def resnet18_half(tmp_path_factory) -> Path:
    """A ResNet-18 at half width, 224x224, random weights (benchmarks/models.py): big enough
    that compute, not per-node overhead, decides how devices balance."""
    import onnx

    from benchmarks import models

    path = tmp_path_factory.mktemp("resnet18_half") / "resnet18.onnx"
    onnx.save(models.build("resnet18", width=0.5), path)
    return path


def one_line_error(result, *needles: str, code: int = 1) -> str:
    """A CLI result that failed as lcpc promises: exit ``code``, no traceback, one line ``error: ...``
    holding every needle; returns the line."""
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def nothing_left(parent: Path, out: Path) -> None:
    """No output folder ``out`` and no temporary sibling of it (or of lcpc's) left in ``parent``."""
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith((f".{out.name}.", ".lcpc-"))]
