//! `--metrics HOST:PORT`: the master's figures in Prometheus' text
//! exposition format (0.0.4) at `/metrics`, served by libevent's evhttp on
//! the master's own event loop. Per-worker figures are those of `handoff
//! status` (read from [`Master::status`], not kept twice); the rest are a
//! few counters the master bumps as things happen (an integer add each,
//! and two clock reads per handover for the latency histogram).
//!
//! A restart starts a new master process: the listening socket of this
//! endpoint moves to it, `handoff_restarts_total` goes on from the
//! generation number, and every other counter starts again from zero
//! (their HELP says "this generation"; Prometheus' `rate()` takes such
//! resets in its stride).
use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::io;
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::rc::{Rc, Weak};
use std::time::Duration;

use serde_json::Value;

use super::Master;
use crate::core::reactor::{Base, HttpRequest, HttpResponse, HttpServer, Method};

/// The one path served.
pub const PATH: &str = "/metrics";
/// Prometheus' text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the handover histogram's buckets, in nanoseconds (50 µs
/// to 1 s; `+Inf` follows). A handover on an idle machine takes tens of
/// microseconds; milliseconds mean a busy worker loop.
const BUCKETS_NS: [u64; 13] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
];

/// What went wrong, by the `kind` label of `handoff_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// A worker (or the next generation) refused a connection: out of
    /// descriptors. It is offered again.
    Refused,
    /// A worker exited without being asked to.
    WorkerCrash,
    /// A worker stopped answering the heartbeat.
    WorkerHung,
    /// A worker's channel carried a malformed message (the worker is killed).
    Channel,
    /// Accepting a connection failed (EMFILE...): accepting paused 100 ms.
    Accept,
    /// A worker could not be started.
    Spawn,
    /// A connection found no live worker and had to wait.
    NoWorker,
    /// A restart this generation ran was aborted (it goes on serving).
    RestartAborted,
}

const FAULTS: [(Fault, &str); 8] = [
    (Fault::Refused, "refused"),
    (Fault::WorkerCrash, "worker_crash"),
    (Fault::WorkerHung, "worker_hung"),
    (Fault::Channel, "channel_error"),
    (Fault::Accept, "accept_error"),
    (Fault::Spawn, "spawn_error"),
    (Fault::NoWorker, "no_worker"),
    (Fault::RestartAborted, "restart_aborted"),
];

/// The handover latency histogram (non-cumulative bucket counts).
#[derive(Default)]
struct Histogram {
    buckets: [Cell<u64>; BUCKETS_NS.len() + 1],
    sum_ns: Cell<u64>,
    count: Cell<u64>,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKETS_NS.partition_point(|&b| b < ns);
        bump(&self.buckets[i]);
        self.sum_ns.set(self.sum_ns.get().saturating_add(ns));
        bump(&self.count);
    }
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

/// The counters the master bumps (shared with the worker channels' ACK
/// timers, hence the cells).
#[derive(Default)]
pub(crate) struct Counters {
    accepted: Cell<u64>,
    /// By worker slot: new connections handed straight to it.
    accepted_by: RefCell<Vec<u64>>,
    restart_moves: Cell<u64>,
    errors: [Cell<u64>; FAULTS.len()],
    handover: Histogram,
}

/// The master's metrics: its counters, and the HTTP endpoint if
/// `--metrics` was given.
#[derive(Default)]
pub(crate) struct Metrics {
    pub(crate) counters: Rc<Counters>,
    pub(crate) server: Option<HttpServer>,
}

impl Metrics {
    /// A connection accepted on the listening port.
    pub(crate) fn accepted(&self) {
        bump(&self.counters.accepted);
    }

    /// A connection just accepted went straight to worker `index`.
    pub(crate) fn accepted_by(&self, index: usize) {
        let mut by = self.counters.accepted_by.borrow_mut();
        if by.len() <= index {
            by.resize(index + 1, 0);
        }
        by[index] += 1;
    }

    /// A connection of the previous generation taken over by this one.
    pub(crate) fn moved_by_restart(&self) {
        bump(&self.counters.restart_moves);
    }

    pub(crate) fn error(&self, e: Fault) {
        bump(&self.counters.errors[e as usize]);
    }

    /// For [`Channel::time_acks`](crate::core::channel::Channel::time_acks)
    /// on a worker's channel.
    pub(crate) fn handover_timer(&self) -> impl Fn(Duration) + 'static {
        let c = Rc::clone(&self.counters);
        move |d| c.handover.observe(d)
    }

    /// Serves `/metrics` on `addr`, or on `inherited` (the listening socket
    /// the previous generation passed on). An address that cannot be bound
    /// is an error naming it.
    pub(crate) fn serve(
        &mut self,
        base: &Base,
        addr: &str,
        inherited: Option<OwnedFd>,
        master: Weak<RefCell<Master>>,
    ) -> io::Result<()> {
        let handler = move |req: &HttpRequest<'_>| {
            respond(req, || {
                let m = master.upgrade()?;
                let m = m.try_borrow().ok()?;
                Some(m.metrics_text())
            })
        };
        let server = match inherited {
            Some(fd) => HttpServer::adopt(base, fd, handler),
            None => HttpServer::bind(base, addr, handler),
        }
        .map_err(|e| io::Error::new(e.kind(), format!("--metrics {addr}: cannot serve metrics: {e}")))?;
        log::info!("metrics on http://{}{PATH}", server.local_addr().map_or(addr.to_string(), |a| a.to_string()));
        self.server = Some(server);
        Ok(())
    }
}

/// The metrics socket a new generation serves: the one the previous
/// generation passed on (`fd`, serving `old`) if `--metrics` (`new`) still
/// names that address; `None` otherwise (it is closed, and `new`, if any,
/// is bound afresh: a reload may move the endpoint).
pub(crate) fn inherit(new: Option<&str>, old: Option<&str>, fd: Option<OwnedFd>) -> Option<OwnedFd> {
    let (new, fd) = (new?, fd?);
    if Some(new) == old {
        return Some(fd);
    }
    // The same address written another way (a name for it, say).
    let bound = TcpListener::from(fd.try_clone().ok()?).local_addr().ok()?;
    if new.to_socket_addrs().is_ok_and(|mut a| a.any(|a| a == bound)) {
        return Some(fd);
    }
    log::info!("--metrics moves from {} to {new}", old.unwrap_or("?"));
    None
}

/// Answers one request: the text of `render` at `GET /metrics` (and its
/// headers at `HEAD`), 404 elsewhere, 405 for other methods, 503 if the
/// figures cannot be read right now.
pub(crate) fn respond(req: &HttpRequest<'_>, render: impl FnOnce() -> Option<String>) -> HttpResponse {
    if req.path != PATH {
        return HttpResponse::new(404, "text/plain", format!("not found: metrics are at {PATH}\n"));
    }
    if req.method == Method::Other {
        return HttpResponse::new(405, "text/plain", "only GET and HEAD\n").header("Allow", "GET, HEAD");
    }
    match render() {
        Some(text) => HttpResponse::new(200, CONTENT_TYPE, text),
        None => HttpResponse::new(503, "text/plain", "the master is busy; try again\n"),
    }
}

impl Master {
    /// The `/metrics` text now.
    pub(crate) fn metrics_text(&self) -> String {
        let accept_errors: u64 = self.listeners.iter().map(|l| l.accept_errors()).sum();
        render(&self.status(), &self.metrics.counters, accept_errors)
    }
}

/// One metric family: its HELP and TYPE lines, then its samples.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Seconds from nanoseconds, as Prometheus prints them.
fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// A per-worker figure from the worker's index and its status row.
type WorkerFigure<'a> = &'a dyn Fn(usize, &Value) -> u64;

/// The exposition text from a status answer (the figures `handoff status`
/// shows) and the counters. `accept_errors` comes from the listener.
pub(crate) fn render(status: &Value, c: &Counters, accept_errors: u64) -> String {
    let mut o = Out(String::with_capacity(4096));
    let num = |v: &Value| v.as_u64().unwrap_or(0);
    let gen = num(&status["gen"]);

    o.family("handoff_info", "gauge", "The master's mode, policy and node name (always 1).");
    let (mode, policy, node) =
        (status["mode"].as_str().unwrap_or(""), status["policy"].as_str().unwrap_or(""), status["node"].as_str());
    let mut labels = vec![("mode", mode), ("policy", policy)];
    if let Some(n) = node.filter(|n| !n.is_empty()) {
        labels.push(("node", n));
    }
    o.sample("handoff_info", &labels, 1);

    o.family("handoff_generation", "gauge", "Generation of the master answering: 1 at a fresh start, +1 per restart.");
    o.sample("handoff_generation", &[], gen);
    o.family(
        "handoff_restarts_total",
        "counter",
        "Hot restarts committed since the cluster was started (generation - 1: kept across restarts).",
    );
    o.sample("handoff_restarts_total", &[], gen.saturating_sub(1));
    o.family("handoff_start_time_seconds", "gauge", "When this generation's master started (Unix time).");
    o.sample("handoff_start_time_seconds", &[], num(&status["started"]));
    o.family(
        "handoff_accepted_total",
        "counter",
        "Connections the master accepted on the port, this generation (with --policy shared the workers accept: not counted).",
    );
    o.sample("handoff_accepted_total", &[], c.accepted.get());
    o.family("handoff_pending_connections", "gauge", "Connections waiting for a live worker.");
    o.sample("handoff_pending_connections", &[], num(&status["pending"]));

    let workers: &[Value] = status["workers"].as_array().map_or(&[], Vec::as_slice);
    let index: Vec<String> = workers.iter().map(|w| num(&w["worker"]).to_string()).collect();
    let accepted_by = c.accepted_by.borrow();
    let per_worker: [(&str, &str, &str, WorkerFigure<'_>); 6] = [
        ("handoff_worker_up", "gauge", "1 if the worker is running and answering, else 0.", &|_, w| {
            u64::from(w["state"] == "up")
        }),
        (
            "handoff_worker_open_connections",
            "gauge",
            "Connections the worker holds now (handed to it, not yet closed).",
            &|_, w| num(&w["open"]),
        ),
        (
            "handoff_worker_accepted_total",
            "counter",
            "New connections the master accepted and handed straight to this worker, this generation.",
            &|i, _| accepted_by.get(i).copied().unwrap_or(0),
        ),
        (
            "handoff_worker_handed_total",
            "counter",
            "Connections handed to this worker, new or moved (restart, rebalancing, a crashed worker's), this generation.",
            &|_, w| num(&w["handed"]),
        ),
        (
            "handoff_worker_served_total",
            "counter",
            "Requests this worker served (all its processes), this generation.",
            &|_, w| num(&w["served"]),
        ),
        (
            "handoff_worker_respawns_total",
            "counter",
            "Times this worker was started again after its process exited, this generation.",
            &|_, w| num(&w["respawns"]),
        ),
    ];
    for (name, kind, help, value) in per_worker {
        o.family(name, kind, help);
        for (w, label) in workers.iter().zip(&index) {
            let i = num(&w["worker"]) as usize;
            o.sample(name, &[("worker", label)], value(i, w));
        }
    }

    let h = "handoff_handover_seconds";
    o.family(
        h,
        "histogram",
        "Time from the master sending a connection to a worker to the worker's acknowledgement, this generation.",
    );
    let mut cumulative = 0;
    for (i, bucket) in c.handover.buckets.iter().enumerate() {
        cumulative += bucket.get();
        let le = BUCKETS_NS.get(i).map_or("+Inf".to_string(), |&ns| secs(ns).to_string());
        o.sample(&format!("{h}_bucket"), &[("le", &le)], cumulative);
    }
    o.sample(&format!("{h}_sum"), &[], secs(c.handover.sum_ns.get()));
    o.sample(&format!("{h}_count"), &[], c.handover.count.get());

    o.family(
        "handoff_moves_total",
        "counter",
        "Live connections moved, this generation: restart = taken over from the previous generation, rebalance = moved off a busy worker.",
    );
    o.sample("handoff_moves_total", &[("reason", "restart")], c.restart_moves.get());
    let rebalanced: u64 = workers.iter().map(|w| num(&w["moved_out"])).sum();
    o.sample("handoff_moves_total", &[("reason", "rebalance")], rebalanced);

    o.family(
        "handoff_errors_total",
        "counter",
        "Faults by kind, this generation: refused (a receiver out of descriptors), worker_crash, worker_hung, channel_error, accept_error, spawn_error, no_worker (a connection waited), restart_aborted.",
    );
    for (e, label) in FAULTS {
        let n = c.errors[e as usize].get() + if e == Fault::Accept { accept_errors } else { 0 };
        o.sample("handoff_errors_total", &[("kind", label)], n);
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status() -> Value {
        json!({
            "mode": "cluster", "node": null, "policy": "round-robin", "gen": 3, "started": 1700000000u64,
            "pending": 2,
            "workers": [
                {"worker": 0, "state": "up", "open": 4, "handed": 10, "served": 30, "respawns": 1, "moved_out": 2},
                {"worker": 1, "state": "down", "open": 0, "handed": 5, "served": 7, "respawns": 0, "moved_out": 1},
            ],
        })
    }

    fn value(text: &str, sample: &str) -> String {
        let line = text.lines().find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '));
        line.unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))[sample.len() + 1..].to_string()
    }

    #[test]
    fn renders_status_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.accepted();
        m.accepted();
        m.accepted_by(1);
        m.moved_by_restart();
        m.error(Fault::Refused);
        let timer = m.handover_timer();
        for us in [10, 60, 60, 2_000_000] {
            timer(Duration::from_micros(us));
        }
        let t = render(&status(), &m.counters, 5);
        assert_eq!(value(&t, r#"handoff_info{mode="cluster",policy="round-robin"}"#), "1");
        assert_eq!(value(&t, "handoff_generation"), "3");
        assert_eq!(value(&t, "handoff_restarts_total"), "2");
        assert_eq!(value(&t, "handoff_accepted_total"), "2");
        assert_eq!(value(&t, "handoff_pending_connections"), "2");
        assert_eq!(value(&t, r#"handoff_worker_up{worker="1"}"#), "0");
        assert_eq!(value(&t, r#"handoff_worker_open_connections{worker="0"}"#), "4");
        assert_eq!(value(&t, r#"handoff_worker_accepted_total{worker="0"}"#), "0");
        assert_eq!(value(&t, r#"handoff_worker_accepted_total{worker="1"}"#), "1");
        assert_eq!(value(&t, r#"handoff_worker_handed_total{worker="0"}"#), "10");
        assert_eq!(value(&t, r#"handoff_worker_served_total{worker="1"}"#), "7");
        assert_eq!(value(&t, r#"handoff_worker_respawns_total{worker="0"}"#), "1");
        assert_eq!(value(&t, r#"handoff_handover_seconds_bucket{le="0.00005"}"#), "1");
        assert_eq!(value(&t, r#"handoff_handover_seconds_bucket{le="0.0001"}"#), "3");
        assert_eq!(value(&t, r#"handoff_handover_seconds_bucket{le="1"}"#), "3");
        assert_eq!(value(&t, r#"handoff_handover_seconds_bucket{le="+Inf"}"#), "4");
        assert_eq!(value(&t, "handoff_handover_seconds_count"), "4");
        assert_eq!(value(&t, "handoff_handover_seconds_sum"), "2.00013");
        assert_eq!(value(&t, r#"handoff_moves_total{reason="restart"}"#), "1");
        assert_eq!(value(&t, r#"handoff_moves_total{reason="rebalance"}"#), "3");
        assert_eq!(value(&t, r#"handoff_errors_total{kind="refused"}"#), "1");
        assert_eq!(value(&t, r#"handoff_errors_total{kind="accept_error"}"#), "5");
        assert_eq!(value(&t, r#"handoff_errors_total{kind="restart_aborted"}"#), "0");
        // Every family has one HELP and one TYPE line, before its samples.
        for family in ["handoff_worker_served_total", "handoff_handover_seconds", "handoff_errors_total"] {
            assert_eq!(t.matches(&format!("# HELP {family} ")).count(), 1, "{family}");
            assert_eq!(t.matches(&format!("# TYPE {family} ")).count(), 1, "{family}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut v = status();
        v["mode"] = json!("node");
        v["node"] = json!("a\"b\\c\nd");
        let t = render(&v, &Counters::default(), 0);
        assert!(t.contains(r#"handoff_info{mode="node",policy="round-robin",node="a\"b\\c\nd"} 1"#), "{t}");
    }

    #[test]
    fn a_restart_keeps_the_socket_only_for_the_same_address() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let old = format!("127.0.0.1:{port}");
        let fd = || Some(OwnedFd::from(l.try_clone().unwrap()));
        assert!(inherit(Some(&old), Some(&old), fd()).is_some());
        assert!(inherit(Some(&format!("localhost:{port}")), Some(&old), fd()).is_some(), "a name for it");
        assert!(inherit(Some("127.0.0.1:1"), Some(&old), fd()).is_none(), "moved elsewhere");
        assert!(inherit(None, Some(&old), fd()).is_none(), "metrics turned off");
        assert!(inherit(Some(&old), None, None).is_none(), "nothing passed on");
    }

    #[test]
    fn only_get_and_head_of_the_metrics_path() {
        let ok = || Some("x 1\n".to_string());
        let r = |method, path| respond(&HttpRequest { method, path }, ok);
        assert_eq!(r(Method::Get, "/metrics").status, 200);
        assert_eq!(r(Method::Get, "/metrics").headers[0].1, CONTENT_TYPE);
        assert_eq!(r(Method::Head, "/metrics").status, 200);
        assert_eq!(r(Method::Get, "/").status, 404);
        assert_eq!(r(Method::Get, "/metrics/").status, 404);
        assert_eq!(r(Method::Other, "/metrics").status, 405);
        assert_eq!(respond(&HttpRequest { method: Method::Get, path: "/metrics" }, || None).status, 503);
    }
}
