//! The load clients over a Unix stream socket (`--unix PATH`, the C
//! client's `unix:PATH`), against a small in-test server on a Unix socket
//! that speaks the rpc framing (ping, whoami, work) or the pingpong one,
//! and counts the connections it accepts: a run that passes proves the
//! client talked to that socket and checked every reply. These do not
//! need the servers' `--listen unix:PATH`; the end-to-end tests against a
//! cluster on a Unix listener come with it.
use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use handoff::client::{self, PingPongOpts, RpcOpts, WorkOpts};
use handoff::service::pingpong::wire as pp;
use handoff::service::rpc::wire;
use serde_json::{json, Map, Value};

use crate::cluster_support::Cluster;
use crate::support::{bin, run_cmd, TempDir};

/// What the in-test server speaks.
#[derive(Clone, Copy)]
enum Proto {
    /// u32-LE-length-prefixed JSON: ping, whoami (worker 0), work.
    Rpc,
    /// 1-byte-length requests; responses alternate `rsp from port: 7000`
    /// and `7001` on each connection (the pair's xor check).
    PingPong,
}

/// A server on `DIR/s.sock`: a thread that accepts, one thread per
/// connection. Dropping it stops the acceptor and removes the directory.
struct UnixServer {
    path: PathBuf,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    _dir: TempDir,
}

impl UnixServer {
    fn start(proto: Proto) -> UnixServer {
        let dir = TempDir::new("ucl");
        let path = dir.path().join("s.sock");
        let l = UnixListener::bind(&path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        let (accepted, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (a2, s2) = (accepted.clone(), stop.clone());
        let acceptor = std::thread::spawn(move || {
            for s in l.incoming() {
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(s) = s else { continue };
                a2.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || match proto {
                    Proto::Rpc => serve_rpc(s),
                    Proto::PingPong => serve_pingpong(s),
                });
            }
        });
        UnixServer { path, accepted, stop, acceptor: Some(acceptor), _dir: dir }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn arg(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path); // wakes the acceptor
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

/// Answers rpc frames until EOF: ping and whoami as the service does,
/// `work` at once (no CPU spent).
fn serve_rpc(s: UnixStream) {
    let mut identity = Map::new();
    identity.insert("worker".into(), json!(0));
    identity.insert("pid".into(), json!(std::process::id()));
    let mut r = BufReader::new(&s);
    let mut w = &s;
    let mut body = Vec::new();
    loop {
        let mut hdr = [0u8; 4];
        if r.read_exact(&mut hdr).is_err() {
            return;
        }
        body.resize(u32::from_le_bytes(hdr) as usize, 0);
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let reply = match wire::parse(&body) {
            Ok((kind, req)) if kind == "work" => match wire::work_us(&req) {
                Ok(us) => json!({"out": "work", "result": us}),
                Err(e) => wire::error(&e),
            },
            parsed => wire::respond(parsed, &identity),
        };
        if w.write_all(&wire::encode(&reply)).is_err() {
            return;
        }
    }
}

/// Answers pingpong requests until EOF, alternating ports 7000 and 7001.
fn serve_pingpong(s: UnixStream) {
    let mut r = BufReader::new(&s);
    let mut w = &s;
    let mut payload = [0u8; 255];
    for n in 0u16.. {
        let mut len = [0u8; 1];
        if r.read_exact(&mut len).is_err() || r.read_exact(&mut payload[..len[0] as usize]).is_err() {
            return;
        }
        if w.write_all(&pp::response(7000 + n % 2)).is_err() {
            return;
        }
    }
}

/// `key=value` from a summary line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// A host and port that would fail: with `unix` set they must not be used.
fn unused_tcp() -> (String, u16) {
    ("192.0.2.1".into(), 1)
}

#[test]
fn rpc_keepalive_and_short_over_unix() {
    let srv = UnixServer::start(Proto::Rpc);
    let (host, port) = unused_tcp();
    let o = RpcOpts { host, port, conns: 8, requests: 200, unix: Some(srv.path.clone()), ..Default::default() };
    let s = client::rpc(&o);
    assert!(s.passed(), "{s}");
    assert_eq!(s.ok, 1600, "{s}");
    assert_eq!(srv.accepted(), 8, "one Unix connection per keep-alive connection");

    let s = client::rpc(&RpcOpts { conns: 3, requests: 20, short: true, ..o });
    assert!(s.passed(), "{s}");
    assert_eq!(s.ok, 60, "{s}");
    assert_eq!(srv.accepted(), 8 + 60, "one Unix connection per short request");
}

#[test]
fn unary_and_stream_over_unix() {
    let srv = UnixServer::start(Proto::PingPong);
    let (host, port) = unused_tcp();
    let o = PingPongOpts { host, port, conns: 5, requests: 100, size: 16, unix: Some(srv.path.clone()) };
    for (mode, s) in [("unary", client::unary(&o)), ("stream", client::stream(&o))] {
        assert!(s.passed(), "{mode}: {s}");
        assert_eq!((s.ok, s.check.as_str()), (500, "xor(7000,7001)"), "{mode}: {s}");
    }
    assert_eq!(srv.accepted(), 10);
}

#[test]
fn work_over_unix() {
    let srv = UnixServer::start(Proto::Rpc);
    let s = client::work(&WorkOpts {
        host: "192.0.2.1".into(),
        port: 1,
        conns: 4,
        us: 100,
        secs: 0.4,
        only_worker: None,
        trace: None,
        sample: Duration::from_millis(100),
        unix: Some(srv.path.clone()),
    });
    assert!(s.passed(), "{s}");
    assert_eq!((s.driven, s.moved), (4, 0), "{s}");
    assert_eq!(s.start, [(0, 4)].into(), "{s}");
    assert_eq!(srv.accepted(), 4);
}

#[test]
fn cli_clients_over_unix() {
    let rpc = UnixServer::start(Proto::Rpc);
    let pp = UnixServer::start(Proto::PingPong);
    let runs: [(&str, &UnixServer, &[&str], &str); 4] = [
        ("rpc", &rpc, &[], "200"),
        ("rpc", &rpc, &["--short"], "200"),
        ("unary", &pp, &[], "200"),
        ("stream", &pp, &[], "200"),
    ];
    for (mode, srv, extra, ok) in runs {
        let (st, out, err) = run_cmd(
            Command::new(bin())
                .args(["client", mode, "--unix", &srv.arg(), "--conns", "4", "--requests", "50"])
                .args(extra),
            Duration::from_secs(30),
        );
        assert!(st.success(), "client {mode} {extra:?} --unix: {st}\n{out}{err}");
        assert!(out.starts_with(mode), "{out:?}");
        assert_eq!((field(&out, "ok"), field(&out, "errors")), (ok, "0"), "{out}");
    }
    assert_eq!((rpc.accepted(), pp.accepted()), (4 + 200, 8));
}

#[test]
fn cli_unix_flag_errors() {
    let sock = "/nonexistent-handoff-dir/s.sock";
    // --unix with --port or --host, or neither --port nor --unix: usage errors.
    for (mode, args, says) in [
        ("rpc", &["--unix", sock, "--port", "7000"][..], "'--unix <PATH>' cannot be used with '--port <PORT>'"),
        ("unary", &["--unix", sock, "--host", "127.0.0.1"][..], "'--unix <PATH>' cannot be used with '--host <HOST>'"),
        ("stream", &["--port", "7000", "--unix", sock][..], "cannot be used with"),
        ("work", &["--unix", sock, "--port", "7000"][..], "cannot be used with"),
        ("rpc", &["--conns", "1"][..], "<--port <PORT>|--unix <PATH>>"),
    ] {
        let (st, out, err) = run_cmd(Command::new(bin()).arg("client").arg(mode).args(args), Duration::from_secs(30));
        assert_eq!(st.code(), Some(2), "client {mode} {args:?}: {st}\n{out}{err}");
        assert!(err.contains(says), "client {mode} {args:?}: {err}");
        assert!(out.is_empty(), "{out}");
    }
    // No server at the path: every request is an error, and the log names the path.
    for mode in ["rpc", "unary", "stream"] {
        let (st, out, err) = run_cmd(
            Command::new(bin()).args(["client", mode, "--unix", sock, "--conns", "2", "--requests", "3"]),
            Duration::from_secs(30),
        );
        assert_eq!(st.code(), Some(1), "client {mode} against nothing: {st}\n{out}{err}");
        assert_eq!((field(&out, "ok"), field(&out, "errors")), ("0", "6"), "{out}");
        assert!(err.contains(&format!("connect unix:{sock}")), "{err}");
    }
}

/// Compiles csrc/cclient.c into `dir` (as `make build/cclient` does).
fn build_cclient(dir: &Path) -> PathBuf {
    let exe = dir.join("cclient");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("csrc/cclient.c");
    let (st, out, err) = run_cmd(
        Command::new("cc")
            .args(["-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", "-D_GNU_SOURCE", "-pthread", "-o"])
            .arg(&exe)
            .arg(&src),
        Duration::from_secs(60),
    );
    assert!(st.success(), "compiling {} failed ({st}):\n{out}{err}", src.display());
    exe
}

#[test]
fn c_client_over_unix() {
    let tmp = TempDir::new("ccu");
    let exe = build_cclient(tmp.path());
    let srv = UnixServer::start(Proto::PingPong);
    let to = format!("unix:{}", srv.arg());
    for mode in ["unary", "stream"] {
        let (st, out, err) = run_cmd(Command::new(&exe).args([mode, &to, "4", "50"]), Duration::from_secs(30));
        assert!(st.success(), "cclient {mode} {to}: {st}\n{out}{err}");
        let line = out.lines().next().unwrap_or_default();
        assert!(line.starts_with(mode), "{line:?}");
        assert_eq!((field(line, "ok"), field(line, "errors"), field(line, "breaks")), ("200", "0", "0"), "{line}");
        assert_eq!(field(line, "check"), "xor(7000,7001)", "{line}");
    }
    assert_eq!(srv.accepted(), 8);

    // An empty or too long path is a usage error; a path nobody listens on
    // makes every request an error, and the message names it.
    let long = format!("unix:/{}", "x".repeat(120));
    for bad in ["unix:", long.as_str()] {
        let (st, out, err) = run_cmd(Command::new(&exe).args(["unary", bad]), Duration::from_secs(30));
        assert_eq!(st.code(), Some(2), "cclient unary {bad}: {st}\n{out}{err}");
        assert!(err.contains("usage: cclient unary|stream PORT|unix:PATH"), "{err}");
    }
    let gone = tmp.path().join("nobody.sock");
    let (st, out, err) = run_cmd(
        Command::new(&exe).args(["unary", &format!("unix:{}", gone.display()), "2", "3"]),
        Duration::from_secs(30),
    );
    assert_eq!(st.code(), Some(1), "{st}\n{out}{err}");
    assert_eq!(field(&out, "errors"), "6", "{out}");
    assert!(err.contains(&format!("connect unix:{}: No such file or directory", gone.display())), "{err}");
}

/// The JSON the in-test server answers is what the client checks: a
/// sanity check of the fixture itself (a wrong echo must fail the run).
#[test]
fn unix_fixture_wrong_reply_fails_the_client() {
    let dir = TempDir::new("ucw");
    let path = dir.path().join("w.sock");
    let l = UnixListener::bind(&path).unwrap();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut r = BufReader::new(&s);
        let mut hdr = [0u8; 4];
        r.read_exact(&mut hdr).unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(hdr) as usize];
        r.read_exact(&mut body).unwrap();
        (&s).write_all(&wire::encode(&json!({"out": "pong", "result": Value::Null}))).unwrap();
    });
    let s = client::rpc(&RpcOpts { conns: 1, requests: 1, unix: Some(path), ..Default::default() });
    h.join().unwrap();
    assert!(!s.passed(), "{s}");
    assert_eq!((s.ok, s.errors), (0, 1), "{s}");
}

/// The clients against a real cluster listening on TCP and on a Unix
/// socket (`--listen unix:PATH`): every reply checked over both. Needs
/// the servers' Unix listeners; a binary without `cluster --listen` skips.
#[test]
fn clients_against_a_cluster_on_a_unix_listener() {
    let (_, help, _) = run_cmd(Command::new(bin()).args(["cluster", "--help"]), Duration::from_secs(30));
    if !help.contains("--listen") {
        eprintln!("skipped: this handoff has no `cluster --listen` (Unix listeners)");
        return;
    }
    let tmp = TempDir::new("ucc");
    let sock = tmp.path().join("c.sock");
    let c = Cluster::start(2, &["--listen", &format!("unix:{}", sock.display())]);
    let to = sock.display().to_string();
    for extra in [&[][..], &["--short"][..]] {
        let (st, out, err) = run_cmd(
            Command::new(bin()).args(["client", "rpc", "--unix", &to, "--conns", "4", "--requests", "50"]).args(extra),
            Duration::from_secs(60),
        );
        assert!(st.success(), "client rpc --unix {extra:?}: {st}\n{out}{err}");
        assert_eq!((field(&out, "ok"), field(&out, "errors")), ("200", "0"), "{out}");
    }
    let s = client::work(&WorkOpts {
        host: String::new(),
        port: 0,
        conns: 4,
        us: 100,
        secs: 0.5,
        only_worker: None,
        trace: None,
        sample: Duration::from_millis(100),
        unix: Some(sock.clone()),
    });
    assert!(s.passed(), "{s}");
    assert_eq!(s.start.values().sum::<usize>(), 4, "{s}");
    // TCP alongside, same cluster.
    let s = client::rpc(&c.rpc_opts(4, 50, false));
    assert!(s.passed(), "{s}");
}
