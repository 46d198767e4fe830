"""``devices.yaml``: where each manifest device runs, how fast it is, and its network link.

    devices:                       # keyed by the manifest's device names (dev0, dev1, ...)
      dev0: {resource: board0, speed: 2.0}
      dev1: {resource: board1}     # speed defaults to 1.0 (relative compute speed)
    links:                         # each device's own link to the switch (full duplex)
      default: {bandwidth: 100Mbit, latency: 1ms}
      dev0: {bandwidth: 1Gbit, latency: 0.2ms}
    overhead: 0.3ms                # optional: engine cost per message (measured by benchmarks/)
    route: direct                  # optional: direct | ray (how messages travel, see lcpc.perf.network)

Guarantees:
- ``load`` reads YAML with ``yaml.safe_load`` (no object construction) and returns a
  frozen ``lcpc.perf.network.Network``; every mistake (unknown key, unknown device, speed <= 0, a
  bandwidth or latency that is not a positive number with a known unit) is an
  ``LcpcError`` naming the file and the key;
- bandwidths are stored in bytes per second, latencies and overheads in seconds;
  plain numbers mean bit/s and seconds; units: bit, kbit, Mbit, Gbit (optionally
  ``/s``), s, ms, us;
- ``route`` is ``direct`` (default: every message straight from its source to its
  destination) or ``ray`` (as the Ray engine moves them; ``lcpc.perf.network`` says how);
- a device missing from the file runs on the Ray resource named like the device,
  at speed 1.0, on the default link; with no file at all every device is that.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from lcpc.errors import LcpcError
from lcpc.perf.network import DEFAULT_BANDWIDTH, DEFAULT_LATENCY, Device, Link, Network
from lcpc.safety import printable

ROUTES = ("direct", "ray")


_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def _quantity(value: Any, units: dict[str, float], where: str, what: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-zA-Z]+)(?:/s)?\s*", str(value))
        if not m or m.group(2).lower() not in units:
            raise LcpcError(f"{where}: {what} {printable(value, 80)!s} is not a number with a unit "
                            f"({', '.join(units)})")
        number = float(m.group(1)) * units[m.group(2).lower()]
    if not number > 0 or number == float("inf"):
        raise LcpcError(f"{where}: {what} must be positive, got {printable(value, 80)}")
    return number


def _mapping(value: Any, where: str, allowed: set[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LcpcError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise LcpcError(f"{where}: unknown key(s) {printable(', '.join(unknown), 200)}; "
                        f"known: {', '.join(sorted(allowed))}")
    return value


def _link(value: Any, where: str) -> Link:
    spec = _mapping(value, where, {"bandwidth", "latency"})
    bw = _quantity(spec["bandwidth"], _BITS, where, "bandwidth") / 8 if "bandwidth" in spec else DEFAULT_BANDWIDTH
    lat = _quantity(spec["latency"], _SECONDS, where, "latency") if "latency" in spec else DEFAULT_LATENCY
    return Link(bw, lat)


def parse(data: Any, where: str = "devices.yaml") -> Network:
    top = _mapping(data, where, {"devices", "links", "overhead", "route"})
    devices = {}
    for name, spec in (top.get("devices") or {}).items():
        at = f"{where}: devices.{printable(name, 80)}"
        spec = _mapping(spec, at, {"resource", "speed"})
        speed = _quantity(spec.get("speed", 1.0), {"x": 1.0}, at, "speed")
        devices[str(name)] = Device(str(name), str(spec.get("resource", name)), speed)
    links = {str(name): _link(spec, f"{where}: links.{printable(name, 80)}")
             for name, spec in (top.get("links") or {}).items()}
    default = links.pop("default", Link())
    overhead = _quantity(top["overhead"], _SECONDS, where, "overhead") if "overhead" in top else 0.0
    route = str(top.get("route", "direct"))
    if route not in ROUTES:
        raise LcpcError(f"{where}: route {printable(route, 40)!s}: choose {' or '.join(ROUTES)}")
    return Network(devices, links, default, overhead, where, route)


def load(path: str | Path | None) -> Network:
    """The network of ``path`` (``devices.yaml``), or the defaults when ``path`` is None."""
    if path is None:
        return Network()
    p = Path(path)
    if not p.is_file():
        raise LcpcError(f"{printable(p)}: no such devices file")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LcpcError(f"{printable(p)}: not valid YAML ({printable(str(exc).splitlines()[0], 200)})") from None
    return parse(data, printable(p))
