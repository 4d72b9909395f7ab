//! `--metrics HOST:PORT`: the master's Prometheus endpoint, read with curl
//! and parsed here (names, labels, values, HELP and TYPE lines); the
//! figures checked against the traffic driven through the cluster.
use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::cluster_support::{free_port, sum_field, worker_field, Cluster, Node};
use crate::support::{bin, poll_until, run_cmd, TempDir};

/// How long a scrape may take (valgrind runs included).
const CURL_TIMEOUT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------ the format

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: samples in order, HELP and TYPE by family.
#[derive(Debug, Default)]
struct Exposition {
    samples: Vec<Sample>,
    help: HashMap<String, String>,
    types: HashMap<String, String>,
}

impl Exposition {
    /// Parses the text format (0.0.4), strictly: every sample belongs to a
    /// family whose HELP and TYPE came before it, each declared once.
    #[track_caller]
    fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for (n, line) in text.lines().enumerate() {
            let bad = |why: &str| -> ! { panic!("line {}: {why}: {line:?}\n{text}", n + 1) };
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let (kw, name, arg) = (parts.next(), parts.next(), parts.next());
                let (Some(name), Some(arg)) = (name, arg) else { bad("comment without a name and text") };
                let map = match kw {
                    Some("HELP") => &mut e.help,
                    Some("TYPE") => {
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg) {
                            bad("unknown type");
                        }
                        &mut e.types
                    }
                    _ => continue,
                };
                if map.insert(name.to_string(), arg.to_string()).is_some() {
                    bad("declared twice");
                }
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad("no value"));
            let name = &line[..name_end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                bad("bad metric name");
            }
            let mut labels = BTreeMap::new();
            let mut rest = &line[name_end..];
            if let Some(r) = rest.strip_prefix('{') {
                rest = r;
                loop {
                    if let Some(r) = rest.strip_prefix('}') {
                        rest = r;
                        break;
                    }
                    let eq = rest.find("=\"").unwrap_or_else(|| bad("label without =\""));
                    let key = rest[..eq].to_string();
                    let mut value = String::new();
                    let mut chars = rest[eq + 2..].char_indices();
                    let close = loop {
                        match chars.next() {
                            Some((i, '"')) => break i,
                            Some((_, '\\')) => match chars.next() {
                                Some((_, 'n')) => value.push('\n'),
                                Some((_, c @ ('\\' | '"'))) => value.push(c),
                                _ => bad("bad escape in a label value"),
                            },
                            Some((_, c)) => value.push(c),
                            None => bad("unterminated label value"),
                        }
                    };
                    rest = &rest[eq + 2 + close + 1..];
                    rest = rest.strip_prefix(',').unwrap_or(rest);
                    if labels.insert(key, value).is_some() {
                        bad("label given twice");
                    }
                }
            }
            let value = rest.strip_prefix(' ').unwrap_or_else(|| bad("no space before the value"));
            let value: f64 = match value.split(' ').next().unwrap_or("") {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| bad("value is not a number")),
            };
            let family = e.family_of(name);
            if !e.types.contains_key(&family) || !e.help.contains_key(&family) {
                bad("sample before its family's HELP and TYPE");
            }
            e.samples.push(Sample { name: name.to_string(), labels, value });
        }
        e
    }

    /// The family a sample name belongs to (a histogram's `_bucket`,
    /// `_sum` and `_count` belong to the histogram).
    fn family_of(&self, name: &str) -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if self.types.get(base).map(String::as_str) == Some("histogram") {
                    return base.to_string();
                }
            }
        }
        name.to_string()
    }

    /// The samples named `name` whose labels include `labels`.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v)))
            .collect()
    }

    /// The one sample named `name` with these labels.
    #[track_caller]
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.find(name, labels).as_slice() {
            [s] => s.value,
            other => panic!("{name}{labels:?}: {} samples, want 1: {other:?}", other.len()),
        }
    }

    /// A per-worker family, by worker index.
    #[track_caller]
    fn per_worker(&self, name: &str, workers: usize) -> Vec<f64> {
        (0..workers).map(|w| self.get(name, &[("worker", &w.to_string())])).collect()
    }

    #[track_caller]
    fn assert_type(&self, family: &str, kind: &str) {
        assert_eq!(self.types.get(family).map(String::as_str), Some(kind), "TYPE of {family}");
        assert!(self.help.get(family).is_some_and(|h| !h.trim().is_empty()), "HELP of {family}");
    }

    /// Checks the handover histogram's shape; returns its count.
    #[track_caller]
    fn check_histogram(&self, name: &str) -> f64 {
        let buckets = self.find(&format!("{name}_bucket"), &[]);
        assert!(buckets.len() >= 2, "{name}: buckets {buckets:?}");
        let le: Vec<f64> = buckets
            .iter()
            .map(|b| match b.labels.get("le").map(String::as_str) {
                Some("+Inf") => f64::INFINITY,
                Some(v) => v.parse().unwrap_or_else(|_| panic!("{name}: bad le {v:?}")),
                None => panic!("{name}: bucket without le: {b:?}"),
            })
            .collect();
        assert!(le.windows(2).all(|w| w[0] < w[1]), "{name}: le not increasing: {le:?}");
        assert_eq!(le.last(), Some(&f64::INFINITY), "{name}: the last bucket is +Inf");
        let counts: Vec<f64> = buckets.iter().map(|b| b.value).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{name}: buckets not cumulative: {counts:?}");
        let count = self.get(&format!("{name}_count"), &[]);
        assert_eq!(counts.last(), Some(&count), "{name}: the +Inf bucket is the count");
        let sum = self.get(&format!("{name}_sum"), &[]);
        assert!(sum >= 0.0 && (count > 0.0) == (sum > 0.0), "{name}: sum {sum} for count {count}");
        count
    }
}

// ---------------------------------------------------------------- client

/// A reply as curl saw it.
struct Reply {
    code: u16,
    content_type: String,
    body: String,
}

/// `curl -sS [ARGS] http://ADDR{path}`.
#[track_caller]
fn curl(addr: &str, path: &str, args: &[&str]) -> Reply {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-w", "\n%{content_type}\n%{http_code}"])
        .args(args)
        .arg(format!("http://{addr}{path}"));
    let (st, out, err) = run_cmd(&mut cmd, CURL_TIMEOUT);
    assert!(st.success(), "curl {addr}{path}: {st}\n{err}");
    let (rest, code) = out.rsplit_once('\n').expect("curl -w output");
    let (body, content_type) = rest.rsplit_once('\n').expect("curl -w output");
    Reply { code: code.trim().parse().expect("http code"), content_type: content_type.to_string(), body: body.into() }
}

/// GET /metrics, checked (200, the text format's content type) and parsed.
#[track_caller]
fn scrape(addr: &str) -> Exposition {
    let r = curl(addr, "/metrics", &[]);
    assert_eq!(r.code, 200, "GET /metrics: {}", r.body);
    assert!(r.content_type.starts_with("text/plain; version=0.0.4"), "content type {:?}", r.content_type);
    Exposition::parse(&r.body)
}

/// Waits for `handoff_worker_up` to show every worker up (a worker
/// slow to answer the heartbeat, e.g. under valgrind, shows 0 meanwhile).
#[track_caller]
fn assert_all_up(addr: &str, workers: usize) {
    let mut up = Vec::new();
    let ok = poll_until(Duration::from_secs(20), || {
        up = scrape(addr).per_worker("handoff_worker_up", workers);
        up.iter().all(|&u| u == 1.0)
    });
    assert!(ok, "handoff_worker_up never all 1: {up:?}");
}

/// A cluster of `workers` with `--metrics` on a free port (and `extra`).
fn cluster(workers: usize, extra: &[&str]) -> (Cluster, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--metrics", addr.as_str()];
    args.extend_from_slice(extra);
    (Cluster::start(workers, &args), addr)
}

// ----------------------------------------------------------------- tests

#[test]
fn metrics_match_the_traffic() {
    const CONNS: usize = 6;
    const PINGS: usize = 3;
    let (c, addr) = cluster(2, &[]);
    for i in 0..CONNS {
        let mut r = c.connect();
        for k in 0..PINGS {
            r.ping(&json!([i, k]));
        }
    }
    // Every connection closed, and the workers' counts reported.
    let v = c.wait_status("all served and closed", Duration::from_secs(10), |v| {
        sum_field(v, "served") >= (CONNS * PINGS) as u64 && sum_field(v, "open") == 0
    });
    let m = scrape(&addr);

    for (family, kind) in [
        ("handoff_info", "gauge"),
        ("handoff_generation", "gauge"),
        ("handoff_restarts_total", "counter"),
        ("handoff_accepted_total", "counter"),
        ("handoff_worker_up", "gauge"),
        ("handoff_worker_open_connections", "gauge"),
        ("handoff_worker_accepted_total", "counter"),
        ("handoff_worker_handed_total", "counter"),
        ("handoff_worker_served_total", "counter"),
        ("handoff_worker_respawns_total", "counter"),
        ("handoff_handover_seconds", "histogram"),
        ("handoff_moves_total", "counter"),
        ("handoff_errors_total", "counter"),
    ] {
        m.assert_type(family, kind);
    }
    assert!(m.samples.iter().all(|s| s.name.starts_with("handoff_")), "every name starts with handoff_");
    assert_eq!(m.get("handoff_info", &[("mode", "cluster"), ("policy", "round-robin")]), 1.0);
    assert_eq!(m.get("handoff_generation", &[]), 1.0);
    assert_eq!(m.get("handoff_restarts_total", &[]), 0.0);

    // Accepted: every connection made, each handed straight to a worker.
    let n = CONNS as f64;
    assert_eq!(m.get("handoff_accepted_total", &[]), n);
    let accepted = m.per_worker("handoff_worker_accepted_total", 2);
    assert_eq!(accepted.iter().sum::<f64>(), n, "per-worker accepted {accepted:?}");
    let handed = m.per_worker("handoff_worker_handed_total", 2);
    assert_eq!(handed.iter().sum::<f64>(), n, "handed {handed:?}");
    // The per-worker figures are status's.
    let as_f64 = |f: &str| worker_field(&v, f).into_iter().map(|x| x as f64).collect::<Vec<_>>();
    assert_eq!(handed, as_f64("handed"));
    let served = m.per_worker("handoff_worker_served_total", 2);
    assert_eq!(served, as_f64("served"));
    assert!(served.iter().sum::<f64>() >= (CONNS * PINGS) as f64, "served {served:?}");
    assert_eq!(m.per_worker("handoff_worker_open_connections", 2), [0.0, 0.0]);
    assert_eq!(m.per_worker("handoff_worker_respawns_total", 2), [0.0, 0.0]);
    assert_all_up(&addr, 2);

    // One handover timed per connection handed, every one acknowledged.
    assert_eq!(m.check_histogram("handoff_handover_seconds"), n);
    assert_eq!(m.get("handoff_moves_total", &[("reason", "restart")]), 0.0);
    assert_eq!(m.get("handoff_moves_total", &[("reason", "rebalance")]), 0.0);
    for kind in ["refused", "worker_crash", "channel_error", "accept_error", "spawn_error", "restart_aborted"] {
        assert_eq!(m.get("handoff_errors_total", &[("kind", kind)]), 0.0, "errors {kind}");
    }

    // HEAD: the headers only; other paths 404; other methods 405.
    let head = curl(&addr, "/metrics", &["-I"]);
    assert_eq!(head.code, 200);
    assert!(head.body.starts_with("HTTP/1.1 200 OK\r\n") && head.body.contains("Content-Length: "), "{}", head.body);
    assert!(!head.body.contains("handoff_"), "HEAD has no body: {}", head.body);
    for path in ["/", "/metrics/", "/metricsx", "/status"] {
        assert_eq!(curl(&addr, path, &[]).code, 404, "GET {path}");
    }
    let post = curl(&addr, "/metrics", &["-X", "POST", "-d", "x=1", "-D", "-"]);
    assert_eq!(post.code, 405, "POST /metrics");
    assert!(post.body.contains("Allow: GET, HEAD"), "{}", post.body);
    // A query string is no other path.
    assert_eq!(curl(&addr, "/metrics?x=1", &[]).code, 200);
}

#[test]
fn a_crashed_worker_counts_a_crash_a_respawn_and_a_rescue() {
    let (c, addr) = cluster(2, &[]);
    let mut conns: Vec<_> = (0..4).map(|_| c.connect()).collect();
    for r in &mut conns {
        r.ping(&json!(1));
    }
    let victim = c.worker_pids()[0];
    crate::cluster_support::kill_pid(victim, libc::SIGKILL);
    c.wait_status("worker 0 respawned", Duration::from_secs(10), |v| {
        worker_field(v, "respawns")[0] == 1 && v["workers"][0]["state"] == "up"
    });
    // The connections worker 0 held were handed to the other worker and
    // still answer.
    for r in &mut conns {
        r.ping(&json!(2));
    }
    let m = scrape(&addr);
    assert_eq!(m.get("handoff_errors_total", &[("kind", "worker_crash")]), 1.0);
    assert_eq!(m.per_worker("handoff_worker_respawns_total", 2), [1.0, 0.0]);
    assert_eq!(m.get("handoff_accepted_total", &[]), 4.0);
    let handed: f64 = m.per_worker("handoff_worker_handed_total", 2).iter().sum();
    assert!(handed > 4.0, "the crashed worker's connections were handed again: {handed}");
    assert_eq!(m.check_histogram("handoff_handover_seconds"), handed, "every handover timed");
}

#[test]
fn a_restart_counts_restarts_and_moves_and_the_endpoint_moves_too() {
    const LIVE: usize = 3;
    let (c, addr) = cluster(2, &[]);
    let mut conns: Vec<_> = (0..LIVE).map(|_| c.connect()).collect();
    for r in &mut conns {
        r.ping(&json!("before"));
    }
    let (gen, _) = c.restart_ok();
    assert_eq!(gen, 2);
    // Until the old master is gone both may answer on the one socket.
    let mut m = Exposition::default();
    let moved = poll_until(Duration::from_secs(10), || {
        m = scrape(&addr);
        m.get("handoff_generation", &[]) == 2.0
    });
    assert!(moved, "the new generation never answered /metrics");
    assert_eq!(m.get("handoff_restarts_total", &[]), 1.0);
    assert_eq!(m.get("handoff_moves_total", &[("reason", "restart")]), LIVE as f64);
    // Counted from zero in the new generation: `handoff restart`'s own
    // probe of the port at most.
    let probes = m.get("handoff_accepted_total", &[]);
    assert!(probes <= 1.0, "accepted by the new generation: {probes}");
    for r in &mut conns {
        r.ping(&json!("after"));
    }
    c.connect().ping(&json!("new"));
    c.wait_status("the new connection closed", Duration::from_secs(10), |v| sum_field(v, "open") == LIVE as u64);
    let m = scrape(&addr);
    // The probe's connection may be accepted only now (it waited in the
    // backlog after `handoff restart` returned): one more, at most.
    let accepted = m.get("handoff_accepted_total", &[]);
    assert!(accepted == probes + 1.0 || probes == 0.0 && accepted == 2.0, "accepted {accepted}, probes {probes}");
    // What this generation handed: what moved, and what it accepted.
    let handed: f64 = m.per_worker("handoff_worker_handed_total", 2).iter().sum();
    assert_eq!(handed, LIVE as f64 + accepted);
    assert_eq!(m.check_histogram("handoff_handover_seconds"), handed);
    // A second restart: the count goes on across generations.
    c.restart_ok();
    let counted = poll_until(Duration::from_secs(10), || scrape(&addr).get("handoff_restarts_total", &[]) == 2.0);
    assert!(counted, "restarts_total never reached 2");
}

#[test]
fn rebalancing_moves_are_counted_and_handed_again() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (c, addr) = cluster(2, &["--rebalance"]);
    // Busy requests on worker 0's connections only: it is hot, worker 1 idle.
    let mut hot = Vec::new();
    for _ in 0..16 {
        let mut r = c.connect();
        if r.whoami()["worker"] == json!(0) {
            hot.push(r);
        }
    }
    let stop = AtomicBool::new(false);
    let moved = std::thread::scope(|s| {
        for r in &mut hot {
            let stop = &stop;
            s.spawn(move || {
                let req = json!({"in": "work", "params": {"us": 300}});
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(r.call(&req), json!({"out": "work", "result": 300}));
                }
            });
        }
        let v = c.wait_status("a rebalancing move", Duration::from_secs(20), |v| sum_field(v, "moved_out") > 0);
        stop.store(true, Ordering::Relaxed);
        v
    });
    let moved_out = sum_field(&moved, "moved_out") as f64;
    // Each move is one more handover, timed like the others once the
    // receiving worker has acknowledged it.
    let mut m = Exposition::default();
    let settled = poll_until(Duration::from_secs(10), || {
        m = scrape(&addr);
        let handed: f64 = m.per_worker("handoff_worker_handed_total", 2).iter().sum();
        let moves = m.get("handoff_moves_total", &[("reason", "rebalance")]);
        handed == m.get("handoff_accepted_total", &[]) + moves
            && m.check_histogram("handoff_handover_seconds") == handed
    });
    let moves = m.get("handoff_moves_total", &[("reason", "rebalance")]);
    assert!(settled, "handed = accepted + moves = handovers timed, never: {:?}", m.samples);
    assert!(moves >= moved_out && moves > 0.0, "moves {moves}, status said {moved_out}");
    assert_eq!(m.get("handoff_moves_total", &[("reason", "restart")]), 0.0);
}

#[test]
fn a_node_serves_metrics_with_its_name() {
    let addr = format!("127.0.0.1:{}", free_port());
    let n = Node::start("alpha", 0, 2, &[], &["--metrics", &addr]);
    n.c.connect().ping(&json!(1));
    let m = scrape(&addr);
    assert_eq!(m.get("handoff_info", &[("mode", "node"), ("node", "alpha")]), 1.0);
    assert_eq!(m.get("handoff_accepted_total", &[]), 1.0);
    assert_eq!(m.per_worker("handoff_worker_accepted_total", 2).iter().sum::<f64>(), 1.0);
    assert_all_up(&addr, 2);
}

#[test]
fn a_metrics_address_that_cannot_be_used_fails_the_start() {
    let tmp = TempDir::new("mx");
    let dir = tmp.path().join("d");
    let run = |metrics: &str| {
        let mut cmd = Command::new(bin());
        cmd.args(["cluster", "--port", "0", "--workers", "1", "--dir"]).arg(&dir).args(["--metrics", metrics]);
        run_cmd(&mut cmd, Duration::from_secs(30))
    };
    // Taken by someone else: a startup error naming the address, exit 1.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (st, out, err) = run(&addr);
    assert_eq!(st.code(), Some(1), "stdout: {out}\nstderr: {err}");
    assert!(!out.contains("ready"), "no readiness line: {out}");
    assert!(err.contains(&format!("--metrics {addr}")) && err.contains("in use"), "stderr: {err}");
    assert!(!err.contains("worker 0 started"), "no worker starts: {err}");
    // Not HOST:PORT: clap's usage error, exit 2.
    for bad in ["9100", "localhost:http", "::1:9100", ":9100", "127.0.0.1:70000"] {
        let (st, _, err) = run(bad);
        assert_eq!(st.code(), Some(2), "--metrics {bad}: {err}");
        assert!(err.contains("--metrics"), "--metrics {bad}: {err}");
    }
}

#[test]
fn metrics_from_a_config_file_and_handoff_check() {
    let tmp = TempDir::new("mcfg");
    let addr = format!("127.0.0.1:{}", free_port());
    let d = tmp.path().join("d");
    let write = |name: &str, metrics: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, format!("port = 0\ndir = \"{}\"\nmetrics = \"{metrics}\"\n", d.display())).unwrap();
        p
    };
    let check = |cfg: &std::path::Path| {
        let mut cmd = Command::new(bin());
        cmd.arg("check").arg("--config").arg(cfg);
        run_cmd(&mut cmd, Duration::from_secs(30))
    };
    let good = write("good.toml", &addr);
    let (st, out, err) = check(&good);
    assert!(st.success(), "check {}: {out}\n{err}", good.display());
    let bad = write("bad.toml", "127.0.0.1:http");
    let (st, _, err) = check(&bad);
    assert!(!st.success() && err.contains("--metrics") && err.contains("not a port"), "{err}");
    // A cluster started from the file serves metrics there.
    let c = Cluster::start(1, &["--config", good.to_str().unwrap()]);
    c.connect().ping(&json!(1));
    assert_eq!(scrape(&addr).get("handoff_accepted_total", &[]), 1.0);
}
