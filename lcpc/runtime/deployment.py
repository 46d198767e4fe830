"""``lcpc.Deployment``: a converted folder kept warm, answering a stream of requests.

    with lcpc.Deployment("out/digits", engine="ray") as dep:
        logits = dep(x)["logits"]                      # one request from Python
        report = dep.serve(requests_from_npy(batch))   # a stream: latency percentiles

Guarantees:
- one engine (``local``, ``ray`` or ``mpi``, opened by ``engine.open_engine``) is opened once
  and reused for every request;
- every request has an id; a request that fails (an actor died, a node left, a
  timeout) is recorded as a ``Failure`` with its id and the engine's one-line message
  naming the device; the engine then rebuilds what died (``rebuild``: dead Ray actors, or a
  new MPI job) and the stream
  goes on; the failed request's input stays with the caller's request (``Request``);
- with ``deadline`` (seconds, Ray), a request whose branch device is late or dead is
  answered from the branches that came in time (``runtime.degrade``) instead of failing,
  and the dead device's actor is rebuilt in the background; ``without`` leaves devices out
  of every request on purpose. Each degraded answer is recorded (``ServeReport.degraded``:
  request id -> devices it was made without);
- ``serve`` returns a ``ServeReport`` with every latency, the failures, the degraded
  answers, the devices rebuilt, throughput and p50/p90/p99, and calls ``on_result`` per
  request (a progress bar, a writer);
- leaving the ``with`` block, or Ctrl-C inside ``serve``, closes the engine, which
  shuts down the Ray it started.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lcpc import safety
from lcpc.errors import LcpcError
from lcpc.images import Preprocessing, image_files, load_folder, read_file
from lcpc.runtime.engine import open_engine
from lcpc.runtime.feeds import Stats, encoded
from lcpc.runtime.manifest import Manifest


@dataclass(frozen=True)
class Request:
    id: Any
    feeds: dict[str, np.ndarray]


@dataclass(frozen=True)
class Failure:
    request: Any
    message: str
    rebuilt: tuple[str, ...] = ()


@dataclass
class ServeReport:
    latencies: list[float] = field(default_factory=list)   # seconds, answered requests only
    failures: list[Failure] = field(default_factory=list)
    degraded: dict[Any, tuple[str, ...]] = field(default_factory=dict)  # request -> devices it was answered without
    rebuilt: list[str] = field(default_factory=list)        # devices whose actor was rebuilt, in order
    wall: float = 0.0
    interrupted: bool = False

    @property
    def answered(self) -> int:
        return len(self.latencies)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    @property
    def throughput(self) -> float:
        return self.answered / self.wall if self.wall > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"answered": self.answered, "failed": [f.request for f in self.failures],
                "failures": [{"request": f.request, "message": f.message, "rebuilt": list(f.rebuilt)}
                             for f in self.failures],
                "degraded": [{"request": r, "without": list(d)} for r, d in self.degraded.items()],
                "rebuilt": list(self.rebuilt),
                "p50_ms": 1e3 * self.percentile(50), "p90_ms": 1e3 * self.percentile(90),
                "p99_ms": 1e3 * self.percentile(99), "throughput_per_s": self.throughput,
                "wall_s": self.wall, "interrupted": self.interrupted}


class Deployment:
    """A warm engine for one converted folder (see the module docstring)."""

    def __init__(self, folder: str | Path, engine: str = "local", *, address: str | None = None,
                 devices: str | Path | None = None, timeout: float | None = None, deadline: float | None = None,
                 without: Iterable[str] = (), hostfile: str | Path | None = None) -> None:
        self.folder = Path(folder)
        self.engine = open_engine(self.folder, engine, address=address, devices=devices, timeout=timeout,
                                  deadline=deadline, hostfile=hostfile)
        self.without = tuple(without)
        self.engine.device_ids(self.without)  # refused now, not at the first request
        self.stats = Stats()
        self._next = 0

    @property
    def manifest(self) -> Manifest:
        return self.engine.manifest

    @property
    def describe(self) -> str:
        return self.engine.describe

    def feeds(self, x: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if isinstance(x, dict):
            return x
        names = [i.name for i in self.engine.inputs]
        if len(names) != 1:
            raise LcpcError(f"the model takes inputs {', '.join(names)}; pass a dict of arrays")
        return {names[0]: x}

    def __call__(self, x: np.ndarray | dict[str, np.ndarray], request: Any = None) -> dict[str, np.ndarray]:
        """Answer one request (raises ``LcpcError`` when it fails; the deployment stays usable)."""
        try:
            return self.engine.run(self.feeds(x), self.stats, request=self._take_id(request), without=self.without)
        except LcpcError:
            self.rebuild()
            raise

    def rebuild(self) -> tuple[str, ...]:
        """Replace what died (Ray actors); returns the devices rebuilt."""
        return tuple(self.engine.rebuild())

    def _take_id(self, request: Any) -> Any:
        if request is None:
            request, self._next = self._next, self._next + 1
        return request

    def serve(self, requests: Iterable[Request | np.ndarray],
              on_result: Callable[[Any, dict | None, float | Failure], None] | None = None) -> ServeReport:
        """Answer every request in order; failures are recorded, not raised."""
        report = ServeReport()
        start = time.perf_counter()
        try:
            for item in requests:
                req = item if isinstance(item, Request) else Request(self._take_id(None), self.feeds(item))
                self.engine.check_inputs(req.feeds)
                t0 = time.perf_counter()
                try:
                    out = self.engine.run(req.feeds, self.stats, request=req.id, without=self.without)
                except LcpcError as exc:
                    failure = Failure(req.id, str(exc), self.rebuild())
                    report.failures.append(failure)
                    if on_result:
                        on_result(req.id, None, failure)
                    continue
                report.latencies.append(time.perf_counter() - t0)
                if req.id in self.stats.degraded:
                    report.degraded[req.id] = self.stats.degraded[req.id]
                if on_result:
                    on_result(req.id, out, report.latencies[-1])
        except KeyboardInterrupt:
            report.interrupted = True
        report.wall = time.perf_counter() - start
        report.rebuilt = list(self.engine.rebuilt)
        return report

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def requests_from_array(x: np.ndarray, name: str, planned_batch: int = 1) -> Iterator[Request]:
    """One request per planned batch of ``x`` (ids 0, 1, ...)."""
    for i in range(0, len(x) - len(x) % planned_batch, planned_batch):
        yield Request(i // planned_batch, {name: x[i:i + planned_batch]})


def requests_from_source(source: str | Path, manifest: Manifest, repeat: int = 1) -> tuple[list, int]:
    """Requests from a .npy batch or a folder of images (ids: file names for images);
    returns (requests, count). Images are read with the manifest's preprocessing, or, for a
    folder fed image files, sent as the files' bytes."""
    source = Path(source)
    spec = manifest.feeds
    if len(spec) != 1:
        raise LcpcError(f"{source}: serve streams single-input models; this one takes "
                        f"{', '.join(i.name for i in spec)}")
    name, batch = spec[0].name, spec[0].shape[0]
    if manifest.encoded:  # the files themselves travel: read, never decoded here
        if not source.is_dir():
            raise LcpcError(f"{source}: this folder is fed image files (convert --input-wire encoded); pass a folder "
                            f"of JPEG or PNG images")
        base = [Request(p.name, {name: encoded(read_file(source, p))}) for p in image_files(source)]
    elif source.is_dir():
        if manifest.preprocessing is None:
            raise LcpcError(f"{source}: an image folder needs the preprocessing, which the manifest does not "
                            f"record; convert with --preprocess")
        x, files = load_folder(source, Preprocessing.from_dict(dict(manifest.preprocessing)),
                               raw=manifest.takes_raw_images)
        ids = [Path(f).name for f in files]
    elif source.is_file():
        loaded = safety.load_array(source)
        if not isinstance(loaded, np.ndarray):
            raise LcpcError(f"{source}: expected one array in a .npy file")
        x, ids = loaded, None
    else:
        raise LcpcError(f"{source}: no such file or folder")
    if not manifest.encoded:
        base = list(requests_from_array(x, name, batch))
        if ids is not None and batch == 1:
            base = [Request(ids[r.id], r.feeds) for r in base]
    reqs = base if repeat == 1 else [Request(f"{r.id}#{k}", r.feeds) for k in range(repeat) for r in base]
    return reqs, len(reqs)
