"""A delaying Ethernet switch for the namespace test: frames from one port reach another ``--delay``
seconds later (the sum of both links' one-way latencies).

This machine's kernel has no ``netem`` qdisc, so link latency cannot be added with ``tc``; rate
shaping can (``tbf``, set by ``netns_cluster``). This process runs inside the switch namespace,
reads every frame arriving on the switch-side veth ends (AF_PACKET, raw Ethernet), learns
which MAC sits behind which port, and re-sends each frame on its destination port (all other
ports for broadcast or unknown destinations) after the delay. SIGUSR1 sets the delay to 0,
SIGUSR2 back to ``--delay`` (``netns_cluster.Cluster.shape`` toggles the shaping so shaped and
unshaped requests can be interleaved). It only ever sees the frames of
the namespaces ``netns_cluster`` created; it opens no IP socket. It runs with SCHED_FIFO
(root) so the delay holds on a loaded machine, and exits after ``--max-seconds`` at the latest.

    python -m benchmarks.netns_relay --ports p0,p1,p2,p3 --delay 0.002 --max-seconds 900
"""

from __future__ import annotations

import argparse
import heapq
import os
import select
import signal
import socket
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ports", required=True)
    ap.add_argument("--delay", type=float, required=True, help="seconds from any port to any other")
    ap.add_argument("--max-seconds", type=float, default=900.0)
    args = ap.parse_args()
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        pass
    delay = [args.delay]
    signal.signal(signal.SIGUSR1, lambda *_: delay.__setitem__(0, 0.0))
    signal.signal(signal.SIGUSR2, lambda *_: delay.__setitem__(0, args.delay))
    ports = args.ports.split(",")
    socks = {}
    for p in ports:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        s.bind((p, 0))
        s.setblocking(False)
        socks[s.fileno()] = (p, s)
    by_name = {p: s for _, (p, s) in socks.items()}
    where: dict[bytes, str] = {}
    queue: list[tuple[float, int, str, bytes]] = []
    seq = 0
    end = time.monotonic() + args.max_seconds
    print("relay ready", flush=True)
    while time.monotonic() < end:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, port, frame = heapq.heappop(queue)
            try:
                by_name[port].send(frame)
            except (BlockingIOError, OSError):
                pass  # a full queue drops the frame, as a switch would; TCP resends
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 0.5
        ready, _, _ = select.select(list(socks), [], [], timeout)
        for fd in ready:
            port, s = socks[fd]
            for _ in range(64):
                try:
                    frame, addr = s.recvfrom(65536)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING or len(frame) < 14:
                    continue
                dst, src = frame[0:6], frame[6:12]
                where[src] = port
                due = time.monotonic() + delay[0]
                targets = [where[dst]] if dst in where and not dst[0] & 1 else [p for p in ports if p != port]
                for t in targets:
                    if t != port:
                        seq += 1
                        heapq.heappush(queue, (due, seq, t, frame))


if __name__ == "__main__":
    main()
