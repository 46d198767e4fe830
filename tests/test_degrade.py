"""Answers with a device left out (``lcpc.runtime.degrade``), against an oracle built from the
stage files themselves: the head's merge is linear in the branches' contributions, so the
degraded answer is the merge of the zero contributions plus each present branch's own term,
scaled by 1 / (the present branches' share of the merged channels)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import EXAMPLE, reference, run_folder
from lcpc.cli import main
from lcpc.errors import LcpcError
from lcpc.pipeline import convert, verify
from lcpc.runtime.feeds import Stats
from lcpc.runtime.local import LocalEngine


@pytest.fixture(scope="module")
def folders(tmp_path_factory, zoo_bytes):
    tmp = tmp_path_factory.mktemp("degrade")
    made = {"digits": convert(EXAMPLE, tmp / "digits", 4, "none"),       # partial logits merged
            "vgg": convert(zoo_bytes["vgg"], tmp / "vgg", 3, "none"),     # pooled features gathered
            "all": convert(EXAMPLE, tmp / "all", 4, "all"),
            "int8": convert(EXAMPLE, tmp / "int8", 4, "none", wire="int8")}
    assert made["digits"]["plan"]["merges"] == {"/fc/Gemm": "partial"}
    assert set(made["vgg"]["plan"]["merges"].values()) == {"features"}
    return {name: tmp / name for name in made}


def _oracle(folder, x: np.ndarray, missing: set[int]) -> np.ndarray:
    """The degraded logits from the stage files: run every stage on its own (onnxruntime), then the
    head's merge stage once with every contribution zero and once per branch with only its own."""
    m = json.loads((folder / "manifest.json").read_text())
    section = m["degrade"]
    values: dict[tuple[int, str], np.ndarray] = {(0, i["name"]): x for i in m["source"]["inputs"]}
    merge = next(s for s in m["stages"] if s["id"] == section["stage"])

    def deliver(before_level: int) -> None:
        for t in m["transfers"]:
            src, dst = (t["from"]["device"], t["from"]["name"]), (t["to"]["device"], t["to"]["name"])
            if (t["kind"] == "input" or t["level"] < before_level) and src in values and dst not in values:
                values[dst] = values[src]

    last = max(s["level"] for s in m["stages"])
    for level in range(last + 1):
        deliver(level)
        for s in m["stages"]:
            if s["level"] == level and s is not merge:
                outs = reference(folder / s["file"], {i["name"]: values[(s["device"], i["name"])] for i in s["inputs"]})
                values.update({(s["device"], o["name"]): v for o, v in zip(s["outputs"], outs)})
    deliver(last + 1)
    contributions = section["inputs"]

    def head(only: int | None) -> np.ndarray:
        feeds = {i["name"]: values[(0, i["name"])] for i in merge["inputs"]}
        for c in contributions:
            if c["device"] != only:
                feeds[c["name"]] = np.zeros_like(feeds[c["name"]])
        return reference(folder / merge["file"], feeds)[0]

    base = head(None)
    present = [c for c in contributions if c["device"] not in missing]
    share = sum(c["share"] for c in present)
    return base + sum(head(c["device"]) - base for c in present) / share


@pytest.mark.parametrize("model, without", [("digits", ["dev2"]), ("digits", ["dev1", "dev3"]),
                                            ("vgg", ["dev1"]), ("vgg", ["dev2"])])
def test_degraded_answer_equals_the_linear_merge_of_the_present_branches(folders, model, without):
    folder = folders[model]
    manifest = json.loads((folder / "manifest.json").read_text())
    shape = manifest["source"]["inputs"][0]["shape"]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    stats = Stats()
    with LocalEngine(folder) as engine:
        got = engine.run({manifest["source"]["inputs"][0]["name"]: x}, stats, request="r", without=without)
        full = engine.run({manifest["source"]["inputs"][0]["name"]: x})
    want = _oracle(folder, x, {int(d[3:]) for d in without})
    out = next(iter(got.values()))
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert not np.allclose(out, next(iter(full.values())))  # leaving a branch out changed the answer
    assert stats.degraded == {"r": tuple(without)}
    gone = {int(d[3:]) for d in without}
    moved = {t["id"]: t["bytes"] for t in manifest["transfers"] if not {t["from"]["device"], t["to"]["device"]} & gone}
    assert dict(stats.bytes_by_transfer) == moved  # nothing to or from the missing devices


def test_nothing_left_out_is_the_exact_answer(folders):
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    got, stats, _ = run_folder(folders["digits"], {"input": x})
    np.testing.assert_allclose(got["logits"], _oracle_all(folders["digits"], x), rtol=1e-5, atol=1e-5)
    assert stats.degraded == {}


def _oracle_all(folder, x):
    return np.concatenate([_oracle(folder, x[i:i + 1], set()) for i in range(len(x))])


@pytest.mark.parametrize("model, without, why", [
    ("digits", ["dev0"], "dev0 is the head"),
    ("digits", ["dev9"], "no such device"),
    ("all", ["dev1"], "cannot answer with a device missing: the branches exchange"),
    ("int8", ["dev1"], "--wire int8"),
])
def test_what_cannot_be_left_out_is_refused_with_the_reason(folders, model, without, why):
    x = np.zeros((1, 1, 8, 8), np.float32)
    with LocalEngine(folders[model]) as engine, pytest.raises(LcpcError, match=why):
        engine.run({"input": x}, without=without)
    result = CliRunner().invoke(main, ["run", str(folders[model]), "--input", str(EXAMPLE.parent / "sample.npy"),
                                       "--without", without[0]])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and why.split(":")[0] in result.output


def test_cli_run_and_verify_say_what_was_left_out(folders, tmp_path):
    sample = EXAMPLE.parent / "sample.npy"
    result = CliRunner().invoke(main, ["run", str(folders["digits"]), "--input", str(sample), "--without", "dev3",
                                       "--stats", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert "degraded: answered without dev3" in result.output
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["degraded"] == [{"request": "run", "without": ["dev3"]}]
    assert all(r["bytes"] == 0 for r in stats["transfers"] if 3 in (r["from"], r["to"]))
    x = np.load(EXAMPLE.parent / "test.npy")[:64]
    y = np.load(EXAMPLE.parent / "test_labels.npy")[:64]
    full, without = verify(folders["digits"], x, y), verify(folders["digits"], x, y, without=("dev3",))
    assert without["without"] == ["dev3"] and full["without"] == []
    assert without["kl_divergence"] != full["kl_divergence"]
