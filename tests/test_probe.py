"""``lcpc probe``: the devices.yaml it writes reads back to the same network, the figures become
links the way the network model reads them, and a closed port ends in one line within its timeout.
The probe against real shaped links runs on the namespace cluster (``tests/test_netns.py``)."""

from __future__ import annotations

import socket
import time

import pytest
from click.testing import CliRunner

from lcpc.cli import main
from lcpc.perf import devices
from lcpc.runtime.probe import Measured, network_of, time_workload, workload, write


def test_written_devices_file_reads_back_to_the_same_network(tmp_path):
    measured = [Measured("dev0", "dev0", 1.0), Measured("dev1", "dev1", 0.37, 4.4e-3, 11.9e6, 5.1e-3),
                Measured("dev2", "dev2", 0.1234567891, 4.0e-3, 12.3e6, 4.9e-3)]
    net = network_of(measured, "probe")
    assert net.link("dev1").latency == pytest.approx(1.1e-3) and net.link("dev1").bandwidth == 11.9e6
    assert net.link("dev0").bandwidth == pytest.approx((11.9e6 + 12.3e6) / 2)  # the head: the others' median
    assert net.overhead == pytest.approx(((5.1e-3 - 4.4e-3) / 2 + (4.9e-3 - 4.0e-3) / 2) / 2)
    write(net, tmp_path / "devices.yaml", "a test")
    back = devices.load(tmp_path / "devices.yaml")
    assert back.devices == net.devices and back.links == net.links and back.overhead == net.overhead
    assert back.route == net.route and back.default_link == net.default_link


def test_the_workload_is_fixed_and_timed(tmp_path):
    assert workload() == workload()
    assert 0 < time_workload(workload(), runs=2) < 5


def test_a_closed_port_ends_in_one_line_within_the_timeout():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    result = CliRunner().invoke(main, ["probe", "--address", f"127.0.0.1:{port}", "-o", "/tmp/never.yaml",
                                       "--timeout", "5"])
    assert time.monotonic() - start < 5
    assert result.exit_code == 1 and result.output.startswith("error: ") and result.output.count("\n") == 1, \
        result.output
    assert f"127.0.0.1:{port}" in result.output
