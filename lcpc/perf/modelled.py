"""The modelled time of a node on a device, as the planning passes weigh it.

``passes.balance`` (channel shares) and ``passes.merge`` (how the classifier meets at the
head) compare the same model: a node takes ``flops / PEAK_FLOPS`` plus the bytes of the
weights it reads over ``WEIGHT_BANDWIDTH`` (a Gemm at batch 1 is bound by reading its
weights, not by its multiply-adds), plus ``NODE_OVERHEAD`` for running it at all (at K = 16
the convs of a ResNet-50 branch are so small that this is most of a stage's time), in
seconds on a reference core, divided by the device's relative speed. The constants are one
core of the development machine, read off ``benchmarks/narrow.py``; the passes compare
times, so what matters is their ratios.

Guarantees: ``speeds_of`` returns K positive speeds scaled so the fastest is 1 (all 1 when
none are given), for comparing devices' work with each other; ``absolute_speeds`` returns them
as given (each relative to the reference core), for comparing work with time on a link (a
board a tenth as fast takes ten times as long beside the same message); both raise an
``LcpcError`` naming what is wrong.
"""

from __future__ import annotations

import numpy as np

from lcpc import ops
from lcpc.errors import LcpcError

PEAK_FLOPS = 60e9          # per second: large convs on one core
WEIGHT_BANDWIDTH = 12e9    # bytes per second: weights streamed from memory
NODE_OVERHEAD = 5e-6       # seconds per node run


def speeds_of(k: int, speeds: tuple[float, ...] | None) -> np.ndarray:
    v = absolute_speeds(k, speeds)
    return v / v.max()


def absolute_speeds(k: int, speeds: tuple[float, ...] | None) -> np.ndarray:
    if speeds is None:
        return np.ones(k)
    v = np.asarray(speeds, dtype=np.float64)
    if len(v) != k or not np.all(v > 0):
        raise LcpcError(f"device speeds {list(speeds)}: need {k} positive numbers, one per device")
    return v


def node_seconds(plan, node) -> float:
    """The modelled time of the whole ``node`` on a reference core (overhead excluded)."""
    g, a = plan.graph, plan.analysis
    seconds = a.flops[node.name] / PEAK_FLOPS
    if isinstance(a.behaviours[node.name], (ops.Dense, ops.Grouped)):
        seconds += sum(g.constants[i].nbytes for i in node.inputs[1:] if i in g.constants) / WEIGHT_BANDWIDTH
    return seconds


def sum_seconds(plan, node) -> float:
    """The head's time to add the K partial outputs of ``node``."""
    return NODE_OVERHEAD + float(np.prod(plan.graph.info(node.outputs[0]).shape)) * (plan.k - 1) / PEAK_FLOPS
