#!/usr/bin/env python3
"""Holds COUNT idle rpc connections open, then checks every one still answers.

    python3 bench/scale_hold.py PORT COUNT [--first F] [--srcs S] [--partial-every K]

Used by scripts/bench-scale.sh, which runs several of these side by side
when one process's descriptor limit is below the total (each one holds
connections F .. F+COUNT-1). Connection i connects to 127.0.0.1:PORT from
source address 127.0.0.(2 + i % S) (bound before connect, with
IP_BIND_ADDRESS_NO_PORT so that the port is picked at connect time: each
source address has the whole ephemeral port range towards the server), so
that more connections than one address's port range can be held. Every
K-th one (i % K == 0; K=10 by default, 0: none) sends the first 7 bytes of
its ping frame (u32 LE length + {"in":"ping","params":"i<i>"}) right after
connecting and holds the rest.

Prints "open COUNT" once all are connected, then idles (no timers; a
connection the server closes meanwhile is reported as "closed K", K: how
many so far). On SIGUSR1 every connection sends its ping (the held ones:
the rest of it) and expects exactly its own pong; once all replies are in
(or after 60 s), one line "check ok=A bad=B lost=C" (bad: a wrong reply;
lost: no reply, or the connection closed). Then it idles until SIGTERM.
Exit status 1 if a connect fails. Needs a descriptor limit above COUNT.
"""
import argparse
import selectors
import signal
import socket
import sys

from idle_conns import frame, hold, replies  # same directory

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
PARTIAL = 7



def main() -> int:
    ap = argparse.ArgumentParser(usage=__doc__.strip().splitlines()[2].strip())
    ap.add_argument("port", type=int)
    ap.add_argument("count", type=int)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--srcs", type=int, default=8)
    ap.add_argument("--partial-every", type=int, default=10)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    check = []
    signal.signal(signal.SIGUSR1, lambda *_: check.append(True))

    def held(i):
        return a.partial_every > 0 and i % a.partial_every == 0

    sel = selectors.EpollSelector()
    for i in range(a.first, a.first + a.count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind(("127.0.0.%d" % (2 + i % a.srcs), 0))
            s.settimeout(10)
            s.connect(("127.0.0.1", a.port))
            if held(i):
                s.sendall(frame(i)[0][:PARTIAL])
        except OSError as e:
            print(f"connect {i - a.first + 1} of {a.count} to 127.0.0.1:{a.port}: {e}", file=sys.stderr)
            return 1
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    print(f"open {a.count}", flush=True)

    hold(sel, check)

    # Every connection pings (the held ones complete theirs); each must get
    # exactly its own reply.
    bufs = {}
    for key in list(sel.get_map().values()):
        i = key.data
        f = frame(i)[0]
        try:
            key.fileobj.setblocking(True)
            key.fileobj.sendall(f[PARTIAL:] if held(i) else f)
            key.fileobj.setblocking(False)
            bufs[i] = b""
        except OSError:
            sel.unregister(key.fileobj)
    ok, bad = replies(sel, bufs, 60)
    print(f"check ok={ok} bad={bad} lost={a.count - ok - bad}", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
