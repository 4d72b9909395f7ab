//! Real hosts: three nodes, each in a network namespace of its own with
//! its own address (scripts/hosts-net.sh, as `make demo-hosts`), relay
//! between every pair of workers; one host is cut off (`ip link set eth0
//! down` in its namespace) and brought back. The nodes find each other
//! through one etcd in the hub. Needs root and `ip netns`;
//! skipped (with a line on stderr) where namespaces are not allowed.
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cluster_support::*;
use crate::support::*;

/// The hosts' /24 (as hosts-net.sh's HOSTS_NET): host I is `NET.I`, the
/// hub (bridge, clients) `NET.254`.
const NET: &str = "10.77.0";
/// Every node's port on its own address: each namespace is private to
/// this test, so a fixed port clashes with nothing.
const PORT: u16 = 7300;
const NAMES: [&str; 3] = ["A", "B", "C"];
const CONNECT_TIMEOUT: f64 = 1.0;
const HEARTBEAT: f64 = 0.5;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/hosts-net.sh")
}

/// The namespaces of one run; removed on drop.
struct Hosts {
    tag: String,
}

impl Hosts {
    /// Three hosts, or `None` (and why, on stderr) where namespaces cannot
    /// be made.
    fn up() -> Option<Hosts> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("hosts test skipped: network namespaces need root");
            return None;
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let tag = format!("{:x}", (std::process::id() ^ nanos.subsec_nanos()) & 0xff_ffff);
        let hosts = Hosts { tag };
        match Command::new(script()).args(["up", &hosts.tag, "3"]).env("HOSTS_NET", NET).output() {
            Ok(o) if o.status.success() => Some(hosts),
            Ok(o) => {
                eprintln!("hosts test skipped: namespaces not allowed here: {}", String::from_utf8_lossy(&o.stderr));
                None
            }
            Err(e) => {
                eprintln!("hosts test skipped: {}: {e}", script().display());
                None
            }
        }
    }

    /// Host `i`'s namespace (1-based), or the hub's ("hub").
    fn ns(&self, i: &str) -> String {
        match i {
            "hub" => format!("hoff-{}-hub", self.tag),
            i => format!("hoff-{}-h{i}", self.tag),
        }
    }

    /// Host `i`'s cable in (`up`) or out.
    fn cable(&self, i: usize, up: bool) {
        let ns = self.ns(&i.to_string());
        let st = Command::new("ip")
            .args(["-n", &ns, "link", "set", "eth0", if up { "up" } else { "down" }])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip -n {ns} link set eth0: {st}");
    }

    /// Runs `f` on a thread inside the hub's namespace (the test's other
    /// threads stay where they are).
    fn in_hub<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.ns("hub"));
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: setns(2) with an open network-namespace descriptor;
                // it moves only this thread, which was made for it.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            });
            t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new(script()).args(["down", &self.tag]).status();
    }
}

fn addr(i: usize) -> SocketAddr {
    format!("{NET}.{}:{PORT}", i + 1).parse().expect("an address")
}

/// etcd's client URL, in the hub.
fn etcd_url() -> String {
    format!("http://{NET}.254:2379")
}

/// One etcd in the hub (as `make demo-hosts` runs it), answering
/// `/health`; `None` (and why, on stderr) without an etcd binary.
fn start_etcd(h: &Hosts, data: &std::path::Path) -> Option<ChildGuard> {
    if Command::new("etcd").arg("--version").output().is_err() {
        eprintln!("hosts test skipped: no etcd binary (make deps installs etcd-server)");
        return None;
    }
    let url = etcd_url();
    let peer = "http://127.0.0.1:2380";
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &h.ns("hub"), "etcd", "--name", "hosts", "--data-dir", &data.display().to_string()]);
    cmd.args(["--listen-client-urls", &url, "--advertise-client-urls", &url]);
    cmd.args(["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer]);
    cmd.args(["--initial-cluster", &format!("hosts={peer}")]);
    let etcd = ChildGuard::spawn(&mut cmd);
    let health = || {
        Command::new("ip")
            .args(["netns", "exec", &h.ns("hub"), "curl", "-sf", "-m", "1", &format!("{url}/health")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(poll_until(Duration::from_secs(15), health), "etcd in {} never answered /health", h.ns("hub"));
    Some(etcd)
}

/// Node `NAMES[i]` on host i+1, bound to its address, finding the others
/// through the hub's etcd.
fn start_node(h: &Hosts, i: usize) -> Node {
    let name = NAMES[i];
    let tmp = TempDir::new(&format!("h{name}"));
    let dir = tmp.path().join("d");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &h.ns(&(i + 1).to_string()), bin(), "node", "--name", name]);
    cmd.args(["--host", &addr(i).ip().to_string(), "--port", &PORT.to_string(), "--workers", "2"]);
    cmd.args(["--dir", &dir.display().to_string(), "--etcd", &etcd_url(), "--advertise", &addr(i).to_string()]);
    cmd.args(["--connect-timeout", &CONNECT_TIMEOUT.to_string(), "--heartbeat", &HEARTBEAT.to_string()]);
    let server = TestServer::start_cmd(&format!("node {name}"), cmd);
    Node { name: name.to_string(), c: Cluster::adopt(&format!("node {name}"), tmp, dir, 2, server) }
}

/// A client connection (from the hub) that landed on worker `w` of node `i`.
fn conn_on(i: usize, w: usize) -> Rpc {
    for _ in 0..6 {
        let mut r = Rpc::connect_addr(addr(i));
        if r.whoami()["worker"] == json!(w) {
            return r;
        }
    }
    panic!("node {}: no connection landed on worker {w}", NAMES[i]);
}

#[test]
fn three_hosts_relay_then_one_is_cut_off_and_comes_back() {
    let Some(hosts) = Hosts::up() else { return };
    let data = TempDir::new("hosts-etcd");
    let Some(_etcd) = start_etcd(&hosts, &data.path().join("etcd")) else { return };
    let nodes: Vec<Node> = (0..3).map(|i| start_node(&hosts, i)).collect();
    // Each node sees all three through etcd (no --peers anywhere).
    for n in &nodes {
        let v = n.c.wait_status("all 3 members from etcd", Duration::from_secs(10), |v| {
            v["members"].as_array().is_some_and(|m| m.len() == 3)
        });
        for m in v["members"].as_array().into_iter().flatten().filter(|m| m["name"] != n.name.as_str()) {
            assert_eq!(m["source"], "etcd", "{m}");
        }
    }
    let pids: Vec<Vec<i32>> = nodes.iter().map(|n| n.c.worker_pids()).collect();
    let masters: Vec<i32> = nodes.iter().map(|n| n.c.master_pid()).collect();
    let relay_all = |from: &[usize], to: &[usize]| {
        for &i in from {
            for sw in 0..2 {
                let mut c = conn_on(i, sw);
                for &j in to {
                    for (dw, &pid) in pids[j].iter().enumerate() {
                        let m = json!({"from": [NAMES[i], sw], "to": [NAMES[j], dw]});
                        let r = c.call(&relay_req(NAMES[j], dw, &m));
                        assert_eq!(
                            assert_relayed(&r, NAMES[j], dw, &m),
                            pid as u64,
                            "{}:{sw} -> {}:{dw}",
                            NAMES[i],
                            NAMES[j]
                        );
                    }
                }
            }
        }
    };
    // Every worker to every worker; the links are up.
    hosts.in_hub(|| relay_all(&[0, 1, 2], &[0, 1, 2]));

    // Cut C off. Every worker of A and B relays to both of C's workers at
    // once: over links that were up (the heartbeat notices) and, for a
    // relay behind them, over new ones (the connect timeout runs out).
    let dead = CONNECT_TIMEOUT + HEARTBEAT * 3.0;
    let bound = Duration::from_secs_f64(dead + 2.0);
    hosts.in_hub(|| {
        let mut conns: Vec<Rpc> = (0..2).flat_map(|i| (0..2).map(move |w| conn_on(i, w))).collect();
        hosts.cable(3, false);
        let t = Instant::now();
        for c in &mut conns {
            let mut two = frame(&relay_req("C", 0, &json!("cut")));
            two.extend(frame(&relay_req("C", 1, &json!("cut"))));
            c.send_raw(&two);
        }
        for c in &mut conns {
            for _ in 0..2 {
                let r = c.recv();
                assert_eq!(r["out"], "error", "{r}");
                let why = r["result"].as_str().unwrap_or("");
                assert!(why.contains("unreachable"), "{why:?}");
            }
        }
        let took = t.elapsed();
        assert!(
            took < bound,
            "relays to the cut-off host failed after {took:?}: over --connect-timeout + 3 heartbeats ({dead} s) + 2 s"
        );
        eprintln!(
            "cut-off host noticed in {took:?} (--connect-timeout {CONNECT_TIMEOUT} + 3 x --heartbeat {HEARTBEAT})"
        );
        // And a relay that needs a new link fails within the connect timeout.
        let t = Instant::now();
        let r = conns[0].call(&relay_req("C", 0, &json!("again")));
        assert!(r["result"].as_str().unwrap_or("").contains("unreachable"), "{r}");
        assert!(t.elapsed() < Duration::from_secs_f64(CONNECT_TIMEOUT + 1.5), "took {:?}", t.elapsed());
        for c in &mut conns {
            c.ping(&json!("stats"));
        }
    });
    nodes[0].c.wait_status("A's links to C down", STATS_TIMEOUT, |v| {
        (0..2).all(|w| (0..2).all(|cw| Node::link(v, w, "C", cw).is_some_and(|l| l["state"] != "up")))
    });

    // Cable back in: relays succeed again, with no restart anywhere.
    hosts.cable(3, true);
    hosts.in_hub(|| {
        let mut c = conn_on(0, 0);
        let ok = poll_until(Duration::from_secs(10), || c.call(&relay_req("C", 0, &json!("back")))["out"] == "relayed");
        assert!(ok, "relays to C did not come back within 10 s of the cable");
        relay_all(&[0, 1, 2], &[0, 1, 2]);
    });
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n.c.master_pid(), masters[i], "node {} was not restarted", n.name);
        assert_eq!(n.c.worker_pids(), pids[i], "node {}: no worker respawned", n.name);
    }
}
