"""Several Ray nodes on one Linux box, each in its own network namespace, joined by shaped links.

Layout (``cluster(n)``; names carry this process's id, so parallel runs never collide):

    lcpc<pid>n0 .. n{n-1}: eth0 10.213.<net>.<i+1>/24, one Ray node each (the head in n0)
    lcpc<pid>sw:           the switch: the other veth end of every node (p0 .. p{n-1})

Each link is shaped in both directions with ``tc tbf`` to ``rate`` (the node's uplink on its
eth0, its downlink on the switch port). This kernel has no ``netem``, so the one-way latency is
added by ``netns_relay.py``, a user-space switch in the switch namespace that forwards every
frame to its destination port ``2 * latency`` later (both links' latencies). Offloads are
capped (gso_max_segs 1) so every frame is at most one MTU.

MPI across the nodes (``Cluster.mpi_launch``): ``mpiexec`` runs in node 0 and starts a PRRTE daemon
in every other node through a launch agent written here (``ip netns exec`` instead of ssh). Every
namespace shares the machine's hostname, and Open MPI takes ranks with one hostname for ranks on one
node: the daemons then report the same node, and the job hangs in its first collective (coll/han
splits ranks by node; without it, the job runs, but Open MPI may pick shared memory between such
ranks, past the shaped links). So the agent starts each daemon in a UTS namespace of its own named
like its network namespace, the host file names the nodes so, and ``mpiexec`` itself runs under
node 0's name (``mpi_prefix``).

Guarantees:
- only addresses in 10.213.<net>.0/24 on interfaces inside the namespaces created here are
  used; nothing is added to the root namespace, so traffic cannot leave the box;
- MPI between nodes goes over TCP on the cluster's subnet (``btl_tcp_if_include``, and the
  daemons' own wire ``oob_tcp_if_include``), so through the shaped links; shared memory only
  between ranks of one node; ``kill_mpi`` kills whatever MPI left in any node (every process
  there in a UTS namespace other than the machine's: the agent's and ``mpi_prefix``'s, never Ray's);
- every wait is bounded (``ray start`` calls, the relay, the node count); ``cluster`` tears
  everything down in ``finally``, also on failure or Ctrl-C: it kills exactly the processes
  inside its own namespaces (``ip netns pids``: never ``ray stop``, which would kill every Ray
  on the machine by name), then deletes the namespaces (which removes the veths);
- ``available()`` says why the test cannot run here (not root, no ``ip``, no Ray, no tbf).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _run(cmd: list[str], timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()[:500]}")
    return out


# ethtool is not installed here: switch off tx checksum offload (ETHTOOL_STXCSUM) and TSO/GSO with the
# ioctl itself, so frames the relay copies carry complete checksums and are at most one MTU
_NO_OFFLOAD = ("import ctypes,fcntl,socket,struct,sys\n"
               "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
               "for cmd in (0x17,0x1f,0x24,0x2c):\n"  # STXCSUM, STSO, SGSO, SGRO
               " v=ctypes.create_string_buffer(struct.pack('II',cmd,0))\n"
               " req=struct.pack('16sP',sys.argv[1].encode(),ctypes.addressof(v))\n"
               " try: fcntl.ioctl(s.fileno(),0x8946,req)\n"
               " except OSError as e: print(cmd,e,file=sys.stderr)\n")


def _no_offload(ns: str, dev: str) -> None:
    _run(["ip", "netns", "exec", ns, sys.executable, "-c", _NO_OFFLOAD, dev])


def available() -> str | None:
    """None when a namespace cluster can be built here, else the reason it cannot."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    try:
        import ray  # noqa: F401
    except ImportError:
        return "Ray is not installed (pip install 'lcpc[ray]')"
    if shutil.which("ray") is None and not (Path(sys.executable).parent / "ray").exists():
        return "the ray command is not on PATH"
    probe = f"{_tag()}probe"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "-n", probe, "link", "add", "name", "va", "type", "veth", "peer", "name", "vb"])
        _run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "va", "root", "tbf", "rate", "100mbit",
              "burst", "32kbit", "latency", "100ms"])
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot build a shaped namespace link here: {exc}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


def mpi_available() -> str | None:
    """None when the MPI engine can run across the namespaces, else why not."""
    try:
        import mpi4py  # noqa: F401 - only whether it is there
    except ImportError:
        return "mpi4py is not installed (pip install 'lcpc[mpi]')"
    from lcpc.errors import LcpcError
    from lcpc.runtime.mpi import mpiexec

    try:
        mpiexec()
    except LcpcError as exc:
        return str(exc)
    if shutil.which("unshare") is None or shutil.which("hostname") is None:
        return "unshare and hostname (util-linux) are not installed"
    return None


# Open MPI's launch agent for a cluster, instead of ssh: ``agent NODE WORDS...`` runs the command the words
# make (as ssh would) in network namespace NODE, in a UTS namespace of its own whose hostname is NODE
_MPI_AGENT = '''#!/bin/sh
case "$1" in
  {nodes}) ;;
  *) echo "lcpc netns agent: $1 is not a node of this cluster" >&2; exit 1 ;;
esac
node="$1"; shift
exec ip netns exec "$node" unshare --uts /bin/sh -c 'hostname "$0" && exec /bin/sh -c "$1"' "$node" "$*"
'''


@dataclass
class Cluster:
    namespaces: list[str]
    addresses: list[str]
    switch: str
    head_address: str      # ip:port of the Ray GCS
    temp: Path
    env: dict
    relay: subprocess.Popen | None = None
    rate_mbit: float = 100.0
    ports: tuple = ()
    rtt_ms: float | None = None

    def shape(self, on: bool) -> None:
        """Links shaped (``rate_mbit`` and the relay's delay) or not (plain FIFO, no delay)."""
        for ns, dev in self.ports:
            qdisc = ["tbf", "rate", f"{self.rate_mbit}mbit", "burst", str(_burst(self.rate_mbit)), "latency",
                     "200ms"] if on else ["pfifo", "limit", "10000"]
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root"] + qdisc)
        self.relay.send_signal(signal.SIGUSR2 if on else signal.SIGUSR1)
        time.sleep(0.05)

    def kill(self, node: int) -> None:
        """Kill every process of node ``node`` (its Ray node and whatever runs there): a lost device."""
        _kill_namespace_processes(self.namespaces[node])

    def exec_prefix(self, node: int = 0) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[node]]

    def mpi_prefix(self, node: int = 0) -> list[str]:
        """Run a command in node ``node`` under the node's own hostname (a UTS namespace of its own): how
        the process that starts ``mpiexec`` must run, so Open MPI finds itself on the host file's first node."""
        return self.exec_prefix(node) + ["unshare", "--uts", "/bin/sh", "-c", 'hostname "$0" && exec "$@"',
                                         self.namespaces[node]]

    def mpi_launch(self, first_slots: int = 2) -> tuple[Path, list[str]]:
        """Open MPI across the nodes: the host file (node 0 first with ``first_slots`` slots: the MPI engine's
        relay and device 0; one slot on every other node, so rank d + 1 runs on node d) and the ``mpiexec``
        arguments (this cluster's launch agent, TCP on the cluster's subnet only, shared memory within a node)."""
        agent = self.temp / "mpi-agent.sh"
        agent.write_text(_MPI_AGENT.format(nodes="|".join(self.namespaces)))
        agent.chmod(0o700)
        hostfile = self.temp / "mpi-hosts"
        hostfile.write_text("".join(f"{ns} slots={first_slots if i == 0 else 1}\n"
                                    for i, ns in enumerate(self.namespaces)))
        subnet = self.addresses[0].rsplit(".", 1)[0] + ".0/24"
        return hostfile, ["--prtemca", "plm_ssh_agent", str(agent), "--prtemca", "oob_tcp_if_include", subnet,
                          "--mca", "pml", "ob1", "--mca", "btl", "self,sm,tcp", "--mca", "btl_tcp_if_include", subnet]

    def sent_bytes(self) -> int:
        """Bytes sent so far on the nodes' links, all nodes together (each crossing counted once, at its sender)."""
        total = 0
        for ns in self.namespaces:
            link = json.loads(_run(["ip", "-j", "-s", "-n", ns, "link", "show", "dev", "eth0"]).stdout)[0]
            total += int(link["stats64"]["tx"]["bytes"])
        return total

    def node_of(self, pid: int) -> int | None:
        """The node whose namespace process ``pid`` lives in (None: none of them)."""
        name = _run(["ip", "netns", "identify", str(pid)], check=False).stdout.strip()
        return self.namespaces.index(name) if name in self.namespaces else None

    def kill_mpi(self) -> int:
        """Kill what MPI left in any node (see the module's guarantees); returns how many processes that was."""
        return sum(_kill_namespace_processes(ns, only=_other_uts) for ns in self.namespaces)

    def run_in(self, node: int, cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside node ``node``'s namespace (bounded by ``timeout``)."""
        return subprocess.run(self.exec_prefix(node) + cmd, capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **(env or {})})


def _burst(rate_mbit: float) -> int:
    return max(int(rate_mbit * 1e6 / 8 / 250), 16000)  # bytes: about 4 ms of traffic, at least 16 kB


def _ray_bin() -> str:
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else "ray"


def _other_uts(pid: int) -> bool:
    """Whether process ``pid`` lives in a UTS namespace other than this process's."""
    try:
        return os.readlink(f"/proc/{pid}/ns/uts") != os.readlink("/proc/self/ns/uts")
    except OSError:
        return False


def _kill_namespace_processes(ns: str, grace: float = 5.0, only=None) -> int:
    """SIGTERM, then SIGKILL, exactly the processes living in namespace ``ns`` (those for which ``only(pid)``
    holds, when given); returns how many there were."""
    def living() -> list[int]:
        pids = [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split()]
        return [p for p in pids if only is None or only(p)]

    found = len(living())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = living()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = living()
        if not pids:
            break
    return found


def _tag() -> str:
    return f"lcpc{os.getpid() % 100000}"


def own_namespaces() -> set[str]:
    """The namespaces this process's clusters created that still exist (others' runs may have theirs)."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    return {n for n in names if re.fullmatch(rf"{_tag()}(sw|n\d+|probe)", n)}


@contextlib.contextmanager
def cluster(n: int = 4, rate_mbit: float = 100.0, latency_ms: float = 1.0, net: int = 213,
            resources: list[dict] | None = None, ray_env: dict | None = None, start_timeout: float = 180.0):
    """A Ray cluster of ``n`` nodes in namespaces, each link ``rate_mbit`` and ``latency_ms`` one way;
    node i carries the Ray resource ``dev{i}`` (or ``resources[i]``). Always torn down."""
    tag = _tag()
    sw = f"{tag}sw"
    names = [f"{tag}n{i}" for i in range(n)]
    addrs = [f"10.{net}.{os.getpid() % 200 + 1}.{i + 1}" for i in range(n)]
    temp = Path(tempfile.mkdtemp(prefix="lcpc-netns-"))
    created: list[str] = []
    relay = None
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **(ray_env or {})}
    try:
        for ns in [sw] + names:
            _run(["ip", "netns", "add", ns])
            created.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        burst = _burst(rate_mbit)
        for i, ns in enumerate(names):
            _run(["ip", "-n", sw, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns])
            for where, dev in ((sw, f"p{i}"), (ns, "eth0")):
                _run(["ip", "-n", where, "link", "set", dev, "gso_max_segs", "1", "gso_max_size", "1500"], check=False)
                _run(["ip", "-n", where, "link", "set", dev, "up"])
                _run(["ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                      f"{rate_mbit}mbit", "burst", str(burst), "latency", "200ms"])
            _run(["ip", "-n", sw, "link", "set", f"p{i}", "promisc", "on"])
            _no_offload(ns, "eth0")
            _no_offload(sw, f"p{i}")
            _run(["ip", "-n", ns, "addr", "add", f"{addrs[i]}/24", "dev", "eth0"])
        relay = subprocess.Popen(["ip", "netns", "exec", sw, sys.executable, str(HERE / "netns_relay.py"),
                                  "--ports", ",".join(f"p{i}" for i in range(n)),
                                  "--delay", str(2 * latency_ms / 1e3), "--max-seconds", "1800"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = relay.stdout.readline()  # bounded: the relay prints at once or dies
        if "relay ready" not in line:
            raise RuntimeError(f"the delaying switch did not start: {relay.stderr.read()[:500]}")
        rtt = udp_rtt_ms(names[0], names[-1], addrs[-1])
        port = 6379
        head = f"{addrs[0]}:{port}"
        common = ["--num-cpus", "1", "--object-store-memory", "100000000", "--disable-usage-stats"]
        for i, ns in enumerate(names):
            res = json.dumps(resources[i] if resources else {f"dev{i}": 1})
            cmd = [_ray_bin(), "start", "--node-ip-address", addrs[i], "--resources", res] + common
            cmd += (["--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", str(temp)]
                    if i == 0 else ["--address", head])
            out = subprocess.run(["ip", "netns", "exec", ns] + cmd, capture_output=True, text=True,
                                 timeout=start_timeout, env=env)
            if out.returncode:
                raise RuntimeError(f"ray start on {ns} failed: {(out.stderr or out.stdout).strip()[-800:]}")
        c = Cluster(names, addrs, sw, head, temp, env, relay, rate_mbit,
                    tuple((where, dev) for i, ns in enumerate(names) for where, dev in ((sw, f"p{i}"), (ns, "eth0"))))
        _wait_nodes(c, n, start_timeout)
        c.rtt_ms = rtt
        yield c
    finally:
        if relay is not None:
            relay.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                relay.wait(timeout=10)
        for ns in reversed(created):
            _kill_namespace_processes(ns)
            _run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(temp, ignore_errors=True)


_ECHO = ("import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind((sys.argv[1],5009));"
         "s.settimeout(15)\nfor _ in range(int(sys.argv[2])):\n d,a=s.recvfrom(64);s.sendto(d,a)")
_PING = ("import socket,sys,time;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(2);r=[]\n"
         "for i in range(int(sys.argv[2])):\n t=time.perf_counter();s.sendto(b'x',(sys.argv[1],5009));s.recvfrom(64)"
         ";r.append(time.perf_counter()-t);time.sleep(0.05)\nr.sort();print(1e3*r[len(r)//2])")


def udp_rtt_ms(client_ns: str, server_ns: str, server_addr: str, count: int = 10) -> float:
    """Median UDP round trip between two namespaces (Python on both ends; bounded by timeouts)."""
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, "-c", _ECHO, server_addr,
                               str(count)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(20):  # until the echo socket is bound (bounded)
            time.sleep(0.25)
            out = _run(["ip", "netns", "exec", client_ns, sys.executable, "-c", _PING, server_addr, str(count)],
                       check=False, timeout=30)
            if out.returncode == 0:
                return float(out.stdout.strip())
            if server.poll() is not None:
                break
        raise RuntimeError(f"the namespaces cannot reach each other ({server_ns} at {server_addr}): "
                           f"{(out.stderr or '').strip()[-300:]}")
    finally:
        server.kill()
        server.wait(timeout=10)


def _wait_nodes(c: Cluster, n: int, timeout: float) -> None:
    """Until the head sees ``n`` alive nodes (bounded)."""
    code = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        out = c.run_in(0, [sys.executable, "-c", code, c.head_address], timeout=max(deadline - time.monotonic(), 1))
        seen = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
        if seen == str(n):
            return
        time.sleep(1.0)
    raise RuntimeError(f"only {seen} of {n} Ray nodes joined within {timeout:g} s")
