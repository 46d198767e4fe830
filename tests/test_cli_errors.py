"""Done-means 4 of the core issue: bad input ends in one clear line, non-zero exit, no
traceback, and no output folder left behind."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import EXAMPLE

from lcpc.cli import main


def convert(tmp_path, *args):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", *map(str, args), "-o", str(out)])
    return result, out


def assert_clean_failure(result, out, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in out.parent.iterdir())


def test_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 10)
    result, out = convert(tmp_path, bad)
    assert_clean_failure(result, out, "notes.onnx", "not an ONNX model")


def test_truncated(tmp_path):
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(EXAMPLE.read_bytes()[:5000])
    result, out = convert(tmp_path, bad)
    assert_clean_failure(result, out, "cut.onnx")


def test_empty(tmp_path):
    bad = tmp_path / "empty.onnx"
    bad.write_bytes(b"")
    result, out = convert(tmp_path, bad)
    assert_clean_failure(result, out, "empty")


def test_missing_file(tmp_path):
    result, out = convert(tmp_path, tmp_path / "nope.onnx")
    assert result.exit_code != 0
    assert not out.exists()


@pytest.mark.parametrize("k", [33, 64])
def test_k_larger_than_channel_space(tmp_path, k):
    result, out = convert(tmp_path, EXAMPLE, "--branches", k)
    assert_clean_failure(result, out, f"--branches {k}", "channel space", "--branches 32 or fewer")


def test_k_out_of_range(tmp_path):
    result, out = convert(tmp_path, EXAMPLE, "--branches", 1)
    assert_clean_failure(result, out, "between 2 and 64")


def test_unknown_input_shape_name(tmp_path):
    result, out = convert(tmp_path, EXAMPLE, "--input-shape", "image:1x1x8x8")
    assert_clean_failure(result, out, "'image'", "input")


def test_malformed_input_shape(tmp_path):
    result, out = convert(tmp_path, EXAMPLE, "--input-shape", "input:1xAx8")
    assert_clean_failure(result, out, "NAME:DIMS")


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["convert", str(EXAMPLE), "-o", str(out)])
    assert result.exit_code == 1 and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(main, ["convert", str(EXAMPLE), "-o", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_run_rejects_wrong_shape(tmp_path):
    import numpy as np

    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["convert", str(EXAMPLE), "-o", str(out)]).exit_code == 0
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 8, 8), np.float32))
    result = CliRunner().invoke(main, ["run", str(out), "--input", str(tmp_path / "x.npy")])
    assert result.exit_code == 1 and "shape (2, 3, 8, 8)" in result.stderr


def test_recover_recipe_options_need_distillation(tmp_path):
    import numpy as np

    folder = tmp_path / "cut"
    assert CliRunner().invoke(main, ["convert", str(EXAMPLE), "-o", str(folder)]).exit_code == 0
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 8, 8), np.float32))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["recover", str(folder), "--data", str(tmp_path / "x.npy"), "--epochs", "0",
                                       "--lr", "0.01", "--augment", "shift+flip", "-o", str(out)])
    assert_clean_failure(result, out, "--lr and --augment", "--epochs 0")
    for option, value in (("--views", "0"), ("--temperature", "0")):
        result = CliRunner().invoke(main, ["recover", str(folder), "--data", str(tmp_path / "x.npy"), "--epochs", "1",
                                           option, value, "-o", str(out)])
        assert_clean_failure(result, out, f"{option.lstrip('-')} {value}", f"({option})")


def test_auto_sync_recover_refuses_raw_uint8_data(tmp_path):
    import numpy as np

    np.save(tmp_path / "calib.npy", np.zeros((4, 1, 8, 8), np.float32))
    np.save(tmp_path / "raw.npy", np.zeros((8, 1, 8, 8), np.uint8))
    result, out = convert(tmp_path, EXAMPLE, "--sync", "auto", "--calib", tmp_path / "calib.npy", "--comm-budget",
                          100000, "--recover", tmp_path / "raw.npy", "--epochs", 0)
    assert_clean_failure(result, out, "--sync auto with --recover needs float model inputs")
