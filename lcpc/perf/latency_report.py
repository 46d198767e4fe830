"""What ``lcpc report --network`` shows: predicted latency of four setups, per-device
finish times, how the broadcast is sent, and (``--plot``) latency against bandwidth.

Guarantees: every figure comes from ``lcpc.perf.network`` (the model) fed with stage times
measured on this machine; the three formats carry the same rows; the plot is written
with matplotlib's non-interactive Agg backend, to a temporary file renamed into place
(no half-written PNG).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcpc.errors import LcpcError
from lcpc.perf import measured as timing
from lcpc.perf import network as model
from lcpc.perf.network import BANDWIDTHS_MBIT, ImageCost, Network, Prediction, broadcast_note
from lcpc.runtime import manifest as mf
from lcpc.runtime.manifest import Manifest


@dataclass(frozen=True)
class Measured:
    """Everything the network model needs, measured on this machine."""

    plan: Manifest
    plan_times: dict[str, float]
    exact: Manifest
    exact_times: dict[str, float]
    original_time: float
    network: Network
    image: ImageCost | None = None   # an encoded input's real size and decode time (``--images``)

    def _args(self) -> tuple:
        return (self.plan, self.plan_times, self.exact, self.exact_times, self.original_time, self.network,
                self.image)

    def compare(self) -> list[Prediction]:
        return model.compare(*self._args())

    def sweep(self) -> dict[str, list[float]]:
        return model.sweep(*self._args())


def measure(folder: Path, manifest: Manifest, network: Network, original: Path | None,
            convert: Callable[..., Any], images: Path | None = None) -> Measured:
    """Time the plan's stages, the original model and (via ``convert``: ``lcpc.pipeline.convert``) the
    same model planned with ``--sync all``, all on this machine; for a folder fed image files, the
    files of ``images`` (their median size, and the median time to decode one here) or a generated
    photo-like image (``measured.image_cost``)."""
    network.check_names(d.name for d in manifest.devices)
    source = Path(original or manifest.json["source"]["path"])
    if not source.is_file():
        raise LcpcError(f"{source}: the original model is needed to time it and plan --sync all; pass --model")
    times = timing.stage_times(folder, manifest)
    if manifest.sync_policy == "all":
        exact, exact_times = manifest, times
    else:
        with tempfile.TemporaryDirectory(prefix="lcpc-report-") as tmp:
            convert(source, Path(tmp) / "all", manifest.branches, "all",
                    partition=manifest.json["sync"].get("partition") or "energy",
                    input_shapes={i.name: i.shape for i in manifest.inputs},
                    preprocessing=manifest.preprocessing,
                    input_wire=manifest.input_wire)
            exact = mf.read(Path(tmp) / "all")
            exact_times = timing.stage_times(Path(tmp) / "all", exact)
    image = timing.image_cost(manifest, images) if manifest.encoded else None
    return Measured(manifest, times, exact, exact_times, timing.model_time(source), network, image)


def rows(predictions: list[Prediction]) -> list[list[str]]:
    base = predictions[0].latency
    return [[p.setup, f"{1e3 * p.latency:.3f}", f"{1e3 * p.compute:.3f}", f"{1e3 * p.network:.3f}",
             str(p.bytes), f"x{base / p.latency:.2f}" if p.latency > 0 else "-"] for p in predictions]


HEADER = ["setup", "latency ms", "busiest compute ms", "network/wait ms", "bytes", "speed-up"]


def render(predictions: list[Prediction], network: Network, manifest: Manifest, fmt: str = "text",
           image: ImageCost | None = None) -> str:
    plan = predictions[1]
    note = broadcast_note(manifest, network, image)
    if fmt == "json":
        return json.dumps({"network": network.source, "broadcast": note,
                           "setups": [{"setup": p.setup, "latency_s": p.latency, "compute_s": p.compute,
                                       "bytes": p.bytes, "devices": [list(d) for d in p.devices]}
                                      for p in predictions]}, indent=1)
    dev_rows = [[name, f"{1e3 * c:.3f}", f"{1e3 * f:.3f}"] for name, c, f in plan.devices]
    tables = [("Predicted latency per inference on " + network.source, HEADER, rows(predictions)),
              ("This plan, per device", ["device", "compute ms", "finish ms"], dev_rows)]
    out = []
    for title, header, body in tables:
        if fmt == "markdown":
            out += [f"## {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(r) + " |" for r in body] + [""]
        else:
            widths = [max(len(x) for x in col) for col in zip(header, *body)]
            out += [title] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + body] + [""]
    if note:
        out.append(f"broadcast: {note}")
    return "\n".join(out)


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend (an optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LcpcError("--plot needs matplotlib: pip install 'lcpc[plot]'") from None
    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` to ``path`` as a PNG, through a temporary file renamed into place; close it."""
    plt = pyplot()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def plot(curves: dict[str, list[float]], plan: Prediction, path: Path) -> None:
    """Latency of every setup against bandwidth, and this plan's per-device time bars."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for setup, latencies in curves.items():
        left.plot(BANDWIDTHS_MBIT, [1e3 * v for v in latencies], marker="o", label=setup)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("link bandwidth (Mbit/s)")
    left.set_ylabel("predicted latency per inference (ms)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    names = [d[0] for d in plan.devices]
    compute = [1e3 * d[1] for d in plan.devices]
    waiting = [1e3 * max(d[2] - d[1], 0.0) for d in plan.devices]
    right.barh(names, compute, label="compute")
    right.barh(names, waiting, left=compute, label="network and waiting")
    right.set_xlabel("ms per inference (this plan)")
    right.invert_yaxis()
    right.legend(fontsize=8)
    save_figure(fig, path)
