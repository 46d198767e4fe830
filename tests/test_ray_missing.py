"""Without Ray installed, `--engine ray` says how to install it (one line, exit code 1)."""

from __future__ import annotations

from click.testing import CliRunner

from conftest import EXAMPLE
from lcpc.cli import main
from lcpc.pipeline import convert as convert_model


def test_engine_ray_without_ray_says_how_to_install(tmp_path, monkeypatch):
    from lcpc.runtime import ray as ray_target

    monkeypatch.setattr(ray_target, "ray", None)
    convert_model(EXAMPLE, tmp_path / "out", 2, "none")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "out"), "--input", str(EXAMPLE.parent / "sample.npy"),
                                       "--engine", "ray"])
    assert result.exit_code == 1
    assert "pip install 'lcpc[ray]'" in result.output
    assert "Traceback" not in result.output
