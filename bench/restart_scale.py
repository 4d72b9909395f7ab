#!/usr/bin/env python3
"""One hot restart of a 2-worker cluster holding N idle keep-alive connections.

    python3 bench/restart_scale.py BIN N [N ...] [--partial-share 0.1]

For each N: starts `BIN cluster --workers 2` on a free port, opens N
connections (spread over source addresses 127.0.0.2, .3, ... so that more
than one port range of them fit), pings each once (so every one is in a
worker), then sends half of a ping frame on a share of them (10% by
default) and holds all of them idle. Then it times `BIN restart --dir D`,
completes the half-sent frames, pings every other connection once more and
checks that each gets exactly its own reply. Prints one line per N:

    n=100000 restart_s=0.81 ok=100000 bad=0 lost=0 closed_before=0

It raises RLIMIT_NOFILE for itself and the cluster it starts as far as it
may (the hard limit too, given CAP_SYS_RESOURCE); an N that does not fit
(each master holds one descriptor per connection) is skipped with a line
saying so. Stops the cluster it started, even on failure.

    --log FILE          the cluster's log (add --cluster-args=-v for debug)
    --wrap CMD          run `restart` under CMD ("perf record -a -g --")
    --next-bin B        `restart --binary B`: a restart into another version
"""
import argparse
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

PER_SRC = 25000
# A command the restart runs under (--wrap "perf record -a -g --").
WRAP = []
# More arguments for `cluster` (--cluster-args "-v").
EXTRA = []
# `restart --binary B` (--next-bin B): a restart into another version.
NEXT = []


def frame(i):
    """The ping of connection i, and the exact reply it must get."""
    param = b'"i%d"' % i
    body = b'{"in":"ping","params":' + param + b"}"
    return len(body).to_bytes(4, "little") + body, b'{"out":"pong","result":' + param + b"}"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def status(bin_, d):
    out = subprocess.run([bin_, "status", "--dir", d, "--json"], capture_output=True, timeout=20)
    return json.loads(out.stdout) if out.returncode == 0 else None


def open_all(port, n):
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.%d" % (2 + i // PER_SRC), 0))
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
        if i % 2000 == 1999:  # let the accept queue drain
            time.sleep(0.01)
    return socks


def exchange(ep, socks, sends, want, timeout):
    """Sends sends[i] on socks[i] (for i in sends), reads until each has its
    whole reply want[i]; returns (ok, bad, lost)."""
    fdmap = {}
    bufs = {}
    for i, data in sends.items():
        s = socks[i]
        try:
            s.setblocking(True)
            s.sendall(data)
            s.setblocking(False)
        except OSError:
            continue
        fdmap[s.fileno()] = i
        bufs[i] = b""
        ep.register(s.fileno(), select.EPOLLIN)
    ok = bad = 0
    deadline = time.monotonic() + timeout
    while fdmap and time.monotonic() < deadline:
        for fd, _ in ep.poll(0.5):
            i = fdmap[fd]
            try:
                data = socks[i].recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            buf = bufs[i] + data
            n = int.from_bytes(buf[:4], "little") if len(buf) >= 4 else -1
            if not data or (n >= 0 and len(buf) >= 4 + n):
                if data:
                    good = buf[4:4 + n] == want[i]
                    ok, bad = ok + good, bad + (not good)
                ep.unregister(fd)
                del fdmap[fd]
            else:
                bufs[i] = buf
    for fd in list(fdmap):
        ep.unregister(fd)
    return ok, bad, len(sends) - ok - bad


def closed_now(socks, idx):
    """How many of socks[idx] the server has closed (readable with EOF)."""
    n = 0
    for i in idx:
        try:
            d = socks[i].recv(1, socket.MSG_PEEK)
            n += d == b""
        except BlockingIOError:
            pass
        except OSError:
            n += 1
    return n


def run(bin_, n, share, log):
    port = free_port()
    d = tempfile.mkdtemp(prefix="restart-scale-")
    proc = subprocess.Popen([bin_, "cluster", "--port", str(port), "--workers", "2", "--dir", d] + EXTRA,
                            stdout=log, stderr=log)
    socks = []
    try:
        for _ in range(200):
            st = status(bin_, d) if proc.poll() is None else None
            if st and st.get("accepting"):
                break
            time.sleep(0.05)
        else:
            raise SystemExit("cluster did not start")
        socks = open_all(port, n)
        ep = select.epoll()
        frames = [frame(i) for i in range(n)]
        ok, bad, lost = exchange(ep, socks, {i: frames[i][0] for i in range(n)}, {i: frames[i][1] for i in range(n)}, 120)
        if ok != n:
            raise SystemExit(f"n={n}: before the restart ok={ok} bad={bad} lost={lost}")
        step = max(1, round(1 / share)) if share > 0 else 0
        partial = set(range(0, n, step)) if step else set()
        for i in partial:
            f = frames[i][0]
            socks[i].setblocking(True)
            socks[i].sendall(f[:len(f) // 2])
            socks[i].setblocking(False)
        t0 = time.monotonic()
        r = subprocess.run(WRAP + [bin_, "restart", "--dir", d] + NEXT, capture_output=True, timeout=120)
        took = time.monotonic() - t0
        if r.returncode != 0:
            print(f"n={n}: restart failed: {r.stderr.decode(errors='replace').strip()}", flush=True)
        closed = closed_now(socks, range(n))
        sends = {i: (frames[i][0][len(frames[i][0]) // 2:] if i in partial else frames[i][0]) for i in range(n)}
        ok, bad, lost = exchange(ep, socks, sends, {i: frames[i][1] for i in range(n)}, 120)
        print(f"n={n} restart_s={took:.3f} ok={ok} bad={bad} lost={lost} closed_before={closed} "
              f"partial={len(partial)}", flush=True)
        return took, ok == n
    finally:
        for s in socks:
            s.close()
        st = status(bin_, d)
        if st and st.get("pid") and st["pid"] != proc.pid:
            os.kill(st["pid"], signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if st and st.get("pid") and st["pid"] != proc.pid:
            for _ in range(200):
                try:
                    os.kill(st["pid"], 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("n", type=int, nargs="+")
    ap.add_argument("--partial-share", type=float, default=0.1)
    ap.add_argument("--log", default="/dev/null")
    ap.add_argument("--wrap", default="", help="a command to run `restart` under, e.g. 'perf record -a -g --'")
    ap.add_argument("--cluster-args", default="", help="more arguments for `cluster`, e.g. '-v'")
    ap.add_argument("--next-bin", help="restart into this binary (`restart --binary`): a version change")
    a = ap.parse_args()
    if a.next_bin:
        NEXT.extend(["--binary", a.next_bin])
    WRAP.extend(a.wrap.split())
    EXTRA.extend(a.cluster_args.split())
    # The holder needs N descriptors, and so does each master (one copy
    # per connection): raise the limit where allowed (root with
    # CAP_SYS_RESOURCE), else run only the N that fit.
    want = 3 * max(a.n) + 10000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fits = [n for n in a.n if n + 1500 <= soft]
    for n in sorted(set(a.n) - set(fits)):
        print(f"n={n}: skipped: RLIMIT_NOFILE is {soft} and cannot be raised here "
              f"(no CAP_SYS_RESOURCE); a master holds one descriptor per connection", flush=True)
    a.n = fits
    with open(a.log, "ab") as log:
        good = True
        for n in a.n:
            good &= run(a.bin, n, a.partial_share, log)[1]
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
