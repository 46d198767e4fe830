"""``lcpc bench``: its figures are consistent with the manifest (one entry per stage and per
device, device time = sum of its stages, critical path by levels), and bad input ends in one
clear line. No test here asserts a time."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import EXAMPLE

from lcpc.runtime import manifest as mf
from lcpc.cli import main
from lcpc.pipeline import convert as convert_model
from lcpc.runtime import bench


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    convert_model(EXAMPLE, out, 4)
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_result_matches_manifest(folder, threads):
    m = mf.read(folder).json
    r = bench.bench(folder, threads=threads, runs=3, warmup=1)
    assert [s["id"] for s in r["stages"]] == [s["id"] for s in m["stages"]]
    assert [d["device"] for d in r["devices"]] == [d["id"] for d in m["devices"]]
    assert r["threads"] == threads and r["runs"] == 3 and r["branches"] == m["branches"] == 4
    by_id = {s["id"]: s for s in r["stages"]}
    for d in r["devices"]:
        mine = [s for s in m["stages"] if s["device"] == d["device"]]
        assert d["stages"] == [s["id"] for s in mine]
        assert d["ms"] == pytest.approx(sum(by_id[s["id"]]["median_ms"] for s in mine))
        assert d["flops"] == sum(s["flops"] for s in mine)
        assert d["speedup"] == pytest.approx(r["original"]["median_ms"] / d["ms"])
        assert d["share"] == pytest.approx(d["speedup"] / d["flop_ratio"])
    for s in r["stages"]:
        assert s["min_ms"] <= s["median_ms"] <= s["max_ms"] and s["iqr_ms"] >= 0
    levels = {s["level"] for s in m["stages"]}
    assert r["critical_path_ms"] == pytest.approx(sum(max(by_id[s["id"]]["median_ms"] for s in m["stages"]
                                                         if s["level"] == lv) for lv in levels))
    slowest = max(r["devices"], key=lambda d: d["ms"])
    assert r["slowest_device"] == slowest["device"]
    assert r["speedup"] == pytest.approx(r["original"]["median_ms"] / slowest["ms"])
    assert r["flop_ratio"] == pytest.approx(m["totals"]["original"]["flops"] / max(d["flops"] for d in r["devices"]))
    assert r["original"]["flops"] == m["totals"]["original"]["flops"]
    assert {"cpu", "cores", "onnxruntime"} <= set(r["machine"])


def test_formats_carry_the_same_rows(folder):
    r = bench.bench(folder, runs=1, warmup=0)
    assert json.loads(bench.render(r, "json")) == json.loads(json.dumps(r))
    for fmt in ("text", "markdown"):
        text = bench.render(r, fmt)
        assert text.count("device ") >= len(r["devices"]) and "original" in text and "critical path" in text


def test_cli_bench_json(folder):
    result = CliRunner().invoke(main, ["bench", str(folder), "--runs", "2", "--warmup", "0", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["stages"]) == len(mf.read(folder).stages)


def _fails(args, *needles):
    result = CliRunner().invoke(main, ["bench", *map(str, args)])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_clear_errors(folder, tmp_path):
    _fails([tmp_path / "nowhere"], "no such folder")
    _fails([folder, "--runs", "0"], "--runs")
    other = tmp_path / "other.onnx"
    other.write_bytes(EXAMPLE.read_bytes() + b"\0")
    _fails([folder, "--model", other], "sha256")
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    m = json.loads((moved / "manifest.json").read_text())
    m["source"]["path"] = str(tmp_path / "gone.onnx")
    (moved / "manifest.json").write_text(json.dumps(m))
    _fails([moved], "--model")
    result = CliRunner().invoke(main, ["bench", str(moved), "--model", str(EXAMPLE), "--runs", "1"])
    assert result.exit_code == 0, result.output
