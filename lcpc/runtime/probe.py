"""``lcpc probe``: measure a Ray cluster's devices and links, and write the ``devices.yaml`` for it.

For every device resource the cluster carries (``dev0``, ``dev1``, ...: the Ray resources
``convert --devices``, ``report --network``, ``plan`` and the Ray engine place devices with), one
probe actor is placed on it. Then, between the head device's actor (``dev0``) and each other
device's:

- latency: the median round trip of ``PINGS`` one-byte TCP messages; the network model charges a
  message ``lat_a + lat_b`` (each device's link to the switch, one way), so with links taken alike
  each link's one-way latency is a quarter of the round trip;
- bandwidth: ``BULK`` bytes sent over TCP after a warm-up, timed from the first byte to the
  receiver's acknowledgement, less one round trip: the narrower of the two links; the fastest of
  ``BULK_RUNS`` such streams (a busy host or a dropped frame only ever slows a stream down, so the
  fastest is the best estimate of what the link carries);
- the engine's per-message cost (``overhead``): the median round trip of a Ray actor call between
  the same two actors, less the TCP round trip, halved (a call and its reply are two messages).

Each device's speed is a fixed onnxruntime workload (a small CNN built here, one thread) timed on
the device's actor against the same workload in this process: speed = time here / time there.

Guarantees:
- the cluster is reached within ``timeout`` or the probe ends in one ``LcpcError`` naming the
  address (a closed port: at once); every wait on an actor is bounded by ``timeout`` and names the
  device it waited on; the probe sends about 7 MB and a few hundred small messages per device;
- the head device's own link, which no pair without it can separate, is taken as the median of the
  others (a cluster of one device has no link to measure: the defaults stay);
- ``write`` puts the figures in a ``devices.yaml`` as plain numbers (bit/s, seconds), which
  ``lcpc.perf.devices.load`` reads back to exactly the same ``Network``.
"""

from __future__ import annotations

import re
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from lcpc.errors import LcpcError
from lcpc.perf.network import Device, Link, Network
from lcpc.runtime.ray import REACH_SECONDS, reach, require_ray
from lcpc.runtime.session import open_session
from lcpc.safety import first_line, printable

PINGS = 200
BULK = 2 << 20          # bytes per bandwidth stream
BULK_RUNS = 3           # streams timed; the fastest is kept
WARMUP = 1 << 20
CALLS = 50              # Ray actor calls timed for the per-message cost
WORKLOAD_RUNS = 7
DEVICE = re.compile(r"dev[0-9]+")


def workload() -> bytes:
    """The fixed onnxruntime workload: three 3x3 convolutions, 32 channels at 64x64 (seeded weights)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(3):
        c_in = 3 if i == 0 else 32
        w = numpy_helper.from_array((rng.standard_normal((32, c_in, 3, 3)) * 0.1).astype(np.float32), f"w{i}")
        inits.append(w)
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "lcpc_probe_workload",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 32, 64, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def time_workload(model: bytes, runs: int = WORKLOAD_RUNS) -> float:
    """Median seconds of one run of ``model`` on one thread (after a warm-up)."""
    session = open_session(model, "the probe workload")
    x = {"x": np.zeros((1, 3, 64, 64), np.float32)}
    session.run(None, x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, x)
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))


class ProbeWorker:
    """The actor placed on one device: a TCP endpoint, the workload, and a no-op for call timing."""

    def __init__(self) -> None:
        self.server: socket.socket | None = None

    def host(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def listen(self, timeout: float) -> int:
        """Accept one connection (in a thread): echo each ping byte, then read a bulk stream and
        acknowledge it; returns the port."""
        server = socket.create_server((self.host(), 0))
        server.settimeout(timeout)
        self.server = server

        def serve() -> None:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(timeout)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    while True:
                        head = conn.recv(9)
                        if not head:
                            return
                        if head[:1] == b"p":       # a ping: echo it
                            conn.sendall(b"p")
                        else:                      # b"b" + 8 bytes of length: a bulk stream, then an ack
                            left = int.from_bytes(head[1:9], "big")
                            while left:
                                left -= len(conn.recv(min(left, 1 << 16)))
                            conn.sendall(b"a")
                except OSError:
                    return

        threading.Thread(target=serve, daemon=True).start()
        return int(server.getsockname()[1])

    def measure(self, host: str, port: int, pings: int, bulk: int, timeout: float) -> dict[str, float]:
        """Round trips and bulk time to a peer's ``listen``ing endpoint."""
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(pings):
                start = time.perf_counter()
                conn.sendall(b"p" + bytes(8))
                if conn.recv(1) != b"p":
                    raise OSError("the peer answered out of turn")
                rtts.append(time.perf_counter() - start)
            seconds = []
            for size in (WARMUP,) + (bulk,) * BULK_RUNS:
                payload = b"b" + size.to_bytes(8, "big")
                start = time.perf_counter()
                conn.sendall(payload + bytes(size))
                if conn.recv(1) != b"a":
                    raise OSError("the peer did not acknowledge the stream")
                seconds.append(time.perf_counter() - start)
        rtt = float(statistics.median(rtts))
        return {"rtt": rtt, "bulk_seconds": max(min(seconds[1:]) - rtt, 1e-9), "bulk_bytes": float(bulk)}

    def call_rtt(self, peer: Any, calls: int, timeout: float) -> float:
        """Median seconds of a Ray actor call to ``peer`` and its reply."""
        import ray

        ray.get(peer.noop.remote(), timeout=timeout)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            ray.get(peer.noop.remote(), timeout=timeout)
            times.append(time.perf_counter() - start)
        return float(statistics.median(times))

    def noop(self) -> None:
        return None

    def workload(self, model: bytes, runs: int) -> float:
        return time_workload(model, runs)


@dataclass(frozen=True)
class Measured:
    """What the probe measured for one device against the head device."""

    name: str
    resource: str
    speed: float
    rtt: float | None = None          # seconds, TCP round trip to the head's actor
    bandwidth: float | None = None    # bytes/s
    call_rtt: float | None = None     # seconds, a Ray actor call and its reply


def device_resources(resources: dict[str, float]) -> list[str]:
    """The device resources (``dev0``, ``dev1``, ...) a cluster carries, in device order."""
    return sorted((r for r in resources if DEVICE.fullmatch(r)), key=lambda r: int(r[3:]))


def probe(address: str, timeout: float = 60.0, pings: int = PINGS, bulk: int = BULK,
          progress: Any = None) -> tuple[Network, list[Measured]]:
    """Measure the cluster at ``address`` (module docstring); returns the network and the raw figures."""
    require_ray()
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    reach(address, min(timeout, REACH_SECONDS))
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as exc:
            raise LcpcError(f"cannot reach Ray at {address}: {first_line(exc)}") from None
    actors: dict[str, Any] = {}

    def wait(ref: Any, what: str) -> Any:
        try:
            return ray.get(ref, timeout=timeout)
        except GetTimeoutError:
            raise LcpcError(f"probe: no answer within {timeout:g} s from {what}") from None
        except (RayActorError, RayTaskError) as exc:
            raise LcpcError(f"probe: {what} failed: {first_line(exc)}") from None

    try:
        names = device_resources(ray.cluster_resources())
        if not names:
            raise LcpcError(f"the cluster at {address} carries no device resources (dev0, dev1, ...); start each "
                            f"node with `ray start --resources '{{\"devN\": 1}}'`")
        if names[0] != "dev0":
            raise LcpcError(f"the cluster at {address} has {', '.join(names)} but no dev0 (the head device)")
        cls = ray.remote(num_cpus=0, max_restarts=0)(ProbeWorker)
        for name in names:
            actors[name] = cls.options(resources={name: 0.001}).remote()
        model = workload()
        here = time_workload(model)
        out = []
        head = actors["dev0"]
        for name in names:
            if progress:
                progress(name)
            there = wait(actors[name].workload.remote(model, WORKLOAD_RUNS), f"{name} (the workload)")
            speed = here / there if there > 0 else 1.0
            if name == "dev0":
                out.append(Measured(name, name, speed))
                continue
            host = wait(actors[name].host.remote(), f"{name} (its address)")
            port = wait(actors[name].listen.remote(timeout), f"{name} (listening)")
            link = wait(head.measure.remote(host, port, pings, bulk, timeout), f"dev0 -> {name} (the link)")
            calls = wait(head.call_rtt.remote(actors[name], CALLS, timeout), f"dev0 -> {name} (Ray calls)")
            out.append(Measured(name, name, speed, link["rtt"], link["bulk_bytes"] / link["bulk_seconds"], calls))
        return network_of(out, f"probe of {address}"), out
    finally:
        for a in actors.values():
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        if started and ray.is_initialized():
            ray.shutdown()


def network_of(measured: list[Measured], source: str) -> Network:
    """The ``Network`` the figures describe (module docstring)."""
    devices = {m.name: Device(m.name, m.resource, m.speed) for m in measured}
    pairs = [m for m in measured if m.rtt is not None and m.bandwidth is not None]
    links = {m.name: Link(float(m.bandwidth), float(m.rtt) / 4) for m in pairs if m.bandwidth and m.rtt}
    overhead = 0.0
    if pairs:
        links["dev0"] = Link(statistics.median(link.bandwidth for link in links.values()),
                             statistics.median(link.latency for link in links.values()))
        overhead = max(statistics.median((m.call_rtt or 0.0) - (m.rtt or 0.0) for m in pairs) / 2, 0.0)
    return Network(devices, links, Link(), overhead, source, "direct")


def write(network: Network, path: str | Path, note: str = "") -> None:
    """``network`` as a devices.yaml (plain numbers: bit/s and seconds), written whole or not at all."""
    lines = [f"# written by lcpc probe{': ' + note if note else ''}",
             "# bandwidth in bit/s, latency and overhead in seconds (plain numbers, so they read back exactly)",
             "devices:"]
    for name, d in sorted(network.devices.items(), key=lambda kv: int(kv[0][3:]) if DEVICE.fullmatch(kv[0]) else 0):
        lines.append(f"  {name}: {{resource: {d.resource}, speed: {d.speed!r}}}")
    lines.append("links:")
    for name, link in network.links.items():
        lines.append(f"  {name}: {{bandwidth: {8 * link.bandwidth!r}, latency: {link.latency!r}}}"
                     f"  # {8 * link.bandwidth / 1e6:.1f} Mbit/s, {1e3 * link.latency:.3f} ms")
    lines.append(f"overhead: {network.overhead!r}  # {1e3 * network.overhead:.3f} ms per message")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LcpcError(f"{printable(path)}: cannot write it ({exc.strerror})") from None


def render(measured: list[Measured], network: Network) -> str:
    rows = [["device", "speed", "link Mbit/s", "link latency ms", "round trip ms", "Ray call ms"]]
    for m in measured:
        link = network.links.get(m.name)
        rows.append([m.name, f"{m.speed:.3f}", f"{8 * link.bandwidth / 1e6:.1f}" if link else "-",
                     f"{1e3 * link.latency:.3f}" if link else "-", "-" if m.rtt is None else f"{1e3 * m.rtt:.3f}",
                     "-" if m.call_rtt is None else f"{1e3 * m.call_rtt:.3f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    return table + f"\nengine cost per message: {1e3 * network.overhead:.3f} ms (dev0's link: the median of the others)"
