#!/usr/bin/env python3
"""Opens N idle TCP connections and holds them until killed.

    python3 bench/idle_conns.py PORT N [HOST] [--partial K]

Connects N sockets to HOST:PORT (default 127.0.0.1) one after another,
sends nothing, prints "open N" on stdout once all are connected, then waits
for SIGTERM/SIGINT. A connection the server closes meanwhile is reported as
a line "closed K" (K: how many so far). Exit status 1 if a connect fails.
Used by scripts/bench-cluster.sh to measure server memory per idle
connection. Needs a descriptor limit above N (ulimit -n).

With --partial K every connection sends the first K bytes of a ping frame
(u32 LE length + {"in":"ping","params":"i<n>"}) right after connecting and
holds the rest. On SIGUSR1 each sends the rest of its frame and expects
exactly its own pong; once all replies are in (or after 30 s) one line
"replies ok=A bad=B lost=C" follows (bad: a wrong reply; lost: no reply,
the connection closed or silent), then it waits for SIGTERM as before.
Used by scripts/bench-restart.sh: requests half-read across a restart.
"""
import argparse
import selectors
import signal
import socket
import sys
import time


def frame(i):
    """The ping of connection i, and the exact reply it must get."""
    param = b'"i%d"' % i
    body = b'{"in":"ping","params":' + param + b"}"
    return len(body).to_bytes(4, "little") + body, b'{"out":"pong","result":' + param + b"}"


def hold(sel, stop):
    """Idles until `stop` is non-empty (a signal handler appends to it),
    reporting each connection the server closes meanwhile as "closed K"."""
    closed = 0
    while not stop:
        for key, _ in sel.select(0.2):
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if not data:  # the server closed (or reset) this one
                sel.unregister(key.fileobj)
                key.fileobj.close()
                closed += 1
                print(f"closed {closed}", flush=True)


def replies(sel, bufs, secs):
    """Reads one reply on every connection in `bufs` (its id -> bytes so
    far; the selector's data is the id) for up to `secs`: returns (ok, bad),
    a reply being ok when it is exactly the connection's own pong."""
    ok = bad = 0
    deadline = time.monotonic() + secs
    while bufs and time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            i = key.data
            try:
                data = key.fileobj.recv(65536)
            except OSError:
                data = b""
            buf = bufs.get(i, b"") + data
            n = int.from_bytes(buf[:4], "little") if len(buf) >= 4 else -1
            if not data or (n >= 0 and len(buf) >= 4 + n):
                if data:
                    good = buf[4:4 + n] == frame(i)[1]
                    ok, bad = ok + good, bad + (not good)
                sel.unregister(key.fileobj)
                bufs.pop(i, None)
            else:
                bufs[i] = buf
    return ok, bad


def main() -> int:
    ap = argparse.ArgumentParser(usage=__doc__.strip().splitlines()[2].strip())
    ap.add_argument("port", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("host", nargs="?", default="127.0.0.1")
    ap.add_argument("--partial", type=int, default=0, metavar="K")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    complete = []
    signal.signal(signal.SIGUSR1, lambda *_: complete.append(True))

    sel = selectors.DefaultSelector()
    socks = []
    for i in range(a.n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect((a.host, a.port))
            if a.partial:
                s.sendall(frame(i)[0][:a.partial])
        except OSError as e:
            print(f"connect {i + 1} of {a.n} to {a.host}:{a.port}: {e}", file=sys.stderr)
            return 1
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
        socks.append(s)
    print(f"open {a.n}", flush=True)

    hold(sel, complete)
    if not a.partial:
        return 0

    # Complete every held request, then check each connection's one reply.
    bufs = {}
    for key in list(sel.get_map().values()):
        key.fileobj.setblocking(True)
        try:
            key.fileobj.sendall(frame(key.data)[0][a.partial:])
            bufs[key.data] = b""
        except OSError:
            sel.unregister(key.fileobj)
        key.fileobj.setblocking(False)
    ok, bad = replies(sel, bufs, 30)
    print(f"replies ok={ok} bad={bad} lost={a.n - ok - bad}", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
