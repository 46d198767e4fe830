"""The MPI engine against the local engine: same outputs (1e-5), same bytes transfer by transfer, with 4 and 5
ranks (a relay and one per device) on this machine; a dead rank ends the request in one line naming the device.

Every job is bounded (the engine's start-up and request timeouts) and its whole process group is killed when
the engine closes, also when a test fails. Each job takes several seconds to start (K + 1 interpreters load
onnxruntime), so the cases share jobs: about 40 s on the 2-core CI machine.
"""

from __future__ import annotations

import io
import json
import os
import signal

import numpy as np
import pytest

from conftest import EXAMPLE, run_folder
from lcpc.errors import LcpcError
from lcpc.pipeline import convert as convert_model
from lcpc.runtime.feeds import Stats

pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'lcpc[mpi]')")

from lcpc.runtime.mpi import MpiEngine, mpiexec, session_members  # noqa: E402

try:
    mpiexec()
except LcpcError as exc:
    pytest.skip(str(exc), allow_module_level=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, zoo_bytes):
    tmp = tmp_path_factory.mktemp("mpi")
    convert_model(EXAMPLE, tmp / "digits", 4, "none")
    convert_model(zoo_bytes["resnet_basic"], tmp / "resnet", 3, "all")
    convert_model(EXAMPLE, tmp / "digits2", 2, "none")
    return {"digits": tmp / "digits", "resnet": tmp / "resnet", "digits2": tmp / "digits2"}


def test_mpi_equals_local_and_a_dead_rank_is_named(folders):
    """ResNet-style zoo model, K=3, --sync all (exchanges at every level): 4 ranks."""
    folder = folders["resnet"]
    engine = MpiEngine(folder, timeout=60)
    try:
        spec = engine.inputs[0]
        x = np.random.default_rng(0).standard_normal((2 * spec.shape[0], *spec.shape[1:])).astype(np.float32)
        stats = Stats()
        got = engine.run({spec.name: x}, stats)
        want, local_stats, manifest = run_folder(folder, {spec.name: x})
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
        assert dict(stats.bytes_by_transfer) == dict(local_stats.bytes_by_transfer)
        assert len(manifest["transfers"]) > 6
        for t in manifest["transfers"]:
            assert stats.bytes_by_transfer[t["id"]] == 2 * t["bytes"], t
        assert stats.samples == 2

        os.kill(engine.pids[2], signal.SIGKILL)
        with pytest.raises(LcpcError, match=r"^request \d+: device dev2 \(MPI rank 3, pid \d+\) exited") as err:
            engine.run({spec.name: x[:1]})
        assert "\n" not in str(err.value)
    finally:
        session = engine.proc.pid if engine.proc is not None else None
        engine.close()
    assert engine.proc is None and engine.pipes is None  # the job and its pipes are gone
    assert session is None or session_members(session) == []


def test_image_files_decode_on_each_rank_and_count_their_real_size(tmp_path):
    """``--input-wire encoded`` with the tree: each rank decodes the file it gets; outputs equal the local
    engine's, every input transfer counts the file's real size, and a file that does not decode ends the
    request in one line naming the device."""
    from PIL import Image

    x = np.load(EXAMPLE.parent / "test.npy")[:3]
    files = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(np.rint(img[0] * 16).astype(np.uint8), mode="L").save(buf, format="PNG")
        files.append(buf.getvalue())
    folder = tmp_path / "enc"
    m = convert_model(EXAMPLE, folder, 4, "none", preprocessing={"size": [8, 8], "channels": "L", "scale": 0.0625},
                      input_wire="encoded", broadcast="tree")
    inputs = [t for t in m["transfers"] if t["kind"] == "input"]
    assert len(inputs) == 3 and all(t["encoded"] for t in inputs)
    engine = MpiEngine(folder, timeout=60)
    try:
        for blob in files:
            stats = Stats()
            got = engine.run({"input": np.frombuffer(blob, np.uint8)}, stats)
            want, local_stats, _ = run_folder(folder, {"input": np.frombuffer(blob, np.uint8)})
            np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
            assert dict(stats.bytes_by_transfer) == dict(local_stats.bytes_by_transfer)
            assert all(stats.bytes_by_transfer[t["id"]] == len(blob) for t in inputs)
        with pytest.raises(LcpcError, match=r"^request \d+: device dev\d: the image of the request "
                                            r"\(9 bytes\): cannot read it as an image") as err:
            engine.run({"input": np.frombuffer(b"not a png", np.uint8)})
        assert "\n" not in str(err.value)
    finally:
        engine.close()


def test_close_after_mpiexec_was_killed_leaves_no_rank(folders):
    """mpiexec killed outright (no chance to end its job): Open MPI gives each rank its own process group,
    and the relay waits on a pipe, not on MPI, so it would outlive mpiexec; close ends every process of the
    job's session. Digits, K=2: 3 ranks."""
    engine = MpiEngine(folders["digits2"], timeout=30)
    session = engine.proc.pid
    try:
        assert len(session_members(session)) >= 4  # mpiexec, the relay and two device ranks
        os.kill(session, signal.SIGKILL)
    finally:
        engine.close()
    assert session_members(session) == []


def test_cli_run_engine_mpi(folders, tmp_path):
    """Digits, K=4, pure LCP, through `lcpc run --engine mpi`: 5 ranks."""
    from click.testing import CliRunner

    from lcpc.cli import main

    folder = folders["digits"]
    sample = EXAMPLE.parent / "sample.npy"
    stats, out = tmp_path / "stats.json", tmp_path / "out.npz"
    result = CliRunner().invoke(main, ["run", str(folder), "--input", str(sample), "--engine", "mpi", "--timeout",
                                       "60", "--stats", str(stats), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "engine mpi" in result.output
    x = np.load(sample)
    want, _, manifest = run_folder(folder, {"input": x})
    got = np.load(out)
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
    data = json.loads(stats.read_text())
    assert data["samples"] == len(x)
    by_id = {r["id"]: r["bytes"] for r in data["transfers"]}
    assert {t["id"] for t in manifest["transfers"]} == set(by_id)
    for t in manifest["transfers"]:
        assert by_id[t["id"]] == t["bytes"] * len(x), t
