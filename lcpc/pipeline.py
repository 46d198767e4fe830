"""The library API behind the command line: convert, recover, verify, open an engine.

    convert: frontend.load -> planner.plan [-> passes.prune] -> lower [-> compress] -> targets.onnx.write
    recover: stored_plan.load [-> passes.recover.synth] -> passes.recover.refit -> passes.recover.distil
             -> lower [-> compress] -> write
    verify:  the original model (onnxruntime) and the folder (runtime.local) on the same inputs
    convert_and_recover: convert, then recover; with ``--sync auto`` the cut pass's candidate
             plans are each recovered first (``RecoveredScores``) and the chosen one's recovery is kept

Guarantees:
- each function takes plain values (paths, arrays) and returns the manifest it wrote or
  the figures it measured; the CLI, the tests and the benchmarks call these, so they
  measure the same code path a user runs;
- the traffic of the exact ``--sync all`` plan, shown for comparison, is lowered once,
  at conversion; recovery changes weights only, so it carries that figure over from
  the folder it started from;
- ``recover`` never plans again: the plan comes from the folder (``stored_plan``);
- an output folder appears whole or not at all (``targets.onnx.write``); ``convert``
  with recovery stages the cut model in a temporary sibling folder it always removes;
- recovery data are ``passes.recover.samples.Samples`` (``recovery_data``: a memory-mapped
  ``.npy``, an image folder read as it is used, or ``synth[:N]``: inputs synthesised from the
  original model), and the manifest's ``fidelity.recovery.data`` says which (real or
  synthetic, how many, from where);
- with ``Execution(procs > 1)`` only process 0 of a torchrun launch writes the folder.

With ``lcpc.cli``, this is the only module that imports targets.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lcpc import compress, fidelity, frontend, planner, safety, stored_plan
from lcpc.calibrate import run_graph
from lcpc.compress import quantize as quantize_pass
from lcpc.errors import LcpcError
from lcpc.images import Preprocessing, load_folder
from lcpc.lower import Program, lower, raw_input
from lcpc.passes import prune as prune_pass
from lcpc.passes.recover import distil as distil_pass
from lcpc.passes.recover import refit as refit_pass
from lcpc.passes.recover.checkpoint import SYNTHETIC, check_fresh
from lcpc.passes.recover.distil import Execution
from lcpc.passes.recover.samples import ArraySamples, Samples, Synthetic, as_samples, open_data
from lcpc.perf.devices import load as load_devices
from lcpc.perf.network import Network, choose_broadcast
from lcpc.plan import Action
from lcpc.runtime.feeds import encoded
from lcpc.runtime.local import LocalEngine
from lcpc.runtime.manifest import Manifest
from lcpc.runtime.order import BROADCASTS
from lcpc.targets import onnx as onnx_target
from lcpc.weights import masked_graph


def convert(model: str | Path | bytes, out: str | Path, branches: int, sync: str = "none",
            input_shapes: dict | None = None, force: bool = False, partition: str = "energy",
            preprocessing: dict | None = None, calib: np.ndarray | None = None,
            comm_budget: int | None = None, devices: str | Path | Network | None = None, prune: float | None = None,
            quantize: str | None = None, wire: str = "fp32", input_wire: str = "auto", broadcast: str = "auto",
            wire_code: str = "none", progress: Any = None, select: Any = None) -> dict[str, Any]:
    """Plan ``model`` for ``branches`` devices and write the folder ``out``; returns its manifest.
    ``devices``: a devices.yaml whose relative speeds size each branch's share of channels, and
    whose speeds and head link choose how the classifier merges (``passes.merge``);
    ``progress(done, total, agreement)`` follows ``--sync auto``'s measurements; ``select``
    (``passes.cut.Select``, e.g. ``RecoveredScores``) makes it choose among plans scored after recovery.

    ``prune`` (passes.prune), ``quantize`` and ``wire`` (lcpc.compress) compress the plan; the
    manifest's ``compression`` then compares LCP, +prune, +quant and +both with the original.
    ``input_wire``: how the model input travels (``lower.raw_input``: with ``preprocessing``,
    ``auto`` sends the raw uint8 image when the preprocessing is exactly elementwise on it; not
    combined with compression yet, which calibrates on float inputs: then ``auto`` keeps float).
    ``broadcast``: how the input reaches its receivers, ``p2p``, ``tree`` or ``auto`` (the faster on
    ``devices``' network, by the network model: ``perf.network.choose_broadcast``)."""
    if broadcast not in ("auto", *BROADCASTS):
        raise LcpcError(f"--broadcast {broadcast}: choose auto, {' or '.join(BROADCASTS)}")
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
    network = devices if isinstance(devices, Network) else load_devices(devices)
    speeds = network.distinct_speeds(branches)  # recorded in the manifest only where they differ
    plan = planner.plan(graph, source, branches, sync, partition, calib=calib, comm_budget=comm_budget,
                        speeds=tuple(network.speeds(branches)), head_bandwidth=network.link("dev0").bandwidth,
                        progress=progress, select=select)
    lcp, record = plan, None
    if prune:
        plan, record = prune_pass.run(plan, prune, calib)
    compressing = bool(prune or quantize or wire != "fp32" or wire_code != "none")
    if compressing and input_wire in ("uint8", "encoded"):
        raise LcpcError(f"--input-wire {input_wire} does not combine with --prune, --quantize or --wire int8 yet "
                        f"(they calibrate on float inputs); use --input-wire float")
    prep = None if preprocessing is None else Preprocessing.from_dict(preprocessing)
    raw = raw_input(graph, prep, "float" if compressing else input_wire)  # a preprocessing is checked either way
    # the exact plan's traffic, for the comparison; its program is dropped before the real one is lowered
    exact_bytes = lower(planner.with_sync(plan, "all"), raw).bytes_per_inference() if sync != "all" else None
    program = lower(plan, raw)
    exact_bytes = program.bytes_per_inference() if exact_bytes is None else exact_bytes
    compression = None
    if compressing:
        lcp_program = lower(lcp) if prune else program  # the unpruned plan, lowered once
        variants = {"lcp": compress.apply(lcp_program, None, wire, calib, wire_code)}
        if prune:
            variants["lcp+prune"] = compress.apply(program, None, wire, calib, wire_code)
        if quantize:
            variants["lcp+quant"] = compress.apply(lcp_program, quantize, wire, calib, wire_code)
            if prune:
                variants["lcp+prune+quant"] = compress.apply(program, quantize, wire, calib, wire_code)
        program = list(variants.values())[-1]
        compression = {"prune": record.as_dict() if record is not None else None, "quantize": quantize,
                       "wire": wire, **({"wire_code": wire_code} if wire_code != "none" else {}),
                       "variants": compress.compare(variants, graph, calib)}
    return onnx_target.write(plan, program, out, force=force, exact_bytes=exact_bytes,
                             preprocessing=preprocessing, compression=compression, original=graph,
                             speeds=speeds, broadcast=_broadcast(program, broadcast, network))


def _broadcast(program: Program, policy: str, network: Network) -> str:
    """``policy``, or for ``auto`` the broadcast the network model finds faster for this program's input."""
    if policy != "auto":
        return policy
    encoded = program.raw is not None and program.raw.encoded
    sizes: dict[int, int] = defaultdict(int)
    for t in program.transfers:
        if t.kind == "input":
            sizes[t.dst] += onnx_target.nominal_encoded_bytes(t.nbytes) if encoded else t.nbytes
    return choose_broadcast(dict(sizes), network) if sizes else "p2p"


def convert_and_recover(model: str | Path | bytes, out: str | Path, data: Path | np.ndarray | Samples | Synthetic, *,
                        labels: np.ndarray | None = None, epochs: int = 2, force: bool = False,
                        progress: Any = None, scores: RecoveredScores | None = None,
                        execution: Execution | None = None, **convert_options) -> dict[str, Any]:
    """``convert`` then ``recover`` on ``data`` (an array, ``Samples``, ``Synthetic`` or a path
    ``recovery_data`` opens with the preprocessing asked for); only the recovered folder is left
    at ``out``. With ``--sync auto`` the sync points are chosen after recovery: ``scores``
    (default: a new ``RecoveredScores`` on ``data``; pass one to share its memo over several
    budgets) recovers the candidate plans and the manifest's ``fidelity.sync_auto`` records what
    each scored."""
    out = Path(out)
    onnx_target.check_out(out, force)
    check_recipe(epochs)
    x = data if isinstance(data, (np.ndarray, Samples, Synthetic)) else \
        recovery_data(Path(data), convert_options.get("preprocessing"))
    if labels is not None:  # the classes are known once converted; the rest now
        if isinstance(x, Synthetic):
            raise LcpcError(SYNTHETIC_LABELS)
        labels = fidelity.check_labels(labels, len(x), None)
    auto = convert_options.get("sync") == "auto"
    if auto:
        if isinstance(x, Synthetic):  # the candidates are scored on the data: synthesise them first
            if isinstance(model, (bytes, bytearray)):
                raise LcpcError("--data synth with --sync auto needs the model as a file")
            x = synthetic_samples(Path(model), convert_options.get("input_shapes"), x, progress=progress,
                                  preprocessing=convert_options.get("preprocessing"))
        scores = convert_options["select"] = scores or RecoveredScores(x, labels, epochs=epochs, progress=progress,
                                                                       execution=execution)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lcpc-convert-", dir=out.resolve().parent))
    try:  # the staging folder goes whatever happens, a signal included
        manifest = convert(model, staging / "cut", force=False, progress=getattr(progress, "sync", None),
                           **convert_options)
        if not auto:
            return recover(staging / "cut", x, out, labels=labels, epochs=epochs, force=force, progress=progress,
                           execution=execution)
        if not manifest["sync"]["cuts"]:  # auto chose the exact plan: written as it is
            return onnx_target.move(staging / "cut", out, force=force)
        assert scores is not None  # set above for --sync auto
        return recover(staging / "cut", x, out, labels=labels, epochs=epochs, force=force, progress=progress,
                       sync_auto=scores.record(manifest, convert_options.get("comm_budget"),
                                               pruned=bool(convert_options.get("prune"))),
                       recovered=scores.recovered(manifest), execution=execution)
    finally:
        with safety.signals_deferred():
            shutil.rmtree(staging, ignore_errors=True)


class RecoveredScores:
    """``passes.cut.Select`` for ``--sync auto --recover``: each candidate plan recovered as
    ``recover`` would (``recover_plan`` on the same data, split, seed and epochs) and scored by
    its held-out agreement and KL with the original; an exact plan (no cut) scores 100% / 0.
    Memoised by the plan's exchanges, so a sweep of budgets recovers each candidate once."""

    def __init__(self, data: np.ndarray | Samples, labels: np.ndarray | None = None, *, epochs: int = 2,
                 seed: int = 0, holdout: float = 0.1, progress: Any = None,
                 execution: Execution | None = None) -> None:
        if (isinstance(data, np.ndarray) and data.dtype == np.uint8) or \
                (isinstance(data, ArraySamples) and data.array.dtype == np.uint8 and data.normalise is None):
            raise LcpcError("--sync auto with --recover needs float model inputs (.npy of the preprocessed "
                            "batch, or an image folder with --preprocess), not raw uint8 images")
        data = as_samples(data)
        self.data, self.labels, self.epochs, self.seed, self.holdout = data, labels, epochs, seed, holdout
        self.progress, self.execution = progress, execution
        hold = fidelity.holdout_split(len(data), holdout, seed)[1]
        # recover_plan's held-out split (all when none: at most fidelity.MAX_HELDOUT samples either way)
        self.x_hold = data.take(hold if len(hold) else np.arange(min(len(data), fidelity.MAX_HELDOUT)))
        self.reference: np.ndarray | None = None          # the original's logits on it, once
        self.scored: dict[frozenset, dict] = {}
        self.plans: dict[frozenset, tuple] = {}   # the recovered (plan, figures) of each scored candidate
        self.last: list[dict] = []

    def __call__(self, plans: list, sizes: list[int]) -> list[dict]:
        self.last = []
        for plan, size in zip(plans, sizes):
            key = frozenset(plan.nodes_with(Action.EXCHANGE))
            if key not in self.scored:
                self.scored[key] = self._score(plan, key)
            self.last.append({"exchanges": sorted(key), "bytes_per_inference": size, **self.scored[key]})
        return self.last

    def _score(self, plan, key: frozenset) -> dict:
        if not plan.cut_nodes():
            return {"agreement": 1.0, "kl": 0.0, "kl_samples": np.zeros(len(self.x_hold)), "exact": True,
                    "recovery": "exact"}
        if self.reference is None:  # every candidate is a plan of the same original graph
            self.reference = run_graph(plan.graph, self.x_hold)
        self.plans[key] = recover_plan(plan, self.data, self.labels, epochs=self.epochs, seed=self.seed,
                                       holdout=self.holdout, progress=self.progress,
                                       execution=_no_checkpoint(self.execution))
        recovered = self.plans[key][0]
        candidate = run_graph(masked_graph(recovered, set(recovered.cut_nodes())), self.x_hold)
        kl = fidelity.kl_per_sample(self.reference, candidate)
        agree = float(np.mean(self.reference.argmax(1) == candidate.argmax(1)))
        return {"agreement": agree, "kl": float(kl.mean()), "kl_samples": kl,
                "recovery": f"refit+{self.epochs}ep" if self.epochs else "refit"}

    def recovered(self, manifest: dict) -> tuple | None:
        """The recovered (plan, figures) of the plan in ``manifest``, if it was scored."""
        return self.plans.get(frozenset(manifest["sync"]["exchanges"]))

    def record(self, manifest: dict, budget: int | None, pruned: bool = False) -> dict:
        """The manifest's ``fidelity.sync_auto``: every candidate of the last choice, its bytes
        and scores, and which one the plan in ``manifest`` is; ``pruned``: the chosen plan was
        pruned after the choice (the candidates were scored unpruned, and it is recovered again)."""
        chosen = frozenset(manifest["sync"]["exchanges"])
        candidates = [{k: v for k, v in c.items() if k != "kl_samples"} for c in self.last]
        return {"candidates": candidates, "chosen": next(i for i, c in enumerate(self.last)
                                                       if frozenset(c["exchanges"]) == chosen),
                "budget": budget, **({"scored_before_pruning": True} if pruned else {})}


def recover(folder: str | Path, data: np.ndarray | Samples | Synthetic, out: str | Path, *,
            labels: np.ndarray | None = None, epochs: int = 2, refit: str = "lsq", model: str | Path | None = None,
            force: bool = False, progress: Any = None, seed: int = 0, holdout: float = 0.1,
            sync_auto: dict | None = None, recovered: tuple | None = None, execution: Execution | None = None,
            **recipe: Any) -> dict[str, Any]:
    """Read FOLDER's plan, recover it on ``data`` (``recover_plan``; ``recipe``: distillation
    settings; ``execution``: device, processes, checkpoint), write OUT. ``data``: an array,
    ``Samples`` (``recovery_data``) or ``Synthetic`` (inputs synthesised from the original model).
    ``sync_auto``: how ``--sync auto`` chose the plan, for the manifest; ``recovered``: (plan,
    figures) of that plan already recovered on ``data`` (then reused). Under torchrun, only
    process 0 writes OUT (the others return None)."""
    onnx_target.check_out(Path(out), force)
    check_recipe(epochs, **recipe)
    plan, manifest = stored_plan.load(folder, model)
    spec = dict(manifest.preprocessing) if manifest.preprocessing is not None else None
    prep = Preprocessing.from_dict(spec) if spec is not None else None
    if labels is not None:  # before any work: labels that do not fit the model's classes
        if isinstance(data, Synthetic):
            raise LcpcError(SYNTHETIC_LABELS)
        classes = fidelity.classes_of(manifest.json["source"]["outputs"][0]["shape"])
        labels = fidelity.check_labels(labels, len(data), classes)
    if isinstance(data, Synthetic):
        samples = synthetic_samples(Path(plan.source.path), {i.name: i.shape for i in manifest.inputs}, data,
                                    seed=seed, progress=progress, preprocessing=spec, execution=execution)
    elif isinstance(data, np.ndarray):  # raw images of a folder that takes them: train on their normalisation
        pixels = prep is not None and manifest.takes_raw_images and data.dtype == np.uint8
        samples = ArraySamples(data, normalise=prep if pixels else None)
    else:
        samples = data
    pruning = (manifest.json.get("compression") or {}).get("prune")
    if pruning and pruning.get("reconstructed"):  # the pruned layers were refit at conversion: again, on data
        original, _ = frontend.load(plan.source.path, {i.name: i.shape for i in manifest.inputs})
        plan = prune_pass.reconstructed(original, plan, prune_pass.Pruning.from_dict(pruning),
                                        _first(samples, MAX_CALIBRATION))
    if not plan.cut_nodes():
        raise LcpcError(f"{folder}: the plan cuts no layer (--sync all?): it is already exact, nothing to recover")
    if recovered is not None and not pruning and stored_plan.same_plan(recovered[0], plan):
        plan, figures = recovered
    else:
        plan, figures = recover_plan(plan, samples, labels, epochs=epochs, refit=refit, progress=progress, seed=seed,
                                     holdout=holdout, execution=execution, **recipe)
    if _rank() != 0:
        return None  # type: ignore[return-value]  # torchrun: process 0 writes the folder
    figures = {"data": samples.describe(), **figures}
    exact = manifest.json["totals"]["comparison"]["model_parallel"]["bytes_per_inference"]
    kept = _kept_compression(manifest.json)
    raw = raw_input(plan.graph, prep, "encoded" if manifest.encoded else "uint8") if manifest.takes_raw_images \
        else None
    program = lower(plan, raw)
    if kept:  # the folder's int8 stages and wire again, calibrated on the recovery data
        program = compress.apply(program, kept.get("quantize"), kept.get("wire", "fp32"),
                                 _first(samples, MAX_CALIBRATION), kept.get("wire_code", "none"))
    return onnx_target.write(plan, program, out, force=force, exact_bytes=exact,
                             preprocessing=manifest.json["source"].get("preprocessing"),
                             fidelity={"recovery": figures, **({"sync_auto": sync_auto} if sync_auto else {})},
                             speeds=_speeds(manifest), compression=kept, broadcast=manifest.broadcast)


SYNTHETIC_LABELS = ("--labels labels real training inputs; synthetic inputs (--data synth) have none: drop "
                    "--labels, and measure accuracy with lcpc verify on real test data")
MAX_CALIBRATION = 4096  # recovery samples a pruning reconstruction or int8 calibration reads (the first ones)


def _first(samples: Samples, n: int) -> np.ndarray:
    return samples.take(np.arange(min(len(samples), n)))


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0")) if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ else 0


def _no_checkpoint(execution: Execution | None) -> Execution | None:
    """``execution`` for the candidate plans ``--sync auto`` recovers: their checkpoints would clash."""
    if execution is None or not execution.checkpoint:
        return execution
    return replace(execution, checkpoint=None, resume=False)


def synthetic_samples(model: Path, input_shapes: Mapping[str, Any] | None, spec: Synthetic, *, seed: int = 0,
                      progress: Any = None, preprocessing: Mapping[str, Any] | None = None,
                      execution: Execution | None = None) -> ArraySamples:
    """``spec.samples`` inputs synthesised from ``model``'s BatchNorm statistics (``passes.recover.synth``),
    within the range ``preprocessing`` can produce. With a checkpoint folder they are kept there
    (``synthetic.npy``, written whole or not at all) and read back on ``--resume``."""
    keep = Path(execution.checkpoint) / SYNTHETIC if execution is not None and execution.checkpoint else None
    if keep is not None and execution is not None and not execution.resume:
        check_fresh(keep.parent)  # never replace the inputs an earlier run's checkpoint was trained on
    if keep is not None and execution is not None and execution.resume and keep.is_file():
        info = json.loads(keep.with_suffix(".json").read_text())
        if info.get("samples") != spec.samples or info.get("seed") != seed:
            raise LcpcError(f"--resume: {keep} holds {info.get('samples')} synthetic samples of seed "
                            f"{info.get('seed')}; this run asks for {spec.samples} of seed {seed}")
        array = safety.load_array(keep, mmap=True)
        assert isinstance(array, np.ndarray)
        return ArraySamples(array, path=keep, kind="synthetic", origin=info)
    try:
        from lcpc.passes.recover import synth
    except ImportError:
        raise LcpcError("--data synth needs PyTorch: pip install 'lcpc[train]'") from None
    norms: list[frontend.FoldedNorm] = []
    graph, source = frontend.load(model, dict(input_shapes or {}), norms=norms)
    stats = synth.locate(graph, norms, source.path)
    bounds = None
    if preprocessing is not None:
        prep = Preprocessing.from_dict(dict(preprocessing))
        scale, mean, std = prep.constants()
        ends = np.stack([(0 * scale - mean) / std, (255 * scale - mean) / std])
        bounds = (float(ends.min()), float(ends.max()))
    device = None
    if execution is not None and execution.device != "auto":
        device = execution.device
    x, report = synth.synthesise(graph, stats, spec.samples, seed=seed, iterations=spec.iterations,
                                 time_limit=spec.time_limit, bounds=bounds, device=device,
                                 progress=getattr(progress, "synth", None))
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        _save_npy(keep, x)
        _save_text(keep.with_suffix(".json"), json.dumps(report, indent=1))
        array = safety.load_array(keep, mmap=True)
        assert isinstance(array, np.ndarray)
        return ArraySamples(array, path=keep, kind="synthetic", origin=report)
    return ArraySamples(x, kind="synthetic", origin=report)


def _save_npy(path: Path, x: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, x)
    os.replace(tmp, path)


def _save_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _speeds(manifest: Manifest) -> list[float] | None:
    """The device speeds a heterogeneous folder recorded (None for equal devices)."""
    speeds = [d.speed for d in manifest.devices]
    return None if None in speeds else speeds  # type: ignore[return-value]


def _kept_compression(manifest: Mapping[str, Any]) -> dict | None:
    """What a recovered folder keeps of its source's compression: the pruning record (``stored_plan``
    replays it), the stage and wire formats asked for (re-applied after recovery)."""
    comp = manifest.get("compression") or {}
    kept = {k: comp[k] for k in ("prune", "quantize", "wire", "wire_code") if comp.get(k) and comp[k] != "fp32"}
    return kept or None


def check_recipe(epochs: int, **recipe: Any) -> None:
    """Refuse recovery settings out of range (``passes.recover.distil.Recipe``) before any work."""
    try:
        distil_pass.Recipe(epochs=epochs, **recipe)
    except TypeError as exc:
        raise LcpcError(f"recovery: {exc}") from None


def recover_plan(plan, data: np.ndarray | Samples, labels: np.ndarray | None = None, *, epochs: int = 2,
                 refit: str = "lsq", progress: Any = None, seed: int = 0, holdout: float = 0.1,
                 execution: Execution | None = None, **recipe: Any) -> tuple[Any, dict[str, Any]]:
    """The one recovery pipeline: the least-squares refit (``passes.recover.refit``, numpy), then
    ``epochs`` of distillation from the original (``passes.recover.distil``, PyTorch), which starts
    from the refit weights; both split ``data`` with the same seed, so neither trains on
    the held-out samples; ``recipe`` sets other distillation settings
    (``passes.recover.distil.Recipe``), ``execution`` where it runs (``Execution``). ``progress``
    has ``refit(done, total, agreement)`` and ``distil(epoch, step, steps, loss, agreement)``
    (either may be None)."""
    check_recipe(epochs, **recipe)
    figures: dict[str, Any] = {}
    data = as_samples(data)
    original = plan.graph  # the teacher: the original weights, before any refit
    if refit != "none":
        plan, figures["refit"] = refit_pass.run(plan, data, refit, labels, seed=seed, holdout=holdout,
                                                progress=getattr(progress, "refit", None))
    if epochs > 0:
        plan, figures["distillation"] = distil_pass.run(plan, data, labels, epochs=epochs, seed=seed,
                                                         holdout=holdout, original=original,
                                                         progress=getattr(progress, "distil", None),
                                                         execution=execution, **recipe)
    return plan, figures


def verify(folder: str | Path, data: np.ndarray | Sequence[bytes], labels: np.ndarray | None = None,
           original_model: bytes | str | Path | None = None, batch_size: int = 64,
           without: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the original model and the converted ``folder`` on ``data``; ``fidelity.compare`` them.

    Returns ``compare``'s dict (reference = original, candidate = converted) plus
    ``output`` (the logits tensor's name), ``branches``, ``sync`` (the policy) and
    ``original`` = {``path``, ``sha256``, ``matches_manifest``}, and ``without``: the devices left
    out (the folder answering from the branches that are left, ``runtime.degrade``). A folder fed
    image files (``--input-wire encoded``) is given the files' bytes, one per sample; the original
    gets the same files through the same decoding (``images.decode``) and the normalisation.
    """
    if batch_size < 1:
        raise LcpcError(f"batch size {batch_size}: must be at least 1")
    with LocalEngine(folder) as engine:
        manifest = engine.manifest
        engine.device_ids(without)  # refused before any work
        if len(manifest.inputs) != 1:
            raise LcpcError(f"{folder}: the model has {len(manifest.inputs)} inputs; verify takes "
                            f"single-input models")
        spec = manifest.inputs[0]
        output = manifest.json["source"]["outputs"][0]["name"]
        if manifest.encoded:
            if isinstance(data, np.ndarray) or not all(isinstance(b, (bytes, bytearray)) for b in data):
                raise LcpcError(f"data: {folder} is fed image files (--input-wire encoded): pass a folder of JPEG or "
                                f"PNG images")
            prep = Preprocessing.from_dict(dict(manifest.preprocessing or {}))
            x = np.concatenate([prep.normalize(engine.decode(encoded(b)), spec.dtype) for b in data])
            reference, original = fidelity.reference_logits(manifest, x, original_model, batch_size)
            candidate = np.concatenate([engine.run({spec.name: encoded(b)}, without=without)[output] for b in data])
            return {**fidelity.compare(reference, candidate, labels), "output": output,
                    "branches": manifest.branches, "sync": manifest.sync_policy, "original": original,
                    "without": list(without)}
        if manifest.takes_raw_images:  # the folder takes the uint8 image; the original its normalisation
            if np.asarray(data).dtype != np.uint8:
                raise LcpcError(f"data: dtype {np.asarray(data).dtype}; {folder} takes the raw image as uint8 and "
                                f"applies the preprocessing itself: pass an image folder or uint8 pixels")
            fed = fidelity.as_input(data, manifest.feeds[0])
            prep = Preprocessing.from_dict(dict(manifest.preprocessing or {}))
            x = fidelity.as_input(prep.normalize(fed, spec.dtype), spec)
        else:
            fed = x = fidelity.as_input(data, spec)
        reference, original = fidelity.reference_logits(manifest, x, original_model, batch_size)
        planned = spec.shape[0]
        step = max(planned, batch_size // planned * planned)
        candidate = np.concatenate([engine.run({spec.name: chunk}, without=without)[output][:real]
                                    for chunk, real in fidelity.padded_chunks(fed, step, planned)])
    return {**fidelity.compare(reference, candidate, labels), "output": output,
            "branches": manifest.branches, "sync": manifest.sync_policy, "original": original,
            "without": list(without)}


# ----------------------------------------------------------------------------- data
def read_array(path: Path, what: str) -> np.ndarray:
    """One array from a .npy file: header checked first, never unpickled."""
    if not path.is_file():
        raise LcpcError(f"{path}: no such {what} file")
    data = safety.load_array(path)
    if not isinstance(data, np.ndarray):
        raise LcpcError(f"{path}: expected one array in a .npy file for {what}")
    return data


def recovery_data(data: Path | str, spec: Mapping[str, Any] | None, *, takes_raw: bool = False
                  ) -> Samples | Synthetic:
    """Recovery data as given on the command line: ``synth[:N]`` (``Synthetic``), a ``.npy``
    (memory-mapped) or a folder of images, its subfolders included (read with the preprocessing
    ``spec`` as training needs them); ``takes_raw``: uint8 arrays are the raw images of a folder
    that takes them, normalised with ``spec``."""
    synthetic = Synthetic.parse(str(data))
    if synthetic is not None:
        return synthetic
    return open_data(Path(data), dict(spec) if spec is not None else None, for_raw_folder=takes_raw)


def read_data(data: Path, spec: Mapping[str, Any] | None, raw: bool = False) -> np.ndarray:
    """Model inputs from a .npy batch, or from a folder of images read with the preprocessing
    ``spec`` (a manifest's ``source.preprocessing``; ``raw``: as the uint8 images a folder that
    takes raw images is fed)."""
    if data.is_dir():
        if spec is None:
            raise LcpcError(f"{data} is an image folder, but the manifest has no preprocessing; convert with "
                            f"--preprocess size=...,mean=...,std=... or pass a .npy batch")
        return load_folder(data, Preprocessing.from_dict(dict(spec)), raw=raw)[0]
    return read_array(data, "data")
