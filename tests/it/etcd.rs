//! Node membership through etcd (issue 14): nodes register under a
//! prefix with a lease, watch it, and relay to whoever is registered. A
//! real single-member etcd (Debian's `etcd-server`) runs per test on free
//! loopback ports; the tests skip, saying so, when the binary is absent.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use handoff::topology::node::etcd::{b64, unb64};
use serde_json::{json, Value};

use crate::cluster_support::*;
use crate::support::*;

const ETCD: &str = "etcd";
const PREFIX: &str = "/handoff/nodes/";

/// A single-member etcd on free loopback ports, killed on drop.
struct Etcd {
    child: Option<Child>,
    port: u16,
    data: PathBuf,
    _tmp: TempDir,
}

fn etcd_binary() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(ETCD)).find(|p| p.is_file()))
}

impl Etcd {
    /// Starts etcd, or `None` (with a message) when it is not installed.
    fn start() -> Option<Etcd> {
        if etcd_binary().is_none() {
            eprintln!("SKIPPED: no etcd binary on PATH (install etcd-server: `make deps`)");
            return None;
        }
        let tmp = TempDir::new("etcd");
        let data = tmp.path().join("data");
        let mut e = Etcd { child: None, port: free_port(), data, _tmp: tmp };
        e.launch();
        Some(e)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs etcd on our ports and data directory; waits until it answers.
    fn launch(&mut self) {
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.port + 1);
        let child = Command::new(ETCD)
            .args(["--name", "default", "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        let up = poll_until(Duration::from_secs(10), || self.try_post("/v3/kv/range", &json!({"key": "AA=="})).is_ok());
        assert!(up, "etcd did not answer on {client} within 10 s");
    }

    /// Kills etcd (the data directory stays).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A gateway call: POST `path` with `body`, the reply's JSON.
    fn try_post(&self, path: &str, body: &Value) -> std::io::Result<Value> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let body = body.to_string();
        write!(s, "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(std::io::Error::other(format!("{path}: {head}")));
        }
        serde_json::from_str(body).map_err(std::io::Error::other)
    }

    /// The registered nodes: name -> address.
    fn nodes(&self) -> Vec<(String, String)> {
        let mut end = PREFIX.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        let v = self
            .try_post("/v3/kv/range", &json!({"key": b64(PREFIX.as_bytes()), "range_end": b64(&end)}))
            .expect("etcd range");
        let text = |k: &Value| String::from_utf8(unb64(k.as_str().unwrap_or("")).unwrap()).unwrap();
        v["kvs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|kv| (text(&kv["key"]).trim_start_matches(PREFIX).to_string(), text(&kv["value"])))
            .collect()
    }

    fn has(&self, name: &str) -> bool {
        self.nodes().iter().any(|(n, _)| n == name)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `handoff node --name NAME --port 0 --workers 2 --etcd URL --etcd-ttl 2 EXTRA...`
fn node(name: &str, etcd: &Etcd, peers: &[(&str, u16)], extra: &[&str]) -> Node {
    let url = etcd.url();
    let mut args = vec!["--etcd", url.as_str(), "--etcd-ttl", "2"];
    args.extend(extra);
    Node::start(name, 0, 2, peers, &args)
}

/// Waits until `n`'s membership holds `name` (or not, `present` false).
#[track_caller]
fn wait_member(n: &Node, name: &str, present: bool, timeout: Duration) -> Value {
    n.c.wait_status(&format!("{name} {}", if present { "joined" } else { "gone" }), timeout, |v| {
        member(v, name).is_some() == present
    })
}

fn member(v: &Value, name: &str) -> Option<Value> {
    v["members"].as_array()?.iter().find(|m| m["name"] == name).cloned()
}

/// A relay from a client of `from` to `to`:`w`, checked.
#[track_caller]
fn relays(from: &Node, to: &str, w: usize) {
    let msg = json!({"from": from.name, "to": [to, w]});
    let r = from.c.connect().call(&relay_req(to, w, &msg));
    assert_relayed(&r, to, w, &msg);
}

/// The error text of a relay that must fail.
#[track_caller]
fn relay_error(from: &Node, to: &str) -> String {
    let r = from.c.connect().call(&relay_req(to, 0, &json!("x")));
    assert_eq!(r["out"], "error", "relay to {to} should fail: {r}");
    r["result"].as_str().unwrap_or_default().to_string()
}

#[test]
fn join_without_peers() {
    let Some(etcd) = Etcd::start() else { return };
    let b = node("B", &etcd, &[], &[]);
    let a = node("A", &etcd, &[], &[]);
    wait_member(&a, "B", true, Duration::from_secs(5));
    // Members come with the read of the prefix; "connected" once the
    // watch is set up.
    let v = a.c.wait_status("etcd connected", Duration::from_secs(5), |v| v["etcd"]["state"] == "connected");
    assert_eq!(member(&v, "B").unwrap()["source"], "etcd", "{v}");
    assert_eq!(member(&v, "B").unwrap()["addr"], format!("127.0.0.1:{}", b.c.port));
    assert_eq!(member(&v, "A").unwrap()["source"], "self", "{v}");
    assert_eq!(v["etcd"]["state"], "connected", "{v}");
    assert_eq!(v["etcd"]["prefix"], PREFIX);
    assert_eq!(v["etcd"]["key"], format!("{PREFIX}A"));
    assert!(v["etcd"]["lease"].as_i64().is_some_and(|l| l != 0), "{v}");
    wait_member(&b, "A", true, Duration::from_secs(5));
    for w in 0..2 {
        relays(&a, "B", w);
        relays(&b, "A", w);
    }
    let mut want =
        vec![("A".to_string(), format!("127.0.0.1:{}", a.c.port)), ("B".into(), format!("127.0.0.1:{}", b.c.port))];
    want.sort();
    assert_eq!(etcd.nodes(), want, "the keys and their values (the advertised addresses)");
    // The text status shows it too.
    let text = a.c.status_cli(false);
    assert!(text.contains("etcd") && text.contains("connected") && text.contains("B "), "{text}");
}

#[test]
fn leave_deletes_the_key_at_once() {
    let Some(etcd) = Etcd::start() else { return };
    let a = node("A", &etcd, &[], &[]);
    let mut b = node("B", &etcd, &[], &[]);
    wait_member(&a, "B", true, Duration::from_secs(5));
    relays(&a, "B", 1);
    let st = b.c.server.terminate();
    assert!(st.success(), "clean stop: {st:?}");
    assert!(!etcd.has("B"), "B's key is deleted by the time B has exited: {:?}", etcd.nodes());
    let t = Instant::now();
    wait_member(&a, "B", false, Duration::from_secs(2));
    let e = relay_error(&a, "B");
    assert!(e.contains("unreachable"), "{e}");
    assert!(e.contains("not a member"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2), "noticed in {:?}", t.elapsed());
    assert!(etcd.has("A"));
}

#[test]
fn death_by_sigkill_then_the_lease_runs_out() {
    let Some(etcd) = Etcd::start() else { return };
    let a = node("A", &etcd, &[], &[]);
    let b = node("B", &etcd, &[], &[]);
    wait_member(&a, "B", true, Duration::from_secs(5));
    relays(&a, "B", 0);
    // Supervisor, master and workers: the whole process group at once (a
    // master that outlives its supervisor stops cleanly, and leaves).
    // (kill_pid leaves negative pids alone: kill(2) itself.)
    // SAFETY: plain kill(2) of the process group our child leads.
    let rc = unsafe { libc::kill(-b.c.server.pid(), libc::SIGKILL) };
    assert_eq!(rc, 0, "kill the group: {}", std::io::Error::last_os_error());
    let t = Instant::now();
    // A dead node's relays fail at once (its link, or the connect).
    let e = relay_error(&a, "B");
    assert!(e.contains("unreachable"), "{e}");
    assert!(poll_until(Duration::from_secs(8), || !etcd.has("B")), "B's key outlived its 2 s lease");
    let gone = t.elapsed();
    assert!(gone >= Duration::from_millis(500), "the key went in {gone:?}: before the lease ran out?");
    wait_member(&a, "B", false, Duration::from_secs(2));
    let e = relay_error(&a, "B");
    assert!(e.contains("unreachable") && e.contains("not a member"), "{e}");
}

#[test]
fn rejoin_after_leaving() {
    let Some(etcd) = Etcd::start() else { return };
    let a = node("A", &etcd, &[], &[]);
    let a_workers = a.c.worker_pids();
    let mut b = node("B", &etcd, &[], &[]);
    wait_member(&a, "B", true, Duration::from_secs(5));
    relays(&a, "B", 0);
    assert!(b.c.server.terminate().success());
    wait_member(&a, "B", false, Duration::from_secs(2));
    assert!(relay_error(&a, "B").contains("unreachable"));
    // B again, on another port: A relays to it with no restart.
    let b2 = node("B", &etcd, &[], &[]);
    assert_ne!(b2.c.port, b.c.port);
    let v = wait_member(&a, "B", true, Duration::from_secs(5));
    assert_eq!(member(&v, "B").unwrap()["addr"], format!("127.0.0.1:{}", b2.c.port), "{v}");
    for w in 0..2 {
        relays(&a, "B", w);
    }
    assert_eq!(a.c.worker_pids(), a_workers, "A's workers were not restarted");
}

#[test]
fn a_node_joining_late_is_reachable_from_all() {
    let Some(etcd) = Etcd::start() else { return };
    let a = node("A", &etcd, &[], &[]);
    let b = node("B", &etcd, &[], &[]);
    wait_member(&a, "B", true, Duration::from_secs(5));
    let pids = (a.c.worker_pids(), b.c.worker_pids());
    // Links A<->B exist before C comes.
    relays(&a, "B", 0);
    relays(&b, "A", 1);
    let c = node("C", &etcd, &[], &[]);
    for n in [&a, &b] {
        wait_member(n, "C", true, Duration::from_secs(5));
        for w in 0..2 {
            relays(n, "C", w);
        }
    }
    wait_member(&c, "A", true, Duration::from_secs(5));
    wait_member(&c, "B", true, Duration::from_secs(5));
    relays(&c, "A", 0);
    relays(&c, "B", 1);
    assert_eq!((a.c.worker_pids(), b.c.worker_pids()), pids, "no restart anywhere");
}

#[test]
fn peers_and_etcd_merge() {
    let Some(etcd) = Etcd::start() else { return };
    // P knows nobody and is not in etcd: only --peers names it.
    let p = Node::start("P", 0, 1, &[], &[]);
    let b = node("B", &etcd, &[], &[]);
    assert!(poll_until(Duration::from_secs(5), || etcd.has("B")), "B registered");
    let a = node("A", &etcd, &[("P", p.c.port), ("B", b.c.port)], &[]);
    let v = wait_member(&a, "B", true, Duration::from_secs(5));
    let v = if member(&v, "B").unwrap()["source"] == "both" {
        v
    } else {
        a.c.wait_status("B from both", Duration::from_secs(5), |v| {
            member(v, "B").is_some_and(|m| m["source"] == "both")
        })
    };
    assert_eq!(member(&v, "P").unwrap()["source"], "peers", "{v}");
    assert_eq!(member(&v, "P").unwrap()["addr"], format!("127.0.0.1:{}", p.c.port), "{v}");
    assert_eq!(member(&v, "A").unwrap()["source"], "self", "{v}");
    relays(&a, "P", 0);
    relays(&a, "B", 1);
    // B learns A from etcd alone, and P is no member of B's.
    wait_member(&b, "A", true, Duration::from_secs(5));
    relays(&b, "A", 0);
    assert!(relay_error(&b, "P").contains("unreachable: not a member"));
    // Without --etcd, status has no etcd.
    let pv = p.c.status();
    assert!(pv["etcd"].is_null(), "{pv}");
}

#[test]
fn etcd_outage_keeps_the_last_membership() {
    let Some(mut etcd) = Etcd::start() else { return };
    let a = node("A", &etcd, &[], &[]);
    let b = node("B", &etcd, &[], &[]);
    wait_member(&a, "B", true, Duration::from_secs(5));
    wait_member(&b, "A", true, Duration::from_secs(5));
    etcd.kill();
    let v = a.c.wait_status("etcd unreachable", Duration::from_secs(5), |v| v["etcd"]["state"] == "unreachable");
    assert!(v["etcd"]["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    // Longer than the 2 s lease: membership stays as last seen.
    std::thread::sleep(Duration::from_millis(2500));
    for w in 0..2 {
        relays(&a, "B", w);
        relays(&b, "A", w);
    }
    let v = a.c.status();
    assert_eq!(v["etcd"]["state"], "unreachable", "{v}");
    assert!(member(&v, "B").is_some(), "{v}");
    // A new etcd on the same port, with none of the old data: both nodes
    // grant new leases and put their keys again.
    std::fs::remove_dir_all(&etcd.data).unwrap();
    etcd.launch();
    for n in [&a, &b] {
        n.c.wait_status("etcd connected again", Duration::from_secs(10), |v| v["etcd"]["state"] == "connected");
    }
    assert!(poll_until(Duration::from_secs(5), || etcd.has("A") && etcd.has("B")), "{:?}", etcd.nodes());
    // The new etcd knew neither node for a moment: each may have seen the
    // other leave and come back.
    wait_member(&a, "B", true, Duration::from_secs(5));
    wait_member(&b, "A", true, Duration::from_secs(5));
    relays(&a, "B", 1);
    relays(&b, "A", 1);
}

/// Writes a config file.
fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn config_file_and_check_take_the_etcd_flags() {
    let tmp = TempDir::new("etcd-check");
    let d = tmp.path().join("d");
    let base = format!("name = \"A\"\nport = 7100\ndir = \"{}\"\n", d.display());
    let check = |cfg: &Path| {
        let (st, out, err) = run_cmd(
            Command::new(bin()).args(["check", "--config"]).arg(cfg).args(["--mode", "node"]),
            Duration::from_secs(10),
        );
        (st.code().unwrap_or(-1), out, err)
    };
    let good = write_config(
        tmp.path(),
        "good.toml",
        &format!("{base}etcd = \"http://127.0.0.1:2379,http://10.0.0.2:2379\"\netcd_prefix = \"/x/\"\netcd_ttl = 5\nadvertise = \"10.0.0.1:7100\"\n"),
    );
    let (code, out, err) = check(&good);
    assert_eq!(code, 0, "stdout {out}\nstderr {err}");
    for (extra, want) in [
        ("etcd = \"https://127.0.0.1:2379\"\n", "https is not supported"),
        ("etcd = \"127.0.0.1:2379\"\n", "expected http://HOST:PORT"),
        ("etcd = \"http://h:1\"\netcd_ttl = 0\n", "--etcd-ttl 0"),
        ("advertise = \"0.0.0.0:7100\"\n", "--advertise"),
        ("advertise = \"nowhere\"\n", "--advertise"),
    ] {
        let cfg = write_config(tmp.path(), "bad.toml", &format!("{base}{extra}"));
        let (code, out, err) = check(&cfg);
        assert_eq!(code, 1, "{extra:?}: stdout {out} stderr {err}");
        assert!(err.contains(want), "{extra:?}: want {want:?} in: {err}");
    }
}

#[test]
fn advertise_a_unix_socket() {
    let Some(etcd) = Etcd::start() else { return };
    let tmp = TempDir::new("etcd-unix");
    let sock = tmp.path().join("b.sock");
    let ep = format!("unix:{}", sock.display());
    let b = node("B", &etcd, &[], &["--listen", &ep, "--advertise", &ep]);
    let a = node("A", &etcd, &[], &[]);
    let v = wait_member(&a, "B", true, Duration::from_secs(5));
    assert_eq!(member(&v, "B").unwrap()["addr"], ep, "{v}");
    assert!(etcd.nodes().contains(&("B".to_string(), ep.clone())), "{:?}", etcd.nodes());
    relays(&a, "B", 0);
    let links = a.c.wait_status("a link to B", Duration::from_secs(5), |v| {
        (0..2).any(|w| Node::link(v, w, "B", 0).is_some_and(|l| l["state"] == "up"))
    });
    assert!(links["workers"].is_array());
    drop(b);
}

/// The lease the key of `name` is on (0 if none).
fn lease_of(etcd: &Etcd, name: &str) -> i64 {
    let v =
        etcd.try_post("/v3/kv/range", &json!({"key": b64(format!("{PREFIX}{name}").as_bytes())})).expect("etcd range");
    v["kvs"][0]["lease"].as_str().and_then(|l| l.parse().ok()).unwrap_or(0)
}

#[test]
fn a_restarted_node_keeps_its_key() {
    let Some(etcd) = Etcd::start() else { return };
    let a = node("A", &etcd, &[], &[]);
    let b = node("B", &etcd, &[], &[]);
    wait_member(&a, "B", true, Duration::from_secs(5));
    relays(&a, "B", 0);
    let before = lease_of(&etcd, "B");
    assert_ne!(before, 0);
    let (gen, _) = b.c.restart_ok();
    assert_eq!(gen, 2);
    // The new generation put the key on its own lease; the old one
    // neither deleted it nor revoked anything that holds it.
    let v = b.c.wait_status("gen 2 registered", Duration::from_secs(5), |v| v["etcd"]["state"] == "connected");
    let after = v["etcd"]["lease"].as_i64().unwrap();
    assert_ne!(after, before, "{v}");
    assert!(poll_until(Duration::from_secs(3), || lease_of(&etcd, "B") == after), "the key moved to the new lease");
    // Past the old lease's 2 s: the key stays, A never lost B.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(2500) {
        assert!(etcd.has("B"), "B's key vanished after the restart");
        assert!(member(&a.c.status(), "B").is_some(), "A dropped B during its restart");
        std::thread::sleep(Duration::from_millis(100));
    }
    for w in 0..2 {
        relays(&a, "B", w);
        relays(&b, "A", w);
    }
}
