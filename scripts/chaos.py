#!/usr/bin/env python3
"""make chaos: a soak that hunts lost connections and replies under hot
restarts and faults (issue 9). Python 3.11 stdlib only.

    scripts/chaos.py [--secs N] [--seed S] [...]     (make chaos CHAOS_SECS=N)

Starts `handoff cluster --workers 2` on 127.0.0.1 (a free port, a private
temp dir), drives four loads from one selectors loop and injects faults,
one at a time, from a second thread. Every flag is also an env var
(CHAOS_<FLAG>, e.g. CHAOS_HELD=8000); see --help.

Load (u32 LE length + JSON; every ping carries a unique param; every reply
is checked for identity and order):
  pipelined  keep-alive connections sending batches of pings
  held       connections that send the first 7 bytes of a frame, hold it a
             random time, complete it, check the reply, and start again
  heavy      ~1 MB pings whose 1 MB replies are read late
  short      connect, one ping, check, close
Faults: restart; restart-lowfd (the new master runs under `ulimit -n 64`
through a --binary wrapper); kill-worker; kill-new-master and
kill-old-master (SIGKILL mid-takeover); stop-worker (SIGSTOP 1-4 s). A
restart's exit status must agree with the service: 0 only if the service
answers and the generation moved on; otherwise the old one still serves.

Accounting. A request is sent once its first byte is written; it ends as a
reply ok or a lost reply (its connection died, a later reply came first,
no progress for --stall s, or the run ended). A lost connection is one the
server closed or reset. A reply nobody asked for is a duplicate (of an
answered request) or a mismatch; the client then closes and reconnects.
Each loss is labelled with its cause: a fault (its span + 5 s) between the
time its connection was last known good (when its oldest request in flight
went out, else 1 s before) and the time it went bad (noticed, or soon
after that request was complete), among those that could touch it (open
before the fault ended; a plain kill: held by the victim): a kill less
than 1.5 s before it was noticed; else, if the server balked at the
request's completion, the first fault at work while it was held; else the
latest. It is *explained* only if a process we SIGKILLed held the
connection (its fd table is read while it is SIGSTOPped just before the
kill) and:
  lost reply  the request was in flight at the kill: one per connection,
              or all of them if the connection died with the process;
  lost conn   another process held it too (a worker's master; the new
              master's predecessor until the takeover commits) and its
              in-flight request died with the victim, so the stream lost its
              place; or nobody else held it and the victim was the old
              master (its generation takes what it alone holds);
  mismatch    as a lost conn that another process held.
Exit status 1 if any loss is unexplained, a finding was recorded (service
down, restart status wrong) or the service is down at the end.
"""
import argparse
import collections
import errno
import heapq
import itertools
import json
import os
import random
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
now = time.monotonic
T0 = now()
AFTER = 5.0  # a fault's effects may show up this long after it ended
HOLD_BYTES = 7  # what a held connection sends before it waits
FAULTS = "restart,restart-lowfd,kill-worker,kill-new-master,kill-old-master,stop-worker"


def say(msg):
    print(f"[{now() - T0:6.1f}s] {msg}", flush=True)


def options():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, d, h in [
        ("secs", 300.0, "how long the load and the faults run"),
        ("seed", -1, "random seed, to replay a run (-1: pick one and print it)"),
        ("workers", 2, "cluster workers"),
        ("held", 4000, "connections holding part of a request"),
        ("hold", 5.0, "longest hold of a partial request, s"),
        ("pipelined", 50, "keep-alive connections pipelining pings"),
        ("batch", 16, "largest batch of pipelined pings"),
        ("pause", 0.02, "mean pause between a pipelined connection's batches, s"),
        ("heavy", 2, "connections sending ~1 MB pings"),
        ("heavy-size", 1000000, "bytes of a heavy ping's param (--max-frame is 1 MiB)"),
        ("late", 2.0, "longest delay before a heavy client reads its reply, s"),
        ("short", 4, "short-connection slots"),
        ("short-rate", 100.0, "short connections per second, all slots"),
        ("fault-min", 2.0, "shortest pause between faults, s"),
        ("fault-max", 6.0, "longest pause between faults, s"),
        ("faults", FAULTS, "faults to inject (comma list; repeat a name to weight it)"),
        ("lowfd", 64, "descriptor limit of restart-lowfd's new master"),
        ("show", 10, "unexplained losses to print in detail as they happen"),
        ("stall", 20.0, "no progress this long on a waiting connection: its replies are lost, s"),
        ("bin", os.path.join(ROOT, "target/release/handoff"), "the handoff binary"),
    ]:
        d = type(d)(os.environ.get("CHAOS_" + name.upper().replace("-", "_"), d))
        p.add_argument("--" + name, type=type(d), default=d, help=f"{h} (default {d})")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (cluster log) even after a clean run")
    o = p.parse_args()
    o.seed = random.randrange(1 << 31) if o.seed < 0 else o.seed
    unknown = {k.strip() for k in o.faults.split(",") if k.strip()} - set(FAULTS.split(","))
    if unknown:
        p.error(f"unknown fault(s) {', '.join(sorted(unknown))}; known: {FAULTS}")
    return o


# ---------------------------------------------------------------- processes
def state(pid):
    """The process state letter (R, S, T, Z, ...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid):
    return state(pid) not in (None, "Z", "X")


def freeze(pid):
    """SIGSTOPs pid and waits until it is stopped: its fd table holds still
    (a process still inside execve stops only once the exec is done)."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    deadline = now() + 10
    while state(pid) not in (None, "T", "t", "Z", "X") and now() < deadline:
        time.sleep(0.002)


def client_ports(pids, port):
    """The client ports of the connections to `port` whose server socket is
    in the fd table of one of `pids` (matched by socket inode); pids None:
    of every established connection to `port`, accepted or in the listen
    queue."""
    inodes = set()
    for pid in pids or []:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    ports, local = set(), f":{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f:
            _, loc, rem, rest = line.split(None, 3)  # rest: st queues tr retrnsmt uid timeout inode ...
            if loc.endswith(local) and rest.startswith("01 "):  # established
                if pids is None or int(rest.split(None, 7)[6]) in inodes:
                    ports.add(int(rem[-4:], 16))
    return ports


class Cluster:
    """The service under test, in a process group of its own (masters that
    a restart spawns stay in it); started afresh if found dead."""

    def __init__(self, o, tmp):
        self.o, self.tmp = o, tmp
        self.dir = os.path.join(tmp, "cluster")
        self.logf = open(os.path.join(tmp, "cluster.log"), "ab")
        self.port, self.pgid, self.proc, self.starts = None, None, None, 0

    def start(self):
        """Same port as before if it can be had, else a new free one."""
        for attempt in range(5):
            if self.port is None or attempt:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    self.port = s.getsockname()[1]
            self.starts += 1
            out = os.path.join(self.tmp, f"ready.{self.starts}")
            self.proc = subprocess.Popen(
                [self.o.bin, "cluster", "--port", str(self.port), "--workers", str(self.o.workers), "--dir", self.dir],
                stdout=open(out, "wb"), stderr=self.logf, start_new_session=True)
            self.pgid = self.proc.pid
            deadline = now() + 15
            while now() < deadline and self.proc.poll() is None:
                with open(out) as f:
                    if f.read().startswith("ready"):
                        return
                time.sleep(0.05)
            self.kill_all()
        raise SystemExit("chaos: the cluster does not start; see " + self.logf.name)

    def procs(self):
        """pid -> argv of the live processes of the cluster."""
        out = {}
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{d}/stat") as f:
                    st, _, pgid = f.read().rsplit(")", 1)[1].split()[:3]
                if int(pgid) == self.pgid and st not in "ZX":
                    with open(f"/proc/{d}/cmdline", "rb") as f:
                        out[int(d)] = f.read().decode(errors="replace").split("\0")
            except OSError:
                pass
        return out

    @staticmethod
    def children(pid, role):
        """The live children of pid that run `handoff ROLE` (worker; cluster: a
        restart's new master, which runs the master's own command line)."""
        out = []
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    for q in map(int, f.read().split()):
                        with open(f"/proc/{q}/cmdline", "rb") as g:
                            if g.read().split(b"\0")[1:2] == [role.encode()] and alive(q):
                                out.append(q)
        except OSError:
            pass
        return out

    def status(self):
        r = subprocess.run([self.o.bin, "status", "--dir", self.dir, "--json"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode:
            raise OSError(f"handoff status: {last_line(r.stderr) or 'exit %d' % r.returncode}")
        return json.loads(r.stdout)

    def probe(self):
        """One whoami on a fresh connection: the reply's result."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b'\x0f\0\0\0{"in":"whoami"}')
            buf = b""
            while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "little"):
                chunk = s.recv(4096)
                if not chunk:
                    raise OSError("whoami: connection closed before the reply")
                buf += chunk
        return json.loads(buf[4:])["result"]

    def group_alive(self):
        self.proc.poll()  # reap our own child, or the group never empties
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False

    def kill_all(self):
        if self.pgid and self.group_alive():
            os.killpg(self.pgid, signal.SIGKILL)
            deadline = now() + 5
            while self.group_alive() and now() < deadline:
                time.sleep(0.02)

    def stop(self):
        """SIGTERM to every master, 8 s grace, then SIGKILL to the group."""
        if not self.pgid:
            return
        for pid, argv in self.procs().items():
            if argv[1:2] in (["cluster"], ["takeover"]):
                os.kill(pid, signal.SIGTERM)
            elif state(pid) in ("T", "t"):
                os.kill(pid, signal.SIGCONT)
        deadline = now() + 8
        while self.group_alive() and now() < deadline:
            time.sleep(0.05)
        self.kill_all()


def last_line(text):
    """The last line of a log, without its timestamp and level."""
    lines = text.strip().splitlines()
    return lines[-1].split("] ", 1)[-1] if lines else ""


# --------------------------------------------------------------- accounting
class Event:
    """A fault. A kill also has its time and who held which connection."""

    def __init__(self, n, kind, label):
        self.n, self.kind, self.label = n, kind, label
        self.t0, self.t1, self.tk = now(), None, None
        self.held, self.others = set(), set()  # client ports: the victim's, everyone else's
        # Only the old generation (or the whole cluster) may take connections
        # nobody else holds with it; see the module doc.
        self.orphans_die = kind in ("kill-old-master", "harness")

    def name(self):
        return f"{self.label} (#{self.n} at {self.t0 - T0:.1f}s)"

    def touches(self, c):
        """Whether it can have hurt connection c: c existed by its end (a
        kill: held c), or it left a low-limit generation serving."""
        if self.kind in ("kill-worker", "harness"):
            return self.tk is not None and c.port in self.held and c.t_connect <= self.tk
        end = self.tk if self.tk is not None else self.t1
        return self.kind == "restart-lowfd" or end is None or c.t_connect <= end

    def start(self):
        """When it can begin to cause losses: a plain kill (which can only
        take the connections it held), at the kill."""
        if self.kind in ("kill-worker", "harness"):
            return self.tk if self.tk is not None else float("inf")
        return self.t0


class Ledger:
    def __init__(self, show):
        self.lock = threading.Lock()
        self.events, self.findings = [], []
        self.sent = self.ok = self.connects = self.refused = 0
        self.ok_by = collections.Counter()  # replies ok, by load
        self.total, self.unexplained = collections.Counter(), collections.Counter()
        self.by_kind = collections.defaultdict(collections.Counter)  # (explained, fault kinds) -> counts
        self.by_event = collections.defaultdict(collections.Counter)  # unexplained, by (fault number, name)
        self.noticed = collections.Counter()  # how lost replies were noticed
        self.ended = collections.Counter()  # how lost connections ended
        self.used = set()  # (connection, kill): its one explained request is spent
        self.show, self.shown = show, 0  # unexplained incidents to print in detail

    def event(self, kind, label):
        with self.lock:
            e = Event(len(self.events) + 1, kind, label)
            self.events.append(e)
        return e

    def finding(self, text):
        with self.lock:
            self.findings.append(f"{now() - T0:.1f}s: {text}")
        say("FINDING: " + text)

    def incident(self, c, t, reqs, what=None, how=None):
        """Accounts for what went wrong on connection c at time t: the
        requests `reqs` lost their replies (noticed `how`), plus one `what`
        (conn: the server closed c; mismatch; dup) if given."""
        with self.lock:
            kills = [e for e in reversed(self.events)
                     if e.tk is not None and c.t_connect <= e.tk <= t and c.port in e.held]
            # The cause: a fault between the time the stream was last known
            # good (its oldest request went out) and the time it went bad
            # (noticed, or shortly after that request's last byte): a kill
            # just before it was noticed; else the first one if the server
            # balked at the request's completion (something done while the
            # request was held); else the latest.
            first = min(reqs, key=lambda r: r.t_first, default=None)
            a = first.t_first if first else t - 1
            b = min(t, first.t_sent + 0.5) if first and first.t_sent else t
            near = [x for x in self.events if x.start() - 0.5 <= b and (x.t1 or now()) + AFTER >= a
                    and x.touches(c)]
            # A stopped worker delays; it takes nothing: blame it last.
            near = [x for x in near if x.kind != "stop-worker"] or near or [None]
            just = [x for x in near if x and x.tk is not None and x.tk <= t <= x.tk + 1.5]
            held = [x for x in near if x and (x.t1 or now()) >= a]  # at work while the request was held
            near = (just[-1] if just else (held or near)[0] if first and first.t_sent and t - first.t_sent < 1
                    else near[-1])
        orphan = next((k for k in kills if k.orphans_die and c.port not in k.others), None) if what == "conn" else None
        unexplained = 0
        for r in reqs:
            k = orphan or next((k for k in kills if (c.cid, k.n) not in self.used and r.t_first <= k.tk), None)
            if k:
                self.used.add((c.cid, k.n))
            unexplained += self.count("reply", k, near)
            self.noticed[how] += 1
        if what:  # rescued by another process, but out of step: its request in flight died
            k = orphan or next((k for k in kills if (c.cid, k.n) in self.used and c.port in k.others
                                and what != "dup"), None)
            unexplained += self.count(what, k, near)
        if unexplained and self.shown < self.show:  # details of the first few, to chase them
            self.shown += 1
            rel = lambda x: f"{x - T0:.2f}s" if x is not None else "-"  # noqa: E731
            say(f"unexplained: {c.kind} connection {c.cid} (client port {c.port}, opened {rel(c.t_connect)}): "
                f"{what or 'replies'} noticed {rel(t)} ({how or what}); {len(reqs)} request(s) lost, the oldest "
                f"sent {rel(first.t_first if first else None)}-{rel(first.t_sent if first else None)}; "
                f"cause {near.name() if near else 'none'}; kills that held it: "
                + (", ".join(f"#{k.n} at {rel(k.tk)}{'' if c.port in k.others else ' (alone)'}" for k in kills)
                   or "none"))

    def count(self, what, k, near):
        """Counts one loss; returns 1 if it is unexplained."""
        e = k or near
        self.by_kind[(k is not None, e.label.split(" pid")[0] if e else "no fault nearby")][what] += 1
        self.total[what] += 1
        if k:
            return 0
        self.by_event[(e.n, e.name()) if e else (0, "no fault nearby")][what] += 1
        self.unexplained[what] += 1
        return 1

    def line(self):
        t, u = self.total, self.unexplained
        return (f"sent {self.sent} ok {self.ok} | lost conns {t['conn']} ({u['conn']} unexpl) "
                f"replies {t['reply']} ({u['reply']} unexpl) | mismatch {t['mismatch']} dup {t['dup']} | "
                f"connects {self.connects} refused {self.refused} | faults {len(self.events)}")


# --------------------------------------------------------------------- load
class Req:
    __slots__ = ("rid", "expected", "start", "end", "t_first", "t_sent")

    def __init__(self, rid, expected, start, end):
        self.rid, self.expected, self.start, self.end = rid, expected, start, end  # start, end: stream offsets
        self.t_first = self.t_sent = None  # first and last byte written


class Conn:
    __slots__ = ("kind", "cid", "sock", "port", "t_connect", "out", "queued", "written", "pending",
                 "inbuf", "mask", "rest", "read_at", "waiting", "last_ok", "lost", "fails")

    def __init__(self, kind, cid, fails):
        self.kind, self.cid, self.fails, self.port, self.t_connect = kind, cid, fails, 0, now()
        self.sock = socket.socket()
        self.out, self.inbuf, self.pending = bytearray(), bytearray(), collections.deque()
        self.queued = self.written = self.mask = self.last_ok = 0
        self.rest = self.read_at = self.waiting = None  # held remainder; heavy read time; wait start
        self.lost = set()  # rids counted as lost replies


class Load:
    """Every client connection, on one selectors loop with a timer heap."""

    def __init__(self, o, cluster, ledger, rng):
        self.o, self.cluster, self.led, self.rng = o, cluster, ledger, rng
        self.sel = selectors.DefaultSelector()
        self.timers, self.tick, self.rid, self.cids = [], itertools.count(), itertools.count(1), itertools.count(1)
        self.conns, self.stopping = {}, False
        self.ready = threading.Event()  # the initial connections are open
        self.quiet = threading.Lock()  # held by the fault thread while it reads fd tables

    def at(self, delay, fn, *args):
        heapq.heappush(self.timers, (now() + delay, next(self.tick), fn, args))

    def start(self):
        o = self.o
        for i in range(o.held):
            self.at(i / 1000, self.open, "held")  # ramp up at 1000 connections/s
        for kind, n in (("pipelined", o.pipelined), ("heavy", o.heavy), ("short", o.short)):
            for i in range(n):
                self.at(0.01 * i, self.open, kind)
        self.at(o.held / 1000 + 1, self.ready.set)

    # -- connection life
    def open(self, kind, fails=0):
        if self.stopping:
            return
        c = Conn(kind, next(self.cids), fails)
        c.sock.setblocking(False)
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conns[c.cid] = c
        if c.sock.connect_ex(("127.0.0.1", self.cluster.port)) not in (0, errno.EINPROGRESS):
            return self.refused(c)
        self.set_mask(c, selectors.EVENT_WRITE)

    def refused(self, c):
        self.led.refused += 1
        self.again(c)

    def connected(self, c):
        if c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return self.refused(c)
        c.port = c.sock.getsockname()[1]
        self.led.connects += 1
        self.set_mask(c, selectors.EVENT_READ)
        self.next_request(c)

    def drop(self, c):
        """Forgets and closes c (its requests are accounted for already)."""
        self.conns.pop(c.cid, None)
        self.set_mask(c, 0)
        c.sock.close()

    def again(self, c):
        """Closes c and opens another in its place, backing off while the
        service keeps failing."""
        self.drop(c)
        self.at(self.rng.uniform(0.05, 0.5) * 2 ** min(c.fails, 5), self.open, c.kind, c.fails + 1)

    def died(self, c, why):
        """The server closed or reset c: the connection and its replies are lost."""
        self.led.ended[why] += 1
        self.abandon(c, "connection lost", "conn")

    def abandon(self, c, how, what=None):
        """c is over (lost, stalled or out of step): account for it, replace it."""
        self.lose(c, [r for r in c.pending if r.t_first is not None], how, what)
        self.again(c)

    def lose(self, c, reqs, how, what=None):
        c.lost.update(r.rid for r in reqs)
        for r in reqs:
            c.pending.remove(r)
        self.led.incident(c, now(), reqs, what, how)

    def set_mask(self, c, mask):
        if mask != c.mask:
            if not c.mask:
                self.sel.register(c.sock, mask, c)
            elif not mask:
                self.sel.unregister(c.sock)
            else:
                self.sel.modify(c.sock, mask, c)
            c.mask = mask

    def want(self, c):
        reading = c.read_at is None or c.read_at <= now()
        self.set_mask(c, (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if c.out else 0))

    # -- requests
    def ping(self, c, tag, pad=b""):
        """Queues one ping (a held connection: only its first HOLD_BYTES)."""
        rid = next(self.rid)
        param = b'"%s%d.%d%s"' % (tag, c.cid, rid, pad)
        body = b'{"in":"ping","params":' + param + b"}"
        frame = len(body).to_bytes(4, "little") + body
        c.pending.append(Req(rid, b'{"out":"pong","result":' + param + b"}", c.queued, c.queued + len(frame)))
        if c.kind == "held":
            frame, c.rest = frame[:HOLD_BYTES], frame[HOLD_BYTES:]
        c.out += frame
        c.queued += len(frame)

    def next_request(self, c, paused=False):
        o, rng = self.o, self.rng
        if c.cid not in self.conns:
            return
        if c.kind == "short" and c.last_ok:
            self.drop(c)  # done; the next one after a pause (the rate)
            return self.at(rng.expovariate(o.short_rate / max(o.short, 1)), self.open, "short")
        if self.stopping:
            return
        if c.kind == "pipelined":
            if o.pause and c.last_ok and not paused:  # a breath between batches (CPU)
                return self.at(rng.uniform(0, 2 * o.pause), self.next_request, c, True)
            for _ in range(rng.randint(1, o.batch)):
                self.ping(c, b"p")
        elif c.kind == "held":
            if c.last_ok and rng.random() < 0.1:
                self.drop(c)  # some churn: close after a reply, open anew
                return self.open("held")
            self.ping(c, b"w")
            self.at(rng.uniform(0.5, o.hold), self.complete_hold, c)
        elif c.kind == "heavy":
            self.ping(c, b"h", b"." + b"x" * o.heavy_size)
            c.read_at = float("inf")  # no reading until the whole request is out
        else:
            self.ping(c, b"s")
        self.flush(c)

    def complete_hold(self, c):
        if c.rest and c.cid in self.conns:
            c.out += c.rest
            c.queued += len(c.rest)
            c.rest = None
            self.flush(c)

    def flush(self, c):
        t, n = now(), 0
        if c.out:
            try:
                n = c.sock.send(c.out)
            except BlockingIOError:
                pass
            except OSError as e:
                return self.died(c, e.strerror)
            del c.out[:n]
            c.written += n
            for r in c.pending:
                if r.t_first is None and c.written > r.start:
                    r.t_first = t
                    self.led.sent += 1
                if r.t_sent is None and c.written >= r.end:
                    r.t_sent = t
                    if c.kind == "heavy":
                        c.read_at = t + self.rng.uniform(0.2, self.o.late)
                        self.at(c.read_at - t, self.late_read, c)
        # Waiting on the server: bytes unsent, or a whole request unanswered
        # (not while a request is held, nor while a heavy client reads late).
        busy = c.out or (c.pending and c.pending[0].t_sent is not None and c.rest is None)
        if not busy or (c.read_at is not None and c.read_at > t):
            c.waiting = None
        elif n or c.waiting is None:
            c.waiting = t
        self.want(c)

    def late_read(self, c):
        if c.cid in self.conns:
            c.waiting = now()
            self.want(c)

    def readable(self, c):
        try:
            data = c.sock.recv(1 << 18)
        except BlockingIOError:
            return
        except OSError as e:
            return self.died(c, e.strerror)
        if not data:
            return self.died(c, "EOF")
        c.waiting = now() if c.pending else None
        c.inbuf += data
        while len(c.inbuf) >= 4:
            n = int.from_bytes(c.inbuf[:4], "little")
            if len(c.inbuf) < 4 + n:
                break
            body = bytes(c.inbuf[4:4 + n])
            del c.inbuf[:4 + n]
            if not self.reply(c, body):
                return
        if not c.pending:
            c.read_at = None
            self.next_request(c)

    def reply(self, c, body):
        """Checks one reply against the requests in flight, in order."""
        for i, r in enumerate(c.pending):
            if r.t_first is None:
                break
            if body == r.expected:
                if i:  # a later reply came first: the earlier ones are lost
                    self.lose(c, list(itertools.islice(c.pending, i)), "a later reply came first")
                c.pending.popleft()
                self.led.ok += 1
                self.led.ok_by[c.kind] += 1
                c.last_ok, c.fails = r.rid, 0
                return True
        self.abandon(c, "the stream went out of step", "dup" if self.is_dup(c, body) else "mismatch")
        return False

    @staticmethod
    def is_dup(c, body):
        """A second reply to a request of c that was answered already."""
        try:
            cid, rid = json.loads(body)["result"][1:].split(".")[:2]
            return int(cid) == c.cid and int(rid) <= c.last_ok and int(rid) not in c.lost
        except (ValueError, KeyError, TypeError, AttributeError):
            return False

    # -- the loop
    def run(self, until, progress=None):
        last = now()
        while now() < until:
            timeout = min(0.1, max(0.0, self.timers[0][0] - now())) if self.timers else 0.1
            ready = self.sel.select(timeout)
            with self.quiet:  # a kill's snapshot and its accounting never interleave
                t = now()
                while self.timers and self.timers[0][0] <= t:
                    _, _, fn, args = heapq.heappop(self.timers)
                    fn(*args)
                for key, ev in ready:
                    c = key.data
                    if c.cid not in self.conns:
                        continue
                    if c.port == 0:
                        self.connected(c)
                        continue
                    if ev & selectors.EVENT_READ:
                        self.readable(c)
                    if ev & selectors.EVENT_WRITE and c.cid in self.conns:
                        self.flush(c)
                if now() - last >= 1:  # once a second: stalls, progress, the end of a drain
                    last = now()
                    for c in list(self.conns.values()):
                        if c.waiting is not None and last - c.waiting > self.o.stall:
                            self.abandon(c, f"no progress for {self.o.stall:g}s")
                    if progress:
                        progress()
                    if self.stopping and not any(c.pending for c in self.conns.values()):
                        return

    def finish(self, timeout):
        """No new requests; held ones complete now; every reply is awaited."""
        self.stopping = True
        for c in list(self.conns.values()):
            self.complete_hold(c)
        self.run(now() + timeout)
        for c in list(self.conns.values()):
            self.lose(c, [r for r in c.pending if r.t_first is not None], "still unanswered at the end")
            self.drop(c)


# ------------------------------------------------------------------- faults
class Faults(threading.Thread):
    """Injects one fault at a time; checks the service every 3 s."""

    def __init__(self, o, cluster, ledger, rng, tmp, load):
        super().__init__(daemon=True)
        self.o, self.cl, self.led, self.rng, self.load = o, cluster, ledger, rng, load
        self.stop = threading.Event()
        self.kinds = [k.strip() for k in o.faults.split(",") if k.strip()]
        self.tally = collections.defaultdict(collections.Counter)  # fault -> outcome -> n
        self.gen, self.took = "?", 0.1  # took: seconds a plain restart takes (moving average)
        self.wrapper = os.path.join(tmp, "handoff-lowfd")
        with open(self.wrapper, "w") as f:
            f.write(f"#!/bin/sh\nulimit -n {o.lowfd}\nexec '{os.path.abspath(o.bin)}' \"$@\"\n")
        os.chmod(self.wrapper, 0o755)

    def run(self):
        self.load.ready.wait(60)
        nxt, check = now() + self.rng.uniform(self.o.fault_min, self.o.fault_max), now() + 3
        while not self.stop.wait(0.2):
            try:
                if now() >= nxt and self.kinds:
                    kind = self.rng.choice(self.kinds)
                    if kind in ("kill-worker", "stop-worker"):
                        getattr(self, kind.replace("-", "_"))()
                    else:  # restart, restart-lowfd, kill-new-master, kill-old-master
                        self.restart_with(kind, ["--binary", self.wrapper] if kind == "restart-lowfd" else [],
                                          {"kill-new-master": "new", "kill-old-master": "old"}.get(kind))
                    nxt = now() + self.rng.uniform(self.o.fault_min, self.o.fault_max)
                if now() >= check:
                    self.health()
                    check = now() + 3
            except Exception:  # a harness bug: say so, go on
                say("chaos: fault thread error:\n" + traceback.format_exc())

    # -- service health
    def health(self, tries=3, recover=True):
        """The status JSON if the service answers (a whoami and `status`);
        after `tries` failures 1 s apart: a finding and a fresh cluster."""
        for i in range(tries):
            try:
                self.cl.probe()
                st = self.cl.status()
                self.gen = st["gen"]
                return st
            except (OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
                why = f"{type(e).__name__}: {e}"
            time.sleep(1 if i + 1 < tries else 0)
        if recover and not self.stop.is_set():
            self.led.finding(f"service down ({why}); restarting the cluster")
            self.fresh("service down")
        return None

    def fresh(self, why):
        """Replaces the whole cluster; its connections die with it (a kill)."""
        e = self.led.event("harness", f"harness cluster restart ({why})")
        with self.load.quiet:
            for p in self.cl.procs():
                freeze(p)
            e.held, e.tk = client_ports(None, self.cl.port), now()
        self.cl.kill_all()
        self.cl.start()
        e.t1 = now()
        say(f"#{e.n} {e.label}: new cluster on port {self.cl.port}; {len(e.held)} connection(s) cut")

    def kill(self, e, pid, role, guard=None):
        """SIGSTOPs pid (and its workers if a master), reads which
        connections each process holds, SIGKILLs pid. The victims are pid
        and the workers that die with it (PR_SET_PDEATHSIG), if they do.
        The load waits meanwhile, so no loss is judged on half a picture.
        Returns False (and lets pid go on) if guard() turned false."""
        t = now()
        freeze(pid)
        if guard and not guard():
            os.kill(pid, signal.SIGCONT)
            return False
        kids = self.cl.children(pid, "worker") if role == "master" else []
        with self.load.quiet:
            for k in kids:
                freeze(k)
            ports = {q: client_ports([q], self.cl.port) for q in [pid] + kids}
            rest = client_ports([p for p in self.cl.procs() if p not in ports], self.cl.port)
            e.tk = now()
            os.kill(pid, signal.SIGKILL)
            for k in kids:  # never leave one stopped
                os.kill(k, signal.SIGCONT)
            deadline = now() + 0.3
            while any(map(alive, kids)) and now() < deadline:
                time.sleep(0.005)
            e.held = set().union(*(ports[q] for q in ports if q == pid or not alive(q)))
            e.others = rest.union(*(ports[q] for q in kids if alive(q)))
        e.frozen = f"stopped {(e.tk - t) * 1000:.0f} ms before"
        return True

    def worker(self):
        st = self.health()
        pids = [w["pid"] for w in (st or {}).get("workers", []) if w["pid"]]
        return self.rng.choice(pids) if pids else None

    # -- the faults
    def kill_worker(self):
        pid = self.worker()
        if pid:
            e = self.led.event("kill-worker", f"worker SIGKILL pid {pid}")
            self.kill(e, pid, "worker")
            e.t1 = now()
            say(f"#{e.n} {e.label}: it held {len(e.held)} connection(s) ({e.frozen})")
            self.tally["kill-worker"]["done"] += 1

    def stop_worker(self):
        pid = self.worker()
        if pid:
            secs = self.rng.uniform(1, 4)
            e = self.led.event("stop-worker", f"worker SIGSTOP pid {pid}")
            os.kill(pid, signal.SIGSTOP)
            time.sleep(secs)
            os.kill(pid, signal.SIGCONT)
            e.t1 = now()
            say(f"#{e.n} {e.label} for {secs:.1f}s")
            self.tally["stop-worker"]["done"] += 1

    def restart_with(self, kind, args, victim=None):
        """`handoff restart` (SIGKILLing the new or old master mid-takeover
        if victim says so), then its exit status against the service."""
        st = self.health()
        if not st:
            return
        old, gen0 = st["pid"], st["gen"]
        e = self.led.event(kind, f"restart nofile={self.o.lowfd}" if kind == "restart-lowfd" else "restart")
        before = (set(self.cl.children(old, "cluster")), self.ctl_inode())
        p = subprocess.Popen([self.o.bin, "restart", "--dir", self.cl.dir] + args,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        note = self.mid_takeover(e, p, old, victim, before) if victim else ""
        try:
            err = p.communicate(timeout=120)[1]
        except subprocess.TimeoutExpired:
            p.kill()
            err = p.communicate()[1]
            self.led.finding(f"#{e.n} {e.label}: handoff restart still running after 120 s")
        e.t1 = now()
        rc, reason = p.returncode, last_line(err)
        st2 = self.health(recover=False)
        gen1 = st2["gen"] if st2 else "DOWN"
        say(f"#{e.n} {e.label}: exit {rc}{' (' + reason + ')' if reason else ''}, "
            f"gen {gen0} -> {gen1}, {e.t1 - e.t0:.2f}s{'; ' + note if note else ''}")
        outcome = "exit 0" if rc == 0 else "exit non-zero"
        self.tally[kind][f"{'killed' if e.tk else 'no kill'}, {outcome}" if victim else outcome] += 1
        if kind == "restart" and rc == 0:
            self.took = 0.7 * self.took + 0.3 * (e.t1 - e.t0)
        if rc == 0 and gen1 != gen0 + 1:
            self.led.finding(f"#{e.n} {e.label}: restart exited 0 but "
                             + ("the service is down" if not st2 else f"the generation went {gen0} -> {gen1}"))
        if rc != 0 and st2 and gen1 != gen0 and victim != "old":
            self.led.finding(f"#{e.n} {e.label}: restart exited {rc} but the generation went {gen0} -> {gen1}")
        if not st2:
            self.health(tries=1)  # the finding, and a fresh cluster
        elif kind == "restart-lowfd" and gen1 != gen0 and not self.raise_nofile():
            time.sleep(0.5)  # let its consequences show, then back to a cluster with the normal limit
            self.fresh(f"undo nofile={self.o.lowfd}")

    def ctl_inode(self):
        try:
            return os.stat(os.path.join(self.cl.dir, "control.sock")).st_ino
        except OSError:
            return None

    def mid_takeover(self, e, p, old, victim, before):
        """Waits for the new master (a `cluster` child of the old one; to
        kill the old one: until the new one has the listener, i.e. has
        renamed its control socket over the old one's), then a random part
        of a restart's usual time; then SIGKILLs the victim."""
        kids, ino = before
        new, deadline = None, now() + 10
        while now() < deadline and p.poll() is None:
            new = new or next((q for q in self.cl.children(old, "cluster") if q not in kids), None)
            if new and (victim == "new" or self.ctl_inode() != ino):
                break
            time.sleep(0.002)
        else:
            return "the takeover did not get that far; nothing killed"
        time.sleep(self.rng.choice([0, self.rng.uniform(0, self.took)]))
        pid = new if victim == "new" else old
        label, e.label = e.label, f"{victim} master SIGKILL pid {pid}"
        if self.kill(e, pid, "master", guard=lambda: p.poll() is None and alive(old)):
            return f"killed mid-takeover holding {len(e.held)} connection(s) ({e.frozen})"
        e.label = label
        return "the takeover had completed; nothing killed"

    def raise_nofile(self):
        """A low-limit generation took over: give its processes the normal
        limit back (needs CAP_SYS_RESOURCE), or every later one inherits it."""
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        try:
            for pid in self.cl.procs():
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
            return True
        except OSError:
            return False


# --------------------------------------------------------------------- main
def report(o, led, faults, up, secs, tmp):
    counts = lambda c: ", ".join(f"{k} {n}" for k, n in c.most_common())  # noqa: E731
    print(f"\nchaos: {secs:.0f}s, seed {o.seed}, {o.workers} workers; load {o.held} held + {o.pipelined} pipelined "
          f"+ {o.heavy} heavy ({o.heavy_size} B) + {o.short} short-connection slots")
    print("faults: " + ("; ".join(f"{k} {sum(v.values())} ({counts(v)})" for k, v in sorted(faults.tally.items()))
                        or "none"))
    print(f"requests sent {led.sent}, replies ok {led.ok}, lost replies {led.total['reply']} "
          f"(sent = ok + lost: {'yes' if led.sent == led.ok + led.total['reply'] else 'NO'}); "
          f"connections {led.connects}, connects refused {led.refused}")
    print(f"replies ok by load: {counts(led.ok_by)}")
    for what, c in (("lost connections ended by", led.ended), ("lost replies noticed by", led.noticed)):
        if c:
            print(f"{what}: {counts(c)}")
    head = f"{'lost conns':>10} {'lost replies':>12} {'mismatch':>8} {'dup':>5}"
    row = lambda c: f"{c['conn']:>10} {c['reply']:>12} {c['mismatch']:>8} {c['dup']:>5}"  # noqa: E731
    print(f"\n{'cause (the fault near the loss)':<50} {'explained':<9} {head}")
    for (ex, kinds), c in sorted(led.by_kind.items(), key=lambda kv: (not kv[0][0], -sum(kv[1].values()))):
        print(f"{kinds[:50]:<50} {'yes' if ex else 'NO':<9} {row(c)}")
    print(f"{'total':<60} {row(led.total)}\n{'unexplained':<60} {row(led.unexplained)}")
    if led.by_event:
        print(f"\nunexplained, by fault\n{'':<60} {head}")
        for (_, name), c in sorted(led.by_event.items()):
            print(f"{name[:60]:<60} {row(c)}")
    if led.findings:
        print("\nfindings:\n" + "\n".join("  " + f for f in led.findings))
    n = sum(led.unexplained.values())
    status = "not checked (interrupted)" if up is None else "up" if up else "DOWN"
    print(f"\nservice at the end: {status}; cluster log: {os.path.join(tmp, 'cluster.log')}")
    print(f"chaos: {n} unexplained loss(es)")
    return 1 if n or led.findings or not up else 0


def main():
    o = options()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = o.held + o.pipelined + o.heavy + o.short + 100
    if hard != resource.RLIM_INFINITY and hard < need:
        raise SystemExit(f"chaos: the descriptor limit {hard} is below the {need} this load needs")
    if not os.access(o.bin, os.X_OK):
        raise SystemExit(f"chaos: {o.bin} is missing: run 'make build' first")

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    rng = random.Random(o.seed)
    tmp = tempfile.mkdtemp(prefix="handoff-chaos.")
    led, cl = Ledger(o.show), Cluster(o, tmp)
    load = Load(o, cl, led, rng)
    faults = Faults(o, cl, led, random.Random(rng.random()), tmp, load)
    up, interrupted, start, last = False, False, now(), [now()]

    def progress():
        if now() - last[0] >= 10:
            last[0] = now()
            say(f"{led.line()} | {len(load.conns)} conns | gen {faults.gen}")

    try:
        cl.start()
        say(f"cluster on 127.0.0.1:{cl.port} ({o.workers} workers), dir {cl.dir}, seed {o.seed}; running {o.secs:g}s")
        load.start()
        faults.start()
        load.run(start + o.secs, progress)
        say("load done; waiting for the fault under way")
        faults.stop.set()
        faults.join(150)
        if faults.is_alive():
            led.finding("a fault did not finish within 150 s")
        say("draining: held requests complete now; waiting for every reply")
        load.finish(o.stall + 5)
        for _ in range(3):
            try:
                cl.probe(), cl.status()
                up = True
                break
            except (OSError, ValueError, subprocess.TimeoutExpired):
                time.sleep(1)
        say(led.line())
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
        interrupted, up = True, None
    finally:
        faults.stop.set()
        for c in list(load.conns.values()):
            load.drop(c)
        cl.stop()
    rc = report(o, led, faults, up, now() - start, tmp)
    if rc == 0 and not o.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 130 if interrupted else rc


if __name__ == "__main__":
    sys.exit(main())
