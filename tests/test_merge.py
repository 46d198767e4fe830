"""Merge pass: the classifier merge follows the head's link. On the default 100 Mbit/s link
the head gathers features (the fewest bytes); on a 10 Gbit/s link it sums partial outputs,
so its merge stage no longer holds the whole classifier. Both compute the same function
(exact under --sync all), the runtime moves the manifest's bytes, and a stored plan keeps
its merges."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import reference, rel_err, run_folder
from lcpc.pipeline import convert
from lcpc.plan import HEAD

K = 8


@pytest.fixture(scope="module")
def resnet(tmp_path_factory, resnet18_half):
    tmp = tmp_path_factory.mktemp("merge")
    (tmp / "resnet18.onnx").symlink_to(resnet18_half)
    fast = tmp / "fast.yaml"
    fast.write_text("links:\n  default: {bandwidth: 10Gbit, latency: 0.1ms}\n")
    return tmp, fast


def _head_merge_params(manifest) -> int:
    last = max(s["level"] for s in manifest["stages"])
    return sum(s["params"] for s in manifest["stages"] if s["device"] == HEAD and s["level"] == last)


@pytest.mark.parametrize("sync", ["none", "all"])
def test_merge_follows_the_link(resnet, sync):
    tmp, fast = resnet
    model = tmp / "resnet18.onnx"
    slow = convert(model, tmp / f"slow-{sync}", K, sync)
    quick = convert(model, tmp / f"fast-{sync}", K, sync, devices=fast)
    assert list(slow["plan"]["merges"].values()) == ["features"]
    assert list(quick["plan"]["merges"].values()) == ["partial"]
    gemm = next(d for d in quick["decisions"] if d["action"] == "merge")
    assert "partial" in gemm["reason"] and "Mbit/s" in gemm["reason"]
    # the partial merge sends (K-1) x 1000 logits instead of the others' pooled features
    extra = quick["totals"]["bytes_per_inference"] - slow["totals"]["bytes_per_inference"]
    features = 256 * 4 * (K - 1) // K  # 256 pooled channels at width 0.5, all but the head's
    assert extra == (K - 1) * 1000 * 4 - features
    assert _head_merge_params(quick) < _head_merge_params(slow) / 100
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    outputs = []
    for folder in (tmp / f"slow-{sync}", tmp / f"fast-{sync}"):
        got, stats, manifest = run_folder(folder, {"input": x})
        assert stats.total() == manifest["totals"]["bytes_per_inference"]
        outputs.append(next(iter(got.values())))
    assert rel_err(outputs[1], outputs[0]) < 1e-4  # both merges are exact: the same plan's function
    if sync == "all":
        assert rel_err(outputs[1], reference(model, {"input": x})[0]) < 1e-4


def test_slow_boards_sum_partial_outputs_on_the_same_link(resnet, tmp_path):
    """Boards a hundredth as fast as the reference core, all equal, on the default 100 Mbit/s link:
    the whole classifier on the head would take longer than the partial outputs take on the wire,
    so the head sums them, although equal speeds leave the channel shares equal."""
    tmp, _ = resnet
    boards = tmp_path / "boards.yaml"
    boards.write_text("devices:\n" + "".join(f"  dev{d}: {{speed: 0.01}}\n" for d in range(K)))
    slow = convert(tmp / "resnet18.onnx", tmp_path / "boards", K, "none", devices=boards)
    assert list(slow["plan"]["merges"].values()) == ["partial"]
    assert slow["plan"].get("shares") is None and all(d.get("speed") is None for d in slow["devices"])


def test_stored_plan_keeps_its_merges(resnet):
    from lcpc.stored_plan import load

    tmp, fast = resnet
    convert(tmp / "resnet18.onnx", tmp / "stored", K, "none", devices=fast)
    plan, _ = load(tmp / "stored")
    assert dict(plan.merges) == {n: "partial" for n in plan.merges} and plan.merges
