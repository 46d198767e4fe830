"""Partition report: per-device compute, memory and traffic, read from a manifest.

Guarantees: every figure comes from the manifest (which the target computed from the
stage files themselves), read through its typed view, so ``lcpc report`` on a copied
folder shows the same numbers; the three formats (text, markdown, json) carry the same
rows.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lcpc.runtime.manifest import Manifest
from lcpc.safety import printable


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{int(n)}"


def summary(document: Mapping[str, Any]) -> dict[str, Any]:
    """The report of a validated manifest (its JSON) as plain data."""
    m = Manifest.parse(document)
    original = document["totals"]["original"]
    devices = []
    for d in m.devices:
        stages = m.stages_on(d.id)
        flops, params = sum(s.flops for s in stages), sum(s.params for s in stages)
        devices.append({
            "device": d.id, "role": d.role, "stages": len(stages), "flops": flops, "params": params,
            "weight_bytes": sum(s.weight_bytes for s in stages),
            "peak_activation_bytes": max((s.peak_activation_bytes for s in stages), default=0),
            "bytes_out": sum(t.bytes for t in m.transfers if t.src == d.id and t.dst != d.id),
            "bytes_in": sum(t.bytes for t in m.transfers if t.dst == d.id and t.src != d.id),
            "flops_vs_original": flops / max(original["flops"], 1),
            "params_vs_original": params / max(original["params"], 1),
        })
    sync = document["sync"]
    return {
        "source": document["source"]["path"], "branches": m.branches, "sync": m.sync_policy,
        "partition": sync.get("partition"), "cuts": len(sync["cuts"]), "exchanges": len(sync["exchanges"]),
        "devices": devices, "totals": document["totals"],
        "syncs": [d for d in document["decisions"] if d["action"] in ("forced-sync", "exchange", "merge")],
        "unsupported_ops": document.get("unsupported_ops", []), "fidelity": document.get("fidelity"),
        "compression": document.get("compression"),
        "formats": [{"stage": s["id"], **s["format"]} for s in document["stages"] if s.get("format")],
    }


def render(m: Mapping[str, Any], fmt: str = "text", width: int = 110) -> str:
    """The report in ``fmt``; names that came from the model are escaped for the terminal."""
    data = summary(m)
    if fmt == "json":
        return json.dumps(data, indent=1)
    if fmt == "markdown":
        return _markdown(data)
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    _rich(console, data)
    return buf.getvalue()


def _device_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for d in data["devices"]:
        rows.append([f"dev{d['device']}" + (" (head)" if d["role"] == "head" else ""), str(d["stages"]),
                     _fmt(d["flops"]),
                     f"{100 * d['flops_vs_original']:.1f}%", _fmt(d["params"]),
                     f"{100 * d['params_vs_original']:.1f}%", _fmt(d["weight_bytes"]) + "B",
                     _fmt(d["peak_activation_bytes"]) + "B", _fmt(d["bytes_in"]) + "B",
                     _fmt(d["bytes_out"]) + "B"])
    return rows


DEVICE_HEADER = ["device", "stages", "FLOPs", "of orig.", "params", "of orig.", "weights", "peak act.",
                 "bytes in", "bytes out"]


def _traffic_rows(data: dict[str, Any]) -> list[list[str]]:
    return [[name, _fmt(v["bytes_per_inference"]) + "B", v["description"]]
            for name, v in data["totals"]["comparison"].items()]


def _sync_rows(data: dict[str, Any]) -> list[list[str]]:
    return [[printable(s["node"], 80), printable(s["op"], 40), s["action"], _fmt(s.get("bytes", 0)) + "B",
             printable(s["reason"], 200)] for s in data["syncs"]]


SYNC_HEADER = ["node", "op", "action", "bytes", "why"]


def _headline(data: dict[str, Any]) -> str:
    t = data["totals"]
    return (f"{printable(data['source'], 300)}: K={data['branches']} branches, --sync {data['sync']}, "
            f"{data['cuts']} cut layers, {data['exchanges']} exact exchanges; "
            f"{_fmt(t['bytes_per_inference'])}B on the wire per inference; busiest device "
            f"{_fmt(t['max_device_flops'])} FLOPs of the original {_fmt(t['original']['flops'])}")


def _rich(console: Console, data: dict[str, Any]) -> None:
    console.print(Text(_headline(data)))
    table = Table(title="Per device (bytes per inference)", title_justify="left")
    for h in DEVICE_HEADER:
        table.add_column(h, justify="left" if h == "device" else "right")
    for row in _device_rows(data):
        table.add_row(*map(Text, row))
    console.print(table)
    traffic = Table(title="Traffic of the same model, per inference", title_justify="left")
    for h in ("execution", "bytes", "what"):
        traffic.add_column(h)
    for row in _traffic_rows(data):
        traffic.add_row(*map(Text, row))
    console.print(traffic)
    if data["syncs"]:
        syncs = Table(title="Sync points and merges (bytes per inference)", title_justify="left")
        for h in SYNC_HEADER:
            syncs.add_column(h)
        for row in _sync_rows(data):
            syncs.add_row(*map(Text, row))
        console.print(syncs)
    if data["unsupported_ops"]:
        console.print(Text("Ops lcpc does not model (run exactly behind a sync): "
                           + printable(", ".join(data["unsupported_ops"]), 500)))
    recovery = (data["fidelity"] or {}).get("recovery")
    if recovery:
        console.print(Text("Recovery: " + render_recovery(recovery).replace("\n", "\n          ")))
    choice = (data["fidelity"] or {}).get("sync_auto")
    if choice:
        console.print(Text(render_sync_choice(choice)))
    for title, header, rows in _compression_tables(data):
        table = Table(title=title, title_justify="left")
        for h in header:
            table.add_column(h, justify="left" if h in ("variant", "stage", "format", "why") else "right")
        for row in rows:
            table.add_row(*map(Text, row))
        console.print(table)


def _compression_tables(data: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = []
    comp = data.get("compression")
    if comp and comp.get("variants"):
        pruned = comp.get("prune")
        title = (f"Compression (--prune {pruned['ratio'] if pruned else '-'}, "
                 f"--quantize {comp.get('quantize') or '-'}, --wire {comp.get('wire')}; "
                 f"fidelity against the original on the calibration data)")
        tables.append((title, COMPRESSION_HEADER, _compression_rows(data)))
    if data.get("formats"):
        tables.append(("Stage number formats", ["stage", "format", "why"], _format_rows(data)))
    return tables


COMPRESSION_HEADER = ["variant", "FLOPs", "vs LCP", "busiest device", "weights", "stage files", "vs LCP",
                      "wire bytes", "top-1 agreement"]


def _compression_rows(data: dict[str, Any]) -> list[list[str]]:
    """Original, LCP, +prune, +quant, +both: compute, weights, files, wire and fidelity."""
    variants = (data.get("compression") or {}).get("variants") or {}
    base = variants.get("lcp", {})
    rows = []
    for name, v in variants.items():
        agree = v.get("top1_agreement")
        rows.append([name, _fmt(v["flops"]), _ratio(v["flops"], base.get("flops")), _fmt(v["max_device_flops"]),
                     _fmt(v["weight_bytes"]) + "B", _fmt(v["file_bytes"]) + "B",
                     _ratio(v["file_bytes"], base.get("file_bytes")), _fmt(v["wire_bytes"]) + "B",
                     "-" if agree is None else f"{100 * agree:.2f}%"])
    return rows


def _ratio(value: float, base: float | None) -> str:
    return f"{100 * value / base:.1f}%" if base else "-"


def _format_rows(data: dict[str, Any]) -> list[list[str]]:
    return [[f["stage"], f["format"], printable(f["reason"], 200)] for f in data.get("formats", [])]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(data: dict[str, Any]) -> str:
    parts = [f"# lcpc partition report\n\n{_headline(data)}\n", "## Per device (bytes per inference)\n",
             _md_table(DEVICE_HEADER, _device_rows(data)), "\n## Traffic of the same model, per inference\n",
             _md_table(["execution", "bytes", "what"], _traffic_rows(data))]
    if data["syncs"]:
        parts += ["\n## Sync points and merges (bytes per inference)\n", _md_table(SYNC_HEADER, _sync_rows(data))]
    if data["unsupported_ops"]:
        parts.append("\nOps lcpc does not model (run exactly behind a sync): " + ", ".join(data["unsupported_ops"]))
    for title, header, rows in _compression_tables(data):
        parts += [f"\n## {title}\n", _md_table(header, rows)]
    return "\n".join(parts) + "\n"


def render_sync_choice(choice: dict) -> str:
    """``--sync auto --recover``: the candidate plans, their held-out agreement after recovery, the chosen one."""
    seen = ", ".join(f"{c['bytes_per_inference']} B ({len(c['exchanges'])} exchanges) {100 * c['agreement']:.2f}%"
                     + (" (chosen)" if i == choice["chosen"] else "") for i, c in enumerate(choice["candidates"]))
    pruned = (" (scored before --prune: the chosen plan was then pruned and recovered again)"
              if choice.get("scored_before_pruning") else "")
    return f"--sync auto chose after recovery, within {choice['budget']} bytes, among: {seen}{pruned}"


def render_recovery(figures: dict) -> str:
    """The data recovery used, then one line per recovery stage: held-out figures before -> after."""
    names = {"top1_agreement": "agreement", "candidate_accuracy": "accuracy", "kl_divergence": "KL"}
    lines = []
    data = figures.get("data")
    if data:
        lines.append("data: " + render_data(data))
        for warning in (data.get("synthesis") or {}).get("warnings", []):
            lines.append(f"warning: {warning}")
    for stage, rep in figures.items():
        if stage == "data":
            continue
        before, after = rep.get("before", {}), rep.get("after", {})
        parts = []
        for key, label in names.items():
            if key in after:
                fmt = (lambda v: f"{v:.4g}") if key == "kl_divergence" else (lambda v: f"{100 * v:.2f}%")
                parts.append(f"{label} {fmt(before.get(key, float('nan')))} -> {fmt(after[key])}")
        if after.get("reference_accuracy") is not None:
            parts.append(f"original accuracy {100 * after['reference_accuracy']:.2f}%")
        where = f" (held-out, {after['samples']} samples)" if "samples" in after else ""
        lines.append(f"{stage}{where}: " + ", ".join(parts))
        for warning in rep.get("warnings", []):
            lines.append(f"warning: {warning}")
    return "\n".join(lines)


def render_data(data: dict) -> str:
    """What ``fidelity.recovery.data`` says, in a line: real or synthetic, how many, from where."""
    if data.get("kind") == "synthetic":
        syn = data.get("synthesis") or {}
        how = (f" (synthesised from the model's {syn['batchnorm_layers']} BatchNorm layers in {syn['seconds']:.0f} s; "
               f"no real image seen)" if "batchnorm_layers" in syn else "")
        return f"synthetic, {data['samples']} samples{how}; measure accuracy with lcpc verify on real test data"
    path = printable(data.get("path", ""), 200)
    where = {"npy": f" from {path}", "images": f" (images in {path})"}.get(data.get("source", ""), "")
    return f"real, {data['samples']} samples{where}"
