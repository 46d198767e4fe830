"""Balance pass: the shares equalise the modelled work per device, the head's classifier
merge and the devices' speeds included; balanced plans stay exact and keep their bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import reference, rel_err, run_folder
from lcpc import frontend
from lcpc.analysis import analyse
from lcpc.passes import balance, layouts
from lcpc.plan import HEAD, Plan, PlanOptions


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 16), st.floats(0, 1e9), st.floats(0, 1e9), st.floats(0, 1e8), st.floats(0, 1e8),
       st.lists(st.floats(0.2, 1.0), min_size=16, max_size=16))
def test_shares_equalise_finish_times(k, quadratic, linear, everywhere, head, speeds):
    w = balance.Work(quadratic, linear, everywhere, head)
    v = np.array(speeds[:k])
    s = balance.balanced_shares(w, v)
    assert s.shape == (k,) and abs(s.sum() - 1) < 1e-9 and np.all(s > 0)
    if quadratic + linear < 1.0:
        return
    t = np.array([w.on(d, s[d]) / v[d] for d in range(k)])
    free = s > balance.MIN_SHARE / k * 1.001   # devices not held at the floor all finish together
    assert np.ptp(t[free]) <= 1e-6 * t.max() + 1e-9
    assert np.all(t[~free] <= t.max() * (1 + 1e-6))


def test_equal_devices_and_no_head_work_give_equal_shares():
    s = balance.balanced_shares(balance.Work(5e8, 1e7, 1e6, 0.0), np.ones(8))
    assert np.allclose(s, 1 / 8)


def test_equal_speeds_keep_equal_shares(resnet18_half):
    """Moving channels off the head would break the kernels' channel blocks: equal devices stay 1/K."""
    g, src = frontend.load(resnet18_half)
    plan = layouts.run(Plan(g, src, analyse(g), 8, layouts={}), PlanOptions()).plan
    assert balance.run(plan, PlanOptions()).plan.shares is None
    assert balance.run(plan, PlanOptions(speeds=(2.0,) * 8)).plan.shares is None


def test_head_takes_less_when_it_also_merges(resnet18_half):
    """Speeds 1:1:2:2: the head, which also runs the classifier merge, gets fewer channels than
    the other slow device, and the modelled finish times are equal."""
    g, src = frontend.load(resnet18_half)
    plan = layouts.run(Plan(g, src, analyse(g), 4, layouts={}), PlanOptions()).plan
    shares = balance.run(plan, PlanOptions(speeds=(1.0, 1.0, 2.0, 2.0))).plan.shares
    assert shares is not None and shares[HEAD] < shares[1] < shares[2] == shares[3]
    w = balance.work(plan, PlanOptions(speeds=(1.0, 1.0, 2.0, 2.0)))
    assert w.head > 0 and w.quadratic > 0
    t = [w.on(d, s) / v for d, (s, v) in enumerate(zip(shares, (1.0, 1.0, 2.0, 2.0)))]
    assert max(t) - min(t) <= 1e-6 * max(t)


@pytest.mark.parametrize("sync", ["none", "all"])
def test_balanced_plan_is_exact_and_bytes_match(tmp_path, sync, resnet18_half):
    """ResNet at K=8 on devices 3:1:...:1: --sync all is exact, --sync none's runtime bytes
    equal the manifest's, and the manifest records the shares."""
    from lcpc.pipeline import convert

    model = resnet18_half
    spec = tmp_path / "devices.yaml"
    spec.write_text("devices:\n  dev0: {speed: 3}\n")
    manifest = convert(model, tmp_path / "out", 8, sync, devices=spec)
    shares = manifest["plan"]["shares"]
    assert shares[HEAD] > max(shares[1:])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    got, stats, manifest = run_folder(tmp_path / "out", {"input": x})
    assert stats.total() == manifest["totals"]["bytes_per_inference"]
    if sync == "all":
        assert rel_err(next(iter(got.values())), reference(model, {"input": x})[0]) < 1e-4
