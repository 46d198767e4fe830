"""Four Ray nodes in network namespaces over 100 Mbit/s, 1 ms links (``benchmarks/netns_latency.py``,
digits example, pure LCP and --sync all): the run crosses the namespaces, moves exactly the
manifest's bytes and leaves nothing behind. How its latency compares with the network model
is a measurement, not an assertion: ``benchmarks/results/netns_latency*.md``.

It needs root, iproute2 and Ray, and skips cleanly without them. Building the 4-node cluster,
measuring and tearing it down (plus the 2-node teardown-on-failure check) took 100 s on the
2-core CI machine (measured), so it runs in the suite (marker ``netns``); ``LCPC_NETNS=0`` or
``-m "not netns"`` skips it. The committed full measurement (digits and a ResNet-style zoo
model) is ``benchmarks/results/netns_latency.md``.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from benchmarks import netns_cluster as nc

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.environ.get("LCPC_NETNS") == "0", reason="LCPC_NETNS=0: namespace test skipped")]


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_cluster_across_namespaces_moves_the_manifest_bytes():
    why = nc.available()
    if why:
        pytest.skip(why)
    from benchmarks.netns_latency import run_all

    before = _namespaces()
    result = run_all(blocks=4, quick=True, out_dir=None)
    assert _namespaces() == before  # everything torn down
    rows = result["rows"]
    assert {r["sync"] for r in rows} == {"none", "all"}
    for r in rows:
        assert r["bytes_match_manifest"], r
        assert r["mode"] == "ray (actor-calls)"


def test_cluster_is_torn_down_on_failure():
    why = nc.available()
    if why:
        pytest.skip(why)
    before = _namespaces()
    with pytest.raises(RuntimeError, match="boom"):
        with nc.cluster(2, start_timeout=120):
            raise RuntimeError("boom")
    assert _namespaces() == before
