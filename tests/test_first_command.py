"""The README's first command: convert, recover (least squares, no PyTorch) and verify the
bundled example; the shipped data files are the example's split."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import EXAMPLE, ROOT

from lcpc.cli import main

NO_TORCH = "import sys; sys.modules['torch'] = None; from lcpc.cli import main; main()"


def _first_command() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    line = next(ln.strip() for ln in readme.splitlines() if ln.strip().startswith("pip install -e . && lcpc"))
    commands = [shlex.split(part) for part in line.split("&&")]
    assert commands[0][:2] == ["pip", "install"]
    return [c[1:] for c in commands[1:] if c[0] == "lcpc"]


def test_readme_first_command_recovers_without_torch(tmp_path):
    commands = _first_command()
    assert [c[0] for c in commands] == ["convert", "verify"]
    outputs = []
    for args in commands:
        args = [str(tmp_path / "digits") if a == "out/digits" else a for a in args]
        done = subprocess.run([sys.executable, "-c", NO_TORCH, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert re.search(r"refit \(held-out, \d+ samples\): agreement [\d.]+% -> 9\d\.\d+%", outputs[0])
    accuracy = float(re.search(r"lcp accuracy\s+([\d.]+)%", outputs[1]).group(1))
    assert accuracy >= 97.0
    manifest = json.loads((tmp_path / "digits" / "manifest.json").read_text())
    assert manifest["branches"] == 4 and manifest["sync"]["cuts"]
    assert set(manifest["fidelity"]["recovery"]) == {"data", "refit"}
    assert manifest["fidelity"]["recovery"]["data"]["kind"] == "real"
    assert manifest["fidelity"]["recovery"]["data"]["samples"] == 1347


def test_shipped_split_matches_the_data_module():
    data = pytest.importorskip("examples.digits.data")
    pytest.importorskip("sklearn")
    for shipped, made in zip(data.load_shipped(), data.load_split()):
        assert shipped.dtype == made.dtype and np.array_equal(shipped, made)


def test_convert_says_the_cut_changed_the_model(tmp_path):
    np.save(tmp_path / "calib.npy", np.load(ROOT / "examples" / "digits" / "test.npy")[:64])
    result = CliRunner().invoke(main, ["convert", str(EXAMPLE), "-k", "4", "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "note: the cut drops the cross-branch weights" in result.output and "--calib" in result.output
    assert f"lcpc recover {tmp_path / 'a'} --data TRAIN.npy" in result.output
    result = CliRunner().invoke(main, ["convert", str(EXAMPLE), "-k", "4", "-o", str(tmp_path / "b"),
                                       "--calib", str(tmp_path / "calib.npy")])
    assert result.exit_code == 0, result.output
    agreement = float(re.search(r"top-1 agreement ([\d.]+)% and KL [\d.]+ on the 64 --calib inputs",
                                result.output).group(1))
    assert agreement < 50
    result = CliRunner().invoke(main, ["convert", str(EXAMPLE), "-k", "4", "--sync", "all", "-o", str(tmp_path / "c")])
    assert result.exit_code == 0 and "note: the cut" not in result.output
