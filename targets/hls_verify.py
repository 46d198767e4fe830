"""``lcpc verify-hls``: an exported HLS folder's C++ emulation, compiled and run beside its software stages.

Guarantees:
- reads ``hls.json`` (strict JSON, its format and version checked) and the folder it was
  exported from (``manifest.read``), whose manifest must still be the one exported (sha256),
  else one ``LcpcError`` saying to export again;
- compiles each project's bit-accurate emulation with the project's own ``build_lib.sh``
  (g++ and the ``ap_types`` headers hls4ml wrote into it; hls4ml itself is not needed), each
  bounded by ``timeout`` seconds: past it the compiler's whole process group is killed and
  the error names the project; a compiler failure names the project and its first error;
- runs the plan in the one run order (``Manifest.order.walk``), one sample at a time (an
  hls4ml top function takes one): hardware stages through their emulation (inputs turned
  channels-last, outputs turned back, as ``hls.json`` records), software stages (the head's
  merge) through onnxruntime (``session.open_stage``) from the exported folder;
- compares with the float plan (the local engine on that folder, the same inputs): per model
  output the top-1 agreement and the largest absolute logit error; accuracy of both when
  labels are given;
- ``synthesize`` runs Vitis HLS C synthesis of each project (``vitis-run`` or ``vitis_hls`` on
  PATH, each bounded) and reads latency and resources from its report.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lcpc.errors import LcpcError
from lcpc.runtime import manifest as mf
from lcpc.runtime.local import LocalEngine
from lcpc.runtime.manifest import Manifest, Stage, Transfer
from lcpc.runtime.session import open_stage
from lcpc.safety import first_line, printable
from lcpc.targets.hls import FILE, FORMAT, VERSION

COMPILE_TIMEOUT = 600.0


def read(folder: str | Path) -> tuple[dict[str, Any], Manifest]:
    """``hls.json`` of an exported folder and the checked manifest of the folder it came from."""
    path = Path(folder) / FILE
    if not path.is_file():
        raise LcpcError(f"{printable(path)}: missing; is {printable(folder)} the output of `lcpc export-hls`?")
    try:
        record = json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LcpcError(f"{printable(path)}: not valid JSON ({printable(str(exc), 200)})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        raise LcpcError(f"{printable(path)}: not an lcpc HLS export of format {VERSION}; export again")
    source = Path(record["source"]["folder"])
    manifest = mf.read(source)
    if hashlib.sha256((source / mf.MANIFEST).read_bytes()).hexdigest() != record["source"]["manifest_sha256"]:
        raise LcpcError(f"{printable(source / mf.MANIFEST)}: changed since the export to {printable(folder)}; "
                        f"run `lcpc export-hls` again")
    return record, manifest


# ----------------------------------------------------------------------------- compiling
def _bounded(cmd: list[str], cwd: Path, timeout: float, what: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; past ``timeout`` the whole group is killed."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise LcpcError(f"{what}: not done within {timeout:g} s; killed (raise --timeout)") from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _first_error(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "no output")


@dataclass
class Emulation:
    """One compiled project: its top function over float arrays."""

    stage: dict[str, Any]
    library: Any
    compile_s: float
    function: Any = field(init=False)

    def __post_init__(self) -> None:
        self.function = getattr(self.library, f"{self.stage['project']}_float")
        self.function.restype = None
        pointer = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
        self.function.argtypes = [pointer] * (len(self.stage["inputs"]) + len(self.stage["outputs"]))

    def __call__(self, values: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One sample: the stage's inputs (ONNX layout, batch 1) -> its outputs (ONNX layout)."""
        args = [np.ascontiguousarray(_to_project(values[i["name"]], i["layout"]), np.float32)
                for i in self.stage["inputs"]]
        outs = [np.zeros(int(np.prod(o["project_shape"])), np.float32) for o in self.stage["outputs"]]
        self.function(*args, *outs)
        return [_from_project(y.reshape(o["project_shape"]), o["layout"]) for y, o in zip(outs, self.stage["outputs"])]


def _to_project(x: np.ndarray, layout: str) -> np.ndarray:
    return x[0].transpose(1, 2, 0) if layout == "nhwc" else x[0]


def _from_project(y: np.ndarray, layout: str) -> np.ndarray:
    return (y.transpose(2, 0, 1) if layout == "nhwc" else y)[None]


def compile_project(folder: Path, stage: dict[str, Any], timeout: float = COMPILE_TIMEOUT) -> Emulation:
    """Build one project's emulation library with its ``build_lib.sh`` (bounded) and load it."""
    project = folder / stage["project"]
    what = f"{printable(project)}: compiling the C++ emulation"
    if shutil.which("g++") is None:
        raise LcpcError(f"{what} needs g++ (apt-get install g++)")
    if not (project / "build_lib.sh").is_file():
        raise LcpcError(f"{printable(project)}: no build_lib.sh; export again")
    for old in (project / "firmware").glob("*.so"):
        old.unlink()
    start = time.perf_counter()
    done = _bounded(["bash", "build_lib.sh"], project, timeout, what)
    seconds = time.perf_counter() - start
    libraries = sorted((project / "firmware").glob(f"{stage['project']}-*.so"))
    if done.returncode or not libraries:
        raise LcpcError(f"{what} failed: {printable(_first_error(done.stdout or ''), 300)}")
    try:
        library = ctypes.CDLL(str(libraries[-1].resolve()))
    except OSError as exc:
        raise LcpcError(f"{printable(libraries[-1])}: cannot load the emulation: {first_line(exc)}") from None
    return Emulation(stage, library, seconds)


# ----------------------------------------------------------------------------- running and comparing
def run_emulated(manifest: Manifest, source: Path, emulations: dict[str, Emulation], x: dict[str, np.ndarray],
                 ) -> dict[str, np.ndarray]:
    """The plan's outputs with the hardware stages emulated, sample by sample, in the one run order."""
    software = {s.id: open_stage(mf.read_stage(source, s), s, source / s.file)
                for s in manifest.stages if s.id not in emulations}

    def sample(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values: dict[tuple[int, str], np.ndarray] = {(0, k): v for k, v in feeds.items()}

        def run_level(stages: tuple[Stage, ...]) -> None:
            for stage in stages:
                here = {t.name: values[(stage.device, t.name)] for t in stage.inputs}
                outs = emulations[stage.id](here) if stage.id in emulations else \
                    software[stage.id].run([o.name for o in stage.outputs], here)
                values.update({(stage.device, o.name): v for o, v in zip(stage.outputs, outs)})

        def move(t: Transfer) -> None:
            values[(t.dst, t.dst_name)] = values[(t.src, t.src_name)]

        manifest.order.walk(run_level, move)
        return {o.name: values[(o.device, o.local_name)] for o in manifest.outputs}

    results = [sample({k: v[i:i + 1] for k, v in x.items()}) for i in range(len(next(iter(x.values()))))]
    return {o.name: np.concatenate([r[o.name] for r in results]) for o in manifest.outputs}


def compare(emulated: dict[str, np.ndarray], reference: dict[str, np.ndarray],
            labels: np.ndarray | None = None) -> dict[str, Any]:
    """Per model output: top-1 agreement and largest absolute error of the emulation against the float plan."""
    rows = {}
    for name, want in reference.items():
        got = emulated[name]
        flat_got, flat_want = got.reshape(len(got), -1), want.reshape(len(want), -1)
        row = {"samples": len(got), "top1_agreement": float((flat_got.argmax(1) == flat_want.argmax(1)).mean()),
               "max_abs_error": float(np.abs(flat_got - flat_want).max()),
               "max_abs_reference": float(np.abs(flat_want).max())}
        if labels is not None and len(labels) == len(got):
            row["float_accuracy"] = float((flat_want.argmax(1) == labels).mean())
            row["fpga_accuracy"] = float((flat_got.argmax(1) == labels).mean())
        rows[name] = row
    return rows


def verify(folder: str | Path, x: np.ndarray | dict[str, np.ndarray], labels: np.ndarray | None = None,
           timeout: float = COMPILE_TIMEOUT, progress: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Compile every project, run the plan emulated and in float on ``x``; the figures (see ``compare``)."""
    folder = Path(folder)
    record, manifest = read(folder)
    source = Path(record["source"]["folder"])
    with LocalEngine(source) as engine:
        feeds = x if isinstance(x, dict) else {engine.inputs[0].name: x}
        if len(engine.inputs) != 1 and not isinstance(x, dict):
            raise LcpcError(f"the model takes {len(engine.inputs)} inputs; pass them by name")
        engine.check_inputs(feeds)
        reference = engine.run(feeds)
    emulations = {}
    for stage in record["stages"]:
        if stage["kind"] == "hls":
            emulations[stage["id"]] = compile_project(folder, stage, timeout)
            if progress is not None:
                progress(stage["project"], emulations[stage["id"]].compile_s)
    start = time.perf_counter()
    emulated = run_emulated(manifest, source, emulations, feeds)
    return {"outputs": compare(emulated, reference, labels), "run_s": time.perf_counter() - start,
            "compile_s": {e.stage["project"]: e.compile_s for e in emulations.values()},
            "precision": record["precision"], "reuse": record["reuse"]}


# ----------------------------------------------------------------------------- C synthesis (Vitis HLS)
SYNTH_OPTIONS = "array set opt {\n reset 1\n csim 0\n synth 1\n cosim 0\n validation 0\n export 0\n vsynth 0\n" \
                " fifo_opt 0\n}\n"


def synthesize(folder: str | Path, timeout: float = 3600.0) -> dict[str, dict[str, Any]]:
    """Vitis HLS C synthesis of every project; per project its latency (cycles) and resources from the report."""
    folder = Path(folder)
    record, _ = read(folder)
    tool = shutil.which("vitis-run") or shutil.which("vitis_hls")
    if tool is None:
        raise LcpcError("--synth needs Vitis HLS (vitis-run or vitis_hls on PATH); the C++ emulation needs only g++")
    reports = {}
    for stage in record["stages"]:
        if stage["kind"] != "hls":
            continue
        project = folder / stage["project"]
        (project / "build_opt.tcl").write_text(SYNTH_OPTIONS)
        cmd = [tool, "--tcl", "build_prj.tcl", "--mode", "hls"] if tool.endswith("vitis-run") else \
            [tool, "-f", "build_prj.tcl"]
        done = _bounded(cmd, project, timeout, f"{printable(project)}: C synthesis")
        xml = project / f"{stage['project']}_prj" / "solution1" / "syn" / "report" / f"{stage['project']}_csynth.xml"
        if done.returncode or not xml.is_file():
            raise LcpcError(f"{printable(project)}: C synthesis failed: {printable(_first_error(done.stdout), 300)}")
        reports[stage["project"]] = read_synthesis_report(xml)
    return reports


def read_synthesis_report(path: Path) -> dict[str, Any]:
    """Latency (cycles, best and worst), interval, clock and resources of one ``*_csynth.xml``."""
    root = ET.parse(path).getroot()
    latency = root.find("./PerformanceEstimates/SummaryOfOverallLatency")
    timing = root.find("./PerformanceEstimates/SummaryOfTimingAnalysis/EstimatedClockPeriod")
    resources = root.find("./AreaEstimates/Resources")
    if latency is None or resources is None:
        raise LcpcError(f"{printable(path)}: no latency or resource summary in the synthesis report")

    def number(node: Any, tag: str) -> float | None:
        found = node.find(tag)
        try:
            return float(found.text) if found is not None and found.text else None
        except ValueError:
            return None

    return {"latency_best_cycles": number(latency, "Best-caseLatency"),
            "latency_worst_cycles": number(latency, "Worst-caseLatency"),
            "interval_cycles": number(latency, "Interval-min"),
            "clock_ns": float(timing.text) if timing is not None and timing.text else None,
            "resources": {("DSP" if c.tag == "DSP48E" else c.tag): int(float(c.text or 0)) for c in resources}}
