"""The Ray engine against the local engine: same outputs (1e-5), same bytes, transfer by transfer."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import EXAMPLE, run_folder
from lcpc.pipeline import convert as convert_model
from lcpc.runtime.feeds import Stats
from ray_fixture import local_ray  # noqa: F401 - the module-scoped fixture

pytest.importorskip("ray", reason="Ray is not installed (pip install 'lcpc[ray]')")

from lcpc.runtime.ray import RayEngine  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory, zoo_bytes):
    tmp = tmp_path_factory.mktemp("ray")
    return {("digits", "none"): convert_model(EXAMPLE, tmp / "dn", 4, "none") and tmp / "dn",
            ("digits", "all"): convert_model(EXAMPLE, tmp / "da", 4, "all") and tmp / "da",
            ("resnet", "all"): convert_model(zoo_bytes["resnet_basic"], tmp / "ra", 3, "all") and tmp / "ra"}


@pytest.mark.parametrize("key", [("digits", "none"), ("digits", "all"), ("resnet", "all")])
def test_ray_equals_local(local_ray, folders, key):  # noqa: F811
    folder = folders[key]
    engine = RayEngine(folder, timeout=60)
    try:
        spec = engine.inputs[0]
        x = np.random.default_rng(0).standard_normal((2 * spec.shape[0], *spec.shape[1:])).astype(np.float32)
        stats = Stats()
        got = engine.run({spec.name: x}, stats)
    finally:
        engine.close()
    want, local_stats, manifest = run_folder(folder, {spec.name: x})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    assert dict(stats.bytes_by_transfer) == dict(local_stats.bytes_by_transfer)
    for t in manifest["transfers"]:
        assert stats.bytes_by_transfer[t["id"]] == 2 * t["bytes"], t
    assert stats.samples == 2


def test_bad_devices_resource_is_named(local_ray, folders, tmp_path):  # noqa: F811
    from lcpc.errors import LcpcError

    devices = tmp_path / "devices.yaml"
    devices.write_text("devices:\n  dev1: {resource: board-nowhere}\n")
    with pytest.raises(LcpcError, match="dev1 wants Ray resource 'board-nowhere'"):
        RayEngine(folders[("digits", "none")], devices=devices)


def test_cli_run_engine_ray(local_ray, folders, tmp_path):  # noqa: F811
    import json

    from click.testing import CliRunner

    from lcpc.cli import main

    for mode, says in (([], "compiled-graph"), (["--ray-mode", "actor-calls"], "actor-calls")):
        stats = tmp_path / f"s{says}.json"
        result = CliRunner().invoke(main, ["run", str(folders[("digits", "none")]), "--input",
                                           str(EXAMPLE.parent / "sample.npy"), "--engine", "ray", "--stats",
                                           str(stats)] + mode)
        assert result.exit_code == 0, result.output
        data = json.loads(stats.read_text())
        assert all(r["bytes"] == r["manifest_bytes_per_inference"] * data["samples"] for r in data["transfers"])
        assert f"engine ray ({says})" in result.output


def test_ray_raw_uint8_input_equals_local(local_ray, tmp_path):  # noqa: F811
    from lcpc.images import Preprocessing

    prep = Preprocessing(size=(8, 8), channels="L", scale=1 / 16)
    convert_model(EXAMPLE, tmp_path / "raw", 4, "none", preprocessing=prep.to_dict())
    x = np.random.default_rng(0).integers(0, 17, (2, 1, 8, 8), dtype=np.uint8)
    engine = RayEngine(tmp_path / "raw", timeout=60)
    try:
        stats = Stats()
        got = engine.run({"input": x}, stats)
    finally:
        engine.close()
    want, local_stats, manifest = run_folder(tmp_path / "raw", {"input": x})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    assert dict(stats.bytes_by_transfer) == dict(local_stats.bytes_by_transfer)
    inputs = [t for t in manifest["transfers"] if t["kind"] == "input"]
    assert inputs and all(t["dtype"] == "uint8" and stats.bytes_by_transfer[t["id"]] == 2 * 64 for t in inputs)


@pytest.mark.parametrize("key", [("digits", "none"), ("digits", "all")])
def test_compiled_graph_equals_local_and_a_dead_actor_is_one_clear_error(local_ray, folders, key):  # noqa: F811
    """The compiled graph's answers equal the local engine's, bytes transfer by transfer; then a killed
    actor ends the next request in one error naming it, and every later one says to start again."""
    from lcpc.errors import LcpcError

    folder = folders[key]
    # the first request sets the graph's channels up (seconds on a busy machine); a dead actor is told at once
    engine = RayEngine(folder, timeout=60, mode="auto")
    try:
        spec = engine.inputs[0]
        x = np.random.default_rng(1).standard_normal((3, *spec.shape[1:])).astype(np.float32)
        stats = Stats()
        got = engine.run({spec.name: x}, stats)
        again = engine.run({spec.name: x[:1]})
        mode = engine.describe
        local_ray.kill(engine.actors[2], no_restart=True)
        with pytest.raises(LcpcError, match=r"request \d+: .*(died|closed)"):  # as it reads the input, or after
            engine.run({spec.name: x[:1]})
        with pytest.raises(LcpcError, match="start the engine again"):
            engine.run({spec.name: x[:1]})
    finally:
        engine.close()
    assert mode == "ray (compiled-graph)", mode
    want, local_stats, manifest = run_folder(folder, {spec.name: x})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(again[name], want[name][:1], rtol=1e-5, atol=1e-5)
    assert dict(stats.bytes_by_transfer) == dict(local_stats.bytes_by_transfer)
    for t in manifest["transfers"]:
        assert stats.bytes_by_transfer[t["id"]] == 3 * t["bytes"], t


def test_deadline_answers_without_a_dead_actor_and_rebuilds_it(local_ray, folders):  # noqa: F811
    """--deadline: a branch actor killed mid-stream is left out at once (the answer equals the local
    engine's without that device), rebuilt in the background, and the answers are exact again."""
    import time

    from lcpc.runtime.local import LocalEngine

    folder = folders[("digits", "none")]
    x = np.random.default_rng(2).standard_normal((4, 1, 8, 8)).astype(np.float32)
    with LocalEngine(folder) as local:
        want = local.run({"input": x})["logits"]
        without = {d: local.run({"input": x}, without=[d])["logits"] for d in ("dev1", "dev2")}
    engine = RayEngine(folder, timeout=60, deadline=5.0)
    try:
        stats = Stats()
        np.testing.assert_allclose(engine.run({"input": x}, stats, request="a")["logits"], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(engine.run({"input": x}, stats, request="b", without=["dev1"])["logits"],
                                   without["dev1"], rtol=1e-5, atol=1e-5)
        local_ray.kill(engine.actors[2], no_restart=True)
        got = engine.run({"input": x}, stats, request="c")["logits"]
        np.testing.assert_allclose(got, without["dev2"], rtol=1e-5, atol=1e-5)
        assert stats.degraded == {"b": ("dev1",), "c": ("dev2",)}
        for i in range(100):  # the new actor answers within seconds; until then requests leave dev2 out
            got = engine.run({"input": x[:1]}, stats, request=f"d{i}")["logits"]
            if f"d{i}" not in stats.degraded:
                break
            time.sleep(0.1)
        np.testing.assert_allclose(got, want[:1], rtol=1e-5, atol=1e-5)
        assert engine.rebuilt == ["dev2"]
    finally:
        engine.close()


def test_image_files_through_a_broadcast_tree_equal_local(local_ray, tmp_path):  # noqa: F811
    """--input-wire encoded --broadcast tree on Ray: each actor decodes the file it gets (from the head
    or forwarded by another receiver); the outputs equal the local engine's, and every input transfer
    counts the file's own bytes."""
    from PIL import Image

    from lcpc.runtime.feeds import encoded
    from lcpc.runtime.local import LocalEngine

    convert_model(EXAMPLE, tmp_path / "enc", 4, "none", preprocessing={"size": [8, 8], "channels": "L",
                                                                       "scale": 0.0625},
                  input_wire="encoded", broadcast="tree")
    x = np.load(EXAMPLE.parent / "test.npy")[:3]
    blobs = []
    for img in x:
        out = tmp_path / "digit.png"
        Image.fromarray(np.rint(img[0] * 16).astype(np.uint8), mode="L").save(out)
        blobs.append(out.read_bytes())
    with LocalEngine(tmp_path / "enc") as local:
        want = [local.run({"input": encoded(b)})["logits"] for b in blobs]
    engine = RayEngine(tmp_path / "enc", timeout=60)
    try:
        assert engine.manifest.broadcast == "tree"
        for b, w in zip(blobs, want):
            stats = Stats()
            np.testing.assert_allclose(engine.run({"input": encoded(b)}, stats)["logits"], w, rtol=1e-5, atol=1e-5)
            inputs = [t for t in engine.manifest.transfers if t.kind == "input"]
            assert all(stats.bytes_by_transfer[t.id] == len(b) for t in inputs)
    finally:
        engine.close()


def test_coded_int8_messages_equal_local(local_ray, tmp_path, digits_calib):  # noqa: F811
    """--wire int8-channel --wire-code deflate on Ray: senders pack, receivers unpack; the same outputs
    and the same coded bytes as the local engine, transfer by transfer."""
    calib, x_test = digits_calib
    convert_model(EXAMPLE, tmp_path / "coded", 4, "none", calib=calib, wire="int8-channel", wire_code="deflate")
    want, local_stats, _ = run_folder(tmp_path / "coded", {"input": x_test[:6]})
    engine = RayEngine(tmp_path / "coded", timeout=60)
    try:
        stats = Stats()
        got = engine.run({"input": x_test[:6]}, stats)
        np.testing.assert_array_equal(got["logits"], want["logits"])
        assert dict(stats.bytes_by_transfer) == dict(local_stats.bytes_by_transfer)
    finally:
        engine.close()
