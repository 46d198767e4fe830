"""Predicted per-inference latency of a plan on a network (``devices.yaml``).

The model, for one inference (times in seconds):

- a stage on device d takes ``stage_time / speed(d)`` (stage times measured on this
  machine, ``lcpc.perf.measured``); a device runs its stages one after another, in level
  order, each as soon as its inputs are there;
- each device has its own full-duplex link to a switch (bandwidth ``bw``, one-way
  latency ``lat``); a message from a to b of n bytes starts when its value exists
  and a's uplink and b's downlink are free, occupies both for ``n / min(bw_a, bw_b)``
  and arrives ``lat_a + lat_b + overhead`` later (``overhead``: the engine's own
  per-message cost);
- a message that goes to every device (the input broadcast) is sent as one message
  per receiving device from its source, one after another on the source's uplink:
  that is how the Ray engine moves it (inlined in each device's call when small, else
  one object that each node pulls; ``broadcast_note`` says which);
- latency = when the last model output exists on the head.

With ``route: ray`` in devices.yaml, messages travel as the Ray engine moves them: its
driver runs on the head's node and owns every value, and Ray passes a value smaller than
``RAY_INLINE_BYTES`` (Ray's ``max_direct_call_object_size``, 100 KiB) inline through its
owner, so such a message between two non-head devices takes two hops, source -> head ->
destination (each hop as above, the second starting when the first has arrived); larger
values sit in the source node's object store and the destination pulls them directly
(one hop). ``direct`` (the default) is what the network itself costs.

Guarantees: ``predict`` is a pure function of the manifest, the stage times and the
network (no timing, no I/O); it replays the manifest in the one run order
(``Manifest.order.walk``);
``pipeline`` and ``single_device`` use the same link and speed model, so the four
setups of ``lcpc report --network`` are compared on equal terms.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from lcpc.errors import LcpcError
from lcpc.runtime.manifest import Manifest, Stage, Transfer
from lcpc.runtime.order import broadcast_tree
from lcpc.safety import printable

RAY_INLINE_BYTES = 100 * 1024
DEFAULT_BANDWIDTH = 100e6 / 8   # bytes/s: 100 Mbit/s Ethernet
DEFAULT_LATENCY = 0.5e-3        # seconds per message, one way, per link


@dataclass(frozen=True)
class Link:
    bandwidth: float = DEFAULT_BANDWIDTH   # bytes per second
    latency: float = DEFAULT_LATENCY       # seconds

    def scaled(self, bandwidth: float) -> Link:
        return Link(bandwidth, self.latency)


@dataclass(frozen=True)
class Device:
    name: str
    resource: str
    speed: float = 1.0


@dataclass(frozen=True)
class Network:
    """The deployment a manifest runs on (see the module docstring)."""

    devices: dict[str, Device] = field(default_factory=dict)
    links: dict[str, Link] = field(default_factory=dict)
    default_link: Link = Link()
    overhead: float = 0.0
    source: str = "(defaults)"
    route: str = "direct"

    def device(self, name: str) -> Device:
        return self.devices.get(name) or Device(name, name)

    def link(self, name: str) -> Link:
        return self.links.get(name, self.default_link)

    def speeds(self, k: int) -> list[float]:
        return [self.device(f"dev{d}").speed for d in range(k)]

    def distinct_speeds(self, k: int) -> tuple[float, ...] | None:
        """The speeds of devices 0..k-1; None when they are all equal."""
        self.check_names([f"dev{d}" for d in range(k)])
        speeds = self.speeds(k)
        return None if len(set(speeds)) == 1 else tuple(speeds)

    def check_names(self, known: Iterable[str]) -> None:
        """Every device and link the file names is one of ``known`` (the plan's device names)."""
        known = set(known)
        for name in list(self.devices) + list(self.links):
            if name not in known:
                raise LcpcError(f"{self.source}: device '{printable(name, 80)}' is not in the plan, which has "
                                f"{', '.join(sorted(known))}")

    def first(self, k: int) -> Network:
        """The same network restricted to its first ``k`` devices (dev0..dev{k-1}) and their links."""
        keep = {f"dev{d}" for d in range(k)}
        return Network({n: d for n, d in self.devices.items() if n in keep},
                       {n: link for n, link in self.links.items() if n in keep}, self.default_link, self.overhead,
                       self.source, self.route)

    def with_bandwidth(self, bandwidth: float) -> Network:
        """The same network with every link at ``bandwidth`` bytes/s (for the latency plot)."""
        return Network(self.devices, {k: v.scaled(bandwidth) for k, v in self.links.items()},
                       self.default_link.scaled(bandwidth), self.overhead, self.source, self.route)


@dataclass(frozen=True)
class Prediction:
    setup: str
    latency: float                      # seconds per inference
    compute: float                      # busiest device's compute time
    devices: tuple[tuple[str, float, float], ...] = ()   # (device, compute seconds, finish time)
    messages: int = 0
    bytes: int = 0

    @property
    def network(self) -> float:
        """What the critical path spends beyond the busiest device's compute (waiting on links)."""
        return max(self.latency - self.compute, 0.0)


@dataclass(frozen=True)
class ImageCost:
    """What an encoded image costs (``--input-wire encoded``): its file's bytes on the wire, and the
    seconds this machine takes to decode and resize it (scaled by each device's speed)."""

    bytes: int
    decode: float


def predict(manifest: Manifest, stage_times: dict[str, float], network: Network,
            setup: str = "this plan", image: ImageCost | None = None, broadcast: str | None = None) -> Prediction:
    """Replay the manifest on ``network`` (see the module docstring). ``image``: an encoded input's
    real size and decode time (default: the manifest's nominal size, no decode time); ``broadcast``:
    how the input reaches its receivers (default: the manifest's)."""
    names = manifest.names
    speed = {d: network.device(n).speed for d, n in names.items()}
    wires = _Wires(names, network)
    hop = wires.hop
    ready: dict[tuple[int, str], float] = {}
    busy_until: dict[int, float] = defaultdict(float)
    compute: dict[int, float] = defaultdict(float)
    decode = image.decode if image is not None and manifest.encoded else 0.0

    def decoded(d: int, at: float) -> float:
        """When device ``d`` has decoded an image file that arrived at ``at`` (it computes meanwhile)."""
        took = decode / speed[d]
        compute[d] += took
        busy_until[d] = max(busy_until[d], at) + took
        return busy_until[d]

    def send(t: Transfer) -> None:
        if t.kind == "input":  # delivered by the broadcast, below
            ready[(t.dst, t.dst_name)] = decoded(t.dst, arrival[t.dst]) if t.encoded else arrival[t.dst]
            return
        a, b = t.src, t.dst
        at = ready[(a, t.src_name)]
        if network.route == "ray" and 0 not in (a, b) and t.bytes < RAY_INLINE_BYTES:
            at = hop(a, 0, t.bytes, at)
            a = 0
        ready[(b, t.dst_name)] = hop(a, b, t.bytes, at)

    # the model input: the head has it at once (decoded first, when it is an image file); each
    # receiver gets one message, from the head or, in a tree, from a receiver that has it already
    for f in manifest.feeds:
        ready[(0, f.name)] = decoded(0, 0.0) if manifest.encoded else 0.0
    sizes = input_sizes(manifest, image)
    arrival = wires.broadcast(sizes, broadcast or manifest.broadcast)

    def run_level(stages: tuple[Stage, ...]) -> None:
        for s in stages:
            d = s.device
            start = max([busy_until[d]] + [ready[(d, i.name)] for i in s.inputs])
            took = stage_times[s.id] / speed[d]
            compute[d] += took
            busy_until[d] = start + took
            for o in s.outputs:
                ready[(d, o.name)] = busy_until[d]

    manifest.order.walk(run_level, send)
    latency = max(ready[(o.device, o.local_name)] for o in manifest.outputs)
    finish = {d: max([busy_until[d], wires.up[d], wires.down[d]]) for d in names}
    sent = sum(sizes.values()) + sum(t.bytes for t in manifest.transfers if t.kind != "input")
    return Prediction(setup, latency, max(compute.values(), default=0.0),
                      tuple((names[d], compute[d], finish[d]) for d in sorted(names)),
                      len(manifest.transfers), sent)


class _Wires:
    """Each device's full-duplex link to the switch, busy until a time (see the module docstring)."""

    def __init__(self, names: dict[int, str], network: Network) -> None:
        self.network = network
        self.link = {d: network.link(n) for d, n in names.items()}
        self.up: dict[int, float] = defaultdict(float)
        self.down: dict[int, float] = defaultdict(float)

    def hop(self, a: int, b: int, n: int, at: float) -> float:
        """When ``n`` bytes sent from ``a`` to ``b`` no earlier than ``at`` arrive (both links busy meanwhile)."""
        start = max(at, self.up[a], self.down[b])
        wire = n / min(self.link[a].bandwidth, self.link[b].bandwidth)
        self.up[a] = self.down[b] = start + wire
        return start + wire + self.link[a].latency + self.link[b].latency + self.network.overhead

    def broadcast(self, sizes: dict[int, int], policy: str) -> dict[int, float]:
        """When each receiver has the model input, sent ``policy``'s way from the head (at 0)."""
        if self.network.route == "ray" and max(sizes.values(), default=0) < RAY_INLINE_BYTES:
            policy = "p2p"  # Ray passes small values inline through their owner, the driver on the head's node
        edges = broadcast_tree(list(sizes)) if policy == "tree" else [(0, r) for r in sizes]
        arrival = {0: 0.0}
        for h, r in edges:
            arrival[r] = self.hop(h, r, sizes[r], arrival[h])
        return arrival


def input_sizes(manifest: Manifest, image: ImageCost | None = None) -> dict[int, int]:
    """Bytes of the model input each receiving device gets (an encoded image: ``image``'s real size)."""
    sizes: dict[int, int] = defaultdict(int)
    for t in manifest.order.inputs:
        sizes[t.dst] += image.bytes if t.encoded and image is not None else t.bytes
    return dict(sizes)


def broadcast_time(sizes: dict[int, int], network: Network, policy: str) -> float:
    """When the last receiver has the model input (``sizes``: bytes per receiving device), sent
    ``policy``'s way from the head (links only, from time 0)."""
    names = {d: f"dev{d}" for d in [0, *sizes]}
    return max(_Wires(names, network).broadcast(sizes, policy).values())


def choose_broadcast(sizes: dict[int, int], network: Network) -> str:
    """``tree`` when the network model has every receiver hold the input sooner than point to point,
    else ``p2p`` (so the choice is never predicted slower than the broadcast it replaces)."""
    tree, p2p = (broadcast_time(sizes, network, p) for p in ("tree", "p2p"))
    return "tree" if tree < p2p else "p2p"


def single_device(manifest: Manifest, original_time: float, network: Network,
                  image: ImageCost | None = None) -> Prediction:
    """The original model on the head device (dev0): no network at all (an encoded image: decoded
    there first, as every plan decodes it)."""
    head = manifest.names[0]
    took = (original_time + (image.decode if image is not None and manifest.encoded else 0.0)) / \
        network.device(head).speed
    return Prediction("original, one device", took, took, ((head, took, took),))


def pipeline(manifest: Manifest, original_time: float, network: Network) -> Prediction:
    """Layer-wise pipeline: device i runs the i-th of K consecutive chunks of equal FLOPs; the
    boundary tensors (the manifest's pipeline bytes, split evenly over the K-1 boundaries and
    the return to the head) cross one after another."""
    names = manifest.names
    k = len(names)
    total = manifest.json["totals"]["comparison"]["pipeline"]["bytes_per_inference"]
    hops = [(d, (d + 1) % k) for d in range(k)] if k > 1 else []
    per_hop = total / max(len(hops), 1)
    clock, rows, comp = 0.0, [], []
    for d in range(k):
        took = original_time / k / network.device(names[d]).speed
        clock += took
        comp.append(took)
        rows.append((names[d], took, clock))
        if d < len(hops) and per_hop:
            a, b = (network.link(names[x]) for x in hops[d])
            clock += per_hop / min(a.bandwidth, b.bandwidth) + a.latency + b.latency + network.overhead
    return Prediction(f"layer-wise pipeline over {k} devices", clock, max(comp), tuple(rows), len(hops), int(total))


def compare(plan: Manifest, plan_times: dict, exact: Manifest | None, exact_times: dict | None,
            original_time: float, network: Network, image: ImageCost | None = None) -> list[Prediction]:
    """The four setups of ``lcpc report --network``, in a fixed order (``exact``: the --sync all plan)."""
    rows = [single_device(plan, original_time, network, image),
            predict(plan, plan_times, network, f"this plan (--sync {plan.sync_policy})", image)]
    if exact is not None and exact_times is not None:
        rows.append(predict(exact, exact_times, network, "channel-wise model parallel (--sync all)", image,
                            plan.broadcast))
    rows.append(pipeline(plan, original_time, network))
    return rows


def broadcast_note(manifest: Manifest, network: Network | None = None, image: ImageCost | None = None) -> str | None:
    """How the model input reaches the devices, and (with ``network``) when the last has it, both ways."""
    inputs = manifest.order.inputs
    if not inputs:
        return None
    sizes = input_sizes(manifest, image)
    size = next(iter(sizes.values()))  # one device's message
    what = {"encoded": f"the image file ({'measured' if image is not None else 'nominal'} size); each device "
                       f"decodes it" + (f" in {1e3 * image.decode:.2f} ms on this machine" if image else ""),
            "uint8": "the raw uint8 image; each device applies the preprocessing",
            "float": inputs[0].dtype}[manifest.input_wire]
    ray = ("inlined by value in each receiving device's call, sent from the driver on dev0's node"
           if size < RAY_INLINE_BYTES else "a large object, pulled by each device's node from one that has it")
    way = ("a binomial tree: each device that has it forwards it to the next (dev0's link carries it "
           f"{sum(1 for h, _ in broadcast_tree(list(sizes)) if h == 0)} times)" if manifest.broadcast == "tree"
           else f"{len(sizes)} point-to-point messages from dev0, one after another on dev0's link")
    when = ""
    if network is not None:
        chosen, other = manifest.broadcast, "p2p" if manifest.broadcast == "tree" else "tree"
        when = (f"; broadcast {chosen}: every device has it after {1e3 * broadcast_time(sizes, network, chosen):.3f} "
                f"ms ({other} would take {1e3 * broadcast_time(sizes, network, other):.3f} ms)")
    return f"the input ({size} bytes, {what}) reaches {len(sizes)} devices as {way} (Ray engine: {ray}){when}"


BANDWIDTHS_MBIT = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def sweep(plan: Manifest, plan_times: dict, exact: Manifest | None, exact_times: dict | None, original_time: float,
          network: Network, image: ImageCost | None = None, bandwidths_mbit=BANDWIDTHS_MBIT) -> dict[str, list[float]]:
    """Predicted latency of each setup at each bandwidth (every link set to it), by setup name."""
    curves: dict[str, list[float]] = defaultdict(list)
    for mbit in bandwidths_mbit:
        for p in compare(plan, plan_times, exact, exact_times, original_time, network.with_bandwidth(mbit * 1e6 / 8),
                         image):
            curves[p.setup].append(p.latency)
    return dict(curves)
