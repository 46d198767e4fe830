"""The network model (devices.yaml + lcpc.perf.network) against hand-computed latencies, and
`lcpc report --network --plot` end to end."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import EXAMPLE
from lcpc.perf import devices, network
from lcpc.cli import main
from lcpc.pipeline import convert as convert_model
from lcpc.errors import LcpcError
from lcpc.runtime.manifest import Manifest


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("net") / "d"
    return out, Manifest.parse(convert_model(EXAMPLE, out, 4, "none"))


def test_units_and_defaults():
    net = devices.parse({"devices": {"dev1": {"speed": 2}}, "links": {"default": {"bandwidth": "8Mbit/s",
                         "latency": "2ms"}, "dev0": {"bandwidth": 1e9}}, "overhead": "100us"})
    assert net.device("dev1").speed == 2.0 and net.device("dev1").resource == "dev1"
    assert net.link("dev3").bandwidth == 1e6 and net.link("dev3").latency == 2e-3
    assert net.link("dev0").bandwidth == 1e9 / 8 and net.overhead == pytest.approx(1e-4)


@pytest.mark.parametrize("bad, message", [
    ({"devices": {"dev0": {"speed": 0}}}, "speed must be positive"),
    ({"links": {"default": {"bandwidth": "fast"}}}, "not a number with a unit"),
    ({"devices": {"dev0": {"colour": 1}}}, "unknown key"),
    ({"nodes": {}}, "unknown key"),
])
def test_bad_devices_yaml_is_named(bad, message):
    with pytest.raises(LcpcError, match=message):
        devices.parse(bad, "my.yaml")


def test_unknown_device_is_named(digits):
    _, manifest = digits
    with pytest.raises(LcpcError, match="dev9"):
        devices.parse({"devices": {"dev9": {}}}).check_names(d.name for d in manifest.devices)


def test_prediction_matches_hand_computation(digits):
    """Pure LCP on digits, K=4: dev0 sends the input to 3 devices one after another, each
    branch computes, sends partial logits to dev0 (one after another on dev0's downlink)."""
    _, m = digits
    bw, lat = 1e6, 1e-3
    net = network.Network(default_link=network.Link(bw, lat))
    times = {s.id: 1e-3 * (1 + s.level) for s in m.stages}
    p = network.predict(m, times, net)
    inputs = [t for t in m.transfers if t.kind == "input"]
    size, logits = inputs[0].bytes, [t for t in m.transfers if t.kind == "reduce"][0].bytes
    arrive = [(i + 1) * size / bw + 2 * lat for i in range(3)]        # serialised on dev0's uplink
    done = [a + 1e-3 for a in arrive]                                  # level-0 stage on each branch
    down = 0.0
    for d in sorted(done):                                             # dev0's downlink, one at a time
        down = max(d, down) + logits / bw
    last = down + 2 * lat
    assert p.latency == pytest.approx(last + 2e-3, rel=1e-9)           # then the head's level-1 stage


def test_faster_links_never_slower(digits):
    _, m = digits
    times = {s.id: 1e-4 for s in m.stages}
    curve = network.sweep(m, times, m, times, 1e-3, network.Network())["this plan (--sync none)"]
    assert all(a >= b for a, b in zip(curve, curve[1:]))


def test_report_network_and_plot(digits, tmp_path):
    folder, _ = digits
    yaml_file = tmp_path / "devices.yaml"
    yaml_file.write_text("links:\n  default: {bandwidth: 100Mbit, latency: 1ms}\n")
    png = tmp_path / "latency.png"
    result = CliRunner().invoke(main, ["report", str(folder), "--network", str(yaml_file), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    for setup in ("original, one device", "this plan", "--sync all", "layer-wise pipeline", "broadcast:"):
        assert setup in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ray_route_relays_small_branch_messages_through_the_head(tmp_path):
    """route: ray — a message under Ray's inline limit between two non-head devices costs two hops
    (source -> head -> destination); messages to or from the head and large ones cost one."""
    m = Manifest.parse(convert_model(EXAMPLE, tmp_path / "all", 4, "all"))
    times = {s.id: 0.0 for s in m.stages}
    lat = 1e-3
    fast = network.Link(1e15, lat)  # latency only, so each message costs exactly its hops
    direct = network.predict(m, times, network.Network(default_link=fast))
    relayed = network.predict(m, times, network.Network(default_link=fast, route="ray"))
    assert relayed.latency > direct.latency
    assert devices.parse({"route": "ray"}).route == "ray"
    with pytest.raises(LcpcError, match="route"):
        devices.parse({"route": "carrier-pigeon"})
    # pure LCP: every message goes to or from the head, so both routes agree
    lcp = Manifest.parse(convert_model(EXAMPLE, tmp_path / "none", 4, "none"))
    lcp_times = {s.id: 0.0 for s in lcp.stages}
    assert network.predict(lcp, lcp_times, network.Network(default_link=fast, route="ray")).latency == \
        pytest.approx(network.predict(lcp, lcp_times, network.Network(default_link=fast)).latency, rel=1e-12)
