"""Target ``onnx``: write a lowered plan as per-device ONNX files plus ``manifest.json``.

Guarantees:
- every stage file passes ``onnx.checker.check_model(full_check=True)`` and loads in
  onnxruntime on its own;
- the folder appears atomically: files are written to a temporary sibling folder that
  is renamed into place only when everything succeeded; an existing non-empty folder
  is replaced only with ``force=True`` (a file or a symlink at ``out`` never is); on
  any failure, Ctrl-C or SIGTERM included (the CLI turns SIGTERM into an exception),
  nothing is left behind (nor the parent folders this call created) and an existing
  folder is untouched; the cleanup and the rename into place finish before a signal acts
  (``safety.signals_deferred``); the folder gets the usual permissions (umask);
- two writers of the same ``out`` at once: without ``force`` the rename into place is the
  check (a directory is only renamed onto an empty one), so one folder lands whole and the
  other writer ends in an ``LcpcError`` saying so; with ``force`` the last one wins whole;
- the manifest is validated against the shipped schema before it is written;
- a program whose input travels raw (``Program.raw``) records it as ``source.feeds``
  (the uint8 image the runtime is fed) next to the preprocessing the stages apply.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lcpc import __version__
from lcpc.errors import LcpcError
from lcpc.images import FORMATS
from lcpc.ir import Graph, to_onnx
from lcpc.lower import Program
from lcpc.perf.costs import data_parallel_bytes, graph_costs, pipeline_bytes
from lcpc.plan import HEAD, Action, Plan
from lcpc.runtime.manifest import MANIFEST, VERSION, validate
from lcpc.safety import signals_deferred


def write(plan: Plan, program: Program, out: str | Path, *, force: bool = False,
          exact_bytes: int | None = None, preprocessing: dict | None = None, speeds: list[float] | None = None,
          fidelity: dict | None = None, compression: dict | None = None,
          original: Graph | None = None, broadcast: str = "p2p") -> dict[str, Any]:
    """Write ``program`` to folder ``out``; returns the manifest. ``exact_bytes`` is the
    traffic of the same model under ``--sync all`` (for the comparison table);
    ``fidelity`` holds measured accuracy figures (recovery), if any; ``speeds`` the devices'
    relative compute speeds (heterogeneous plans), recorded per device; ``compression`` the
    pruning record and the comparison of compressed variants (``lcpc.compress``), if any;
    ``original`` the model before pruning (default: the plan's graph), for the totals; ``broadcast``
    how the model input reaches its receivers (``p2p`` or ``tree``)."""
    with new_folder(Path(out), force) as tmp:
        return _write_files(plan, program, tmp, exact_bytes, preprocessing, fidelity, speeds, compression,
                            original, broadcast)


@contextlib.contextmanager
def new_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into, renamed to ``out`` when the block succeeds (``write``'s
    rules for ``out``: atomic, an existing non-empty folder replaced only with ``force``); on any failure it
    is removed, with the parent folders this call created, and an existing ``out`` is untouched."""
    check_out(out, force)
    created = _make_parents(out.parent)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()  # mode 0777 less the umask, unlike mkdtemp's 0700, which would follow the folder to devices
    try:
        yield tmp
        with signals_deferred():
            _replace(tmp, out, force)
    except BaseException:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in created:  # deepest first; only the ones this call made, and only if empty
                try:
                    folder.rmdir()
                except OSError:
                    break
        raise


def move(folder: Path, out: Path, force: bool = False) -> dict[str, Any]:
    """Move a written folder to ``out`` whole (``write``'s rules for ``out``); returns its manifest."""
    check_out(out, force)
    _make_parents(out.parent)
    with signals_deferred():
        _replace(folder, out, force)
    return json.loads((out / MANIFEST).read_text())


def check_out(out: Path, force: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder without ``force``."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise LcpcError(f"{out}: exists and is not a folder; choose another output folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise LcpcError(f"{out}: exists and is not empty; choose another folder or pass --force")


def _make_parents(parent: Path) -> list[Path]:
    """Create the missing folders above ``out``; returns the ones this call made, deepest first
    (another writer making the same folder at the same time is fine)."""
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    made = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
            made.append(folder)
        except FileExistsError:
            if not folder.is_dir():
                raise
    return made[::-1]


def _replace(tmp: Path, out: Path, force: bool) -> None:
    """Rename ``tmp`` to ``out``. Without ``force`` the rename itself refuses an ``out`` that is not
    an empty folder (another writer got there first); with it, an existing ``out`` is moved aside
    first and put back if the rename fails (unless another writer's folder took its place)."""
    if not force:
        try:
            tmp.rename(out)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise LcpcError(f"{out}: another process wrote this folder while lcpc was writing it; it is left "
                                f"as it is (choose another folder, or pass --force to replace it)") from None
            raise
        return
    check_out(out, force)  # again: a file or a symlink put there meanwhile is never replaced
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            if out.exists():  # another writer's folder took the place: the old one was to go anyway
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_files(plan: Plan, program: Program, folder: Path, exact_bytes: int | None,
                 preprocessing: dict | None, fidelity: dict | None, speeds: list[float] | None = None,
                 compression: dict | None = None, original: Graph | None = None,
                 broadcast: str = "p2p") -> dict[str, Any]:
    producer = {}
    for s in program.stages:
        for o in s.graph.outputs:
            producer[(s.device, o)] = s.id
    receiver = {(s.device, i): s.id for s in program.stages for i in s.graph.inputs}
    transfer_into = {(t.dst, t.dst_name): t for t in program.transfers}
    stages = []
    for s in program.stages:
        data = to_onnx(s.graph).SerializeToString()  # once: checked, written and hashed as these bytes
        try:
            onnx.checker.check_model(data, full_check=True)
        except Exception as exc:
            raise LcpcError(f"internal: stage {s.id} fails the ONNX checker: {str(exc).splitlines()[0]}") from None
        file = f"{s.id}.onnx"
        onnx.save_model(data, folder / file)  # bytes are written as they are
        costs = graph_costs(s.graph)
        inputs = []
        for i in s.graph.inputs:
            info = s.graph.info(i)
            if (s.device, i) in transfer_into:
                t = transfer_into[(s.device, i)]
                source = {"kind": "transfer", "device": t.src, "name": t.src_name}
            elif (s.device, i) in producer:
                source = {"kind": "stage", "stage": producer[(s.device, i)]}
            else:
                source = {"kind": "model_input"}
            inputs.append(tensor_entry(i, info.shape, info.dtype, source))
        stages.append({
            "id": s.id, "device": s.device, "level": s.level, "file": file,
            "sha256": hashlib.sha256(data).hexdigest(), "inputs": inputs,
            "outputs": [tensor_entry(o, s.graph.info(o).shape, s.graph.info(o).dtype) for o in s.graph.outputs],
            "flops": costs.flops, "params": costs.params, "weight_bytes": costs.weight_bytes,
            "peak_activation_bytes": costs.peak_activation_bytes,
            **({"format": s.format.as_dict()} if s.format is not None else {}),
        })
    encoded = program.raw is not None and program.raw.encoded
    transfers = [{
        "id": n, "tensor": t.tensor, "kind": t.kind,
        "from": {"device": t.src, "name": t.src_name, "stage": producer.get((t.src, t.src_name))},
        "to": {"device": t.dst, "name": t.dst_name, "stage": receiver.get((t.dst, t.dst_name))},
        "dtype": t.info.dtype.name, "shape": list(t.info.shape), "level": t.level,
        **({"bytes": nominal_encoded_bytes(t.nbytes), "encoded": True} if encoded and t.kind == "input" else
           {"bytes": t.coded_bytes, "coding": "deflate"} if t.coded_bytes is not None else {"bytes": t.nbytes}),
        **({"quantization": t.quant.as_dict()} if t.quant is not None else {}),
    } for n, t in enumerate(program.transfers)]
    manifest = build_manifest(plan, program, stages, transfers, exact_bytes, preprocessing, original)
    manifest["degrade"] = degrade_section(program, plan.k)
    manifest["broadcast"] = broadcast
    manifest["fidelity"] = fidelity
    for device, speed in zip(manifest["devices"], speeds or []):
        device["speed"] = float(speed)
    if compression is not None:
        manifest["compression"] = compression
    validate(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


ENCODED_RATIO = 10  # a photo's JPEG is about a tenth of its raw pixels: the nominal size of an encoded input


def nominal_encoded_bytes(raw_bytes: int) -> int:
    """The nominal size of an encoded image on the wire (``lcpc report --images`` measures it)."""
    return max(raw_bytes // ENCODED_RATIO, 1)


def degrade_section(program: Program, k: int) -> dict[str, Any]:
    """The manifest's ``degrade``: the head stage that merges the branches and every branch's
    contribution to it, when each non-head device receives only the model input and sends only
    its contributions (``lcpc.runtime.degrade`` answers without it then); else why not."""
    def refuse(why: str) -> dict[str, Any]:
        return {"stage": None, "why": why}

    names = {c.name for c in program.contributions}
    if not names:
        return refuse("no layer is merged at the head (the model has no classifier on split channels)")
    if any(t.quant is not None for t in program.transfers):
        return refuse("the contributions travel as int8 (--wire int8); convert with --wire fp32")
    merging = [s for s in program.stages if s.device == HEAD and names & set(s.graph.inputs)]
    if len(merging) != 1 or not names <= set(merging[0].graph.inputs):
        return refuse("the merged layers' contributions feed more than one stage of the head")
    for t in program.transfers:
        if t.kind != "input" and not (t.dst == HEAD and t.dst_name in names):
            return refuse(f"the branches exchange '{t.tensor}' (dev{t.src} -> dev{t.dst}, {t.kind}) before the "
                          f"classifier merge; only branches that meet nowhere else (--sync none) can answer with "
                          f"one missing")
    if any(not any(s.device == d for s in program.stages) for d in range(1, k)):
        return refuse("a device runs no stage")
    return {"stage": merging[0].id, "inputs": [{"name": c.name, "device": c.branch, "layer": c.layer,
                                                 "share": c.share} for c in program.contributions]}


def tensor_entry(name: str, shape, dtype, source: dict | None = None) -> dict[str, Any]:
    entry = {"name": name, "shape": [int(d) for d in shape], "dtype": np.dtype(dtype).name}
    if source is not None:
        entry["source"] = source
    return entry


def build_manifest(plan: Plan, program: Program, stages: list, transfers: list, exact_bytes: int | None,
                   preprocessing: dict | None, original_graph: Graph | None = None) -> dict[str, Any]:
    g = plan.graph
    original = graph_costs(original_graph if original_graph is not None else g)
    per_device: dict[int, dict[str, int]] = {}
    for s in stages:
        d = per_device.setdefault(s["device"], {"flops": 0, "params": 0})
        d["flops"] += s["flops"]
        d["params"] += s["params"]
    lcp_bytes = program.bytes_per_inference()
    comparison = {
        "lcp": {"bytes_per_inference": lcp_bytes,
                "description": f"this plan (--sync {plan.sync_policy})"},
        "model_parallel": {"bytes_per_inference": lcp_bytes if exact_bytes is None else exact_bytes,
                           "description": "channel-wise model parallelism (--sync all), exact"},
        "pipeline": {"bytes_per_inference": pipeline_bytes(g, plan.k),
                     "description": f"layer-wise pipeline over {plan.k} devices"},
        "data_parallel": {"bytes_per_inference": data_parallel_bytes(g),
                          "description": "whole model per device: input out, outputs back"},
    }
    split_params = sum(plan.analysis.params[n.name] for n in g.nodes
                       if plan.layouts.get(n.outputs[0]) == "S")

    def cost(node: str) -> int:
        """Bytes per inference of the transfers carrying this node's inputs or outputs."""
        tensors = set(g.node(node).inputs) | set(g.node(node).outputs)
        return sum(t.nbytes for t in program.transfers if t.kind != "input" and t.tensor in tensors)

    decisions = [{"node": d.node, "op": d.op, "action": str(d.action), "cause": str(d.cause), "reason": d.reason,
                  "bytes": cost(d.node)} for d in plan.decisions.values()]
    unsupported = sorted({n.op for n in g.nodes if getattr(plan.analysis.behaviours[n.name], "unsupported", False)})
    return {
        "format": "lcpc-manifest", "version": VERSION, "lcpc_version": __version__,
        "source": {
            "path": plan.source.path, "sha256": plan.source.sha256, "opset": plan.source.opset,
            "inputs": [tensor_entry(i, g.info(i).shape, g.info(i).dtype) for i in g.inputs],
            "outputs": [tensor_entry(o, g.info(o).shape, g.info(o).dtype) for o in g.outputs],
            "preprocessing": preprocessing if program.raw is None else program.raw.prep.to_dict(),
            **({} if program.raw is None else
               {"feeds": [tensor_entry(program.raw.name, g.info(program.raw.name).shape, "uint8")]}),
            **({"encoded": {"formats": list(FORMATS), "nominal_bytes": nominal_encoded_bytes(
                g.info(program.raw.name).nbytes // g.info(program.raw.name).dtype.itemsize)}}
               if program.raw is not None and program.raw.encoded else {}),
        },
        "branches": plan.k,
        "sync": {"policy": plan.sync_policy, "partition": plan.partition_method,
                 "partition_energy": dict(plan.partition_energy),
                 "cuts": plan.nodes_with(Action.CUT), "exchanges": plan.nodes_with(Action.EXCHANGE)},
        "plan": {"layouts": dict(plan.layouts),
                 "branch_of_class": {str(c): int(b) for c, b in sorted(plan.branch_of_class.items())},
                 **({} if plan.shares is None else {"shares": list(plan.shares)}),
                 "merges": dict(plan.merges)},
        "devices": [{"id": d, "name": f"dev{d}", "role": "head" if d == HEAD else "branch"}
                    for d in range(plan.k)],
        "stages": stages,
        "transfers": transfers,
        "outputs": [{"name": o, "device": HEAD, "local_name": n} for o, n in program.outputs.items()],
        "decisions": decisions,
        "unsupported_ops": unsupported,
        "totals": {
            "bytes_per_inference": lcp_bytes,
            "flops": sum(s["flops"] for s in stages), "params": sum(s["params"] for s in stages),
            "max_device_flops": max(d["flops"] for d in per_device.values()),
            "max_device_params": max(d["params"] for d in per_device.values()),
            "original": {"flops": original.flops, "params": original.params,
                         "weight_bytes": original.weight_bytes, "split_params": split_params},
            "comparison": comparison,
        },
        "fidelity": None,
    }
