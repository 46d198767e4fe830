"""Issue 25: hostile inputs on the surfaces added after the first hardening round.

Every case of ``tests/corpus/cases.json``'s ``devices``, ``preprocess``, ``images`` and ``options``
ends, through the CLI, in exit code 1 and one line ``error: ...`` naming the file or option and
why, with no traceback, no Python warning and no output folder left behind; the accepted cases
run. Devices files are refused as themselves by ``convert``, ``run`` and ``serve`` alike (with
the local engine too, which never uses one). Beyond the corpus: an alias bomb that could never
be expanded (so refusing it proves nothing was expanded), speeds at the ends of their range
through every planning pass with warnings as errors, Ctrl-C and SIGTERM in the middle of a
``convert`` (real signals, in a subprocess), and two converts into one folder.
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import EXAMPLE, nothing_left, one_line_error
from corpus import build

from lcpc import pipeline
from lcpc.cli import main, parse_preprocessing
from lcpc.errors import LcpcError
from lcpc.images import Preprocessing, load_folder
from lcpc.perf import devices, network
from lcpc.runtime import manifest as mf
from lcpc.targets import onnx as onnx_target

CORPUS = Path(__file__).resolve().parent / "corpus"
CASES = json.loads((CORPUS / "cases.json").read_text())
GOOD_MODEL = CORPUS / "models" / "good.onnx"
GOOD_INPUT = CORPUS / "inputs" / "good.npy"
WATCHDOG_S = 60  # a case taking this long is a hang: dump the stacks and stop the run


def invoke(*args) -> object:
    """The CLI in this process; any Python warning it emits fails the test."""
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    return result


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "out"
    pipeline.convert(GOOD_MODEL, out, 2)
    return out


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """good.onnx converted with a preprocessing, so it reads image folders."""
    out = tmp_path_factory.mktemp("images") / "out"
    pipeline.convert(GOOD_MODEL, out, 2, preprocessing=Preprocessing(size=(8, 8), mean=(127.0,),
                                                                     std=(128.0,)).to_dict())
    return out


@pytest.fixture(scope="module")
def cut_folder(tmp_path_factory) -> Path:
    """The digits example at K=4, pure LCP: layers are cut, so there is something to recover."""
    out = tmp_path_factory.mktemp("cut") / "out"
    assert pipeline.convert(EXAMPLE, out, 4)["sync"]["cuts"]
    return out


# ----------------------------------------------------------------------------- devices files
DEVICE_CASES = CASES["devices"]
BAD_DEVICES = [c for c in DEVICE_CASES if c["expect"]]


@pytest.mark.parametrize("case", DEVICE_CASES, ids=[c["file"] for c in DEVICE_CASES])
def test_devices_case_convert(tmp_path, case):
    spec, out = CORPUS / "devices" / case["file"], tmp_path / "out"
    result = invoke("convert", GOOD_MODEL, "-k", 2, "-o", out, "--devices", spec)
    if case["expect"] is None:
        assert result.exit_code == 0, result.stderr
        assert mf.read(out).branches == 2
        return
    one_line_error(result, case["file"], *case["expect"])
    nothing_left(tmp_path, out)


@pytest.mark.parametrize("case", DEVICE_CASES, ids=[c["file"] for c in DEVICE_CASES])
def test_devices_case_run_with_the_local_engine(good_folder, case):
    """A file the user names is used or refused, never ignored: the local engine places no device,
    yet a bad file is refused as itself, and a good one with what to do instead."""
    spec = CORPUS / "devices" / case["file"]
    result = invoke("run", good_folder, "-i", GOOD_INPUT, "--devices", spec)
    if case["expect"] is None:
        one_line_error(result, f"--devices {spec}", "the local engine runs every device in this process",
                       "--engine ray")
    else:
        one_line_error(result, case["file"], *case["expect"])


@pytest.mark.parametrize("name", ["bomb_speed.yaml", "unknown_device.yaml", "speed_tiny.yaml", "good.yaml"])
def test_devices_case_serve(good_folder, name):
    case = next(c for c in DEVICE_CASES if c["file"] == name)
    result = invoke("serve", good_folder, "-i", GOOD_INPUT, "--devices", CORPUS / "devices" / name)
    one_line_error(result, name, *(case["expect"] or ["the local engine runs every device"]))


@pytest.mark.parametrize("case", BAD_DEVICES, ids=[c["file"] for c in BAD_DEVICES])
def test_devices_case_api(good_folder, case):
    with pytest.raises(LcpcError) as info:
        devices.load(CORPUS / "devices" / case["file"]).check_names(d.name for d in mf.read(good_folder).devices)
    message = str(info.value)
    assert "\n" not in message and case["file"] in message and all(e in message for e in case["expect"]), message


def test_alias_bomb_is_refused_before_any_expansion(tmp_path):
    """9**40 values: refusing it at all shows the aliases were counted, not expanded."""
    spec = tmp_path / "devices.yaml"
    spec.write_text("devices:\n  dev0:\n    resource:\n" + build.alias_bomb("      ", depth=40))
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    try:
        with pytest.raises(LcpcError, match="expand to more than 10000 values"):
            devices.load(spec)
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_devices_file_size_is_bounded(tmp_path, monkeypatch):
    spec = tmp_path / "devices.yaml"
    spec.write_text("# a comment\n" * 10 + "route: direct\n")
    assert devices.load(spec).route == "direct"
    monkeypatch.setattr(devices, "MAX_FILE_BYTES", 64)
    with pytest.raises(LcpcError, match="devices.yaml: larger than a devices file needs to be"):
        devices.load(spec)


@pytest.mark.parametrize("sync", ["none", "all"])
def test_speeds_at_the_limits_plan_without_numpy_warnings(tmp_path, sync):
    """The fastest and slowest devices a file may describe, side by side, through every planning
    pass and the latency model, with every warning and floating-point error raised."""
    spec = tmp_path / "devices.yaml"
    spec.write_text("devices:\n  dev0: {speed: 1e6}\n  dev1: {speed: 1e-6}\n  dev2: {speed: 1e6}\n"
                    "  dev3: {speed: 1e-6}\nlinks:\n  dev0: {bandwidth: 1kbit, latency: 3600s}\n"
                    "  dev1: {bandwidth: 1000000Gbit, latency: 1e-9}\n")
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        manifest = mf.Manifest.parse(pipeline.convert(EXAMPLE, tmp_path / "out", 4, sync, devices=spec))
        times = {s.id: s.flops * 1e-9 for s in manifest.stages}
        predicted = network.predict(manifest, times, devices.load(spec))
    assert [d.speed for d in manifest.devices] == [1e6, 1e-6, 1e6, 1e-6]
    assert np.isfinite(predicted.latency) and predicted.latency > 3600  # dev0's link: an hour one way


# ----------------------------------------------------------------------------- preprocessing specs
PREPROCESS_CASES = CASES["preprocess"]


@pytest.mark.parametrize("case", PREPROCESS_CASES, ids=[c["spec"][:40] for c in PREPROCESS_CASES])
def test_preprocess_case(tmp_path, case):
    out = tmp_path / "out"
    result = invoke("convert", GOOD_MODEL, "-k", 2, "-o", out, "--preprocess", case["spec"])
    if case["expect"] is None:
        assert result.exit_code == 0, result.stderr
        assert mf.read(out).preprocessing["size"] == [8, 8]
        return
    one_line_error(result, "--preprocess", *case["expect"])
    nothing_left(tmp_path, out)
    if not any("the model input" in e or "gives [" in e for e in case["expect"]):  # else: well-formed, unfit
        with pytest.raises(LcpcError):
            parse_preprocessing(case["spec"])


# ----------------------------------------------------------------------------- image folders
IMAGE_CASES = CASES["images"]


def folder_with(tmp_path: Path, name: str, data: bytes) -> Path:
    """An image folder: one good image and ``name``."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(CORPUS / "images" / "good.png", folder / "a_good.png")
    (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c["file"] for c in IMAGE_CASES])
def test_image_case_verify(image_folder, tmp_path, case):
    folder = folder_with(tmp_path, case["file"], (CORPUS / "images" / case["file"]).read_bytes())
    result = invoke("verify", image_folder, "--data", folder)
    if case["expect"] is None:
        assert result.exit_code == 0, result.stderr
        assert "samples" in result.output
        return
    one_line_error(result, case["file"], *case["expect"])


@pytest.mark.parametrize("name", ["bomb.png", "corrupt.jpg", "empty.png"])
def test_image_case_serve(image_folder, tmp_path, name):
    case = next(c for c in IMAGE_CASES if c["file"] == name)
    folder = folder_with(tmp_path, name, (CORPUS / "images" / name).read_bytes())
    one_line_error(invoke("serve", image_folder, "-i", folder), name, *case["expect"])


def test_image_link_leaving_the_folder_is_refused_unread(tmp_path):
    from audit import audited, opened

    secret = tmp_path / "secret.png"
    shutil.copy(CORPUS / "images" / "good.png", secret)
    folder = folder_with(tmp_path, "placeholder.txt", b"")
    (folder / "b_link.png").symlink_to(secret)
    with audited() as events, pytest.raises(LcpcError, match="b_link.png: a link that leads outside"):
        load_folder(folder, Preprocessing(size=(8, 8)))
    assert not opened(events, secret)
    (folder / "b_link.png").unlink()
    (folder / "b_link.png").symlink_to(folder / "a_good.png")  # a link that stays inside is an image
    assert load_folder(folder, Preprocessing(size=(8, 8)))[0].shape == (2, 3, 8, 8)


@pytest.mark.parametrize("image, prep, message", [
    (build.png(1, 200_000), Preprocessing(size=(64, 64)), "a 1x200000 image would be resized to 64x1.28e+07"),
    (build.png(8, 8), Preprocessing(size=(8, 8), crop_fraction=1e-4), "would be resized to 8e+04x8e+04"),
])
def test_resizes_past_the_pixel_limit_are_refused(tmp_path, image, prep, message):
    folder = folder_with(tmp_path, "b.png", image)
    (folder / "a_good.png").unlink()
    with pytest.raises(LcpcError, match=message.replace("+", r"\+")):
        load_folder(folder, prep)


def test_image_batch_over_the_limit_is_refused_before_reading(tmp_path, monkeypatch):
    from lcpc import safety

    folder = folder_with(tmp_path, "b.png", build.png(8, 8))
    monkeypatch.setattr(safety, "MAX_TENSOR_BYTES", 1000)
    with pytest.raises(LcpcError, match="2 images at 8x8 make a batch of"):
        load_folder(folder, Preprocessing(size=(8, 8)))


# ----------------------------------------------------------------------------- option values
OPTION_CASES = CASES["options"]


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c["name"] for c in OPTION_CASES])
def test_option_case(good_folder, cut_folder, tmp_path, case):
    if case.get("needs") == "ray":
        ray = pytest.importorskip("ray")
        if ray.is_initialized():  # an engine of this process would join that Ray, --address aside
            pytest.skip("Ray is running in this process")
    out = tmp_path / "out"
    places = {"cut": cut_folder, "good": good_folder, "model": EXAMPLE, "input": GOOD_INPUT, "out": out,
              "options": CORPUS / "options"}
    args = [a.format(**places) for a in case["args"]]
    one_line_error(invoke(*args), *case["expect"])
    nothing_left(tmp_path, out)


# ----------------------------------------------------------------------------- signals, two writers
SLOW_WRITER = """
import sys, time
from pathlib import Path
from lcpc.targets import onnx as target
real = target.onnx.save_model
def slow(model, path, *args, **kwargs):  # the first stage file written, then a long wait
    real(model, path, *args, **kwargs)
    Path(sys.argv[1]).write_text(str(path))
    time.sleep(120)
target.onnx.save_model = slow
from lcpc.cli import main
main(sys.argv[2:], prog_name="lcpc")
"""


@pytest.mark.parametrize("sig, code, words", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                              (signal.SIGTERM, 143, "interrupted by SIGTERM")])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "force"])
def test_signal_during_convert_leaves_no_folder(tmp_path, good_folder, sig, code, words, existing):
    """A real signal while the stage files are being written: the temporary folder goes, an existing
    folder (--force) stays as it was, and the command ends in one line."""
    out, marker = tmp_path / "out", tmp_path / "writing"
    before = None
    if existing:
        shutil.copytree(good_folder, out)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = [sys.executable, "-c", SLOW_WRITER, str(marker), "convert", str(GOOD_MODEL), "-k", "2", "-o", str(out)]
    child = subprocess.Popen(args + (["--force"] if existing else []), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for _ in range(1200):  # the child imports lcpc first
            if marker.exists() or child.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.exists(), child.communicate(timeout=10)
        assert Path(marker.read_text()).parent.name.startswith(".out.tmp-")  # written beside out, not into it
        child.send_signal(sig)
        _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == code, err
    assert err.splitlines() == [f"error: {words}"], err
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "writing"]
    else:
        nothing_left(tmp_path, out)


@pytest.mark.parametrize("force", [False, True])
def test_two_converts_into_one_folder(tmp_path, monkeypatch, force):
    """Another convert finishes into the same -o while this one writes: without --force this one ends
    in one line and leaves the other's folder whole; with it, this one's folder replaces it whole."""
    out = tmp_path / "out"
    real, other = onnx_target._write_files, {}

    def meanwhile_another_convert(*args, **kwargs):
        if not other:  # this convert's files are written; the other one runs whole, writes first
            other["started"] = True
            other["manifest"] = pipeline.convert(EXAMPLE, out, 2)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_target, "_write_files", meanwhile_another_convert)
    result = invoke("convert", GOOD_MODEL, "-k", 2, "-o", out, *(["--force"] if force else []))
    written = mf.read(out)  # whole: schema, dataflow and every stage's sha256
    if force:
        assert result.exit_code == 0, result.stderr
        assert written.json["source"]["path"] == str(GOOD_MODEL.resolve())
    else:
        one_line_error(result, str(out), "another process wrote this folder", "--force")
        assert written.json == other["manifest"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupt_during_convert_with_recovery_leaves_no_staging_folder(tmp_path, monkeypatch):
    """Ctrl-C while recovering (after the cut model was staged beside -o): one line, exit 130, and
    neither the output nor the staging folder stays."""
    def interrupted(*args, **kwargs):
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".lcpc-convert-")]  # staged
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "recover", interrupted)
    out = tmp_path / "out"
    result = invoke("convert", EXAMPLE, "-o", out, "--recover", CORPUS / "options" / "train.npy", "--epochs", 0)
    one_line_error(result, "interrupted (Ctrl-C)", code=130)
    nothing_left(tmp_path, out)


def test_signals_wait_for_a_deferred_block():
    """What the writer's rename and clean-up run under: a signal acts once the block is over."""
    from lcpc.safety import signals_deferred

    finished = []
    with pytest.raises(KeyboardInterrupt), signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # a signal not held back would be handled here
        finished.append(True)
    assert finished == [True]


def test_sigterm_handler_is_only_there_while_a_command_runs(good_folder, monkeypatch):
    before, seen, real = signal.getsignal(signal.SIGTERM), [], mf.read

    def read(*args, **kwargs):  # inside the command
        seen.append(signal.getsignal(signal.SIGTERM))
        return real(*args, **kwargs)

    monkeypatch.setattr(mf, "read", read)
    assert invoke("report", good_folder).exit_code == 0
    assert seen and all(h is not before and callable(h) for h in seen)
    assert signal.getsignal(signal.SIGTERM) == before
