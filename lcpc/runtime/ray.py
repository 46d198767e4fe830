"""Engine ``ray``: run an lcpc output folder with one Ray actor per manifest device.

Guarantees:
- one actor per device, placed with the Ray custom resource ``devices.yaml`` names for
  it (default: the device's own name, e.g. ``dev1``); when Ray is started here (no
  ``address``) the local node gets every such resource, so all actors run locally;
  on an existing cluster without those resources and no ``devices.yaml``, the actors
  are pinned to this node; a ``devices.yaml`` resource the cluster lacks is an
  ``LcpcError`` naming the device and the resource;
- actors get the stage files' checked bytes (``manifest.read_stage``) from the driver,
  so remote nodes need no copy of the folder; each builds its sessions with
  ``lcpc.runtime.session.open_stage`` (same checks as the local engine);
- execution follows the one run order (``Manifest.order.steps()``, the order the local
  engine walks): one actor call per device per level; a value sent to another device is the return value of
  the sender's call, passed as an ``ObjectRef`` argument to the receiver's next call,
  so Ray moves every byte; lcpc opens no socket. The model input goes by value when it
  is smaller than Ray's inline limit (``INLINE_BYTES``, 100 KiB: Ray inlines it in each
  receiving device's call, one copy per device from the driver on dev0's node; putting it
  in the object store instead costs each receiver an extra location lookup and pull, two
  more round trips over the network), else it is put in the object
  store once and every device that receives it pulls it from there (one point-to-point
  copy per receiving device). With ``broadcast: tree`` a receiver's ``forward`` call
  re-issues the input as its own message, which the next receivers of the binomial tree
  (``Manifest.broadcast_edges``) get: a large input lands in that node's object store and is
  pulled from there, not from the head's; a small one still travels inline via the driver;
- a folder fed image files sends the file's bytes; each device decodes them on receipt;
- the receiving actor counts the bytes of every value it receives, by transfer id, so
  ``Stats`` equals the manifest transfer by transfer, exactly as with the local engine;
- ``timeout`` is a number of seconds in (0, ``MAX_TIMEOUT``]; an ``address`` is checked before
  Ray is asked to join it (Ray's own connect retries last minutes): it must read HOST:PORT,
  ray://HOST:PORT, auto or local, and a HOST:PORT must accept a TCP connection and answer as a
  Ray GCS (one ``GetClusterId`` call over gRPC) within ``REACH_SECONDS`` (``reach``), else one
  ``LcpcError`` names the address and why; apart from this check (and ``lcpc probe``), lcpc opens
  no socket;
- every wait has a timeout: a request that does not finish within ``timeout`` seconds,
  or whose actor dies, ends in one ``LcpcError`` naming the request id and the device
  (dead, or not answering); ``rebuild`` replaces dead actors so later requests run;
- ``close`` kills the actors and shuts Ray down when this engine started it.

Modes (``mode``, printed by ``describe``): ``actor-calls`` (the calls above; the default of this class
and of ``lcpc serve``, whose ``rebuild`` after a fault needs them) or
``compiled-graph``: the same schedule as one Ray Compiled Graph (``ray.dag``,
``experimental_compile``; ``compiled_graph``), messages through compiled-graph channels,
bytes still counted by the receiving actor per transfer id, every wait bounded by the timeout.
``auto`` (the default of ``lcpc run``) compiles and falls back to actor calls (saying why) when Ray
cannot compile it. A
compiled graph that fails on a request (dead actor, timeout) is torn down and the engine
refuses further requests with a message to start it again (``rebuild`` after a fault is
for actor calls, which ``lcpc serve`` uses). benchmarks/ray_overhead.py measures both.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np

from lcpc.errors import LcpcError
from lcpc.images import Preprocessing, decode
from lcpc.perf import devices as dv
from lcpc.runtime import manifest as mf
from lcpc.runtime.coding import pack, unpack
from lcpc.runtime.degrade import HEAD, Merge
from lcpc.runtime.engine import Engine
from lcpc.runtime.feeds import Stats
from lcpc.runtime.manifest import Manifest, Stage, Transfer
from lcpc.runtime.session import open_stage
from lcpc.safety import first_line

INSTALL_HINT = "the ray engine needs Ray: pip install 'lcpc[ray]'"
INLINE_BYTES = 100 * 1024  # Ray's max_direct_call_object_size default: smaller values travel inline
MAX_TIMEOUT = 1e6          # seconds (11 days); Ray turns timeouts into int64 milliseconds
REACH_SECONDS = 3.0        # how long an --address may take to answer before lcpc gives up on it

try:
    import grpc  # Ray's RPC library, a dependency of Ray
    import ray
    from ray._private.services import canonicalize_bootstrap_address
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    from ray.dag import InputNode, MultiOutputNode
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError:  # optional extra
    ray = None  # type: ignore[assignment]


def require_ray() -> None:
    if ray is None:
        raise LcpcError(INSTALL_HINT)


def check_timeout(timeout: Any) -> float:
    """``timeout`` as seconds, or an ``LcpcError`` when it is not a number in (0, ``MAX_TIMEOUT``]."""
    ok = isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and math.isfinite(timeout)
    if not ok or not 0 < timeout <= MAX_TIMEOUT:
        raise LcpcError(f"--timeout {timeout}: the seconds a request may take must be a number above 0 and at "
                        f"most {MAX_TIMEOUT:g}")
    return float(timeout)


def reach(address: str, seconds: float = REACH_SECONDS) -> None:
    """Refuse an ``address`` that is malformed, or where nothing speaking gRPC answers within
    ``seconds`` (see the module docstring); ``auto`` and ``local`` are Ray's to resolve."""
    if address in ("auto", "local"):
        return
    client = address.startswith("ray://")
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise LcpcError(f"--address {address}: expected HOST:PORT (the head node's GCS port, e.g. 10.0.0.5:6379), "
                        f"ray://HOST:PORT, auto or local")
    if not client:  # where Ray itself will connect (it maps localhost to this node's address)
        try:
            canonical = canonicalize_bootstrap_address(f"{host}:{port}") or ""
        except Exception:  # Ray's own parser refused it: probe the address as given
            canonical = ""
        if canonical.rpartition(":")[0]:
            host, _, port = canonical.rpartition(":")
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as exc:
        raise LcpcError(f"cannot reach Ray at {address}: {exc.strerror or 'no answer'} within {seconds:g} s "
                        f"(is `ray start --head` running there, and is the port open?)") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # a TLS cluster: the plain channel below could not tell
    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        if client:  # a Ray Client server: that it speaks gRPC is all one can ask without joining
            grpc.channel_ready_future(channel).result(timeout=seconds)
        else:  # a GCS answers GetClusterId (or asks for the token ray.init will send); others do not know it
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=seconds)  # type: ignore[attr-defined]
    except grpc.FutureTimeoutError:
        raise LcpcError(f"{address} accepts connections but does not answer as a Ray cluster within {seconds:g} s "
                        f"(no gRPC); pass the address `ray status` prints on the head node") from None
    except grpc.RpcError as exc:
        if exc.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise LcpcError(f"{address} accepts connections but does not answer as a Ray cluster's GCS "
                            f"({exc.code().name.lower()}); pass the address `ray status` prints on the head "
                            f"node") from None
    finally:
        channel.close()


class DeviceWorker:
    """The per-device actor body: sessions for the device's stages, a value store per request."""

    def __init__(self, device: int, stages: list[Stage], blobs: dict[str, bytes], folder: str,
                 merge: Merge | None = None, images: tuple[dict, set[str]] | None = None,
                 coded: tuple[set[str], dict[str, tuple[tuple[int, ...], str]]] | None = None) -> None:
        self.device = device
        self.merge = merge  # the head's: how to answer when contributions are missing
        # a folder fed image files: the preprocessing and the names that arrive as files, decoded here
        self.prep = Preprocessing.from_dict(images[0]) if images else None
        self.files = images[1] if images else set()
        # entropy-coded messages: the names this device sends coded, and those it receives coded (shape, dtype)
        self.packs, self.unpacks = coded or (set(), {})
        self.stages = {s.id: s for s in stages}
        self.sessions = {s.id: open_stage(blobs[s.id], s, f"{folder}/{s.file}") for s in stages}
        self.folder = folder
        self.store: dict[Any, dict[str, np.ndarray]] = {}
        self.counts: dict[Any, dict[int, int]] = {}

    def ping(self) -> int:
        return os.getpid()

    def _receive(self, rid: Any, maps: list[list[tuple]], refs: tuple) -> dict[str, np.ndarray]:
        values = self.store.setdefault(rid, {})
        counts = self.counts.setdefault(rid, defaultdict(int))
        for mapping, message in zip(maps, refs):
            for src, dst, tid in mapping:
                if dst in self.files and self.prep is not None:  # an image file: decoded on this device
                    values[dst] = decode(message[src].tobytes(), self.prep, f"{self.device}: the image")
                elif dst in self.unpacks:
                    values[dst] = unpack(message[src], *self.unpacks[dst], f"dev{self.device}: {dst}")
                else:
                    # a copy: a compiled-graph channel hands out views of its buffer, and holding one
                    # would keep the sender from writing the next request's value
                    values[dst] = np.array(message[src], copy=True)
                if tid is not None:
                    counts[tid] += message[src].nbytes
        return values

    def step(self, rid: Any, stage_ids: list[str], sends: list[list[str]], maps: list[list[tuple]], *refs,
             missing: tuple[int, ...] = ()):
        """Store what arrived, run this level's stages, return one message per destination. ``missing``
        (the head's merge step): devices whose contributions did not come, filled in by ``merge``."""
        values = self._receive(rid, maps, refs)
        if missing and self.merge is not None:
            values.update(self.merge.fill(values, missing))
        for sid in stage_ids:
            stage = self.stages[sid]
            feeds = {i.name: values[i.name] for i in stage.inputs}
            try:
                outs = self.sessions[sid].run([o.name for o in stage.outputs], feeds)
            except Exception as exc:
                raise LcpcError(f"{self.folder}/{stage.file}: stage {sid} failed in onnxruntime: "
                                f"{first_line(exc)}") from None
            values.update(zip((o.name for o in stage.outputs), outs))
        messages = [{name: pack(values[name]) if name in self.packs else values[name] for name in names}
                    for names in sends]
        return messages[0] if len(messages) == 1 else tuple(messages) if messages else None

    def last_step(self, rid: Any, stage_ids: list[str], sends: list[list[str]], outputs: list[str],
                  maps: list[list[tuple]], *refs, missing: tuple[int, ...] = ()):
        """``step``, then ``finish`` with nothing more to receive: the messages, then the result."""
        messages = self.step(rid, stage_ids, sends, maps, *refs, missing=missing)
        messages = [] if messages is None else [messages] if len(sends) == 1 else list(messages)
        result = self.finish(rid, outputs, [])
        return tuple(messages) + (result,) if messages else result

    def finish(self, rid: Any, outputs: list[str], maps: list[list[tuple]], *refs):
        """Store what arrived last, return (model outputs held here, bytes received by transfer id)."""
        values = self._receive(rid, maps, refs)
        result = {name: values[name] for name in outputs}
        self.store.pop(rid, None)
        return result, dict(self.counts.pop(rid, {}))

    def forward(self, message: Any) -> Any:
        """The model input this device received, as a new message of its own (a broadcast tree: a large
        one lands in this node's object store, and the next receiver pulls it from here)."""
        return message

    def drop(self, rid: Any) -> None:
        self.store.pop(rid, None)
        self.counts.pop(rid, None)


MODES = ("actor-calls", "compiled-graph", "auto")
RID_COMPILED = "compiled"  # one request at a time flows through a compiled graph


class RayEngine(Engine):
    """Runs a manifest on Ray actors; reuse one engine for many requests."""

    @property
    def describe(self) -> str:
        why = f"; compiled graph unavailable: {self.fallback}" if self.fallback else ""
        return f"ray ({self.mode}{why})"

    def __init__(self, folder: str | Path, address: str | None = None, devices: str | Path | None = None,
                 timeout: float = 60.0, mode: str = "actor-calls", deadline: float | None = None) -> None:
        """``deadline`` (seconds, per request): answer from the branches that have answered by then
        when a device is late or dead, for a plan that can (``runtime.degrade``), and rebuild a dead
        device's actor in the background; without it a late or dead device fails the request."""
        if mode not in MODES:
            raise LcpcError(f"ray mode '{mode}': choose {', '.join(MODES)}")
        if deadline is not None and mode != "actor-calls":
            raise LcpcError("--deadline needs --ray-mode actor-calls: a compiled graph waits on every device")
        timeout = check_timeout(timeout)
        require_ray()
        super().__init__(folder)
        self.network = dv.load(devices)
        self.network.check_names(d.name for d in self.manifest.devices)
        self.explicit_devices = devices is not None
        self.timeout = float(timeout)
        self.deadline = deadline
        self.pending: dict[int, Any] = {}   # device -> ping of the actor being rebuilt for it
        self.blobs = {s.id: mf.read_stage(self.folder, s) for s in self.manifest.stages}
        self.names = self.manifest.names
        self.owns_ray = False
        self._ids = itertools.count()
        self._start_ray(address)
        self._worker_cls = ray.remote(num_cpus=0, max_restarts=0)(DeviceWorker)
        self.actors: dict[int, Any] = {}
        self.mode = "actor-calls"
        self.fallback: str | None = None   # why the compiled graph is not used, when asked for
        self.graph: Any = None             # the compiled graph, when used
        try:
            for d in self.names:
                self.actors[d] = self._spawn(d)
            self._wait([(d, a.ping.remote()) for d, a in self.actors.items()], "starting the actors")
            if mode != "actor-calls":
                self._compile(required=mode == "compiled-graph")
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup
    def _resource(self, d: int) -> str:
        return self.network.device(self.names[d]).resource

    def _start_ray(self, address: str | None) -> None:
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if address is None:
                kwargs["resources"] = {self._resource(d): float(len(self.names)) for d in self.names}
            else:
                reach(address, min(REACH_SECONDS, self.timeout))
            try:
                ray.init(address=address, **kwargs)
            except Exception as exc:
                raise LcpcError(f"cannot start or reach Ray{f' at {address}' if address else ''}: "
                                f"{first_line(exc)}") from None
            self.owns_ray = True
        have = ray.cluster_resources()
        missing = {self.names[d]: self._resource(d) for d in self.names if have.get(self._resource(d), 0) <= 0}
        if missing and self.explicit_devices:
            name, res = next(iter(missing.items()))
            raise LcpcError(f"{self.network.source}: device {name} wants Ray resource '{res}', which no node of "
                            f"the cluster has; start that node with `ray start --resources '{{\"{res}\": 1}}'`")
        self.pin_local = bool(missing)

    def _spawn(self, d: int):
        stages = list(self.manifest.stages_on(d))
        options: dict[str, Any]
        if self.pin_local:
            options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                             soft=False)}
        else:
            options = {"resources": {self._resource(d): 0.001}}
        images = None
        if self.manifest.encoded:
            files = {t.dst_name for t in self.manifest.transfers if t.encoded and t.dst == d}
            images = (dict(self.manifest.preprocessing or {}),
                      files | ({f.name for f in self.manifest.feeds} if d == HEAD else set()))
        coded = ({t.src_name for t in self.manifest.transfers if t.coding and t.src == d},
                 {t.dst_name: (t.shape, t.dtype) for t in self.manifest.transfers if t.coding and t.dst == d})
        return self._worker_cls.options(name=None, **options).remote(
            d, stages, {s.id: self.blobs[s.id] for s in stages}, str(self.folder),
            self.manifest.merge[0] if d == HEAD else None, images, coded)

    # ------------------------------------------------------------------ running
    def run(self, feeds: dict[str, np.ndarray], stats: Stats | None = None, request: Any = None,
            without: Collection[str] = ()) -> dict[str, np.ndarray]:
        return super().run(feeds, stats, next(self._ids) if request is None else request, without)

    def _run_once(self, feeds: dict[str, np.ndarray], stats: Stats | None, rid: Any,
                  missing: frozenset[int]) -> tuple[dict[str, np.ndarray], frozenset[int]]:
        if self.graph is not None:
            if missing:
                raise LcpcError(f"request {rid}: a compiled graph runs every device; leave devices out with "
                                f"--ray-mode actor-calls")
            return self._run_compiled(feeds, stats, rid), missing
        if self.fallback == "it failed on a request":
            raise LcpcError(f"request {rid}: the compiled graph failed on an earlier request; start the engine "
                            f"again")
        # small: by value, inlined in each receiving device's call; large: one object put once, pulled by each
        message = feeds if sum(v.nbytes for v in feeds.values()) < INLINE_BYTES else ray.put(feeds)
        merge, _ = self.manifest.merge
        degrading = merge is not None and (bool(missing) or self.deadline is not None)
        lost = set(missing | self._rebuilding()) if degrading else set()
        start = time.monotonic()

        def merge_call(method, n: int, args: list, messages: list[tuple[Any, list, int | None]]) -> list:
            """The head's merge step, called with the contributions that came in time (``deadline``)."""
            waiting = [(src, ref) for ref, _, src in messages if src not in (None, HEAD)]
            budget = self.timeout if self.deadline is None else self.deadline
            ready, _ = ray.wait([r for _, r in waiting], num_returns=len(waiting),
                                timeout=max(budget - (time.monotonic() - start), 0.0))
            for src, ref in waiting:
                if ref not in ready:
                    lost.add(src)  # late
                elif self._died(ref):
                    lost.add(src)
                    self._rebuild_later(src)
            given = [(ref, mapping) for ref, mapping, src in messages if src not in lost]
            return _remote(method, n, *args, [m for _, m in given], *[r for r, _ in given],
                           missing=tuple(sorted(lost)))

        results, leaves = issue(self.manifest, self.actors, rid, message, _remote, skip=frozenset(lost),
                                merge_call=merge_call if degrading else None)
        kept = [(d, ref) for d, ref in results.items() if d not in lost]
        done = self._wait(kept + [(d, ref) for d, ref in leaves if d not in lost], f"request {rid}", rid)
        return self._collect({d: r for (d, _), r in zip(kept, done)}, stats), frozenset(lost)

    def _died(self, ref: Any) -> bool:
        """Whether a finished call failed because its actor died (its process or node went away)."""
        try:
            ray.get(ref, timeout=0)
        except RayActorError:
            return True
        except Exception:
            return False
        return False

    def _rebuild_later(self, d: int) -> None:
        """Start a new actor for dead device ``d``; requests leave ``d`` out until it answers a ping."""
        if d in self.pending:
            return
        try:
            ray.kill(self.actors[d], no_restart=True)
        except Exception:
            pass
        self.actors[d] = self._spawn(d)
        self.pending[d] = self.actors[d].ping.remote()

    def _rebuilding(self) -> set[int]:
        """The devices whose new actor has not answered yet (those that have are back in use)."""
        for d, ping in list(self.pending.items()):
            ready, _ = ray.wait([ping], timeout=0)
            if ready and not self._died(ping):
                del self.pending[d]
                self.rebuilt.append(self.names[d])
            elif ready:  # the new actor died too: try again
                del self.pending[d]
                self._rebuild_later(d)
        return set(self.pending)

    def _collect(self, done: dict[int, tuple[dict, dict]], stats: Stats | None) -> dict[str, np.ndarray]:
        """The model outputs from each device's (outputs held there, bytes received by transfer id)."""
        if stats is not None:
            received: dict[int, int] = defaultdict(int)
            for _, counts in done.values():
                for tid, n in counts.items():
                    received[tid] += n
            stats.add(received)
        # a copy: a compiled-graph channel hands out views of its buffer
        return {o.name: np.array(done[o.device][0][o.local_name], copy=True) for o in self.manifest.outputs}

    # ------------------------------------------------------------------ compiled graph
    def _compile(self, required: bool) -> None:
        """Build the schedule as one Ray Compiled Graph; on failure, actor calls (or an error if ``required``)."""
        try:
            self.graph = compiled_graph(self.manifest, self.actors)
            self.mode = "compiled-graph"
        except Exception as exc:
            self.graph = None
            self.fallback = first_line(exc)
            if required:
                raise LcpcError(f"cannot build the Ray compiled graph: {self.fallback}; use the actor calls "
                                f"(--ray-mode actor-calls)") from None

    def _run_compiled(self, feeds: dict[str, np.ndarray], stats: Stats | None, rid: Any) -> dict[str, np.ndarray]:
        devices = sorted(self.names)
        try:
            refs = self.graph.execute(feeds)
        except Exception as exc:
            self._break()
            raise LcpcError(f"request {rid}: the compiled graph cannot take it ({first_line(exc)}); "
                            f"start the engine again") from None
        done, deadline = {}, time.monotonic() + self.timeout
        for d, ref in zip(devices, refs):
            try:
                done[d] = ray.get(ref, timeout=max(deadline - time.monotonic(), 0.001))
            except Exception as exc:
                self._break()
                cause = getattr(exc, "cause", None)
                if isinstance(cause, LcpcError):
                    raise LcpcError(f"request {rid}: {cause}") from None
                what = (f"no answer from {self.names[d]} within {self.timeout:g} s" if isinstance(exc, TimeoutError)
                        else f"waiting for {self.names[d]}, an actor of the graph died")
                raise LcpcError(f"request {rid}: {what} in the compiled graph ({type(exc).__name__}: "
                                f"{first_line(exc)}); start the engine again, or use --ray-mode actor-calls") from None
        try:
            for ref in refs[len(devices):]:  # the steps that send nothing: read so the next request can run
                ray.get(ref, timeout=max(deadline - time.monotonic(), 0.001))
        except Exception as exc:
            self._break()
            raise LcpcError(f"request {rid}: the compiled graph did not finish within {self.timeout:g} s "
                            f"({type(exc).__name__}); start the engine again") from None
        return self._collect(done, stats)

    def _break(self) -> None:
        """Tear down a compiled graph that failed (bounded by Ray's teardown timeout); later calls refuse."""
        self._teardown()
        self.mode, self.fallback = "actor-calls", "it failed on a request"

    def _teardown(self) -> None:
        graph, self.graph = self.graph, None
        if graph is not None:
            try:
                graph.teardown()
            except Exception:
                pass

    # ------------------------------------------------------------------ faults
    def _wait(self, refs: list[tuple[int, Any]], what: str, rid: Any = None) -> list[Any]:
        """``ray.get`` of refs, each from one device, bounded by the timeout; failures name the device."""
        try:
            return ray.get([r for _, r in refs], timeout=self.timeout)
        except GetTimeoutError:
            ready, _ = ray.wait([r for _, r in refs], num_returns=len(refs), timeout=0)
            late = sorted({self.names[d] for d, r in refs if r not in ready})
            self._forget(rid)
            raise LcpcError(f"{what}: no answer within {self.timeout:g} s from {', '.join(late)} "
                            f"(waited on {'their' if len(late) > 1 else 'its'} actor; raise --timeout or check "
                            f"the node)") from None
        except RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
            if isinstance(cause, LcpcError):
                self._forget(rid)
                raise LcpcError(f"{what}: {cause}") from None
            if not isinstance(cause, RayActorError):
                self._forget(rid)
                raise LcpcError(f"{what}: failed on a device: {first_line(cause)}") from None
        except RayActorError:
            pass
        dead = self.dead_devices()
        self._forget(rid)
        names = ", ".join(self.names[d] for d in dead) or "a device"
        raise LcpcError(f"{what}: the actor of {names} died (its process or node went away); "
                        f"the request did not complete") from None

    def dead_devices(self) -> list[int]:
        """Devices whose actor does not answer a ping within a few seconds."""
        pings = {d: a.ping.remote() for d, a in self.actors.items()}
        dead = []
        for d, ref in pings.items():
            try:
                ray.get(ref, timeout=min(self.timeout, 10.0))
            except (RayActorError, GetTimeoutError, RayTaskError):
                dead.append(d)
        return dead

    def _forget(self, rid: Any) -> None:
        """Drop a failed request's values on every actor (best effort, never waits)."""
        if rid is None:
            return
        for a in self.actors.values():
            try:
                a.drop.remote(rid)
            except Exception:
                pass

    def rebuild(self) -> list[str]:
        """Replace dead actors (same device, same stages); returns the names of the rebuilt devices."""
        dead = self.dead_devices()
        for d in dead:
            try:
                ray.kill(self.actors[d], no_restart=True)
            except Exception:
                pass
            self.actors[d] = self._spawn(d)
        if dead:
            self._wait([(d, self.actors[d].ping.remote()) for d in dead], "rebuilding the actors")
        return [self.names[d] for d in dead]

    def actor_pid(self, device: int) -> int:
        return self._wait([(device, self.actors[device].ping.remote())], "ping")[0]

    def close(self) -> None:
        self._teardown()
        for a in self.actors.values():
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = {}
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
        self.owns_ray = False


# ---------------------------------------------------------------------- the calls of one request
Call = Callable[..., list]  # (actor method, number of returns, *args) -> one handle per return


def _remote(method, n: int, *args, **kwargs) -> list:
    out = method.options(num_returns=n).remote(*args, **kwargs) if n > 1 else method.remote(*args, **kwargs)
    return list(out) if n > 1 else [out]


def _bind(method, n: int, *args) -> list:
    node = method.options(num_returns=n).bind(*args) if n > 1 else method.bind(*args)
    return [node[i] for i in range(n)] if n > 1 else [node]


def _mapping(transfers) -> list[tuple[str, str, int | None]]:
    """(sender's name, receiver's name, transfer id) of each value in one message."""
    return [(t.src_name, t.dst_name, t.id) for t in transfers]


# (the head's step method, number of returns, its arguments before the messages, the messages as
# (handle, mapping, sending device or None for the model input)) -> one handle per return
MergeCall = Callable[[Any, int, list, list[tuple[Any, list, int | None]]], list]


def issue(manifest: Manifest, actors: dict[int, Any], rid: Any, first: Any, call: Call,
          needs_message: bool = False, skip: frozenset[int] = frozenset(),
          merge_call: MergeCall | None = None) -> tuple[dict[int, Any], list[tuple[int, Any]]]:
    """Issue one request as one call per device per level, in the run order (``Manifest.order.steps``).

    ``first`` is the model input as a message (a value, an object ref, or a compiled graph's input
    node); each message a step sends is the handle ``call`` returns for it, passed to the receiver's
    next call. A device's last call returns (model outputs held there, bytes received by transfer id):
    its last ``step`` as ``last_step`` when nothing reaches it afterwards, else a ``finish`` call.
    Returns those results by device, and (device, handle) of the steps that send nothing otherwise
    (``needs_message``: a compiled graph, in which every call must wait on a message).

    Devices in ``skip`` get no call and no message. ``merge_call``, when given, makes the head's step
    that runs the merge stage (``Manifest.merge``): it chooses which of the messages to pass."""
    order = manifest.order
    merge, _ = manifest.merge
    outputs: dict[int, list[str]] = defaultdict(list)
    for o in manifest.outputs:
        outputs[o.device].append(o.local_name)
    last = order.last_level()
    late = {t.dst for t in manifest.transfers if t.kind != "input" and t.level >= last.get(t.dst, -1)}
    pending: dict[int, list[tuple[Any, list, int | None]]] = defaultdict(list)
    pending[HEAD].append((first, [(f.name, f.name, None) for f in manifest.feeds], None))
    inputs: dict[int, list[Transfer]] = defaultdict(list)
    for t in order.inputs:
        inputs[t.dst].append(t)
    given: dict[int, Any] = {HEAD: first}  # the message of the model input each device gets
    copies: dict[int, Any] = {}            # a receiver's own copy of it, for the receivers it forwards to
    for h, r in manifest.broadcast_edges(skip):
        if h != HEAD and h not in copies:
            copies[h] = call(actors[h].forward, 1, given[h])[0]
        given[r] = first if h == HEAD else copies[h]
        pending[r].append((given[r], _mapping(inputs[r]), None))

    def take(d: int, what: str) -> list[tuple[Any, list, int | None]]:
        messages = pending.pop(d, [])
        if needs_message and not messages:
            raise LcpcError(f"device {d}'s {what} waits on no message")
        return messages

    def invoke(method, n: int, args: list, messages: list[tuple[Any, list, int | None]], merging: bool) -> list:
        if merging and merge_call is not None:
            return merge_call(method, n, args, messages)
        return call(method, n, *args, [m for _, m, _ in messages], *[r for r, _, _ in messages])

    results, leaves = {}, []
    for level in order.steps():
        arrived: dict[int, list] = defaultdict(list)
        for step in level:
            d, dests = step.device, step.destinations
            if d in skip:
                continue
            messages = take(d, f"call at level {step.level}")
            sends = [[t.src_name for t in step.sends[dst]] for dst in dests]
            stages = [s.id for s in step.stages]
            merging = merge is not None and merge.stage in stages
            if last[d] == step.level and d not in late:
                outs = invoke(actors[d].last_step, len(sends) + 1, [rid, stages, sends, outputs[d]], messages, merging)
                results[d] = outs.pop()
            else:
                outs = invoke(actors[d].step, max(len(sends), 1), [rid, stages, sends], messages, merging)
                if not dests:
                    leaves.append((d, outs[0]))
            for dst, out in zip(dests, outs):
                arrived[dst].append((out, _mapping(step.sends[dst]), d))
        for d, items in arrived.items():
            if d not in skip:
                pending[d].extend(items)
    for d in sorted(actors):
        if d not in results and d not in skip:
            messages = take(d, "last call")
            results[d] = call(actors[d].finish, 1, rid, outputs[d], [m for _, m, _ in messages],
                              *[r for r, _, _ in messages])[0]
    return results, leaves


def compiled_graph(manifest: Manifest, actors: dict[int, Any]):
    """The calls of one request (``issue``) as one Ray Compiled Graph over ``actors``, messages as its
    edges. Its outputs are the devices' results in device order, then the steps that send nothing
    (compiled graphs allow no leaves)."""
    with InputNode() as inp:
        results, leaves = issue(manifest, actors, RID_COMPILED, inp, _bind, needs_message=True)
        dag = MultiOutputNode([results[d] for d in sorted(actors)] + [ref for _, ref in leaves])
    return dag.experimental_compile()
