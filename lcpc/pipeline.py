"""The library API behind the command line: convert, recover, verify, open an engine.

    convert: frontend.load -> planner.plan [-> passes.prune] -> lower [-> compress] -> targets.onnx.write
    recover: stored_plan.load -> passes.refit -> passes.recover (distillation) -> lower [-> compress] -> write
    verify:  the original model (onnxruntime) and the folder (targets.local) on the same inputs

Guarantees:
- each function takes plain values (paths, arrays) and returns the manifest it wrote or
  the figures it measured; the CLI, the tests and the benchmarks call these, so they
  measure the same code path a user runs;
- the traffic of the exact ``--sync all`` plan, shown for comparison, is lowered once,
  at conversion; recovery changes weights only, so it carries that figure over from
  the folder it started from;
- ``recover`` never plans again: the plan comes from the folder (``stored_plan``);
- an output folder appears whole or not at all (``targets.onnx.write``); ``convert``
  with recovery stages the cut model in a temporary sibling folder it always removes.

With ``lcpc.cli``, this is the only module that imports targets.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lcpc import compress, fidelity, frontend, planner, safety, stored_plan
from lcpc import manifest as mf
from lcpc.devices import load as load_devices
from lcpc.errors import LcpcError
from lcpc.images import Preprocessing, load_folder
from lcpc.lower import lower, raw_input
from lcpc.passes import prune as prune_pass
from lcpc.passes import quantize as quantize_pass
from lcpc.passes import recover as recover_pass
from lcpc.passes import refit as refit_pass
from lcpc.targets import onnx as onnx_target
from lcpc.targets.local import LocalEngine


def convert(model: str | Path | bytes, out: str | Path, branches: int, sync: str = "none",
            input_shapes: dict | None = None, force: bool = False, partition: str = "energy",
            preprocessing: dict | None = None, calib: np.ndarray | None = None,
            comm_budget: int | None = None, devices: str | Path | None = None, prune: float | None = None,
            quantize: str | None = None, wire: str = "fp32", input_wire: str = "auto",
            progress: Any = None) -> dict[str, Any]:
    """Plan ``model`` for ``branches`` devices and write the folder ``out``; returns its manifest.
    ``devices``: a devices.yaml whose relative speeds size each branch's share of channels;
    ``progress(done, total, agreement)`` follows ``--sync auto``'s measurements.

    ``prune`` (passes.prune), ``quantize`` and ``wire`` (lcpc.compress) compress the plan; the
    manifest's ``compression`` then compares LCP, +prune, +quant and +both with the original.
    ``input_wire``: how the model input travels (``lower.raw_input``: with ``preprocessing``,
    ``auto`` sends the raw uint8 image when the preprocessing is exactly elementwise on it; not
    combined with compression yet, which calibrates on float inputs: then ``auto`` keeps float)."""
    out = Path(out)
    onnx_target.check_out(out, force)
    if prune is not None:
        prune_pass.check_ratio(prune)
    if quantize is not None:
        quantize_pass.require()
    graph, source = frontend.load(model, input_shapes)
    compress.check_calib({i: graph.info(i) for i in graph.inputs}, calib)
    if not isinstance(model, (bytes, bytearray)):
        source = replace(source, path=str(Path(model).resolve()))
    network = load_devices(devices)
    speeds = network.distinct_speeds(branches)
    plan = planner.plan(graph, source, branches, sync, partition, calib=calib, comm_budget=comm_budget,
                        speeds=speeds, head_bandwidth=network.link("dev0").bandwidth, progress=progress)
    lcp, record = plan, None
    if prune:
        plan, record = prune_pass.run(plan, prune, calib)
    compressing = bool(prune or quantize or wire != "fp32")
    if compressing and input_wire == "uint8":
        raise LcpcError("--input-wire uint8 does not combine with --prune, --quantize or --wire int8 yet (they "
                        "calibrate on float inputs); use --input-wire float")
    prep = None if preprocessing is None else Preprocessing.from_dict(preprocessing)
    raw = None if compressing else raw_input(graph, prep, input_wire)
    # the exact plan's traffic, for the comparison; its program is dropped before the real one is lowered
    exact_bytes = lower(planner.with_sync(plan, "all"), raw).bytes_per_inference() if sync != "all" else None
    program = lower(plan, raw)
    exact_bytes = program.bytes_per_inference() if exact_bytes is None else exact_bytes
    compression = None
    if compressing:
        lcp_program = lower(lcp) if prune else program  # the unpruned plan, lowered once
        variants = {"lcp": compress.apply(lcp_program, None, wire, calib)}
        if prune:
            variants["lcp+prune"] = compress.apply(program, None, wire, calib)
        if quantize:
            variants["lcp+quant"] = compress.apply(lcp_program, quantize, wire, calib)
            if prune:
                variants["lcp+prune+quant"] = compress.apply(program, quantize, wire, calib)
        program = list(variants.values())[-1]
        compression = {"prune": record.as_dict() if record is not None else None, "quantize": quantize,
                       "wire": wire, "variants": compress.compare(variants, graph, calib)}
    return onnx_target.write(plan, program, out, force=force, exact_bytes=exact_bytes,
                             preprocessing=preprocessing, compression=compression, original=graph,
                             speeds=speeds)


def convert_and_recover(model: str | Path | bytes, out: str | Path, data: Path | np.ndarray, *,
                        labels: np.ndarray | None = None, epochs: int = 2, force: bool = False,
                        progress: Any = None, **convert_options) -> dict[str, Any]:
    """``convert`` then ``recover`` on ``data`` (an array, or a path ``read_data`` reads with the
    converted folder's preprocessing); only the recovered folder is left at ``out``."""
    out = Path(out)
    onnx_target.check_out(out, force)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lcpc-convert-", dir=out.resolve().parent))
    try:
        manifest = convert(model, staging / "cut", force=False, progress=getattr(progress, "sync", None),
                           **convert_options)
        x = data if isinstance(data, np.ndarray) else read_data(Path(data), manifest)
        return recover(staging / "cut", x, out, labels=labels, epochs=epochs, force=force, progress=progress)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def recover(folder: str | Path, data: np.ndarray, out: str | Path, *, labels: np.ndarray | None = None,
            epochs: int = 2, refit: str = "lsq", model: str | Path | None = None, force: bool = False,
            progress: Any = None, seed: int = 0, holdout: float = 0.1, **recipe: Any) -> dict[str, Any]:
    """Read FOLDER's plan, recover it on ``data`` (``recover_plan``; ``recipe``: distillation
    settings), write OUT."""
    onnx_target.check_out(Path(out), force)
    plan, manifest = stored_plan.load(folder, model)
    pruning = (manifest.get("compression") or {}).get("prune")
    if pruning and pruning.get("reconstructed"):  # the pruned layers were refit at conversion: again, on data
        original, _ = frontend.load(plan.source.path, {i["name"]: tuple(i["shape"]) for i in manifest["source"]["inputs"]})
        plan = prune_pass.reconstructed(original, plan, prune_pass.Pruning.from_dict(pruning), data)
    if not plan.cut_nodes():
        raise LcpcError(f"{folder}: the plan cuts no layer (--sync all?): it is already exact, nothing to recover")
    if mf.takes_raw_images(manifest) and np.asarray(data).dtype == np.uint8:  # raw images: train on their normalisation
        data = Preprocessing.from_dict(manifest["source"]["preprocessing"]).normalize(
            data, manifest["source"]["inputs"][0]["dtype"])
    plan, figures = recover_plan(plan, data, labels, epochs=epochs, refit=refit, progress=progress, seed=seed,
                                 holdout=holdout, **recipe)
    exact = manifest["totals"]["comparison"]["model_parallel"]["bytes_per_inference"]
    kept = _kept_compression(manifest)
    raw = raw_input(plan.graph, Preprocessing.from_dict(manifest["source"]["preprocessing"]), "uint8") \
        if mf.takes_raw_images(manifest) else None
    program = lower(plan, raw)
    if kept:  # the folder's int8 stages and wire again, calibrated on the recovery data
        program = compress.apply(program, kept.get("quantize"), kept.get("wire", "fp32"), data)
    return onnx_target.write(plan, program, out, force=force, exact_bytes=exact,
                             preprocessing=manifest["source"].get("preprocessing"),
                             fidelity={"recovery": figures}, speeds=_speeds(manifest), compression=kept)


def _kept_compression(manifest: dict) -> dict | None:
    """What a recovered folder keeps of its source's compression: the pruning record (``stored_plan``
    replays it), the stage and wire formats asked for (re-applied after recovery)."""
    comp = manifest.get("compression") or {}
    kept = {k: comp[k] for k in ("prune", "quantize", "wire") if comp.get(k) and comp[k] != "fp32"}
    return kept or None


def recover_plan(plan, data: np.ndarray, labels: np.ndarray | None = None, *, epochs: int = 2, refit: str = "lsq",
                 progress: Any = None, seed: int = 0, holdout: float = 0.1,
                 **recipe: Any) -> tuple[Any, dict[str, Any]]:
    """The one recovery pipeline: the least-squares refit (``passes.refit``, numpy), then
    ``epochs`` of distillation from the original (``passes.recover``, PyTorch), which starts
    from the refit weights; both split ``data`` with the same seed, so neither trains on
    the held-out samples; ``recipe`` sets other distillation settings
    (``passes.recover.Recipe``). ``progress`` has ``refit(done, total, agreement)`` and
    ``distil(epoch, step, steps, loss, agreement)`` (either may be None)."""
    figures: dict[str, Any] = {}
    original = plan.graph  # the teacher: the original weights, before any refit
    if refit != "none":
        plan, figures["refit"] = refit_pass.run(plan, data, refit, labels, seed=seed, holdout=holdout,
                                                progress=getattr(progress, "refit", None))
    if epochs > 0:
        plan, figures["distillation"] = recover_pass.run(plan, data, labels, epochs=epochs, seed=seed,
                                                         holdout=holdout, original=original,
                                                         progress=getattr(progress, "distil", None), **recipe)
    return plan, figures


def verify(folder: str | Path, data: np.ndarray, labels: np.ndarray | None = None,
           original_model: bytes | str | Path | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Run the original model and the converted ``folder`` on ``data``; ``fidelity.compare`` them.

    Returns ``compare``'s dict (reference = original, candidate = converted) plus
    ``output`` (the logits tensor's name), ``branches``, ``sync`` (the policy) and
    ``original`` = {``path``, ``sha256``, ``matches_manifest``}.
    """
    if batch_size < 1:
        raise LcpcError(f"batch size {batch_size}: must be at least 1")
    engine = LocalEngine(folder)
    try:
        manifest = engine.manifest
        source = manifest["source"]
        if len(source["inputs"]) != 1:
            raise LcpcError(f"{folder}: the model has {len(source['inputs'])} inputs; verify takes "
                            f"single-input models")
        spec = source["inputs"][0]
        output = source["outputs"][0]["name"]
        if mf.takes_raw_images(manifest):  # the folder takes the uint8 image; the original its normalisation
            if np.asarray(data).dtype != np.uint8:
                raise LcpcError(f"data: dtype {np.asarray(data).dtype}; {folder} takes the raw image as uint8 and "
                                f"applies the preprocessing itself: pass an image folder or uint8 pixels")
            fed = fidelity.as_input(data, mf.feeds(manifest)[0])
            x = fidelity.as_input(Preprocessing.from_dict(source["preprocessing"]).normalize(fed, spec["dtype"]), spec)
        else:
            fed = x = fidelity.as_input(data, spec)
        reference, original = fidelity.reference_logits(manifest, x, original_model, batch_size)
        planned = spec["shape"][0]
        step = max(planned, batch_size // planned * planned)
        candidate = np.concatenate([engine.run({spec["name"]: chunk})[output][:real]
                                    for chunk, real in fidelity.padded_chunks(fed, step, planned)])
    finally:
        engine.close()
    return {**fidelity.compare(reference, candidate, labels), "output": output,
            "branches": manifest["branches"], "sync": manifest["sync"]["policy"], "original": original}


# ----------------------------------------------------------------------------- data
def read_array(path: Path, what: str) -> np.ndarray:
    """One array from a .npy file: header checked first, never unpickled."""
    if not path.is_file():
        raise LcpcError(f"{path}: no such {what} file")
    data = safety.load_array(path)
    if not isinstance(data, np.ndarray):
        raise LcpcError(f"{path}: expected one array in a .npy file for {what}")
    return data


def read_data(data: Path, manifest: dict, raw: bool = False) -> np.ndarray:
    """Model inputs from a .npy batch, or from a folder of images read with the manifest's
    preprocessing (``raw``: as the uint8 images a folder that takes raw images is fed)."""
    if data.is_dir():
        spec = manifest["source"].get("preprocessing")
        if spec is None:
            raise LcpcError(f"{data} is an image folder, but the manifest has no preprocessing; convert with "
                            f"--preprocess size=...,mean=...,std=... or pass a .npy batch")
        return load_folder(data, Preprocessing.from_dict(spec), raw=raw)[0]
    return read_array(data, "data")


def _speeds(manifest: dict[str, Any]) -> list[float] | None:
    """The device speeds a heterogeneous folder recorded (None for equal devices)."""
    speeds = [d.get("speed") for d in manifest["devices"]]
    return None if None in speeds else speeds


def open_engine(folder: str | Path, engine: str = "local", address: str | None = None,
                devices: str | Path | None = None, timeout: float = 60.0, ray_mode: str = "actor-calls"):
    """The engine that runs ``folder``: ``local`` (onnxruntime threads) or ``ray`` (one actor per device;
    ``ray_mode``: actor-calls, compiled-graph or auto, see ``lcpc.targets.ray``)."""
    if engine == "local":
        return LocalEngine(folder)
    if engine == "ray":
        from lcpc.targets.ray import RayEngine  # optional, and slow to import: only when asked for

        return RayEngine(folder, address=address, devices=devices, timeout=timeout, mode=ray_mode)
    raise LcpcError(f"unknown engine '{engine}'; choose local or ray")
