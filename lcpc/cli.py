"""The ``lcpc`` command line: convert, run, serve, report, bench, inspect, verify, recover.

Guarantees: the commands parse options and print; the work is done by the library
(``lcpc.pipeline`` for convert, recover and verify; ``lcpc.runtime`` for run, serve and
bench; ``lcpc.perf.latency_report`` for the network prediction), so the CLI,
the tests and the benchmarks run the same code. Options shared by several commands are
defined once (stacked click decorators); every command ends with a one-screen summary;
any ``LcpcError`` is printed as one line ``error: ...`` with exit code 1 and no
traceback (``--debug`` shows it); an unexpected exception is reported as an internal
error, exit code 2. With ``lcpc.pipeline``, this is the only module that imports targets.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lcpc import __version__, frontend, pipeline, report
from lcpc.errors import Interrupted, LcpcError
from lcpc.frontend import parse_input_shapes
from lcpc.images import Preprocessing
from lcpc.inspect import inspect_graph
from lcpc.inspect import render as inspect_render
from lcpc.passes.recover.distil import Execution
from lcpc.passes.recover.samples import Synthetic
from lcpc.perf import latency_report
from lcpc.perf.devices import load as load_devices
from lcpc.runtime import bench, serving
from lcpc.runtime import manifest as mf
from lcpc.runtime.deployment import Deployment, requests_from_source
from lcpc.runtime.engine import ENGINES, open_engine
from lcpc.runtime.feeds import Stats
from lcpc.safety import load_array, printable, save_arrays


def _fail(message: str, code: int) -> None:
    """One line on stderr, control characters escaped, then exit with ``code``."""
    click.echo(f"error: {printable(message)}", err=True)
    sys.exit(code)


def handles_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (KeyboardInterrupt, SystemExit, click.ClickException):
            raise
        except Exception as exc:
            if debug:
                raise
            if isinstance(exc, LcpcError):
                _fail(str(exc), 130 if isinstance(exc, Interrupted) else 1)
            if isinstance(exc, OSError) and exc.strerror:  # the disk or the file system said no
                _fail(f"{exc.filename or ''}: {exc.strerror}" if exc.filename else exc.strerror, 1)
            if isinstance(exc, MemoryError):
                _fail("out of memory; try a smaller batch or input shape", 1)
            text = str(exc).strip()  # a bug in lcpc: still no traceback unless asked
            _fail(f"internal error: {type(exc).__name__}: {text.splitlines()[0] if text else ''} "
                  f"(rerun with --debug for a traceback and report it)", 2)
    return click.option("--debug", is_flag=True, help="Show tracebacks.")(wrapper)


def input_shape_option(fn: Callable) -> Callable:
    return click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
                        help="Pin an input's dims, e.g. input:1x3x224x224 (repeatable).")(fn)


def data_options(what: str, recovery: bool = False) -> Callable:
    """--data, --labels and --model, shared by verify and recover (``recovery``: --data also takes
    synth[:N], and reads a .npy memory-mapped, a folder recursively)."""
    data_help = (f"{what}: a .npy batch (memory-mapped), a folder of JPEG/PNG images (its subfolders too, read "
                 f"as needed with the manifest's preprocessing), or synth[:N]: N inputs synthesised from the "
                 f"original model's BatchNorm statistics (default 2048; no real image needed)." if recovery else
                 f"{what}: a .npy batch, or a folder of JPEG/PNG images (read with the manifest's preprocessing).")

    def decorate(fn: Callable) -> Callable:
        fn = click.option("--model", "original", type=click.Path(dir_okay=False, path_type=Path), default=None,
                          help="The original ONNX model, when it is no longer at the manifest's source path.")(fn)
        fn = click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
                          help="Integer labels (.npy): accuracy figures (and cross-entropy in recovery).")(fn)
        return click.option("--data", required=True, type=click.Path(path_type=Path), help=data_help)(fn)
    return decorate


def training_options(fn: Callable) -> Callable:
    """Where and how recovery trains (``passes.recover.distil.Execution``) and the synthetic-data
    time bound, shared by recover and convert --recover."""
    fn = click.option("--synth-time", type=float, default=Synthetic.time_limit, show_default=True, metavar="SECONDS",
                      help="Most seconds --data synth may spend synthesising inputs (fewer iterations if need be).")(fn)
    fn = click.option("--synth-iterations", type=int, default=Synthetic.iterations, show_default=True,
                      help="Optimisation steps per batch of synthesised inputs.")(fn)
    fn = click.option("--resume", is_flag=True, help="Continue the recovery whose state --checkpoint holds.")(fn)
    fn = click.option("--checkpoint", type=click.Path(file_okay=False, path_type=Path), default=None,
                      help="Folder for the distillation's state after every epoch and on Ctrl-C (with --resume, "
                           "continue from it).")(fn)
    fn = click.option("--timeout", "train_timeout", type=float, default=600.0, show_default=True,
                      metavar="SECONDS", help="Most seconds any wait between recovery processes (and for a data "
                                              "loader's batch) may take.")(fn)
    fn = click.option("--workers", type=int, default=None,
                      help="Data-loader processes per training process [default: up to 4 for image folders, "
                           "else 0].")(fn)
    fn = click.option("--procs", type=int, default=1, show_default=True,
                      help="Data-parallel training processes (DDP: gloo on the CPU, NCCL with one GPU each).")(fn)
    return click.option("--train-device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        show_default=True, help="Where recovery trains (auto: a CUDA GPU when PyTorch sees one; "
                                                "mixed precision there).")(fn)


def execution_of(train_device: str, procs: int, workers: int | None, train_timeout: float, checkpoint: Path | None,
                 resume: bool) -> Execution:
    return Execution(device=train_device, procs=procs, workers=workers, timeout=train_timeout,
                     checkpoint=str(checkpoint) if checkpoint is not None else None, resume=resume)


def with_synth_options(data: Any, synth_time: float, synth_iterations: int) -> Any:
    """``--synth-time`` and ``--synth-iterations`` applied to ``--data synth[:N]`` (other data pass through)."""
    if not isinstance(data, Synthetic):
        return data
    if synth_iterations < 1 or not synth_time > 0:
        raise LcpcError(f"--synth-iterations {synth_iterations}, --synth-time {synth_time}: both must be positive")
    return replace(data, time_limit=synth_time, iterations=synth_iterations)


def format_option(fn: Callable) -> Callable:
    return click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default="text",
                        show_default=True, help="Output format.")(fn)


@click.group()
@click.version_option(__version__, prog_name="lcpc")
def main() -> None:
    """Compile image CNNs (ONNX) into LCP form: K almost-independent branches."""


# ----------------------------------------------------------------------------- convert
def parse_preprocessing(spec: str | None) -> dict | None:
    """``size=224x224,mean=127,std=128[,scale=1,layout=NCHW,channels=RGB,...]`` -> a checked dict."""
    if not spec:
        return None
    fields: dict[str, Any] = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise LcpcError(f"--preprocess: '{item}' is not KEY=VALUE")
        key = key.strip()
        if key == "size":
            fields[key] = tuple(int(v) for v in value.lower().split("x"))
            if len(fields[key]) == 1:
                fields[key] = fields[key] * 2
        elif key in ("mean", "std"):
            fields[key] = tuple(float(v) for v in value.split("/"))
        elif key in ("scale", "crop_fraction"):
            fields[key] = float(value)
        else:
            fields[key] = value
    try:
        return Preprocessing(**fields).to_dict()
    except TypeError as exc:
        raise LcpcError(f"--preprocess: {exc}") from None


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--branches", "-k", type=int, default=4, show_default=True, help="Number of branches K.")
@click.option("--sync", default="none", show_default=True,
              help="none: pure LCP (branches meet at the classifier); all: exact model parallelism; "
                   "every:N: an exact exchange every N cut layers; NODE,NODE,...: exchanges at these "
                   "nodes; auto: the exchanges that buy most fidelity per byte (--calib, --comm-budget).")
@click.option("--partition", type=click.Choice(["energy", "contiguous"]), default="energy", show_default=True,
              help="energy: keep the heaviest weights inside branches; contiguous: channel blocks in order.")
@click.option("--calib", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Calibration inputs (.npy, a batch) for --sync auto, --prune, --quantize and --wire int8.")
@click.option("--comm-budget", type=int, default=None, metavar="BYTES",
              help="Most bytes per inference --sync auto may spend.")
@click.option("--prune", type=float, default=None, metavar="FRACTION",
              help="Remove this fraction of each branch's prunable channels (0.3: 30%), whole channel classes.")
@click.option("--quantize", type=click.Choice(["int8", "int8-all"]), default=None,
              help="int8 stages (onnxruntime quantization; static QDQ with --calib, else dynamic): int8 keeps "
                   "float for stages int8 would slow down (measured); int8-all quantizes every stage.")
@click.option("--wire", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="Tensors crossing devices as int8 with a scale and zero point per transfer (--calib ranges).")
@click.option("--preprocess", default=None, metavar="SPEC",
              help="Image preprocessing stored in the manifest, e.g. size=224x224,mean=127,std=128.")
@click.option("--input-wire", type=click.Choice(["auto", "float", "uint8"]), default="auto", show_default=True,
              help="How the model input travels: uint8 sends the raw image and applies --preprocess in the "
                   "stages (4x fewer bytes than float32); auto does so whenever --preprocess allows it.")
@click.option("--recover", "recover_data", type=click.Path(path_type=Path), default=None, metavar="TRAIN",
              help="Recover accuracy right away from these training inputs (.npy, image folder, or synth[:N] "
                   "for synthesised inputs), as `lcpc recover` does.")
@click.option("--labels", "recover_labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Integer labels of the --recover inputs (.npy): accuracy figures before and after.")
@click.option("--epochs", type=int, default=2, show_default=True,
              help="Distillation epochs for --recover (0: least-squares refit only, no PyTorch needed).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: MODEL stem + '.lcp'].")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--devices", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="devices.yaml: size each branch's share of channels by the devices' relative speeds.")
@input_shape_option
@training_options
@handles_errors
def convert(model: Path, branches: int, sync: str, partition: str, calib: Path | None, comm_budget: int | None,
            prune: float | None, quantize: str | None, wire: str, preprocess: str | None, input_wire: str,
            recover_data: Path | None, recover_labels: Path | None, epochs: int, out: Path | None, force: bool,
            devices: Path | None, input_shapes, train_device: str, procs: int, workers: int | None,
            train_timeout: float, checkpoint: Path | None, resume: bool, synth_time: float,
            synth_iterations: int) -> None:
    """Partition MODEL into K branches; write per-device ONNX files and manifest.json."""
    out = out or model.with_suffix(".lcp")
    options: dict[str, Any] = dict(sync=sync, input_shapes=parse_input_shapes(input_shapes), partition=partition,
                   preprocessing=parse_preprocessing(preprocess), comm_budget=comm_budget, devices=devices,
                   prune=prune, quantize=quantize, wire=wire, input_wire=input_wire,
                   calib=pipeline.read_array(calib, "calibration") if calib is not None else None)
    if recover_data is None:
        if recover_labels is not None:
            raise LcpcError("--labels labels the --recover inputs; pass --recover TRAIN.npy too")
        if procs != 1 or checkpoint is not None or resume or workers is not None or train_device != "auto":
            raise LcpcError("--train-device, --procs, --workers, --checkpoint and --resume set how --recover trains; "
                            "pass --recover TRAIN too, or drop them")
        with _progress_bar() as progress:
            manifest = pipeline.convert(model, out, branches, force=force, progress=progress.sync, **options)
    else:
        labels = pipeline.read_array(recover_labels, "labels") if recover_labels is not None else None
        data = with_synth_options(pipeline.recovery_data(recover_data, options["preprocessing"]), synth_time,
                                  synth_iterations)
        _check_labels(data, labels)
        execution = execution_of(train_device, procs, workers, train_timeout, checkpoint, resume)
        with _progress_bar() as progress:
            manifest = pipeline.convert_and_recover(model, out, data, labels=labels, epochs=epochs,
                                                    force=force, progress=progress, branches=branches,
                                                    execution=execution, **options)
        if manifest is None:  # torchrun: process 0 reports
            return
    click.echo(report.render(manifest, "text"))  # with --recover, it shows the recovery figures too
    click.echo(f"wrote {len(manifest['stages'])} stage files and manifest.json to {out}")
    if recover_data is None and manifest["sync"]["cuts"]:
        click.echo(cut_warning(manifest, out, options["calib"]))


def cut_warning(manifest: dict, out: Path, calib: np.ndarray | None) -> str:
    """What the cut did to the model, measured on --calib when given, and how to recover it."""
    n = len(manifest["sync"]["cuts"])
    text = f"note: the cut drops the cross-branch weights of {n} layer(s), so this model computes something else "
    if calib is not None:
        fig = pipeline.verify(out, calib)
        text += (f"than the original: top-1 agreement {100 * fig['top1_agreement']:.1f}% and KL "
                 f"{fig['kl_divergence']:.3g} on the {fig['samples']} --calib inputs. ")
    else:
        text += "than the original (pass --calib X.npy to measure by how much). "
    return text + (f"Recover it from unlabelled training inputs: lcpc recover {out} --data TRAIN.npy -o "
                   f"{out}-recovered (or convert with --recover TRAIN.npy).")


# ----------------------------------------------------------------------------- run
def engine_options(fn: Callable) -> Callable:
    """--engine, --address, --devices and --timeout, shared by run and serve."""
    fn = click.option("--timeout", type=float, default=None,
                      help="Seconds a request may take before it is reported as failed (ray) [default: 60].")(fn)
    fn = click.option("--devices", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      help="devices.yaml: Ray resource, speed and link of each device.")(fn)
    fn = click.option("--address", default=None, help="Ray cluster address [default: start Ray here].")(fn)
    return click.option("--engine", type=click.Choice(list(ENGINES)), default="local", show_default=True,
                        help="local: onnxruntime threads here; ray: one Ray actor per device.")(fn)


def load_inputs(specs: tuple[str, ...], names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``X.npy`` (single-input models), ``NAME=X.npy`` or an ``.npz`` keyed by input names; returns
    the arrays and, per input name, the file it came from. Nothing is unpickled (``safety.load_array``)."""
    feeds: dict[str, np.ndarray] = {}
    files: dict[str, str] = {}
    for spec in specs:
        name, path = ("", spec) if "=" not in spec or Path(spec).is_file() else spec.split("=", 1)
        p = Path(path)
        if not p.is_file():
            raise LcpcError(f"{p}: no such input file")
        data = load_array(p)
        arrays = data if isinstance(data, dict) else None
        if arrays is None:
            if not name:
                if len(names) != 1:
                    raise LcpcError(f"{p}: the model has inputs {', '.join(names)}; pass --input NAME={p}")
                name = names[0]
            arrays = {name: data}
        for key, value in arrays.items():
            if key in feeds:
                raise LcpcError(f"{p}: input '{key}' is also given by {files[key]}; give each input once")
            feeds[key], files[key] = value, str(p)
    return feeds, files


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--input", "-i", "inputs", multiple=True, required=True, metavar="[NAME=]X.npy",
              help="Input array (.npy; NAME=X.npy for multi-input models; or one .npz).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write outputs to this .npz, under the model's output names.")
@click.option("--stats", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the bytes each transfer actually moved to this JSON file.")
@engine_options
@click.option("--ray-mode", type=click.Choice(["auto", "compiled-graph", "actor-calls"]), default=None,
              help="ray: one Ray Compiled Graph for the whole schedule (auto: when Ray can compile it, else actor "
                   "calls) or one actor call per device per level [default: auto].")
@handles_errors
def run(folder: Path, inputs: tuple[str, ...], output: Path | None, stats: Path | None, engine: str,
        address: str | None, devices: Path | None, timeout: float | None, ray_mode: str | None) -> None:
    """Run a converted FOLDER locally (one onnxruntime session per stage) or on Ray actors."""
    mode = ray_mode or ("auto" if engine == "ray" else None)
    with open_engine(folder, engine, address=address, devices=devices, timeout=timeout, mode=mode) as runner:
        feeds, files = load_inputs(inputs, [i.name for i in runner.inputs])
        runner.check_inputs(feeds, files)
        counter = Stats()
        outputs = runner.run(feeds, counter)
    if output is not None:
        save_arrays(output, outputs)
    if stats is not None:
        stats.write_text(json.dumps(counter.as_dict(runner.manifest), indent=1))
    for name, value in outputs.items():
        top = value.reshape(value.shape[0], -1).argmax(axis=1) if value.ndim >= 2 else value
        click.echo(f"{printable(name, 200)}: shape {tuple(value.shape)}, argmax per sample {top[:8].tolist()}"
                   + (" ..." if len(top) > 8 else ""))
    expected = runner.manifest.bytes_per_inference * counter.samples
    click.echo(f"{counter.samples} inference(s), {counter.total()} bytes moved between devices "
               f"(manifest predicts {expected}); engine {runner.describe}")


# ----------------------------------------------------------------------------- report
@main.command(name="report")
@click.argument("folder", type=click.Path(path_type=Path))
@format_option
@click.option("--network", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="devices.yaml: predict the latency per inference on this network (stage times measured here).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write predicted latency against bandwidth (1 Mbit/s..10 Gbit/s) to this PNG.")
@click.option("--model", "original", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The original ONNX model, when it is no longer at the manifest's source path.")
@handles_errors
def report_cmd(folder: Path, fmt: str, network: Path | None, plot: Path | None, original: Path | None) -> None:
    """Show the partition report of a converted FOLDER (and, with --network, predicted latency)."""
    manifest = mf.read(folder)
    click.echo(report.render(manifest.json, fmt))
    if network is None and plot is None:
        return
    net = load_devices(network)
    measured = latency_report.measure(folder, manifest, net, original, pipeline.convert)
    click.echo(latency_report.render(measured.compare(), net, manifest, fmt))
    if plot is not None:
        latency_report.plot(measured.sweep(), measured.compare()[1], plot)
        click.echo(f"wrote {plot}")


# ----------------------------------------------------------------------------- serve
@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--input", "-i", "source", required=True, type=click.Path(path_type=Path),
              help="Requests: a .npy batch (one request per planned batch) or a folder of images.")
@click.option("--repeat", type=int, default=1, show_default=True, help="Send the requests this many times.")
@engine_options
@format_option
@handles_errors
def serve(folder: Path, source: Path, repeat: int, engine: str, address: str | None, devices: Path | None,
          timeout: float | None, fmt: str) -> None:
    """Keep FOLDER's stages warm and answer a stream of requests; print latency percentiles."""
    requests, total = requests_from_source(source, mf.read(folder), max(repeat, 1))
    with Deployment(folder, engine, address=address, devices=devices, timeout=timeout) as dep:
        with serving.ServeProgress(total) as progress:
            result = dep.serve(requests, on_result=progress)
        click.echo(serving.render(result, dep.describe, fmt))
    if result.interrupted:
        sys.exit(130)


# ----------------------------------------------------------------------------- bench
@main.command(name="bench")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--threads", type=int, default=1, show_default=True,
              help="onnxruntime intra-op threads per session (the original's and each stage's).")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed interleaved rounds.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed rounds first.")
@click.option("--model", "original", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The original ONNX model, when it is no longer at the manifest's source path.")
@format_option
@handles_errors
def bench_cmd(folder: Path, threads: int, runs: int, warmup: int, original: Path | None, fmt: str) -> None:
    """Time a converted FOLDER's stages against its original model (same settings, one run)."""
    click.echo(bench.render(bench.bench(folder, original, threads=threads, runs=runs, warmup=warmup), fmt))


# ----------------------------------------------------------------------------- inspect
@main.command(name="inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@input_shape_option
@format_option
@handles_errors
def inspect_cmd(model: Path, input_shapes, fmt: str) -> None:
    """Show how lcpc treats each op of MODEL, its channel spaces and the largest K."""
    graph, _ = frontend.load(model, frontend.parse_input_shapes(input_shapes))
    click.echo(inspect_render(inspect_graph(graph), str(model), fmt))


# ----------------------------------------------------------------------------- verify
@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@data_options("Inputs")
@click.option("--batch-size", type=int, default=64, show_default=True)
@format_option
@handles_errors
def verify(folder: Path, data: Path, labels: Path | None, original: Path | None, batch_size: int, fmt: str) -> None:
    """Compare a converted FOLDER with its original model on the same inputs."""
    manifest = mf.read(folder)
    x = pipeline.read_data(data, manifest.preprocessing, raw=manifest.takes_raw_images)
    y = pipeline.read_array(labels, "labels") if labels is not None else None
    result = pipeline.verify(folder, x, y, original, batch_size)
    click.echo(render_fidelity(result, fmt))


def render_fidelity(result: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(result, indent=1)
    rows = [("samples", result["samples"]), ("top-1 agreement", f"{100 * result['top1_agreement']:.2f}%"),
            (f"top-{result['top5_k']} overlap", f"{100 * result['top5_overlap']:.2f}%"),
            ("KL(original || lcp)", f"{result['kl_divergence']:.4g}"),
            ("max relative logit error", f"{result['max_rel_logit_error']:.3g}")]
    if result.get("reference_accuracy") is not None:
        rows += [("original accuracy", f"{100 * result['reference_accuracy']:.2f}%"),
                 ("lcp accuracy", f"{100 * result['candidate_accuracy']:.2f}%")]
    if fmt == "markdown":
        return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ----------------------------------------------------------------------------- recover
@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@data_options("Training inputs (unlabelled is fine)", recovery=True)
@click.option("--epochs", type=int, default=2, show_default=True,
              help="Distillation epochs (0: cheap refit only, no PyTorch needed).")
@click.option("--refit", type=click.Choice(["lsq", "stats", "none"]), default="lsq", show_default=True,
              help="Cheap recovery first: least-squares re-fit of the cut layers, or BN statistics only.")
@click.option("--lr", type=float, default=None, help="Distillation learning rate [default: 2e-3].")
@click.option("--augment", type=click.Choice(["shift", "shift+flip", "flip", "none"]), default=None,
              help="Distillation augmentation [default: shift]; add flip only where a mirrored input is "
                   "still an input of its class (photos, shapes; not digits or text).")
@click.option("--views", type=int, default=None,
              help="Augmented copies of each image per step [default: 1]: more samples seen from few data, "
                   "at that many times the compute.")
@click.option("--temperature", type=float, default=None, help="Distillation temperature [default: 4].")
@click.option("--batch-size", type=int, default=None,
              help="Images per distillation step, over all processes [default: 8; on GPUs use hundreds].")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=None,
              help="Distillation arithmetic [default: auto: bf16 (or fp16) autocast on CUDA, fp32 on the CPU].")
@training_options
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@handles_errors
def recover(folder: Path, data: Path, labels: Path | None, original: Path | None, epochs: int, refit: str,
            lr: float | None, augment: str | None, views: int | None, temperature: float | None,
            batch_size: int | None, precision: str | None, train_device: str, procs: int, workers: int | None,
            train_timeout: float, checkpoint: Path | None, resume: bool, synth_time: float, synth_iterations: int,
            out: Path, force: bool) -> None:
    """Recover the accuracy of a converted FOLDER by refit and distillation; write OUT."""
    recipe: dict[str, Any] = {k: v for k, v in (("lr", lr), ("augment", augment), ("views", views),
                                                ("temperature", temperature), ("batch_size", batch_size),
                                                ("precision", precision)) if v is not None}
    if recipe and epochs < 1:
        flags = " and --".join(k.replace("_", "-") for k in recipe)
        raise LcpcError(f"--{flags} set(s) the distillation, which --epochs {epochs} does not run; "
                        f"pass --epochs 1 or more, or drop --{flags}")
    execution = execution_of(train_device, procs, workers, train_timeout, checkpoint, resume)
    view = mf.read(folder)
    x = with_synth_options(pipeline.recovery_data(data, view.preprocessing, takes_raw=view.takes_raw_images),
                           synth_time, synth_iterations)
    y = pipeline.read_array(labels, "labels") if labels is not None else None
    _check_labels(x, y)
    with _progress_bar() as progress:
        manifest = pipeline.recover(folder, x, out, labels=y, epochs=epochs, refit=refit, model=original,
                                    force=force, progress=progress, execution=execution, **recipe)
    if manifest is None:  # torchrun: process 0 reports
        return
    click.echo(report.render_recovery(manifest["fidelity"]["recovery"]))
    click.echo(f"wrote the recovered plan to {out}")


def _check_labels(data: Any, labels: np.ndarray | None) -> None:
    if labels is not None and isinstance(data, Synthetic):
        raise LcpcError("--labels labels real training inputs; synthetic inputs (--data synth) have none: drop "
                        "--labels, and measure accuracy with lcpc verify on real test data")


class _progress_bar:
    """Rich progress bars fed by the passes' progress callbacks: the synthesis of inputs
    (iterations), the refit (layers), each distillation epoch (steps) and auto sync placement
    (plans measured), each showing the latest loss or agreement it measured."""

    def __enter__(self):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                            transient=False, disable=not sys.stderr.isatty(), console=Console(stderr=True))
        self.bar.__enter__()
        self.tasks: dict[str, Any] = {}
        return self

    def _show(self, key: str, description: str, done: int, total: int, info: str) -> None:
        if key not in self.tasks:
            self.tasks[key] = self.bar.add_task(description, total=total, info=info)
        self.bar.update(self.tasks[key], completed=done, total=total, info=info)

    def refit(self, done: int, total: int, agreement: float | None) -> None:
        info = "" if agreement is None else f"held-out agreement {100 * agreement:.1f}%"
        self._show("refit", "refit layers", done, total, info)

    def distil(self, epoch: int, step: int, steps: int, loss: float, agreement: float | None) -> None:
        info = f"loss {loss:.4f}" + ("" if agreement is None else f"  held-out agreement {100 * agreement:.1f}%")
        self._show(f"epoch {epoch}", f"distil epoch {epoch}", step, steps, info)

    def synth(self, done: int, total: int, loss: float | None) -> None:
        info = "" if loss is None else f"loss {loss:.4g}"
        self._show("synth", "synthesise inputs", done, total, info)

    def sync(self, done: int, total: int, agreement: float | None) -> None:
        info = "" if agreement is None else f"calibration agreement {100 * agreement:.1f}%"
        self._show("sync", "auto sync placement", done, total, info)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)
