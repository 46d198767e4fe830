"""Heterogeneous devices (a ResNet-18 at half width): speeds 2:1:1:1 in devices.yaml give
channel shares within 10% of 2:1:1:1 under --sync all and (compute = FLOPs / speed) finish
times within 15% of each other, also under pure LCP, where a cut layer's work grows with
the share squared (``passes.balance``); equal speeds change nothing; the speeds are
recorded in the manifest and the plan stays exact."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import EXAMPLE, reference, rel_err, run_folder
from lcpc.perf import devices, network
from lcpc.pipeline import convert as convert_model
from lcpc.runtime.manifest import Manifest


@pytest.fixture(scope="module")
def het(tmp_path_factory, resnet18_half):
    tmp = tmp_path_factory.mktemp("het")
    (tmp / "resnet18.onnx").symlink_to(resnet18_half)
    spec = tmp / "devices.yaml"
    spec.write_text("devices:\n  dev0: {speed: 2}\n  dev1: {speed: 1}\n")
    return tmp, spec, convert_model(tmp / "resnet18.onnx", tmp / "all", 4, "all", devices=spec)


@pytest.fixture(scope="module")
def het_lcp(het):
    tmp, spec, _ = het
    return tmp, spec, convert_model(tmp / "resnet18.onnx", tmp / "none", 4, "none", devices=spec)


def test_channel_shares_follow_speed(het):
    from lcpc.stored_plan import load as plan_from_folder

    tmp, _, manifest = het
    assert [d["speed"] for d in manifest["devices"]] == [2.0, 1.0, 1.0, 1.0]
    plan, _ = plan_from_folder(tmp / "all")
    want = np.array([2, 1, 1, 1]) / 5
    checked = 0
    for t, layout in plan.layouts.items():
        if layout == "S" and len(plan.branches(t)) >= 16:
            share = np.bincount(plan.branches(t), minlength=4) / len(plan.branches(t))
            assert np.all(np.abs(share - want) <= 0.1 * want), (t, share)
            checked += 1
    assert checked


@pytest.mark.parametrize("which", ["het", "het_lcp"])
def test_finish_times_even_out(which, request):
    _, spec, manifest = request.getfixturevalue(which)
    net = devices.load(spec)
    view = Manifest.parse(manifest)
    flops_time = {s.id: s.flops * 1e-9 for s in view.stages}
    p = network.predict(view, flops_time, network.Network(net.devices, default_link=network.Link(1e15, 1e-12)))
    compute = np.array([c for _, c, _ in p.devices])
    assert compute.max() <= 1.15 * compute.min(), compute


def test_heterogeneous_plan_is_exact(het):
    tmp, _, _ = het
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    got, stats, manifest = run_folder(tmp / "all", {"input": x})
    want = reference(tmp / "resnet18.onnx", {"input": x})[0]
    assert rel_err(next(iter(got.values())), want) < 1e-4
    assert stats.total() == manifest["totals"]["bytes_per_inference"]


def test_equal_speeds_change_nothing(tmp_path):
    spec = tmp_path / "devices.yaml"
    spec.write_text("devices:\n  dev0: {speed: 3}\n  dev1: {speed: 3}\n  dev2: {speed: 3}\n  dev3: {speed: 3}\n")
    a = convert_model(EXAMPLE, tmp_path / "a", 4, "none", devices=spec)
    b = convert_model(EXAMPLE, tmp_path / "b", 4, "none")
    assert [s["sha256"] for s in a["stages"]] == [s["sha256"] for s in b["stages"]]
