"""``lcpc plan``: the recommendation follows the network model, K=1 when nothing distributed is
faster, and the figure it gives for a plan is the one ``lcpc report --network`` gives for the
same folder and the same stage times."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import EXAMPLE, ROOT

from lcpc import advise, pipeline
from lcpc.cli import main
from lcpc.errors import LcpcError
from lcpc.perf import devices, latency_report, measured
from lcpc.runtime import manifest as mf

BENCH_NET = ROOT / "benchmarks" / "devices-100mbit.yaml"


def test_digits_on_four_devices_over_100mbit_stays_on_one(tmp_path):
    """The digits model computes in a tenth of a millisecond; a message costs more than that."""
    result = CliRunner().invoke(main, ["plan", str(EXAMPLE), "--devices", str(BENCH_NET), "--format", "json",
                                       "--calib", str(EXAMPLE.parent / "sample.npy")])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["recommended"] == "K=1 (one device)" and "stay on one device" in out["verdict"]
    labels = [c["label"] for c in out["candidates"]]
    assert labels == ["K=1 (one device)"] + [f"K={k} --sync {s}" for k in (2, 3, 4) for s in ("none", "all")]
    exact = [c for c in out["candidates"] if c["sync"] == "all"]
    assert all(c["agreement"] == 1.0 and c["kl"] < 1e-6 for c in exact)  # --sync all is the original model


@pytest.fixture
def flop_timed(monkeypatch):
    """Stage and model times as FLOPs at a fixed rate (deterministic), for both plan and report."""
    from lcpc import frontend
    from lcpc.analysis import analyse

    def stages(folder, manifest, repeat=20):
        return {s.id: s.flops * 1e-9 for s in manifest.stages}

    def model(path, repeat=20):
        graph, _ = frontend.load(path)
        return float(sum(analyse(graph).flops.values())) * 1e-9

    monkeypatch.setattr(measured, "stage_times", stages)
    monkeypatch.setattr(measured, "model_time", model)


def test_a_slow_board_network_recommends_splitting_and_report_network_agrees(tmp_path, flop_timed):
    """Boards 10^4 times slower than the FLOP rate over fast links: K=4 pure LCP is the fastest, and
    its predicted latency is exactly what report --network predicts for the same folder."""
    spec = tmp_path / "boards.yaml"
    spec.write_text("devices:\n" + "".join(f"  dev{d}: {{speed: 0.0001}}\n" for d in range(4))
                    + "links:\n  default: {bandwidth: 10Gbit, latency: 10us}\n")
    network = devices.load(spec)
    advice = advise.advise(EXAMPLE, network)
    assert advice.chosen.label == "K=4 --sync none"
    assert advice.speedup(advice.chosen) > 2
    assert [c.latency for c in advice.candidates if c.sync == "none"] == \
        sorted((c.latency for c in advice.candidates if c.sync == "none"), reverse=True)  # more boards, faster
    pipeline.convert(EXAMPLE, tmp_path / "chosen", 4, "none", devices=spec)
    report = latency_report.measure(tmp_path / "chosen", mf.read(tmp_path / "chosen"), network, None,
                                    pipeline.convert).compare()
    assert report[1].latency == pytest.approx(advice.chosen.latency, rel=1e-12)
    assert report[0].latency == pytest.approx(advice.single.latency, rel=1e-12)  # one device, the same too
    text = advise.render(advice, str(EXAMPLE))
    assert "recommended: K=4 --sync none" in text and "--recover" in text


def test_devices_files_that_say_nothing_are_refused(tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text("links:\n  default: {bandwidth: 100Mbit}\n")
    with pytest.raises(LcpcError, match="names no devices"):
        advise.advise(EXAMPLE, devices.load(bare))
    with pytest.raises(LcpcError, match="describes 4 devices"):
        advise.advise(EXAMPLE, devices.load(BENCH_NET), most=6)
    result = CliRunner().invoke(main, ["plan", str(EXAMPLE), "--devices", str(bare)])
    assert result.exit_code == 1 and result.output.startswith("error: ") and result.output.count("\n") == 1


def test_plot_is_a_png(tmp_path, flop_timed):
    png = tmp_path / "k.png"
    advice = advise.advise(EXAMPLE, devices.load(BENCH_NET), most=2)
    advise.plot(advice, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.isfinite([c.latency for c in advice.candidates]).all()
