"""``lcpc plan``: will splitting pay on this network? Predicted latency for every K, before deploying.

For a model and a ``devices.yaml`` of N devices, every candidate is converted for real into a
scratch folder (K from 2 to N devices, each sync policy, each input wire that applies), its
stage files are timed on this machine and its latency per inference is predicted on the
network by the same model ``lcpc report --network`` uses (``lcpc.perf.network.predict``: stage
times scaled by each device's speed, every message on the links). K=1 is the original model on
the head device (dev0), no network at all.

Guarantees:
- a K-device candidate runs on the file's first K devices (dev0..dev{K-1}) and their links,
  so the figure for K=N is exactly what ``lcpc report OUT --network devices.yaml`` predicts
  for the same folder and stage times;
- the recommendation is the candidate with the lowest predicted latency; it is K=1 (stay on
  one device) whenever no distributed candidate is predicted faster; a cut plan (--sync
  none) changes the model, which the recommendation says, with the command that recovers it;
- with calibration inputs, each candidate's fidelity before recovery (top-1 agreement and
  KL against the original) is measured on them;
- nothing is written outside a temporary folder, which is always removed; every error is an
  ``LcpcError`` naming the file or option.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lcpc import frontend, pipeline
from lcpc.errors import LcpcError
from lcpc.images import Preprocessing
from lcpc.lower import raw_input
from lcpc.perf import measured
from lcpc.perf.latency_report import pyplot, save_figure
from lcpc.perf.network import Network, predict
from lcpc.runtime import manifest as mf

SYNCS = ("none", "all")


@dataclass(frozen=True)
class Candidate:
    """One plan's predicted figures (K=1: the original model on dev0)."""

    k: int
    sync: str | None          # None for K=1
    input_wire: str | None    # float | uint8; None for K=1
    latency: float            # seconds per inference, predicted
    compute: float            # busiest device's compute, seconds
    bytes: int                # on the wire per inference
    messages: int
    agreement: float | None = None   # top-1 agreement with the original on --calib, before recovery
    kl: float | None = None

    @property
    def label(self) -> str:
        if self.k == 1:
            return "K=1 (one device)"
        wire = f", {self.input_wire} input" if self.input_wire == "uint8" else ""
        return f"K={self.k} --sync {self.sync}{wire}"


@dataclass(frozen=True)
class Advice:
    network: str
    candidates: tuple[Candidate, ...]
    chosen: Candidate

    @property
    def single(self) -> Candidate:
        return self.candidates[0]

    def speedup(self, c: Candidate) -> float:
        return self.single.latency / c.latency if c.latency > 0 else float("inf")


def devices_of(network: Network, most: int | None) -> int:
    """How many devices the file describes (its ``devices:`` entries), or ``most`` when given."""
    named = len(network.devices)
    n = most if most is not None else named
    if n < 1:
        raise LcpcError(f"{network.source}: names no devices; list them under devices: (dev0, dev1, ...) or pass "
                        f"--max-branches N")
    if named and n > named:
        raise LcpcError(f"--max-branches {n}: {network.source} describes {named} devices")
    return n


def advise(model: str | Path, network: Network, *, most: int | None = None, syncs: Iterable[str] = SYNCS,
           input_shapes: dict | None = None, preprocessing: dict | None = None, calib: np.ndarray | None = None,
           progress: Callable[[str], Any] | None = None) -> Advice:
    """Every candidate's predicted latency on ``network`` and the recommended one (module docstring)."""
    n = devices_of(network, most)
    syncs = tuple(syncs)
    for s in syncs:
        if s not in SYNCS:
            raise LcpcError(f"--sync {s}: lcpc plan compares {' and '.join(SYNCS)}")
    model = Path(model)
    base = measured.model_time(model)
    head = network.device("dev0").speed
    candidates = [Candidate(1, None, None, base / head, base / head, 0, 0, 1.0 if calib is not None else None,
                            0.0 if calib is not None else None)]
    wires = ["float"]
    if preprocessing is not None:
        graph, _ = frontend.load(model, input_shapes)
        if raw_input(graph, Preprocessing.from_dict(preprocessing), "auto") is not None:
            wires.append("uint8")
    with tempfile.TemporaryDirectory(prefix="lcpc-plan-") as tmp:
        for k in range(2, n + 1):
            net = network.first(k)
            for sync in syncs:
                for wire in wires:
                    folder = Path(tmp) / f"k{k}-{sync}-{wire}"
                    if progress:
                        progress(f"K={k} --sync {sync} ({wire} input)")
                    pipeline.convert(model, folder, k, sync, input_shapes=input_shapes, devices=net,
                                     preprocessing=preprocessing, input_wire=wire)
                    candidates.append(_predict(folder, k, sync, wire, net, calib))
    chosen = min(candidates, key=lambda c: (c.latency, c.k))
    return Advice(network.source, tuple(candidates), chosen)


def _predict(folder: Path, k: int, sync: str, wire: str, net: Network, calib: np.ndarray | None) -> Candidate:
    manifest = mf.read(folder)
    p = predict(manifest, measured.stage_times(folder, manifest), net)
    agreement = kl = None
    if calib is not None:
        data = calib
        if manifest.takes_raw_images:
            raise LcpcError("--calib with a uint8 input wire: pass the calibration images as a float batch "
                            "without --preprocess, or leave --calib out")
        fig = pipeline.verify(folder, data)
        agreement, kl = fig["top1_agreement"], fig["kl_divergence"]
    return Candidate(k, sync, wire, p.latency, p.compute, p.bytes, p.messages, agreement, kl)


# ----------------------------------------------------------------------------- rendering
HEADER = ["plan", "latency ms", "speed-up", "busiest compute ms", "bytes", "messages", "agreement", "KL"]


def rows(advice: Advice) -> list[list[str]]:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    return [[c.label + (" <- recommended" if c is advice.chosen else ""), f"{1e3 * c.latency:.3f}",
             f"x{advice.speedup(c):.2f}", f"{1e3 * c.compute:.3f}", str(c.bytes), str(c.messages),
             "-" if c.agreement is None else f"{100 * c.agreement:.1f}%", fmt(c.kl, ".3g")]
            for c in advice.candidates]


def verdict(advice: Advice, model: str) -> str:
    c = advice.chosen
    if c.k == 1:
        return ("recommended: stay on one device (K=1): no distributed plan is predicted faster than the original "
                f"model on dev0 on {advice.network}")
    text = (f"recommended: {c.label}, predicted {1e3 * c.latency:.3f} ms per inference, x{advice.speedup(c):.2f} "
            f"over the original on one device")
    if c.sync == "none":
        text += (f"; the cut changes the model: convert with --recover TRAIN.npy (or lcpc recover) to win back its "
                 f"accuracy: lcpc convert {model} --branches {c.k} --devices {advice.network} --recover TRAIN.npy")
    return text


def render(advice: Advice, model: str, fmt: str = "text") -> str:
    if fmt == "json":
        return json.dumps({"network": advice.network, "candidates": [asdict(c) | {"label": c.label}
                                                                     for c in advice.candidates],
                           "recommended": advice.chosen.label, "verdict": verdict(advice, model)}, indent=1)
    body = rows(advice)
    title = f"Predicted latency per inference on {advice.network} (stage times measured on this machine)"
    if fmt == "markdown":
        lines = [f"## {title}\n", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines) + f"\n\n{verdict(advice, model)}\n"
    widths = [max(len(x) for x in col) for col in zip(HEADER, *body)]
    lines = [title] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [HEADER, *body]]
    return "\n".join(lines) + "\n" + verdict(advice, model)


def plot(advice: Advice, path: Path) -> None:
    """Predicted latency against K, one line per sync policy and input wire (K=1 on each)."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    single = advice.single
    lines: dict[str, list[Candidate]] = {}
    for c in advice.candidates[1:]:
        lines.setdefault(c.label.split(" ", 1)[1], []).append(c)
    for name, cs in lines.items():
        ax.plot([1] + [c.k for c in cs], [1e3 * single.latency] + [1e3 * c.latency for c in cs], marker="o",
                label=name)
    ax.axhline(1e3 * single.latency, color="grey", linestyle=":", label="one device")
    ax.set_xticks(range(1, max(c.k for c in advice.candidates) + 1))
    ax.set_xlabel("devices K")
    ax.set_ylabel("predicted latency per inference (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"on {Path(advice.network).name}", fontsize=9)
    save_figure(fig, path)
