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
- ``load`` reads at most ``MAX_FILE_BYTES`` of YAML with ``yaml.SafeLoader`` (no object
  construction) and returns a frozen ``lcpc.perf.network.Network``; every mistake (unknown key,
  unknown device, a speed, bandwidth or latency that is not a number with a known unit or lies
  outside ``RANGES``) is an ``LcpcError`` naming the file, the key and why;
- aliases cannot blow up: the YAML node graph is measured before anything is built from it, and a
  file whose aliases would expand past ``MAX_NODES`` nodes, that refers to itself, or that nests
  brackets more than ``MAX_FLOW_DEPTH`` deep (or anything deeper than Python can walk) is refused,
  in well under a second wherever the alias sits;
- bandwidths are stored in bytes per second, latencies and overheads in seconds;
  plain numbers (``2``, ``1e-3``, also as YAML strings) mean bit/s, seconds and relative speed;
  units: bit, kbit, Mbit, Gbit (optionally ``/s``), s, ms, us, x (speed);
- speeds lie in 1e-6..1e6 (relative to a device of speed 1), bandwidths in 1 kbit/s..1 Pbit/s,
  latencies and overheads in 1e-9..3600 s, so no pass or prediction overflows or divides by zero;
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
MAX_FILE_BYTES = 64 << 10   # a devices file names a few dozen devices and links
MAX_NODES = 10_000          # YAML nodes once every alias is expanded
MAX_FLOW_DEPTH = 64         # [ and { open at once (PyYAML's scanner is quadratic in it)

_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_SPEED = {"x": 1.0}
# what -> (lowest, highest) in the unit it is given in (bit/s, s, relative), and how to say it
RANGES = {"speed": (1e-6, 1e6, "1e-06..1e+06 (relative to a device of speed 1)"),
          "bandwidth": (1e3, 1e15, "1 kbit/s..1 Pbit/s"),   # bit/s here; stored as bytes/s
          "latency": (1e-9, 3600.0, "1e-09..3600 s"),
          "overhead": (1e-9, 3600.0, "1e-09..3600 s")}
_NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"


def _quantity(value: Any, units: dict[str, float], where: str, what: str) -> float:
    """``value`` (a number, or a string: a number and an optional unit of ``units``) in its base unit
    (bit/s, s or relative speed), checked against ``RANGES[what]``."""
    shown = printable(value, 80) if isinstance(value, (str, int, float)) else type(value).__name__
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        m = re.fullmatch(rf"\s*({_NUMBER})\s*([a-zA-Z]*)(?:/s)?\s*", value) if isinstance(value, str) else None
        if not m or (m.group(2) and m.group(2).lower() not in units):
            raise LcpcError(f"{where}: {what} {shown} is not a number with a unit "
                            f"({', '.join(units)})")
        number = float(m.group(1)) * (units[m.group(2).lower()] if m.group(2) else 1.0)
    if not number > 0:  # NaN too
        raise LcpcError(f"{where}: {what} must be positive, got {shown}")
    low, high, span = RANGES[what]
    if not low <= number <= high:
        raise LcpcError(f"{where}: {what} {shown} is out of range: lcpc takes {what}s of {span}")
    return number


def _mapping(value: Any, where: str, allowed: set[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LcpcError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown = sorted(printable(k, 80) for k in value if k not in allowed)
    if unknown:
        raise LcpcError(f"{where}: unknown key(s) {printable(', '.join(unknown), 200)}; "
                        f"known: {', '.join(sorted(allowed))}")
    return value


def _entries(value: Any, where: str) -> list[tuple[Any, Any]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise LcpcError(f"{where}: expected a mapping, got {type(value).__name__}")
    return list(value.items())


def _name(value: Any, where: str, what: str) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise LcpcError(f"{where}: {what} must be a name, got {type(value).__name__}")
    return str(value)


def _link(value: Any, where: str) -> Link:
    spec = _mapping(value, where, {"bandwidth", "latency"})
    bw = _quantity(spec["bandwidth"], _BITS, where, "bandwidth") / 8 if "bandwidth" in spec else DEFAULT_BANDWIDTH
    lat = _quantity(spec["latency"], _SECONDS, where, "latency") if "latency" in spec else DEFAULT_LATENCY
    return Link(bw, lat)


def parse(data: Any, where: str = "devices.yaml") -> Network:
    top = _mapping(data, where, {"devices", "links", "overhead", "route"})
    devices = {}
    for key, spec in _entries(top.get("devices"), f"{where}: devices"):
        name = _name(key, f"{where}: devices", "a device")
        at = f"{where}: devices.{printable(name, 80)}"
        spec = _mapping(spec, at, {"resource", "speed"})
        speed = _quantity(spec.get("speed", 1.0), _SPEED, at, "speed")
        devices[name] = Device(name, _name(spec.get("resource", name), at, "resource"), speed)
    links = {}
    for key, spec in _entries(top.get("links"), f"{where}: links"):
        name = _name(key, f"{where}: links", "a link")
        links[name] = _link(spec, f"{where}: links.{printable(name, 80)}")
    default = links.pop("default", Link())
    overhead = _quantity(top["overhead"], _SECONDS, where, "overhead") if "overhead" in top else 0.0
    route = top.get("route", "direct")
    if route not in ROUTES:
        shown = printable(route, 40) if isinstance(route, str) else type(route).__name__
        raise LcpcError(f"{where}: route {shown}: choose {' or '.join(ROUTES)}")
    return Network(devices, links, default, overhead, where, route)


def load(path: str | Path | None) -> Network:
    """The network of ``path`` (``devices.yaml``), or the defaults when ``path`` is None."""
    if path is None:
        return Network()
    p = Path(path)
    if not p.is_file():
        raise LcpcError(f"{printable(p)}: no such devices file")
    return parse(read_yaml(p), printable(p))


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``, built only once its size, its nesting and its aliases'
    expansion are known to be small (see the module docstring)."""
    where = printable(path)
    with path.open("rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise LcpcError(f"{where}: larger than a devices file needs to be (at most {MAX_FILE_BYTES >> 10} KiB)")
    if _flow_depth(data) > MAX_FLOW_DEPTH:
        raise LcpcError(f"{where}: not valid YAML (brackets nested more than {MAX_FLOW_DEPTH} deep)")
    loader = None
    try:
        loader = yaml.SafeLoader(data)  # reads the encoding already
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    except (yaml.YAMLError, ValueError, OverflowError) as exc:  # ValueError: UnicodeDecodeError, a bad date
        raise LcpcError(f"{where}: not valid YAML ({printable(str(exc).splitlines()[0], 200)})") from None
    except RecursionError:
        raise LcpcError(f"{where}: not valid YAML (nested too deeply)") from None
    finally:
        if loader is not None:
            loader.dispose()


def _flow_depth(data: bytes) -> int:
    """The most [ and { open at once (quotes aside: a devices file has no reason to nest that deep)."""
    depth = deepest = 0
    for byte in data:
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth = max(depth - 1, 0)
    return deepest


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Refuse a node graph that refers to itself or whose aliases expand past ``MAX_NODES``
    nodes; each distinct node is visited once, so this costs the size of the file."""
    size: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = _children(node)
        if finished:
            open_.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > MAX_NODES:
                raise LcpcError(f"{where}: its YAML aliases (*name) expand to more than {MAX_NODES} values; "
                                f"a devices file needs a few dozen: write the values out")
        elif key not in size:
            if key in open_:
                raise LcpcError(f"{where}: a YAML alias refers to the value that contains it "
                                f"(line {node.start_mark.line + 1}); write the values out")
            open_.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []
