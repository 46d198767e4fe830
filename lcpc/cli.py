"""The ``lcpc`` command line: convert, run, serve, report, bench, inspect, verify, recover, export-hls,
verify-hls (and mpi-worker, a rank of the MPI engine's job).

Guarantees: the commands parse options and print; the work is done by the library
(``lcpc.pipeline`` for convert, recover and verify; ``lcpc.runtime`` for run, serve and
bench; ``lcpc.perf.latency_report`` for the network prediction), so the CLI,
the tests and the benchmarks run the same code. Options shared by several commands are
defined once (stacked click decorators); every command ends with a one-screen summary;
any ``LcpcError`` is printed as one line ``error: ...`` with exit code 1 and no
traceback (``--debug`` shows it); an unexpected exception is reported as an internal
error, exit code 2. Option values out of range are refused that way before any work.
Ctrl-C and SIGTERM (turned into an exception while a command runs, so every cleanup
runs and no half-written output folder stays) end in one line too, exit code 130 or 143.
With ``lcpc.pipeline``, this is the only module that imports targets.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lcpc import __version__, advise, fidelity, frontend, pipeline, report
from lcpc.compress.wire import WIRE_FORMATS
from lcpc.errors import Interrupted, LcpcError
from lcpc.frontend import parse_input_shapes
from lcpc.images import IMAGE_SUFFIXES, Preprocessing, image_files, read_file
from lcpc.inspect import inspect_graph
from lcpc.inspect import render as inspect_render
from lcpc.lower import INPUT_WIRES
from lcpc.passes.recover.distil import Execution
from lcpc.passes.recover.samples import Synthetic
from lcpc.perf import latency_report
from lcpc.perf.devices import load as load_devices
from lcpc.runtime import bench, serving
from lcpc.runtime import manifest as mf
from lcpc.runtime.coding import CODINGS
from lcpc.runtime.deployment import Deployment, requests_from_source
from lcpc.runtime.engine import ENGINES, open_engine
from lcpc.runtime.feeds import Stats, encoded
from lcpc.runtime.order import BROADCASTS
from lcpc.safety import load_array, printable, save_arrays
from lcpc.targets import hls as hls_target
from lcpc.targets import hls_verify


def _fail(message: str, code: int) -> None:
    """One line on stderr, control characters escaped, then exit with ``code``."""
    click.echo(f"error: {printable(message)}", err=True)
    sys.exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C is, so the same cleanups run."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a command runs, SIGTERM raises ``Terminated`` instead of ending the process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def handles_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            with _sigterm_raises():
                return fn(*args, **kwargs)
        except KeyboardInterrupt as exc:
            if debug:
                raise
            if isinstance(exc, Terminated):
                _fail("interrupted by SIGTERM", 128 + signal.SIGTERM)
            _fail("interrupted (Ctrl-C)", 128 + signal.SIGINT)
        except (SystemExit, click.ClickException):
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
PREPROCESS_FORMS = {"size": "HxW or S in whole pixels, e.g. 224x224", "mean": "numbers separated by /, e.g. 127 or "
                    "0.485/0.456/0.406", "std": "numbers separated by /, e.g. 128", "scale": "a number, e.g. 0.00392",
                    "crop_fraction": "a number in (0, 1], e.g. 0.875"}


def parse_preprocessing(spec: str | None) -> dict | None:
    """``size=224x224,mean=127,std=128[,scale=1,layout=NCHW,channels=RGB,...]`` -> a checked dict
    (``Preprocessing``'s checks; every key once)."""
    if spec is None:
        return None
    fields: dict[str, Any] = {}
    for item in spec.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise LcpcError(f"--preprocess: '{printable(item, 80)}' is not KEY=VALUE "
                            f"(e.g. size=224x224,mean=127,std=128)")
        if key in fields:
            raise LcpcError(f"--preprocess: {printable(key, 40)} is given twice")
        try:
            if key == "size":
                fields[key] = tuple(int(v) for v in value.lower().split("x"))
                fields[key] = fields[key] * 2 if len(fields[key]) == 1 else fields[key]
            elif key in ("mean", "std"):
                fields[key] = tuple(float(v) for v in value.split("/"))
            elif key in ("scale", "crop_fraction"):
                fields[key] = float(value)
            else:
                fields[key] = value
        except ValueError:
            raise LcpcError(f"--preprocess: {printable(key, 40)}={printable(value, 80)}: expected "
                            f"{PREPROCESS_FORMS[key]}") from None
    try:
        return Preprocessing.from_dict(fields).to_dict()
    except LcpcError as exc:  # "preprocessing size=...: ..." -> "--preprocess: size=...: ..."
        raise LcpcError(f"--preprocess: {str(exc).removeprefix('preprocessing').lstrip(': ')}") from None


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
@click.option("--wire", type=click.Choice(list(WIRE_FORMATS)), default="fp32", show_default=True,
              help="Tensors crossing devices as int8 with a scale and zero point per transfer (int8) or per "
                   "channel of each transfer (int8-channel); ranges from --calib.")
@click.option("--wire-code", type=click.Choice(list(CODINGS)), default="none", show_default=True,
              help="deflate: every int8 message entropy-coded (lossless; the manifest records its mean size on "
                   "--calib); needs --wire int8 or int8-channel.")
@click.option("--preprocess", default=None, metavar="SPEC",
              help="Image preprocessing stored in the manifest, e.g. size=224x224,mean=127,std=128.")
@click.option("--input-wire", type=click.Choice(list(INPUT_WIRES)), default="auto", show_default=True,
              help="How the model input travels: uint8 sends the raw image and applies --preprocess in the "
                   "stages (4x fewer bytes than float32); encoded sends the image file itself (JPEG/PNG), which "
                   "each device decodes; auto sends uint8 whenever there is a --preprocess.")
@click.option("--broadcast", type=click.Choice(["auto", *BROADCASTS]), default="auto", show_default=True,
              help="How the model input reaches the devices: p2p (the head sends it to each), tree (receivers "
                   "forward it, a binomial tree), auto (the faster on --devices' network, by the network model).")
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
            prune: float | None, quantize: str | None, wire: str, wire_code: str, preprocess: str | None,
            input_wire: str, broadcast: str,
            recover_data: Path | None, recover_labels: Path | None, epochs: int, out: Path | None, force: bool,
            devices: Path | None, input_shapes, train_device: str, procs: int, workers: int | None,
            train_timeout: float, checkpoint: Path | None, resume: bool, synth_time: float,
            synth_iterations: int) -> None:
    """Partition MODEL into K branches; write per-device ONNX files and manifest.json."""
    out = out or model.with_suffix(".lcp")
    if recover_data is not None:
        pipeline.check_recipe(epochs)
    calibration = pipeline.read_array(calib, "calibration") if calib is not None else None
    options: dict[str, Any] = dict(sync=sync, input_shapes=parse_input_shapes(input_shapes), partition=partition,
                                   preprocessing=parse_preprocessing(preprocess), comm_budget=comm_budget,
                                   devices=devices, prune=prune, quantize=quantize, wire=wire, input_wire=input_wire,
                                   broadcast=broadcast, wire_code=wire_code, calib=calibration)
    if recover_data is None:
        if recover_labels is not None:
            raise LcpcError("--labels labels the --recover inputs; pass --recover TRAIN.npy too")
        if procs != 1 or checkpoint is not None or resume or workers is not None or train_device != "auto":
            raise LcpcError("--train-device, --procs, --workers, --checkpoint and --resume set how --recover trains; "
                            "pass --recover TRAIN too, or drop them")
        with _progress_bar() as progress:
            manifest = pipeline.convert(model, out, branches, force=force, progress=progress.sync, **options)
    else:
        labels = read_labels(recover_labels)
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
        click.echo(cut_warning(manifest, out, calibration))


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
    """--engine, --address, --devices, --hostfile and --timeout, shared by run and serve."""
    fn = click.option("--timeout", type=float, default=None,
                      help="Seconds a request may take before it is reported as failed (ray, mpi) [default: 60].")(fn)
    fn = click.option("--hostfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      help="mpi: Open MPI host file, this machine first (rank 0, the relay, runs here) "
                           "[default: every rank here].")(fn)
    fn = click.option("--devices", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      help="devices.yaml: Ray resource, speed and link of each device.")(fn)
    fn = click.option("--address", default=None, help="Ray cluster address [default: start Ray here].")(fn)
    return click.option("--engine", type=click.Choice(list(ENGINES)), default="local", show_default=True,
                        help="local: onnxruntime threads here; ray: one Ray actor per device; mpi: one MPI rank "
                             "per device (mpiexec).")(fn)


def without_option(fn: Callable) -> Callable:
    """--without, shared by run, serve and verify."""
    return click.option("--without", multiple=True, metavar="DEVICE",
                        help="Leave this device out (repeatable, e.g. dev2): the head answers from the branches "
                             "that are left, for a plan whose branches meet only at the classifier.")(fn)


def load_inputs(specs: tuple[str, ...], names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``X.npy`` (single-input models), ``NAME=X.npy``, an ``.npz`` keyed by input names, or an image
    file (JPEG/PNG: its bytes as they are, for a folder fed image files); returns the arrays and, per
    input name, the file it came from. Nothing is unpickled (``safety.load_array``)."""
    feeds: dict[str, np.ndarray] = {}
    files: dict[str, str] = {}
    for spec in specs:
        name, path = ("", spec) if "=" not in spec or Path(spec).is_file() else spec.split("=", 1)
        p = Path(path)
        if not p.is_file():
            raise LcpcError(f"{p}: no such input file")
        data = encoded(read_file(p.parent, p)) if p.suffix.lower() in IMAGE_SUFFIXES else load_array(p)
        if isinstance(data, dict):
            arrays = data
        else:
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
              help="Input array (.npy; NAME=X.npy for multi-input models; or one .npz), or an image file "
                   "(JPEG/PNG) for a folder fed image files.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write outputs to this .npz, under the model's output names.")
@click.option("--stats", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the bytes each transfer actually moved to this JSON file.")
@engine_options
@click.option("--ray-mode", type=click.Choice(["auto", "compiled-graph", "actor-calls"]), default=None,
              help="ray: one Ray Compiled Graph for the whole schedule (auto: when Ray can compile it, else actor "
                   "calls) or one actor call per device per level [default: auto; actor-calls with --without].")
@without_option
@handles_errors
def run(folder: Path, inputs: tuple[str, ...], output: Path | None, stats: Path | None, engine: str,
        address: str | None, devices: Path | None, hostfile: Path | None, timeout: float | None,
        ray_mode: str | None, without: tuple[str, ...]) -> None:
    """Run a converted FOLDER locally (one onnxruntime session per stage), on Ray actors or as an MPI job."""
    mode = ray_mode or (("actor-calls" if without else "auto") if engine == "ray" else None)
    with open_engine(folder, engine, address=address, devices=devices, timeout=timeout, mode=mode,
                     hostfile=hostfile) as runner:
        feeds, files = load_inputs(inputs, [i.name for i in runner.inputs])
        runner.check_inputs(feeds, files)
        counter = Stats()
        outputs = runner.run(feeds, counter, request="run", without=without)
    if output is not None:
        save_arrays(output, outputs)
    if stats is not None:
        stats.write_text(json.dumps(counter.as_dict(runner.manifest), indent=1))
    for name, value in outputs.items():
        top = value.reshape(value.shape[0], -1).argmax(axis=1) if value.ndim >= 2 else value
        click.echo(f"{printable(name, 200)}: shape {tuple(value.shape)}, argmax per sample {top[:8].tolist()}"
                   + (" ..." if len(top) > 8 else ""))
    if without:
        click.echo(f"degraded: answered without {', '.join(without)} (the head merged the branches that were left)")
        click.echo(f"{counter.samples} inference(s), {counter.total()} bytes moved between devices (the manifest's "
                   f"transfers to and from {', '.join(without)} left out); engine {runner.describe}")
        return
    expected = runner.manifest.bytes_per_inference * counter.samples
    click.echo(f"{counter.samples} inference(s), {counter.total()} bytes moved between devices "
               f"(manifest predicts {expected}); engine {runner.describe}")


# ----------------------------------------------------------------------------- plan
@main.command(name="plan")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--devices", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="devices.yaml: the devices (speed, link) the plan may use; K goes from 1 to their number.")
@click.option("--max-branches", type=int, default=None, metavar="N",
              help="Try K up to N [default: the number of devices the file names].")
@click.option("--sync", "syncs", multiple=True, type=click.Choice(list(advise.SYNCS)),
              help="Sync policies to compare (repeatable) [default: none and all].")
@click.option("--calib", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Inputs (.npy): each plan's top-1 agreement and KL with the original, before recovery.")
@click.option("--preprocess", default=None, metavar="SPEC",
              help="Image preprocessing (as for convert): also compares the raw uint8 input on the wire.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write predicted latency against K to this PNG.")
@input_shape_option
@format_option
@handles_errors
def plan_cmd(model: Path, devices: Path, max_branches: int | None, syncs: tuple[str, ...], calib: Path | None,
             preprocess: str | None, plot: Path | None, input_shapes, fmt: str) -> None:
    """Predict, before deploying, whether splitting MODEL over the devices pays, and for which K."""
    if not model.is_file():
        raise LcpcError(f"{model}: no such model file")
    network = load_devices(devices)
    data = pipeline.read_array(calib, "calibration") if calib is not None else None
    bar = Console(stderr=True)
    with bar.status("planning") as status:
        advice = advise.advise(model, network, most=max_branches, syncs=syncs or advise.SYNCS,
                               input_shapes=parse_input_shapes(input_shapes),
                               preprocessing=parse_preprocessing(preprocess), calib=data,
                               progress=lambda what: status.update(f"converting and timing {what}"))
    click.echo(advise.render(advice, str(model), fmt))
    if plot is not None:
        advise.plot(advice, plot)
        click.echo(f"wrote {plot}")


# ----------------------------------------------------------------------------- probe
@main.command(name="probe")
@click.option("--address", required=True, help="The Ray cluster's address (HEAD:6379), whose nodes carry dev0, dev1...")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Write the measured devices.yaml here (for convert --devices, report --network, plan).")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds any one measurement may take before the probe gives up, naming it.")
@handles_errors
def probe_cmd(address: str, out: Path, timeout: float) -> None:
    """Measure each device's speed, its link's bandwidth and latency, and the engine's cost per message."""
    from lcpc.runtime import probe  # Ray: imported only when this command runs

    if not 0 < timeout < float("inf"):
        raise LcpcError(f"--timeout {timeout}: a positive number of seconds")
    with Console(stderr=True).status("probing") as status:
        network, measured = probe.probe(address, timeout, progress=lambda d: status.update(f"probing {d}"))
    probe.write(network, out, f"--address {address}")
    click.echo(probe.render(measured, network))
    click.echo(f"wrote {out}")


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
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A folder fed image files (--input-wire encoded): the camera's JPEG/PNG files, whose median "
                   "size and decode time the prediction uses [default: the nominal size, a generated image].")
@handles_errors
def report_cmd(folder: Path, fmt: str, network: Path | None, plot: Path | None, original: Path | None,
               images: Path | None) -> None:
    """Show the partition report of a converted FOLDER (and, with --network, predicted latency)."""
    manifest = mf.read(folder)
    click.echo(report.render(manifest.json, fmt))
    if images is not None and not manifest.encoded:
        raise LcpcError(f"--images: {folder} is not fed image files (convert with --input-wire encoded)")
    if network is None and plot is None:
        return
    net = load_devices(network)
    measured = latency_report.measure(folder, manifest, net, original, pipeline.convert, images)
    click.echo(latency_report.render(measured.compare(), net, manifest, fmt, measured.image))
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
@click.option("--deadline", type=float, default=None, metavar="MS",
              help="ray: a request's branches may take this long; a late or dead one is left out and the head "
                   "answers from the others (flagged degraded), a dead one rebuilt in the background.")
@without_option
@format_option
@handles_errors
def serve(folder: Path, source: Path, repeat: int, engine: str, address: str | None, devices: Path | None,
          hostfile: Path | None, timeout: float | None, deadline: float | None, without: tuple[str, ...],
          fmt: str) -> None:
    """Keep FOLDER's stages warm and answer a stream of requests; print latency percentiles."""
    if deadline is not None and not 0 < deadline < float("inf"):
        raise LcpcError(f"--deadline {deadline}: a positive number of milliseconds")
    if repeat < 1:
        raise LcpcError(f"--repeat {repeat}: send the requests at least once")
    requests, total = requests_from_source(source, mf.read(folder), repeat)
    with Deployment(folder, engine, address=address, devices=devices, timeout=timeout, without=without,
                    deadline=None if deadline is None else deadline / 1e3, hostfile=hostfile) as dep:
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
@without_option
@format_option
@handles_errors
def verify(folder: Path, data: Path, labels: Path | None, original: Path | None, batch_size: int,
           without: tuple[str, ...], fmt: str) -> None:
    """Compare a converted FOLDER with its original model on the same inputs."""
    manifest = mf.read(folder)
    x = [read_file(data, p) for p in image_files(data)] if manifest.encoded and data.is_dir() else \
        pipeline.read_data(data, manifest.preprocessing, raw=manifest.takes_raw_images)
    y = pipeline.read_array(labels, "labels") if labels is not None else None
    result = pipeline.verify(folder, x, y, original, batch_size, without)
    click.echo(render_fidelity(result, fmt))


def render_fidelity(result: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(result, indent=1)
    rows = [("samples", result["samples"]), ("top-1 agreement", f"{100 * result['top1_agreement']:.2f}%"),
            (f"top-{result['top5_k']} overlap", f"{100 * result['top5_overlap']:.2f}%"),
            ("KL(original || lcp)", f"{result['kl_divergence']:.4g}"),
            ("max relative logit error", f"{result['max_rel_logit_error']:.3g}")]
    if result.get("without"):
        rows.append(("left out", ", ".join(result["without"]) + " (answered from the other branches)"))
    if result.get("reference_accuracy") is not None:
        rows += [("original accuracy", f"{100 * result['reference_accuracy']:.2f}%"),
                 ("lcp accuracy", f"{100 * result['candidate_accuracy']:.2f}%")]
    if fmt == "markdown":
        return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ----------------------------------------------------------------------------- MPI ranks
@main.command(name="mpi-worker", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def mpi_worker(args: tuple[str, ...]) -> None:
    """One rank of the MPI engine's job (started by mpiexec; `lcpc run --engine mpi` starts it for you)."""
    from lcpc.runtime import mpi

    mpi.main(list(args))


# ----------------------------------------------------------------------------- FPGA (hls4ml)
@main.command(name="export-hls")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the hls4ml projects (one per branch stage) and hls.json.")
@click.option("--precision", default=hls_target.DEFAULT_PRECISION, show_default=True,
              help="fixed<W,I>: every activation (rounded, saturated; give the modes to change them), weights at W "
                   "bits fitted per layer; from-int8: the widths of a --quantize int8-all --calib plan.")
@click.option("--reuse", type=int, default=1, show_default=True,
              help="hls4ml reuse factor: multiplications per multiplier (1: fully parallel; more: fewer DSPs).")
@click.option("--board", type=click.Choice(list(hls_target.BOARDS)), default=None,
              help="Target board (its FPGA part; the table shows its DSP and BRAM share) [default part: pynq-z2's].")
@click.option("--part", default=None, help="FPGA part, e.g. xczu3eg-sbva484-1-e (instead of --board).")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@handles_errors
def export_hls(folder: Path, out: Path, precision: str, reuse: int, board: str | None, part: str | None,
               force: bool) -> None:
    """Write each branch stage of a converted FOLDER as one hls4ml project (Vitis HLS, io_stream)."""
    options = hls_target.Options(precision=precision, reuse=reuse, board=board, part=part)
    record = hls_target.export(folder, out, options, force=force)
    click.echo(hls_target.render_table(record))
    click.echo(f"wrote {len(hls_target.table(record))} hls4ml projects and {hls_target.FILE} to {out}; check them "
               f"with: lcpc verify-hls {out} --data X.npy")


@main.command(name="verify-hls")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Inputs (.npy batch) to run through the C++ emulation and the float plan.")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Integer labels (.npy): the accuracy of both.")
@click.option("--timeout", type=float, default=hls_verify.COMPILE_TIMEOUT, show_default=True,
              help="Seconds each project's compilation (or synthesis) may take.")
@click.option("--synth", is_flag=True, help="Also run Vitis HLS C synthesis and read latency and resources "
                                            "(needs vitis-run or vitis_hls on PATH).")
@format_option
@handles_errors
def verify_hls(folder: Path, data: Path, labels: Path | None, timeout: float, synth: bool, fmt: str) -> None:
    """Compile each project of an export-hls FOLDER (g++) and compare it with the float plan on --data."""
    x = pipeline.read_array(data, "data")
    y = pipeline.read_array(labels, "labels") if labels is not None else None

    def compiled(project: str, seconds: float) -> None:
        click.echo(f"compiled {project} in {seconds:.1f} s", err=True)

    result = hls_verify.verify(folder, x, y, timeout=timeout, progress=compiled)
    if synth:
        result["synthesis"] = hls_verify.synthesize(folder, timeout)
    click.echo(render_hls_check(result, fmt))


def render_hls_check(result: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(result, indent=1)
    rows = []
    for name, r in result["outputs"].items():
        rows += [(f"{name}: top-1 agreement with the float plan",
                  f"{100 * r['top1_agreement']:.2f}% of {r['samples']}"),
                 (f"{name}: largest logit error",
                  f"{r['max_abs_error']:.4g} (largest logit {r['max_abs_reference']:.4g})")]
        if "fpga_accuracy" in r:
            rows.append((f"{name}: accuracy float / FPGA", f"{100 * r['float_accuracy']:.2f}% / "
                                                          f"{100 * r['fpga_accuracy']:.2f}%"))
    rows.append(("precision, reuse", f"{result['precision']}, {result['reuse']}"))
    for project, synth in result.get("synthesis", {}).items():
        rows.append((f"{project}: C synthesis", f"latency {synth['latency_worst_cycles']} cycles, "
                                                f"interval {synth['interval_cycles']}, {synth['resources']}"))
    if fmt == "markdown":
        return "| check | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
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
@click.option("--branch-dropout", type=float, default=None,
              help="Train for answers with a device missing: drop each non-head branch at the classifier "
                   "merge with this probability per image, rescaled as `run --without` does [default: 0].")
@training_options
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@handles_errors
def recover(folder: Path, data: Path, labels: Path | None, original: Path | None, epochs: int, refit: str,
            lr: float | None, augment: str | None, views: int | None, temperature: float | None,
            batch_size: int | None, precision: str | None, branch_dropout: float | None, train_device: str,
            procs: int, workers: int | None, train_timeout: float, checkpoint: Path | None, resume: bool,
            synth_time: float, synth_iterations: int,
            out: Path, force: bool) -> None:
    """Recover the accuracy of a converted FOLDER by refit and distillation; write OUT."""
    recipe: dict[str, Any] = {k: v for k, v in (("lr", lr), ("augment", augment), ("views", views),
                                                ("temperature", temperature), ("batch_size", batch_size),
                                                ("precision", precision), ("branch_dropout", branch_dropout))
                                  if v is not None}
    pipeline.check_recipe(epochs, **recipe)  # every value in range, before anything is read
    if recipe and epochs < 1:
        flags = " and --".join(k.replace("_", "-") for k in recipe)
        raise LcpcError(f"--{flags} set(s) the distillation, which --epochs {epochs} does not run; "
                        f"pass --epochs 1 or more, or drop --{flags}")
    execution = execution_of(train_device, procs, workers, train_timeout, checkpoint, resume)
    source = mf.read(folder)
    x = with_synth_options(pipeline.recovery_data(data, source.preprocessing, takes_raw=source.takes_raw_images),
                           synth_time, synth_iterations)
    _check_labels(x, labels)
    y = read_labels(labels, len(x) if not isinstance(x, Synthetic) else None,
                    fidelity.classes_of(source.json["source"]["outputs"][0]["shape"]))
    with _progress_bar() as progress:
        manifest = pipeline.recover(folder, x, out, labels=y, epochs=epochs, refit=refit, model=original,
                                    force=force, progress=progress, execution=execution, **recipe)
    if manifest is None:  # torchrun: process 0 reports
        return
    click.echo(report.render_recovery(manifest["fidelity"]["recovery"]))
    click.echo(f"wrote the recovered plan to {out}")


def _check_labels(data: Any, labels: Any) -> None:
    if labels is not None and isinstance(data, Synthetic):
        raise LcpcError(pipeline.SYNTHETIC_LABELS)


def read_labels(path: Path | None, samples: int | None = None, classes: int | None = None) -> np.ndarray | None:
    """The --labels file: one integer class index per sample (``samples``, when known), each below
    ``classes`` (when known); an ``LcpcError`` naming the file otherwise."""
    if path is None:
        return None
    y = pipeline.read_array(path, "labels")
    return y if samples is None else fidelity.check_labels(y, samples, classes, printable(path))


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
