"""A manifest run as one Ray Compiled Graph (``ray.dag``, ``experimental_compile``), for measurement.

The same per-device actors as the Ray engine (``lcpc.targets.ray.DeviceWorker``) and the same
run order (``lcpc.schedule``): one bound ``step`` per device per level, the messages between
them as DAG edges (compiled-graph channels instead of the object store); the last step of the
head returns the model outputs, and steps that send nothing become graph outputs too (compiled
graphs allow no leaves). Received bytes are not counted here (no ``finish`` call): this is a
timing harness; ``RayEngine`` is the engine.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import ray
from ray.dag import InputNode, MultiOutputNode

from lcpc import manifest as mf
from lcpc.schedule import Schedule
from lcpc.targets.ray import DeviceWorker

RID = "compiled"


class CopyingWorker(DeviceWorker):
    """Copies what arrives: arrays read from a compiled-graph channel are zero-copy views of its
    buffer, and holding one keeps the writer from writing the next execution (a hang)."""

    def step(self, rid, stage_ids, sends, maps, *refs):
        copied = [{k: np.array(v, copy=True) for k, v in r.items()} if isinstance(r, dict) else r for r in refs]
        return super().step(rid, stage_ids, sends, maps, *copied)


class CompiledRun:
    """``run(feeds) -> outputs`` through one compiled graph of the folder's stages (Ray must be running)."""

    def __init__(self, folder: str | Path, timeout: float = 60.0) -> None:
        folder = Path(folder)
        self.manifest = mf.read(folder)
        self.timeout = timeout
        schedule = Schedule(self.manifest)
        worker = ray.remote(num_cpus=0, max_restarts=0)(CopyingWorker)
        devices = schedule.devices
        self.actors = {}
        for d in devices:
            stages = [s for s in self.manifest["stages"] if s["device"] == d]
            self.actors[d] = worker.options(resources={f"dev{d}": 0.001}).remote(
                d, stages, {s["id"]: mf.read_stage(folder, s) for s in stages}, str(folder))
        ray.get([a.ping.remote() for a in self.actors.values()], timeout=timeout)
        feeds = [f["name"] for f in mf.feeds(self.manifest)]
        with InputNode() as inp:
            pending: dict[int, list] = defaultdict(list)
            pending[0].append((inp, [(n, n, None) for n in feeds]))
            by_dst: dict[int, list] = defaultdict(list)
            for t in schedule.input_transfers:
                by_dst[t["to"]["device"]].append((t["from"]["name"], t["to"]["name"], t["id"]))
            for dst, mapping in by_dst.items():
                pending[dst].append((inp, mapping))
            outputs = defaultdict(list)
            for o in self.manifest["outputs"]:
                outputs[o["device"]].append(o["local_name"])
            steps = schedule.steps()
            last = {st.device: st.level for level in steps for st in level}
            leaves, results = [], {}  # steps that send nothing, and the model outputs: graph outputs
            for level in steps:
                arrived: dict[int, list] = defaultdict(list)
                for step in level:
                    given = pending.pop(step.device, [])
                    if not given:
                        raise ValueError(f"device {step.device} has a call at level {step.level} with no input")
                    dests = step.destinations
                    sends = [[t["from"]["name"] for t in step.sends[dst]] for dst in dests]
                    driver = step.device in outputs and last[step.device] == step.level
                    if driver:  # the model outputs go back to the driver as one more message
                        sends.append(outputs[step.device])
                    method = self.actors[step.device].step
                    if len(sends) > 1:
                        method = method.options(num_returns=len(sends))
                    node = method.bind(RID, [s["id"] for s in step.stages], sends, [m for _, m in given],
                                       *[n for n, _ in given])
                    outs = [node] if len(sends) <= 1 else [node[i] for i in range(len(sends))]
                    if not sends:
                        leaves.append(node)
                    if driver:
                        results[step.device] = outs.pop()
                    for dst, out in zip(dests, outs):
                        arrived[dst].append((out, [(t["from"]["name"], t["to"]["name"], t["id"])
                                                   for t in step.sends[dst]]))
                for d, items in arrived.items():
                    pending[d].extend(items)
            if set(results) != set(outputs) or any(pending.values()):
                raise ValueError("the model outputs are not all produced by a step (or a message is never read)")
            dag = MultiOutputNode(list(results.values()) + leaves)
        self.devices = list(results)
        self.graph = dag.experimental_compile()

    def run(self, feeds: dict) -> dict:
        done = dict(zip(self.devices, ray.get(self.graph.execute(feeds), timeout=self.timeout)[:len(self.devices)]))
        return {o["name"]: np.array(done[o["device"]][o["local_name"]], copy=True) for o in self.manifest["outputs"]}

    def close(self) -> None:
        try:
            self.graph.teardown()
        finally:
            for a in self.actors.values():
                ray.kill(a, no_restart=True)
