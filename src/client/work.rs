//! The rebalancing load (`handoff client work`): CPU work on keep-alive
//! connections, and where those connections sit over time.
//!
//! ```text
//! {"in":"whoami"}                  -> {"out":"whoami","result":{"worker":I,"pid":N,...}}
//! {"in":"work","params":{"us":N}}  -> {"out":"work","result":N}  (after N µs of CPU)
//! ```
//!
//! 1. `conns` keep-alive connections are opened one at a time, each asking
//!    `whoami` before the next connects: the worker it starts on (and a
//!    balancer that hands a connection to whichever worker is free, as
//!    Node's round-robin does, spreads them evenly).
//! 2. The driven ones (all, or with `only_worker = W` those that started
//!    on worker W: a skewed load) send `work` requests back to back, one
//!    outstanding per connection, for `secs` seconds; the others stay idle.
//!    Every `sample` (200 ms) each driven connection sends one `whoami`
//!    between two work requests: where it is now.
//! 3. At the end each driven connection asks a last `whoami` (`moved`:
//!    those on another worker than at the start), then the client listens
//!    for a quiet `sample` more.
//!
//! Every reply is checked, in order, exactly once: with one request in
//! flight, any byte that arrives while nothing is asked (on a driven
//! connection between two requests, on an idle one at any time, during the
//! quiet end) is an error — a duplicated or stray reply — and so is a
//! wrong reply or a connection that breaks. Steps 2 and 3 run on one event
//! loop (the project's reactor), like the keep-alive rpc load.
//!
//! `trace` writes one TSV row per `sample`: the time, the work replies per
//! second in that interval, the driven connections on each worker, and each
//! worker's busy share (utime + stime deltas from `/proc/PID/stat` of the
//! pid its whoami named; `nan` when that process is not on this machine).
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::rpc::{encode_frame, read_frame, MAX_REPLY};
use super::stats::{ErrLog, Latency};
use super::{connect, Stream, Target, IO_TIMEOUT};
use crate::core::reactor::{Base, Conn, ConnEvent, Event, Interest};
use crate::service::rpc::wire::{self, Frame};

/// `first_moved_ms`: the time until at least this many driven connections
/// answered whoami from another worker than the one they started on.
pub const MOVED_MARK: usize = 8;
/// The first interval of the split throughput (`rps_0_3`), in seconds.
pub const SPLIT_SECS: f64 = 3.0;
const ERR_DETAILS: u64 = 5;
/// How early a timer may fire and still count as the deadline.
const TIMER_SLACK: Duration = Duration::from_millis(5);

/// Options for [`work`].
#[derive(Debug, Clone)]
pub struct WorkOpts {
    /// The server's host name or address (not used with `unix`).
    pub host: String,
    /// The server's TCP port (not used with `unix`).
    pub port: u16,
    /// Keep-alive connections opened.
    pub conns: usize,
    /// Microseconds of CPU work per request.
    pub us: u64,
    /// Seconds of load (after every connection learned its worker).
    pub secs: f64,
    /// Drive only the connections that start on this worker.
    pub only_worker: Option<u64>,
    /// Where to write the per-sample TSV.
    pub trace: Option<PathBuf>,
    /// How often the driven connections re-learn their worker (and the
    /// trace's row interval).
    pub sample: Duration,
    /// Connect to the Unix stream socket at this path instead of
    /// `host:port` (`--unix PATH`).
    pub unix: Option<PathBuf>,
}

/// What a [`work`] run produced; `Display` gives the one summary line.
#[derive(Debug, Clone, Default)]
pub struct WorkSummary {
    /// Connections opened.
    pub conns: usize,
    /// Connections that sent work.
    pub driven: usize,
    /// Microseconds of work per request.
    pub us: u64,
    /// Seconds of load asked for.
    pub secs: f64,
    /// Work replies that passed the check (also those that came after the
    /// deadline, for requests sent before it).
    pub ok: u64,
    /// Wrong replies, stray bytes, broken connections, failed connects.
    pub errors: u64,
    /// Work replies received in `[0, secs)` per second.
    pub rps: f64,
    /// The same over `[0, min(3, secs))`.
    pub rps_early: f64,
    /// The same over `[min(3, secs), secs)`.
    pub rps_late: f64,
    /// 99th percentile latency of the work replies received in
    /// `[0, min(3, secs))`, µs ...
    pub p99_early_us: u64,
    /// ... and in `[min(3, secs), secs)` (after a rebalancing has had time).
    pub p99_late_us: u64,
    /// Median work latency (request written to whole reply), µs.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Largest, µs.
    pub max_us: u64,
    /// Driven connections whose last whoami named another worker than
    /// their first.
    pub moved: usize,
    /// Milliseconds from the start until [`MOVED_MARK`] driven connections
    /// were seen on another worker; `None` when never.
    pub first_moved_ms: Option<u64>,
    /// Driven connections per worker (index order) at the start ...
    pub start: BTreeMap<u64, usize>,
    /// ... and at the end (by their last whoami).
    pub end: BTreeMap<u64, usize>,
    /// This client's own CPU time over the run's wall time, in % of one
    /// CPU (that the client is not what limits the figures).
    pub client_cpu_pct: f64,
}

impl WorkSummary {
    /// No error, something driven, and at least one work reply.
    pub fn passed(&self) -> bool {
        self.errors == 0 && self.driven > 0 && self.ok > 0
    }
}

/// `8` for 8.0, `2.5` for 2.5.
fn secs_label(s: f64) -> String {
    format!("{s}")
}

/// `20/0` (counts in worker-index order; `-` when none).
fn per_worker(m: &BTreeMap<u64, usize>, workers: &[u64]) -> String {
    if workers.is_empty() {
        return "-".into();
    }
    workers.iter().map(|w| m.get(w).copied().unwrap_or(0).to_string()).collect::<Vec<_>>().join("/")
}

impl fmt::Display for WorkSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let split = SPLIT_SECS.min(self.secs);
        let workers: Vec<u64> = self
            .start
            .keys()
            .chain(self.end.keys())
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        write!(
            f,
            "work conns={} driven={} us={} secs={} ok={} errors={} rps={:.0} p50_us={} p99_us={} max_us={} moved={} \
             rps_0_{}={:.0} rps_{}_{}={:.0} p99_0_{}={} p99_{}_{}={} first_moved_ms={} driven_start={} driven_end={} \
             client_cpu_pct={:.1}",
            self.conns,
            self.driven,
            self.us,
            secs_label(self.secs),
            self.ok,
            self.errors,
            self.rps,
            self.p50_us,
            self.p99_us,
            self.max_us,
            self.moved,
            secs_label(split),
            self.rps_early,
            secs_label(split),
            secs_label(self.secs),
            self.rps_late,
            secs_label(split),
            self.p99_early_us,
            secs_label(split),
            secs_label(self.secs),
            self.p99_late_us,
            self.first_moved_ms.map_or(-1, |m| m as i64),
            per_worker(&self.start, &workers),
            per_worker(&self.end, &workers),
            self.client_cpu_pct,
        )
    }
}

/// The work request for `us` microseconds.
pub fn work_frame(us: u64) -> Vec<u8> {
    encode_frame(&json!({"in": "work", "params": {"us": us}}))
}

/// The whoami request.
pub fn whoami_frame() -> Vec<u8> {
    encode_frame(&json!({"in": "whoami"}))
}

fn shown(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    if body.len() > 200 {
        s + "..."
    } else {
        s
    }
}

/// Checks that `body` is `{"out":"work","result":us}`. `exact` is that
/// reply as this client would write it (compared first: the common case
/// costs no parse).
pub fn check_work(body: &[u8], us: u64, exact: &[u8]) -> Result<(), String> {
    if body == exact {
        return Ok(());
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("reply is not JSON ({e}): {}", shown(body)))?;
    if v.get("out").and_then(Value::as_str) == Some("work") && v.get("result").and_then(Value::as_u64) == Some(us) {
        Ok(())
    } else {
        Err(format!("unexpected reply {} (expected work with result {us})", shown(body)))
    }
}

/// Parses a whoami reply: (worker index, pid if given).
pub fn parse_whoami(body: &[u8]) -> Result<(u64, Option<u64>), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("reply is not JSON ({e}): {}", shown(body)))?;
    let r = &v["result"];
    match (v["out"].as_str(), r["worker"].as_u64()) {
        (Some("whoami"), Some(w)) => Ok((w, r["pid"].as_u64())),
        _ => Err(format!("unexpected reply {} (expected whoami with a worker index)", shown(body))),
    }
}

/// What a connection waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Nothing asked: any byte is an error.
    Nothing,
    /// A work reply.
    Work,
    /// A whoami sent between two work requests.
    Probe,
    /// The last whoami.
    Final,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Driving,
    Stopping,
    Quiet,
}

struct Client {
    conn: Option<Conn>,
    driven: bool,
    wait: Wait,
    sent_at: Instant,
    /// The worker of the first whoami.
    first: Option<u64>,
    /// The worker of the latest whoami.
    now: Option<u64>,
    /// A whoami is due after the current reply.
    probe: bool,
    /// The last whoami was answered.
    ended: bool,
}

/// One trace row.
struct Sample {
    t: f64,
    rps: f64,
    conns: BTreeMap<u64, usize>,
    busy: BTreeMap<u64, f64>,
}

/// The worker processes' CPU time, for the busy share.
#[derive(Default)]
struct CpuSampler {
    /// worker -> (pid, ticks, when)
    last: BTreeMap<u64, (u64, u64, Instant)>,
}

/// utime + stime of a process, in clock ticks.
fn proc_ticks(pid: u64) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the ")" that ends the command name: state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// This process's user + system CPU time.
fn own_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

impl CpuSampler {
    /// Busy share of each worker since the previous call (NaN for the
    /// first sight of a pid, or when /proc does not show it).
    fn sample(&mut self, pids: &BTreeMap<u64, u64>, hz: f64) -> BTreeMap<u64, f64> {
        let now = Instant::now();
        let mut out = BTreeMap::new();
        for (&w, &pid) in pids {
            let share = match (proc_ticks(pid), self.last.get(&w)) {
                (Some(t), Some(&(p0, t0, at))) if p0 == pid => {
                    let dt = now.duration_since(at).as_secs_f64();
                    if dt > 0.0 {
                        t.saturating_sub(t0) as f64 / hz / dt
                    } else {
                        f64::NAN
                    }
                }
                _ => f64::NAN,
            };
            match proc_ticks(pid) {
                Some(t) => {
                    self.last.insert(w, (pid, t, now));
                }
                None => {
                    self.last.remove(&w);
                }
            }
            out.insert(w, share);
        }
        out
    }
}

struct Run {
    clients: Vec<Client>,
    us: u64,
    work: Vec<u8>,
    whoami: Vec<u8>,
    /// The work reply's exact bytes as serde_json writes them.
    exact: Vec<u8>,
    phase: Phase,
    start: Instant,
    secs: f64,
    sample: Duration,
    ok: u64,
    errors: u64,
    lat: Latency,
    /// Work replies (and their latencies) in [0, min(3, secs)) and in
    /// [min(3, secs), secs).
    early: u64,
    late: u64,
    lat_early: Latency,
    lat_late: Latency,
    /// Work replies since the last trace row.
    since_row: u64,
    last_row: Instant,
    first_moved: Option<Duration>,
    /// worker -> pid, from the latest whoami naming it.
    pids: BTreeMap<u64, u64>,
    cpu: CpuSampler,
    hz: f64,
    samples: Vec<Sample>,
    tick: u32,
    timer: Option<Event>,
    base: Base,
    errlog: Arc<ErrLog>,
}

impl Run {
    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Connection `c` is unusable: one error, closed.
    fn lose(&mut self, c: usize, why: fmt::Arguments<'_>) {
        self.errlog.report(format_args!("conn {c}: {why}"));
        self.errors += 1;
        let cl = &mut self.clients[c];
        cl.conn = None;
        cl.wait = Wait::Nothing;
        self.progress();
    }

    /// Ends the phase when every connection is through with it.
    fn progress(&mut self) {
        match self.phase {
            Phase::Stopping => {
                if self.clients.iter().all(|c| !c.driven || c.conn.is_none() || c.ended) {
                    self.phase = Phase::Quiet;
                    if let Some(t) = &self.timer {
                        t.del();
                        if let Err(e) = t.add(Some(self.sample)) {
                            self.errlog.report(format_args!("work: timer: {e}"));
                            self.base.exit(None);
                        }
                    }
                }
            }
            Phase::Driving | Phase::Quiet => {}
        }
    }

    fn send(&mut self, c: usize, what: Wait) {
        let frame = if what == Wait::Work { &self.work } else { &self.whoami };
        let cl = &mut self.clients[c];
        let Some(conn) = cl.conn.as_ref() else { return };
        cl.wait = what;
        cl.sent_at = Instant::now();
        if let Err(e) = conn.write_now(frame) {
            self.lose(c, format_args!("write: {e}"));
        }
    }

    /// After a reply on driven connection `c`: the next request.
    fn next(&mut self, c: usize) {
        match self.phase {
            Phase::Driving if self.clients[c].probe => {
                self.clients[c].probe = false;
                self.send(c, Wait::Probe)
            }
            Phase::Driving => self.send(c, Wait::Work),
            Phase::Stopping => self.send(c, Wait::Final),
            Phase::Quiet => {}
        }
    }

    /// Driven connections seen on another worker than their first.
    fn moved(&self) -> usize {
        self.clients.iter().filter(|c| c.driven && c.conn.is_some() && c.now.is_some() && c.now != c.first).count()
    }

    fn whoami(&mut self, c: usize, body: &[u8]) -> bool {
        match parse_whoami(body) {
            Ok((w, pid)) => {
                if let Some(pid) = pid {
                    self.pids.insert(w, pid);
                }
                let cl = &mut self.clients[c];
                if cl.first.is_none() {
                    cl.first = Some(w);
                }
                cl.now = Some(w);
                if self.first_moved.is_none() && self.moved() >= MOVED_MARK {
                    self.first_moved = Some(self.elapsed());
                }
                true
            }
            Err(e) => {
                self.errlog.report(format_args!("conn {c}: whoami: {e}"));
                self.errors += 1;
                false
            }
        }
    }

    fn on_event(&mut self, c: usize, ev: ConnEvent) {
        match ev {
            ConnEvent::Read => {}
            ConnEvent::Drained => return,
            ConnEvent::Eof | ConnEvent::Error(_) | ConnEvent::Timeout => {
                let wait = self.clients[c].wait;
                return self
                    .lose(c, format_args!("{ev:?} while waiting for {wait:?} ({:?} into the run)", self.elapsed()));
            }
        }
        loop {
            let cl = &self.clients[c];
            let Some(conn) = cl.conn.as_ref() else { return };
            let avail = conn.input_len();
            if avail == 0 {
                return;
            }
            if cl.wait == Wait::Nothing {
                let shown = shown(conn.peek(avail.min(200)));
                return self.lose(c, format_args!("{avail} bytes arrived while nothing was asked: {shown}"));
            }
            let len = match wire::frame(conn.peek(avail.min(4)), avail, MAX_REPLY) {
                Frame::Incomplete => return,
                Frame::TooLarge { len } => {
                    return self.lose(c, format_args!("reply frame of {len} bytes exceeds {MAX_REPLY}"))
                }
                Frame::Complete { body } => body,
            };
            let body = conn.peek(4 + len)[4..].to_vec();
            let rtt = cl.sent_at.elapsed();
            let wait = cl.wait;
            if let Some(conn) = self.clients[c].conn.as_mut() {
                conn.consume(4 + len);
            }
            self.clients[c].wait = Wait::Nothing;
            match wait {
                Wait::Nothing => unreachable!("checked above"),
                Wait::Work => match check_work(&body, self.us, &self.exact) {
                    Ok(()) => {
                        self.ok += 1;
                        self.lat.record(rtt);
                        let t = self.elapsed().as_secs_f64();
                        if t < SPLIT_SECS.min(self.secs) {
                            self.early += 1;
                            self.lat_early.record(rtt);
                        } else if t < self.secs {
                            self.late += 1;
                            self.lat_late.record(rtt);
                        }
                        self.since_row += 1;
                    }
                    Err(e) => {
                        self.errlog.report(format_args!("conn {c}: work: {e}"));
                        self.errors += 1;
                    }
                },
                Wait::Probe => {
                    self.whoami(c, &body);
                }
                Wait::Final => {
                    self.whoami(c, &body);
                    self.clients[c].ended = true;
                    self.progress();
                }
            }
            // One request in flight: whatever follows its reply was never asked for.
            if let Some(conn) = self.clients[c].conn.as_ref() {
                let extra = conn.input_len();
                if extra > 0 {
                    let shown = shown(conn.peek(extra.min(200)));
                    return self.lose(c, format_args!("{extra} bytes more than the reply to {wait:?}: {shown}"));
                }
            }
            if matches!(wait, Wait::Work | Wait::Probe) {
                self.next(c);
            }
        }
    }

    /// Per-worker counts of the live driven connections, by `pick`.
    fn count(&self, pick: impl Fn(&Client) -> Option<u64>) -> BTreeMap<u64, usize> {
        let mut m = BTreeMap::new();
        for w in self.pids.keys() {
            m.insert(*w, 0);
        }
        for cl in self.clients.iter().filter(|c| c.driven && c.conn.is_some()) {
            if let Some(w) = pick(cl) {
                *m.entry(w).or_insert(0) += 1;
            }
        }
        m
    }

    /// The timer: a trace row and probes due, or the deadline; the quiet end.
    fn on_timer(&mut self) {
        match self.phase {
            Phase::Quiet => return self.base.exit(None),
            Phase::Driving => {}
            Phase::Stopping => return,
        }
        let now = Instant::now();
        let dt = now.duration_since(self.last_row).as_secs_f64();
        let busy = self.cpu.sample(&self.pids, self.hz);
        let conns = self.count(|c| c.now);
        self.samples.push(Sample {
            t: now.duration_since(self.start).as_secs_f64(),
            rps: if dt > 0.0 { self.since_row as f64 / dt } else { 0.0 },
            conns,
            busy,
        });
        self.since_row = 0;
        self.last_row = now;
        self.tick += 1;
        let deadline = self.start + Duration::from_secs_f64(self.secs);
        // (libevent's timers may fire a little early: they count from the
        // loop round's cached time.)
        if now + TIMER_SLACK >= deadline {
            // Every driven connection has a request in flight; each asks its
            // last whoami after that reply, then the quiet end (`progress`).
            self.phase = Phase::Stopping;
            return self.progress();
        }
        for cl in self.clients.iter_mut().filter(|c| c.driven) {
            cl.probe = true;
        }
        let next = (self.start + self.sample * (self.tick + 1)).min(deadline);
        if let Some(t) = &self.timer {
            if let Err(e) = t.add(Some(next.saturating_duration_since(Instant::now()))) {
                self.errlog.report(format_args!("work: timer: {e}"));
                self.errors += 1;
                self.base.exit(None);
            }
        }
    }
}

/// Connects and asks whoami (blocking: one connection at a time, so that a
/// balancer that hands connections to whichever worker is free, as Node's
/// round-robin does, sees them one by one), then puts the connection on the
/// loop. Returns it with the worker and pid its whoami named.
fn open(run: &Rc<RefCell<Run>>, base: &Base, target: &Target, c: usize) -> Result<(Conn, u64, Option<u64>), String> {
    let s = connect(target).map_err(|e| format!("connect {target}: {e}"))?;
    let mut body = Vec::new();
    match &s {
        Stream::Tcp(s) => whoami(&mut &*s, &mut body),
        Stream::Unix(s) => whoami(&mut &*s, &mut body),
    }?;
    let (worker, pid) = parse_whoami(&body).map_err(|e| format!("first whoami: {e}"))?;
    let fd = s.into_nonblocking_fd().map_err(|e| format!("socket options: {e}"))?;
    let w: Weak<RefCell<Run>> = Rc::downgrade(run);
    let conn = Conn::adopt(
        base,
        fd,
        &[],
        MAX_REPLY + 4,
        Rc::new(move |ev| {
            if let Some(r) = w.upgrade() {
                r.borrow_mut().on_event(c, ev);
            }
        }),
    )
    .map_err(|e| format!("event loop: {e}"))?;
    Ok((conn, worker, pid))
}

/// Writes a whoami request and reads its reply's body into `body`.
fn whoami<S: io::Read + Write>(s: &mut S, body: &mut Vec<u8>) -> Result<(), String> {
    s.write_all(&whoami_frame()).map_err(|e| format!("write whoami: {e}"))?;
    read_frame(s, body).map_err(|e| format!("first whoami: {e}"))
}

/// Runs the work load and returns its summary (with `trace`, the TSV is
/// written too; a failure to write it counts as an error).
pub fn work(o: &WorkOpts) -> WorkSummary {
    let errlog = Arc::new(ErrLog::new(ERR_DETAILS));
    let mut sum = WorkSummary { conns: o.conns, us: o.us, secs: o.secs, ..Default::default() };
    let fail = |mut s: WorkSummary, msg: fmt::Arguments<'_>| {
        errlog.report(msg);
        s.errors += 1;
        s
    };
    if !(o.secs > 0.0 && o.secs.is_finite()) || o.sample.is_zero() {
        return fail(sum, format_args!("work: --secs must be > 0 and the sample interval > 0"));
    }
    let target = match Target::new(&o.host, o.port, o.unix.as_deref()) {
        Ok(a) => a,
        Err(e) => return fail(sum, format_args!("work: resolve {}:{}: {e}", o.host, o.port)),
    };
    let base = match Base::new() {
        Ok(b) => b,
        Err(e) => return fail(sum, format_args!("work: event base: {e}")),
    };
    let run = Rc::new(RefCell::new(Run {
        clients: Vec::with_capacity(o.conns),
        us: o.us,
        work: work_frame(o.us),
        whoami: whoami_frame(),
        exact: serde_json::to_vec(&json!({"out": "work", "result": o.us})).expect("serialize json"),
        phase: Phase::Driving,
        start: Instant::now(),
        secs: o.secs,
        sample: o.sample,
        ok: 0,
        errors: 0,
        lat: Latency::new(),
        early: 0,
        late: 0,
        lat_early: Latency::new(),
        lat_late: Latency::new(),
        since_row: 0,
        last_row: Instant::now(),
        first_moved: None,
        pids: BTreeMap::new(),
        cpu: CpuSampler::default(),
        hz: clock_ticks_per_sec(),
        samples: Vec::new(),
        tick: 0,
        timer: None,
        base: base.clone(),
        errlog: errlog.clone(),
    }));
    // The longest a driven connection may wait for a reply: every
    // connection's request queued on one worker before its own.
    let reply_timeout = IO_TIMEOUT + Duration::from_micros(o.us.saturating_mul(o.conns as u64 + 1));

    // 1. Connect, and ask each connection where it is.
    for c in 0..o.conns {
        let opened = open(&run, &base, &target, c);
        let mut r = run.borrow_mut();
        let mut client = Client {
            conn: None,
            driven: false,
            wait: Wait::Nothing,
            sent_at: Instant::now(),
            first: None,
            now: None,
            probe: false,
            ended: false,
        };
        match opened {
            Ok((conn, worker, pid)) => {
                client.driven = o.only_worker.is_none_or(|w| w == worker);
                // An idle connection waits without a timeout: nothing may
                // arrive on it, however long the run.
                conn.set_read_timeout(client.driven.then_some(reply_timeout));
                conn.resume_reading();
                (client.first, client.now, client.conn) = (Some(worker), Some(worker), Some(conn));
                if let Some(pid) = pid {
                    r.pids.insert(worker, pid);
                }
            }
            Err(e) => {
                r.errlog.report(format_args!("conn {c}: {e}"));
                r.errors += 1;
            }
        }
        r.clients.push(client);
    }

    // 2. Drive.
    let cpu0 = own_cpu();
    let wall0 = Instant::now();
    {
        let mut r = run.borrow_mut();
        let r = &mut *r;
        let driven = r.clients.iter().filter(|c| c.driven).count();
        sum.driven = driven;
        sum.start = r.count(|c| c.first);
        if driven == 0 {
            let which = o.only_worker.map_or("any worker".to_string(), |w| format!("worker {w}"));
            r.errlog.report(format_args!("work: no connection on {which} to drive"));
            r.errors += 1;
        } else {
            let w = Rc::downgrade(&run);
            match Event::new(&base, -1, Interest::Timer, move || {
                if let Some(r) = w.upgrade() {
                    r.borrow_mut().on_timer();
                }
            }) {
                Ok(t) => r.timer = Some(t),
                Err(e) => {
                    r.errlog.report(format_args!("work: timer: {e}"));
                    r.errors += 1;
                }
            }
        }
        let first_tick = o.sample.min(Duration::from_secs_f64(o.secs));
        if let Some(Err(e)) = r.timer.as_ref().map(|t| t.add(Some(first_tick))) {
            r.errlog.report(format_args!("work: timer: {e}"));
            r.errors += 1;
            r.timer = None;
        }
        if r.timer.is_some() {
            r.start = Instant::now();
            r.last_row = r.start;
            let _ = r.cpu.sample(&r.pids, r.hz);
            for c in 0..r.clients.len() {
                if r.clients[c].driven {
                    r.send(c, Wait::Work);
                }
            }
        }
    }
    // (Idle connections keep the loop alive: without the timer, which ends
    // the run, it would never return.)
    if run.borrow().timer.is_some() {
        if let Err(e) = base.dispatch() {
            let mut r = run.borrow_mut();
            r.errlog.report(format_args!("work: event loop: {e}"));
            r.errors += 1;
        }
    }
    let wall = wall0.elapsed().as_secs_f64();
    let cpu = own_cpu().saturating_sub(cpu0).as_secs_f64();

    // 3. Figures.
    let mut r = run.borrow_mut();
    r.timer = None;
    let r = &mut *r;
    for cl in r.clients.iter_mut() {
        // Whatever is left unasked and unread now is an error too.
        if let Some(conn) = &cl.conn {
            if conn.input_len() > 0 {
                r.errlog.report(format_args!("a connection ends with {} unread bytes", conn.input_len()));
                r.errors += 1;
            }
        }
    }
    sum.ok = r.ok;
    sum.errors = r.errors;
    sum.end = r.count(|c| if c.ended { c.now } else { None });
    sum.moved = r.clients.iter().filter(|c| c.driven && c.ended && c.now != c.first).count();
    sum.first_moved_ms = r.first_moved.map(|d| d.as_millis() as u64);
    let split = SPLIT_SECS.min(o.secs);
    let (early, late) = (r.early, r.late);
    sum.rps = (early + late) as f64 / o.secs;
    sum.rps_early = if split > 0.0 { early as f64 / split } else { 0.0 };
    sum.rps_late = if o.secs > split { late as f64 / (o.secs - split) } else { 0.0 };
    sum.p50_us = r.lat.quantile_us(0.50);
    sum.p99_us = r.lat.quantile_us(0.99);
    sum.max_us = r.lat.max_us();
    sum.p99_early_us = r.lat_early.quantile_us(0.99);
    sum.p99_late_us = r.lat_late.quantile_us(0.99);
    sum.client_cpu_pct = if wall > 0.0 { 100.0 * cpu / wall } else { 0.0 };
    if let Some(path) = &o.trace {
        if let Err(e) = write_trace(path, &r.samples) {
            errlog.report(format_args!("work: trace {}: {e}", path.display()));
            sum.errors += 1;
        }
    }
    r.clients.clear();
    sum
}

/// The trace TSV: a header row, then one row per sample.
fn write_trace(path: &std::path::Path, samples: &[Sample]) -> io::Result<()> {
    let workers: std::collections::BTreeSet<u64> =
        samples.iter().flat_map(|s| s.conns.keys().chain(s.busy.keys()).copied()).collect();
    let mut out = io::BufWriter::new(std::fs::File::create(path)?);
    write!(out, "t_s\trps")?;
    for w in &workers {
        write!(out, "\tconns_w{w}")?;
    }
    for w in &workers {
        write!(out, "\tbusy_w{w}")?;
    }
    writeln!(out)?;
    for s in samples {
        write!(out, "{:.3}\t{:.0}", s.t, s.rps)?;
        for w in &workers {
            write!(out, "\t{}", s.conns.get(w).copied().unwrap_or(0))?;
        }
        for w in &workers {
            match s.busy.get(w) {
                Some(b) if b.is_finite() => write!(out, "\t{b:.3}")?,
                _ => write!(out, "\tnan")?,
            }
        }
        writeln!(out)?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_checks() {
        let exact = br#"{"out":"work","result":300}"#;
        assert!(check_work(exact, 300, exact).is_ok());
        assert!(check_work(br#"{ "result": 300, "out": "work" }"#, 300, exact).is_ok());
        for bad in [
            &br#"{"out":"work","result":301}"#[..],
            br#"{"out":"work","result":"300"}"#,
            br#"{"out":"error","result":"unknown method: \"work\""}"#,
            br#"{"out":"whoami","result":{"worker":0,"pid":1}}"#,
            br#"{"out":"work"}"#,
            b"",
        ] {
            assert!(check_work(bad, 300, exact).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse_whoami(br#"{"out":"whoami","result":{"worker":1,"pid":42,"gen":3}}"#), Ok((1, Some(42))));
        assert_eq!(parse_whoami(br#"{"out":"whoami","result":{"worker":0}}"#), Ok((0, None)));
        assert!(parse_whoami(br#"{"out":"work","result":300}"#).is_err());
        assert!(parse_whoami(br#"{"out":"whoami","result":{"pid":1}}"#).is_err());
    }

    #[test]
    fn frames() {
        let f = work_frame(300);
        assert_eq!(&f[4..], br#"{"in":"work","params":{"us":300}}"#);
        assert_eq!(u32::from_le_bytes([f[0], f[1], f[2], f[3]]) as usize, f.len() - 4);
        assert_eq!(&whoami_frame()[4..], br#"{"in":"whoami"}"#);
    }

    #[test]
    fn summary_line() {
        let s = WorkSummary {
            conns: 40,
            driven: 20,
            us: 300,
            secs: 8.0,
            ok: 30000,
            rps: 3750.4,
            rps_early: 3300.0,
            rps_late: 4000.0,
            p99_early_us: 11000,
            p99_late_us: 5000,
            p50_us: 4000,
            p99_us: 9000,
            max_us: 12000,
            moved: 10,
            first_moved_ms: Some(420),
            start: [(0, 20), (1, 0)].into(),
            end: [(0, 10), (1, 10)].into(),
            client_cpu_pct: 7.25,
            ..Default::default()
        };
        assert_eq!(
            s.to_string(),
            "work conns=40 driven=20 us=300 secs=8 ok=30000 errors=0 rps=3750 p50_us=4000 p99_us=9000 max_us=12000 \
             moved=10 rps_0_3=3300 rps_3_8=4000 p99_0_3=11000 p99_3_8=5000 first_moved_ms=420 driven_start=20/0 \
             driven_end=10/10 client_cpu_pct=7.2"
        );
        assert!(s.passed());
        let s = WorkSummary { secs: 2.5, first_moved_ms: None, ..s };
        assert!(
            s.to_string()
                .contains(" rps_0_2.5=3300 rps_2.5_2.5=4000 p99_0_2.5=11000 p99_2.5_2.5=5000 first_moved_ms=-1 "),
            "{s}"
        );
        assert!(!WorkSummary { errors: 1, ..s.clone() }.passed());
        assert!(!WorkSummary { driven: 0, ..s }.passed());
    }

    #[test]
    fn own_process_ticks() {
        assert!(proc_ticks(std::process::id() as u64).is_some());
        assert!(proc_ticks(u32::MAX as u64 + 7).is_none());
    }
}
