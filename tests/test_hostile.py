"""Issue 5: hostile and broken inputs fail clearly, lose nothing, trust nothing.

Every case of ``tests/corpus/cases.json`` (models, runtime inputs, manifest edits) ends
in exit code 1 and one line ``error: ...`` naming the file and the problem, with no
traceback and no output folder left behind; the same case through the API raises
``LcpcError``. A Python audit hook records every file opened and every class a pickle
would resolve (``tests/audit.py``), so "never read" and "never unpickled" are checked.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from audit import audited, opened, unpickled
from click.testing import CliRunner
from conftest import nothing_left, one_line_error, reference, rel_err
from corpus import build

from lcpc import frontend
from lcpc.runtime import manifest as mf
from lcpc import pipeline, reader
from lcpc.cli import main
from lcpc.errors import LcpcError
from lcpc.ir import to_onnx
from lcpc.targets import onnx as onnx_target
from lcpc.runtime.local import LocalEngine

CORPUS = Path(__file__).resolve().parent / "corpus"
CASES = json.loads((CORPUS / "cases.json").read_text())
SECRET = "../outside/secret.bin"

# ----------------------------------------------------------------------------- helpers
def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def place_model(tmp_path: Path, name: str) -> Path:
    """The corpus model in its own folder beside ``outside/secret.bin``, a file with exactly
    the bytes the escaping tensors claim, so reading it would succeed and be noticed."""
    folder = tmp_path / "model"
    folder.mkdir()
    for side in ("external_ok.bin", "external_short.bin"):
        shutil.copy(CORPUS / "models" / side, folder / side)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.bin").write_bytes((CORPUS / "models" / "external_ok.bin").read_bytes())
    shutil.copy(CORPUS / "models" / name, folder / name)
    return folder / name


# ----------------------------------------------------------------------------- corpus
def test_corpus_is_reproducible(tmp_path):
    built = {path.relative_to(tmp_path) for path in build.build(tmp_path)}
    for rel in built:
        assert (CORPUS / rel).read_bytes() == (tmp_path / rel).read_bytes(), f"{rel}: rerun tests/corpus/build.py"
    committed = {p.relative_to(CORPUS) for sub in ("models", "inputs", "devices", "images", "options")
                 for p in (CORPUS / sub).iterdir()}
    assert committed <= built, f"stale corpus files: {sorted(map(str, committed - built))}"


MODEL_CASES = CASES["models"]


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c["file"] for c in MODEL_CASES])
def test_model_case_cli(tmp_path, case):
    model = place_model(tmp_path, case["file"])
    out = tmp_path / "out"
    with audited() as events:
        result = invoke("convert", model, "-o", out, "--branches", 2, *case["args"])
    assert not opened(events, tmp_path / "outside" / "secret.bin")
    if case["expect"] is None:
        assert result.exit_code == 0, result.stderr
        assert (out / "manifest.json").is_file()
        return
    one_line_error(result, case["file"], *case["expect"])
    nothing_left(tmp_path, out)


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c["file"] for c in MODEL_CASES])
def test_model_case_api(tmp_path, case):
    model = place_model(tmp_path, case["file"])
    if case["expect"] is None:
        graph, _ = frontend.load(model)
        x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
        got = reference(to_onnx(graph).SerializeToString(), {"x": x})[0]
        original = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])  # from the path:
        assert rel_err(got, original.run(None, {"x": x})[0]) < 1e-5  # external data next to it
        return
    with pytest.raises(LcpcError) as info:
        frontend.load(model)
    message = str(info.value)
    assert "\n" not in message and all(part in message for part in case["expect"]), message


@pytest.mark.parametrize("name", ["external_parent.onnx", "external_in_subgraph.onnx"])
def test_escaping_external_data_is_never_opened(tmp_path, name):
    model = place_model(tmp_path, name)
    secret = tmp_path / "outside" / "secret.bin"
    with audited() as events, pytest.raises(LcpcError, match="outside the model's folder"):
        frontend.load(model)
    assert not opened(events, secret)
    # the same weights one folder down are read, and the model loads
    (tmp_path / "ok").mkdir()
    ok = place_model(tmp_path / "ok", "external_ok.onnx")
    with audited() as events:
        frontend.load(ok)
    assert opened(events, ok.parent / "external_ok.bin")


def test_external_data_symlink_leaving_the_folder_is_refused(tmp_path):
    model = place_model(tmp_path, "external_ok.onnx")
    data = model.parent / "external_ok.bin"
    data.unlink()
    data.symlink_to(tmp_path / "outside" / "secret.bin")
    with audited() as events, pytest.raises(LcpcError, match="outside the model's folder"):
        frontend.load(model)
    assert not opened(events, tmp_path / "outside" / "secret.bin")


def test_bounded_loop_loads_and_matches():
    """check_loops refuses unbounded Loops only (the corpus has those); a bounded one loads."""
    model = build.loop(10).SerializeToString()
    graph, _ = frontend.load(model)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert rel_err(reference(to_onnx(graph).SerializeToString(), {"x": x})[0], reference(model, {"x": x})[0]) < 1e-6


def test_external_data_needs_a_path(tmp_path):
    with pytest.raises(LcpcError, match="load it from a path, not bytes"):
        frontend.load((CORPUS / "models" / "external_ok.onnx").read_bytes())


def test_model_larger_than_protobuf_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "MAX_MODEL_BYTES", 100)
    model = place_model(tmp_path, "good.onnx")
    with audited() as events, pytest.raises(LcpcError, match="larger than 2 GiB.*external data"):
        frontend.load(model)
    assert not opened(events, model)


def test_model_folder_instead_of_file(tmp_path):
    with pytest.raises(LcpcError, match="is a folder"):
        frontend.load(tmp_path)


def test_control_characters_in_names_are_escaped(tmp_path):
    model = onnx.load_model_from_string((CORPUS / "models" / "dynamic_spatial.onnx").read_bytes())
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "\x1b[2J\x1b[31mH"
    path = tmp_path / "ansi.onnx"
    path.write_bytes(model.SerializeToString())
    line = one_line_error(invoke("convert", path, "-o", tmp_path / "out"), "ansi.onnx", "\\x1b[2J")
    assert "\x1b" not in line


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("convert", CORPUS / "models" / "not_onnx.onnx", "-o", tmp_path / "out", "--debug")
    assert result.exit_code != 0 and isinstance(result.exception, LcpcError)


# ----------------------------------------------------------------------------- runtime inputs
@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "out"
    pipeline.convert(CORPUS / "models" / "good.onnx", out, 2)
    return out


def test_good_input_runs_and_matches(good_folder, tmp_path):
    result = invoke("run", good_folder, "--input", CORPUS / "inputs" / "good.npy", "--output", tmp_path / "y.npz")
    assert result.exit_code == 0, result.stderr
    x = np.load(CORPUS / "inputs" / "good.npy")
    # --sync none cuts no layer of this model (its one Conv feeds the classifier): exact
    assert rel_err(np.load(tmp_path / "y.npz")["y"], reference(CORPUS / "models" / "good.onnx", {"x": x})[0]) < 1e-5


INPUT_CASES = [c for c in CASES["inputs"] if c["expect"]]


@pytest.mark.parametrize("case", INPUT_CASES, ids=[c["file"] for c in INPUT_CASES])
def test_input_case_cli(good_folder, case):
    with audited() as events:
        result = invoke("run", good_folder, "--input", CORPUS / "inputs" / case["file"])
    one_line_error(result, case["file"], *case["expect"])
    assert not unpickled(events)


def test_input_named_and_twice(good_folder):
    good = CORPUS / "inputs" / "good.npy"
    assert invoke("run", good_folder, "--input", f"x={good}").exit_code == 0
    one_line_error(invoke("run", good_folder, "--input", f"x={good}", "--input", f"x={good}"),
                          "good.npy", "input 'x' is also given")
    one_line_error(invoke("run", good_folder, "--input", f"image={good}"), "['image'] unknown")


@pytest.mark.parametrize("feeds, message", [
    ({}, r"\['x'\] missing"),
    ({"x": np.zeros((3, 3, 8, 8), np.float32)[::2]}, None),  # a strided batch of 2 runs
    ({"x": [[1.0]]}, "expected a numpy array"),
])
def test_engine_checks_inputs(good_folder, feeds, message):
    engine = LocalEngine(good_folder)
    try:
        if message is None:
            assert engine.run(feeds)["y"].shape == (2, 4)
        else:
            with pytest.raises(LcpcError, match=message):
                engine.run(feeds)
    finally:
        engine.close()


def test_output_file_that_cannot_be_written(good_folder, tmp_path):
    result = invoke("run", good_folder, "--input", CORPUS / "inputs" / "good.npy",
                    "--output", tmp_path / "no" / "such" / "y.npz")
    one_line_error(result, "y.npz", "No such file or directory")


# ----------------------------------------------------------------------------- manifests
def _pointer(doc, pointer: str):
    *parents, last = [int(p) if p.isdigit() else p for p in pointer.strip("/").split("/")]
    for p in parents:
        doc = doc[p]
    return doc, last


def apply_edit(folder: Path, edit: dict, outside: Path) -> None:
    """The vocabulary of ``cases.json``'s manifest edits."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    first, last = (folder / s["file"] for s in (manifest["stages"][0], manifest["stages"][-1]))
    if "set" in edit or "add" in edit:
        parent, key = _pointer(manifest, edit.get("set") or edit["add"])
        parent[key] = edit["value"]
        path.write_text(json.dumps(manifest))
    elif "remove" in edit:
        parent, key = _pointer(manifest, edit["remove"])
        del parent[key]
        path.write_text(json.dumps(manifest))
    elif "raw" in edit:
        path.write_text(edit["raw"])
    elif "raw_bytes" in edit:
        path.write_bytes(bytes.fromhex(edit["raw_bytes"]))
    elif "raw_replace" in edit:
        old, new = edit["raw_replace"]
        text = json.dumps(manifest, indent=1)
        assert old in text
        path.write_text(text.replace(old, new, 1))
    elif edit.get("stage") == "append":
        first.write_bytes(first.read_bytes() + b"\0")
    elif edit.get("stage") == "delete":
        first.unlink()
    elif edit.get("stage") == "symlink_outside":
        shutil.copy(first, outside / first.name)
        first.unlink()
        first.symlink_to(outside / first.name)
    elif edit.get("stage") == "swap_with_last":  # a consistent manifest whose file does something else
        first.write_bytes(last.read_bytes())
        manifest["stages"][0]["sha256"] = manifest["stages"][-1]["sha256"]
        path.write_text(json.dumps(manifest))
    elif edit.get("manifest") == "delete":
        path.unlink()
    elif edit.get("manifest") == "symlink_outside":
        shutil.copy(path, outside / "manifest.json")
        path.unlink()
        path.symlink_to(outside / "manifest.json")
    else:
        raise AssertionError(f"unknown edit {edit}")


MANIFEST_CASES = CASES["manifests"]


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=[c["name"] for c in MANIFEST_CASES])
def test_manifest_case(good_folder, tmp_path, case):
    folder = tmp_path / "out"
    shutil.copytree(good_folder, folder)
    (tmp_path / "outside").mkdir()
    apply_edit(folder, case["edit"], tmp_path / "outside")
    with audited() as events:
        result = invoke("run", folder, "--input", CORPUS / "inputs" / "good.npy")
    line = one_line_error(result, *case["expect"])
    assert str(folder / "manifest.json") in line or str(folder / "d0_l0.onnx") in line  # names the file
    assert not unpickled(events)
    assert not any(opened(events, p) for p in (tmp_path / "outside").iterdir())
    with pytest.raises(LcpcError):
        LocalEngine(folder).close()


def test_manifest_read_is_the_one_gate(good_folder, tmp_path, monkeypatch):
    """The tamper check lives in manifest.read, so every reader (report too) gets it."""
    folder = tmp_path / "out"
    shutil.copytree(good_folder, folder)
    apply_edit(folder, {"stage": "append"}, tmp_path)
    one_line_error(invoke("report", folder), "sha256 differs")
    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", 10)
    one_line_error(invoke("report", good_folder), "manifest larger than")


def test_stage_file_is_loaded_from_the_checked_bytes(good_folder, tmp_path, monkeypatch):
    """A stage file swapped right after its check is never what onnxruntime runs."""
    folder = tmp_path / "out"
    shutil.copytree(good_folder, folder)
    checked, calls = mf.read_stage, []

    def swap_after_second_check(f, stage):  # the first check is manifest.read's, the second the engine's
        data = checked(f, stage)
        calls.append(stage.id)
        if calls.count(stage.id) == 2:
            (Path(f) / stage.file).write_bytes(b"swapped")
        return data

    monkeypatch.setattr(mf, "read_stage", swap_after_second_check)
    engine = LocalEngine(folder)
    try:
        x = np.load(CORPUS / "inputs" / "good.npy")
        assert rel_err(engine.run({"x": x})["y"], reference(CORPUS / "models" / "good.onnx", {"x": x})[0]) < 1e-5
    finally:
        engine.close()
    assert all((folder / f"{s}.onnx").read_bytes() == b"swapped" for s in set(calls))


# ----------------------------------------------------------------------------- output folder
class Boom(Exception):
    pass


def fail_after(monkeypatch, n: int, exc: type[BaseException] = Boom) -> None:
    """Make the stage writer raise after ``n`` files."""
    real = onnx_target.onnx.save_model
    count = [0]

    def save(model, path, *a, **k):
        if count[0] == n:
            raise exc("disk full")
        count[0] += 1
        real(model, path, *a, **k)

    monkeypatch.setattr(onnx_target.onnx, "save_model", save)


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_failure_midway_leaves_nothing(tmp_path, monkeypatch, exc):
    out = tmp_path / "new" / "deeper" / "out"
    fail_after(monkeypatch, 2, exc)
    with pytest.raises(exc):
        pipeline.convert(CORPUS / "models" / "good.onnx", out, 2)
    assert not (tmp_path / "new").exists()  # nor the parents this call created


def test_failure_midway_keeps_the_existing_folder(tmp_path, monkeypatch, good_folder):
    out = tmp_path / "out"
    shutil.copytree(good_folder, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fail_after(monkeypatch, 2)
    with pytest.raises(Boom):
        pipeline.convert(CORPUS / "models" / "good.onnx", out, 2, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch, good_folder):
    out = tmp_path / "out"
    shutil.copytree(good_folder, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = Path.rename

    def rename(self, target):
        if self.name.startswith(".out.tmp-"):
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError):
        pipeline.convert(CORPUS / "models" / "good.onnx", out, 2, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_bad_model_with_force_keeps_the_existing_folder(tmp_path, good_folder):
    out = tmp_path / "out"
    shutil.copytree(good_folder, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one_line_error(invoke("convert", CORPUS / "models" / "truncated.onnx", "-o", out, "--force"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_non_empty_out_needs_force_and_a_file_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    one_line_error(invoke("convert", CORPUS / "models" / "good.onnx", "-o", out, "-k", 2), "--force")
    assert (out / "mine.txt").read_text() == "keep"
    plan_file = tmp_path / "plan"
    plan_file.write_text("keep")
    with pytest.raises(LcpcError, match="not a folder"):
        onnx_target.check_out(plan_file, force=True)
    assert plan_file.read_text() == "keep"


def test_unexpected_exception_is_one_line_exit_2(tmp_path, monkeypatch):
    def bug(*a, **k):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(frontend, "load", bug)
    result = invoke("convert", CORPUS / "models" / "good.onnx", "-o", tmp_path / "out")
    one_line_error(result, "internal error: ZeroDivisionError: division by zero", "--debug", code=2)
    assert isinstance(invoke("convert", CORPUS / "models" / "good.onnx", "-o", tmp_path / "out",
                             "--debug").exception, ZeroDivisionError)


def test_umask_is_respected(tmp_path):
    old = os.umask(0o027)
    try:
        pipeline.convert(CORPUS / "models" / "good.onnx", tmp_path / "out", 2)
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
