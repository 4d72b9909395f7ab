#!/usr/bin/env python3
"""Opens N idle TCP connections and holds them until killed.

    python3 bench/idle_conns.py PORT N [HOST]

Connects N sockets to HOST:PORT (default 127.0.0.1) one after another,
sends nothing, prints "open N" on stdout once all are connected, then waits
for SIGTERM/SIGINT. A connection the server closes meanwhile is reported as
a line "closed K" (K: how many so far). Exit status 1 if a connect fails.
Used by scripts/bench-cluster.sh to measure server memory per idle
connection. Needs a descriptor limit above N (ulimit -n).
"""
import selectors
import signal
import socket
import sys


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    port, n = int(sys.argv[1]), int(sys.argv[2])
    host = sys.argv[3] if len(sys.argv) == 4 else "127.0.0.1"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))

    sel = selectors.DefaultSelector()
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect((host, port))
        except OSError as e:
            print(f"connect {i + 1} of {n} to {host}:{port}: {e}", file=sys.stderr)
            return 1
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    print(f"open {n}", flush=True)

    closed = 0
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:  # the server closed (or reset) this one
                sel.unregister(s)
                closed += 1
                print(f"closed {closed}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
