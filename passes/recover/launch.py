"""Several recovery processes, one per device (or CPU share): started by lcpc or by torchrun.

Guarantees:
- ``spawn(worker, job, procs, ...)`` starts ``procs`` processes (``torch.multiprocessing``,
  spawn); each joins one ``torch.distributed`` process group (NCCL on CUDA, gloo on the CPU) on
  a free local port, then calls ``worker(rank, procs, job, channel)``; process 0's return value
  comes back to the caller (through a file in a temporary folder that is always removed);
- under ``torchrun`` (``torchrun_rank()``: its RANK, WORLD_SIZE and LOCAL_RANK variables)
  ``join_group`` joins the group torchrun set up, and the caller runs the worker itself;
- every wait is bounded by ``timeout`` seconds: joining the group and every collective (the
  process group's timeout), and the caller's wait for word from the processes (process 0
  reports every step; silence for longer than ``timeout`` stops them all);
- a process that raises or dies ends the run: the others are stopped (SIGTERM, then SIGKILL
  after ``GRACE`` seconds) and one ``LcpcError`` line names the process and its error, or the
  signal or exit code it died of;
- Ctrl-C (SIGINT) reaches the processes (they share the terminal's process group, and the
  caller forwards it); they stop together at a step boundary, process 0 saves a checkpoint,
  and the caller raises ``lcpc.errors.Interrupted``; a second Ctrl-C stops them at once.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lcpc.errors import Interrupted, LcpcError
from lcpc.safety import first_line

GRACE = 5.0
RESULT = "result.pt"


class Channel:
    """What a worker tells the caller: progress (``send``) from process 0, errors from any."""

    def __init__(self, queue, rank: int) -> None:
        self.queue, self.rank = queue, rank

    def send(self, kind: str, *payload: Any) -> None:
        self.queue.put((kind, self.rank, payload))


class LocalChannel:
    """The channel of a worker that runs in the caller's process (torchrun, or one process)."""

    def __init__(self, on_message: Callable[[str, tuple], None] | None) -> None:
        self.on_message = on_message

    def send(self, kind: str, *payload: Any) -> None:
        if self.on_message is not None:
            self.on_message(kind, payload)


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process was started by torchrun, else None."""
    env = os.environ
    if all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")):
        try:
            return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
        except ValueError:
            raise LcpcError("torchrun: RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    return None


def device_of(kind: str, local_rank: int, procs: int = 1) -> torch.device:
    """The torch device process ``local_rank`` of ``procs`` trains on (``cuda``: one GPU each)."""
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise LcpcError("--train-device cuda: no CUDA GPU is visible to PyTorch here; pass --train-device cpu")
        if max(local_rank + 1, procs) > torch.cuda.device_count():
            raise LcpcError(f"--train-device cuda: {max(local_rank + 1, procs)} processes need as many GPUs, but "
                            f"{torch.cuda.device_count()} are visible; pass --procs {torch.cuda.device_count()} or "
                            f"fewer")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def join_group(kind: str, rank: int, world: int, timeout: float, init_method: str = "env://") -> None:
    """Join the process group: NCCL for CUDA, gloo for the CPU; every collective times out."""
    backend = "nccl" if kind == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
    except Exception as exc:
        raise LcpcError(f"recovery process {rank}: could not join the {backend} process group of {world} "
                        f"within {timeout:.0f} s ({first_line(exc)})") from None


def leave_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, worker, job, procs: int, kind: str, port: int, timeout: float, threads: int, queue,
           folder: str) -> None:
    channel = Channel(queue, rank)
    try:
        torch.set_num_threads(max(1, threads))
        join_group(kind, rank, procs, timeout, f"tcp://127.0.0.1:{port}")
        result = worker(rank, procs, job, channel)
        if rank == 0:
            torch.save(result, Path(folder) / RESULT)
    except Interrupted as exc:  # stopped together at a step boundary: not a failure
        channel.send("interrupted", str(exc))
    except LcpcError as exc:
        channel.send("error", str(exc))
        sys.exit(1)
    except Exception as exc:  # a bug: still one line in the caller
        channel.send("error", f"internal error: {type(exc).__name__}: {first_line(exc)}")
        sys.exit(1)
    finally:
        leave_group()


def spawn(worker: Callable, job: Any, procs: int, kind: str, *, timeout: float, threads: int,
          on_message: Callable[[str, tuple], None] | None = None) -> Any:
    """Run ``worker`` in ``procs`` new processes (see the module docstring); process 0's result."""
    folder = tempfile.mkdtemp(prefix="lcpc-recover-")
    queue = mp.get_context("spawn").SimpleQueue()
    interrupted = False
    try:
        context = mp.start_processes(_entry, args=(worker, job, procs, kind, _free_port(), timeout, threads,
                                                   queue, folder),
                                     nprocs=procs, join=False, start_method="spawn")
        errors: dict[int, str] = {}
        stopped: dict[int, str] = {}
        heard = time.monotonic()

        def handle(kind_: str, rank: int, payload: tuple) -> None:
            nonlocal heard
            heard = time.monotonic()
            if kind_ == "error":
                errors[rank] = payload[0]
            elif kind_ == "interrupted":
                stopped[rank] = payload[0]
            elif on_message is not None:
                on_message(kind_, payload)

        try:
            while True:
                try:
                    _drain(queue, handle)
                    if context.join(timeout=0.2, grace_period=GRACE):
                        break
                except KeyboardInterrupt:
                    if interrupted:  # the second Ctrl-C: stop them now
                        raise Interrupted("recovery stopped at once (second Ctrl-C); the last epoch's checkpoint, "
                                          "if any, is kept") from None
                    interrupted = True
                    heard = time.monotonic()
                    _stop(context, signal.SIGINT)  # they save and stop at the next step boundary
                    continue
                except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:
                    _drain(queue, handle, wait=1.0)
                    raise LcpcError(_failure(context, exc, errors, procs)) from None
                if time.monotonic() - heard > timeout:
                    raise LcpcError(f"recovery processes: no word from process 0 for {timeout:.0f} s (waiting for "
                                    f"its next step or evaluation); stopped all {procs}. Raise --timeout if an "
                                    f"epoch's evaluation takes longer")
        except BaseException:  # whatever ends the wait (an error, a callback that raised): no process outlives it
            _stop(context, signal.SIGKILL)
            raise
        _drain(queue, handle)
        if stopped:
            raise Interrupted(stopped.get(0) or next(iter(stopped.values())))
        path = Path(folder) / RESULT
        if not path.is_file() and interrupted:
            raise Interrupted("recovery stopped (Ctrl-C) before its first step; nothing to keep")
        if not path.is_file():
            raise LcpcError("recovery processes ended without a result from process 0")
        return torch.load(path, map_location="cpu", weights_only=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _stop(context, sig: int) -> None:
    for process in context.processes:
        if process.is_alive() and process.pid is not None:
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                pass
    if sig == signal.SIGKILL:
        for process in context.processes:
            process.join(GRACE)


def _drain(queue, handle: Callable[[str, int, tuple], None], wait: float = 0.0) -> None:
    """Hand every message waiting in ``queue`` to ``handle``; with ``wait``, keep listening that long
    (a process that failed may still be writing its error)."""
    deadline = time.monotonic() + wait
    while True:
        while not queue.empty():
            handle(*queue.get())
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def _failure(context, exc, errors: dict[int, str], procs: int) -> str:
    """One line on why the run failed: a process killed by a signal other than the SIGTERM that
    stops the rest (the cause; its peers then fail of a broken collective), else the error the
    failing process reported, else how it exited."""
    for rank, process in enumerate(context.processes):
        code = process.exitcode
        if code is not None and code < 0 and -code != signal.SIGTERM and rank not in errors:
            return f"recovery process {rank} of {procs} failed: it was killed by {signal.Signals(-code).name}"
    rank = exc.error_index
    if rank in errors:
        return f"recovery process {rank} of {procs} failed: {errors[rank]}"
    if isinstance(exc, mp.ProcessExitedException):
        return f"recovery process {rank} of {procs} failed: {_death(exc)}"
    return f"recovery process {rank} of {procs} failed: {_last_line(str(exc))}"


def _death(exc) -> str:
    name = getattr(exc, "signal_name", None)
    return f"it was killed by {name}" if name else f"it exited with code {exc.exit_code}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no detail"
