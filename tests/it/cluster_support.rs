//! Fixtures for the cluster, restart and node tests (on top of `support`):
//! a cluster / node guard that kills every generation of masters and their
//! workers, a framed JSON client, status helpers.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    bin, free_pair, poll_until, run_cmd, Rng, TempDir, TestServer, EXIT_TIMEOUT, IO_TIMEOUT, LOCALHOST,
};

/// How long a `handoff restart` may take in these tests.
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(30);
/// How long worker stats may take to reach `status` (they are sent within
/// ~100 ms; generous for loaded CI machines).
pub const STATS_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- processes

/// Whether `pid` is a live process (a zombie counts as gone).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(s) => {
            // "pid (comm) S ...": the state follows the last ')'.
            let state = s.rfind(')').and_then(|i| s[i + 1..].split_whitespace().next()).unwrap_or("X");
            !matches!(state, "Z" | "X" | "x")
        }
    }
}

/// `sig` to one pid, or to a process group given as `-pgid` (ignored if
/// it is gone; 0 and -1, which mean "everyone", are refused).
pub fn kill_pid(pid: i32, sig: i32) {
    if !(-1..=0).contains(&pid) {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid, sig) };
    }
}

/// Parses `key=value` out of a readiness line.
pub fn ready_field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string))
}

/// Writes an executable shell script.
pub fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
}

/// A running cluster (or node) master with its workers, and every master
/// that replaced it by a hot restart. Drop kills them all: the first
/// master's process group (every generation inherits it), every master pid
/// seen in `status`, and their workers; the first master's stderr (which
/// later generations share) is printed by its `TestServer` on failure.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    pub workers: usize,
    /// Every master and worker pid seen (killed on drop).
    pids: Mutex<Vec<i32>>,
    /// The first master (generation 1).
    pub server: TestServer,
    _tmp: TempDir,
}

impl Cluster {
    /// `handoff cluster --port 0 --workers N --dir D EXTRA...`
    pub fn start(workers: usize, extra: &[&str]) -> Cluster {
        Cluster::start_with(workers, extra, bin().as_ref(), |_| {})
    }

    /// `start`, running `program` (e.g. a copy of the binary) and letting
    /// `setup` adjust the command (e.g. a `pre_exec` that sets a limit).
    pub fn start_with(
        workers: usize,
        extra: &[&str],
        program: &std::ffi::OsStr,
        setup: impl FnOnce(&mut Command),
    ) -> Cluster {
        let tmp = TempDir::new("cl");
        let dir = tmp.path().join("d");
        let mut args: Vec<String> =
            vec!["cluster".into(), "--port".into(), "0".into(), "--workers".into(), workers.to_string()];
        args.push("--dir".into());
        args.push(dir.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(program);
        cmd.args(&args);
        setup(&mut cmd);
        Cluster::adopt("cluster", tmp, dir, workers, TestServer::start_cmd("cluster", cmd))
    }

    /// Starts `handoff ARGS` (a cluster or a node) in `dir` and checks its
    /// readiness line `ready port=P workers=N dir=D gen=1`.
    pub fn launch(name: &str, tmp: TempDir, dir: PathBuf, workers: usize, args: Vec<String>) -> Cluster {
        Cluster::adopt(name, tmp, dir, workers, TestServer::start(name, &args))
    }

    /// Wraps a started master (readiness line seen) as in `launch`.
    pub fn adopt(name: &str, tmp: TempDir, dir: PathBuf, workers: usize, server: TestServer) -> Cluster {
        let port: u16 = ready_field(&server.ready, "port")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no port in readiness line {:?}", server.ready));
        let want = format!("ready port={port} workers={workers} dir={} gen=1", dir.display());
        // Several endpoints, or a Unix one: ` listen=A,B` follows.
        let listen = ready_field(&server.ready, "listen");
        if listen.is_none() {
            assert_ne!(port, 0, "{name}: readiness line shows port 0");
        }
        let want = match &listen {
            Some(l) => format!("{want} listen={l}"),
            None => want,
        };
        assert_eq!(server.ready, want, "{name}: readiness line");
        let c = Cluster { dir, port, workers, pids: Mutex::new(vec![server.pid()]), server, _tmp: tmp };
        // Learn the worker pids now, so that Drop kills them even if the
        // master is gone by then.
        c.status();
        c
    }

    /// The status JSON (panics, with the master's stderr, if it fails).
    pub fn status(&self) -> Value {
        match self.try_status(Duration::from_secs(5)) {
            Ok(v) => v,
            Err(e) => panic!("status --dir {}: {e}\n--- stderr ---\n{}", self.dir.display(), self.server.stderr_text()),
        }
    }

    pub fn try_status(&self, timeout: Duration) -> io::Result<Value> {
        let v = handoff::topology::cluster::status::fetch(&self.dir, timeout)?;
        self.remember(&v);
        Ok(v)
    }

    /// Records the master and worker pids of a status answer.
    pub fn remember(&self, v: &Value) {
        let mut pids = self.pids.lock().unwrap();
        let mut add = |p: &Value| {
            if let Some(p) = p.as_i64().filter(|&p| p > 0) {
                if !pids.contains(&(p as i32)) {
                    pids.push(p as i32);
                }
            }
        };
        add(&v["pid"]);
        for w in v["workers"].as_array().into_iter().flatten() {
            add(&w["pid"]);
        }
    }

    /// `handoff status --dir D --json` through the CLI.
    pub fn status_cli(&self, json: bool) -> String {
        let mut cmd = Command::new(bin());
        cmd.arg("status").arg("--dir").arg(&self.dir);
        if json {
            cmd.arg("--json");
        }
        let (st, out, err) = run_cmd(&mut cmd, Duration::from_secs(10));
        assert!(st.success(), "handoff status: {st}\n{err}");
        out
    }

    /// The current master's pid.
    pub fn master_pid(&self) -> i32 {
        self.status()["pid"].as_i64().expect("status pid") as i32
    }

    /// Worker pids by slot.
    pub fn worker_pids(&self) -> Vec<i32> {
        worker_field(&self.status(), "pid").into_iter().map(|p| p as i32).collect()
    }

    /// Polls status until `cond` holds (panics with the last status after
    /// `timeout`); returns that status.
    #[track_caller]
    pub fn wait_status(&self, what: &str, timeout: Duration, mut cond: impl FnMut(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let ok = poll_until(timeout, || {
            match self.try_status(Duration::from_secs(2)) {
                Ok(v) => {
                    let done = cond(&v);
                    last = v;
                    done
                }
                Err(_) => false, // between generations the socket may be renamed
            }
        });
        assert!(ok, "status never showed {what} within {timeout:?}; last status: {last}");
        last
    }

    /// Runs `handoff restart --dir D ARGS` to completion.
    pub fn restart(&self, args: &[&str]) -> (ExitStatus, String, String) {
        let mut cmd = Command::new(bin());
        cmd.arg("restart").arg("--dir").arg(&self.dir).args(args);
        let r = run_cmd(&mut cmd, RESTART_TIMEOUT);
        // Learn the new master (and its workers) for Drop.
        let _ = self.try_status(Duration::from_secs(2));
        r
    }

    /// A successful restart: returns (generation, new master pid) as
    /// printed by `handoff restart`, checked against status.
    #[track_caller]
    pub fn restart_ok(&self) -> (u64, i32) {
        let (st, out, err) = self.restart(&[]);
        assert!(
            st.success(),
            "handoff restart failed: {st}\nstdout: {out}\nstderr: {err}\n--- master stderr ---\n{}",
            self.server.stderr_text()
        );
        let (gen, pid) = parse_restarted(&out);
        let v = self.status();
        assert_eq!(v["gen"], json!(gen), "status after restart: {v}");
        assert_eq!(v["pid"], json!(pid), "status after restart: {v}");
        (gen, pid)
    }

    pub fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(LOCALHOST, self.port)
    }

    pub fn connect(&self) -> Rpc {
        Rpc::connect(self.port)
    }

    /// Options of the library load client against this cluster.
    pub fn rpc_opts(&self, conns: usize, requests: usize, short: bool) -> handoff::client::RpcOpts {
        handoff::client::RpcOpts {
            host: "127.0.0.1".into(),
            port: self.port,
            conns,
            requests,
            short,
            relay: None,
            unix: None,
        }
    }

    /// Kills every process of this cluster now (what Drop does).
    pub fn kill_all(&self) {
        // Learn the latest generation, if one answers quickly.
        let _ = self.try_status(Duration::from_millis(500));
        for &p in self.pids.lock().unwrap().iter() {
            kill_pid(p, libc::SIGKILL);
        }
        // Every generation and worker is in the first master's group.
        kill_pid(-self.server.pid(), libc::SIGKILL);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
        // The first master is reaped by its TestServer; later masters were
        // orphaned (re-parented), and are gone once killed.
        let pids: Vec<i32> = self.pids.lock().unwrap().clone();
        let all_gone = poll_until(Duration::from_secs(5), || pids.iter().all(|&p| !pid_alive(p)));
        if !all_gone && !std::thread::panicking() {
            let left: Vec<i32> = pids.into_iter().filter(|&p| pid_alive(p)).collect();
            panic!("cluster processes still alive after SIGKILL: {left:?}");
        }
    }
}

/// Parses `restarted: generation G (pid N)`.
#[track_caller]
pub fn parse_restarted(out: &str) -> (u64, i32) {
    let line =
        out.lines().find(|l| l.starts_with("restarted:")).unwrap_or_else(|| panic!("no restarted line: {out:?}"));
    let gen = line.split_whitespace().nth(2).and_then(|g| g.parse().ok());
    let pid = line.rsplit_once("(pid ").and_then(|(_, p)| p.trim_end_matches(')').parse().ok());
    match (gen, pid) {
        (Some(g), Some(p)) => (g, p),
        _ => panic!("cannot parse {line:?}"),
    }
}

/// `field` of every worker of a status answer, by slot.
pub fn worker_field(v: &Value, field: &str) -> Vec<u64> {
    v["workers"].as_array().expect("status workers").iter().map(|w| w[field].as_u64().unwrap_or(0)).collect()
}

pub fn sum_field(v: &Value, field: &str) -> u64 {
    worker_field(v, field).iter().sum()
}

// ------------------------------------------------------------------ client

/// A client's stream: TCP, or a Unix stream socket (`--listen unix:PATH`).
pub enum Stream {
    Tcp(TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Stream {
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(d),
            Stream::Unix(s) => s.set_read_timeout(d),
        }
    }

    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(d),
            Stream::Unix(s) => s.set_write_timeout(d),
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
        }
    }

    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// The TCP client's own address (panics on a Unix stream).
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self {
            Stream::Tcp(s) => s.local_addr(),
            Stream::Unix(_) => panic!("local_addr of a Unix stream"),
        }
    }

    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.peek(buf),
            // SAFETY: recv with MSG_PEEK into a live buffer of its length.
            Stream::Unix(s) => {
                let n = unsafe {
                    libc::recv(std::os::fd::AsRawFd::as_raw_fd(s), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK)
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl std::os::fd::AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// A blocking client of the cluster protocol (u32 LE length + JSON).
pub struct Rpc {
    pub s: Stream,
    buf: Vec<u8>,
}

impl Rpc {
    pub fn connect(port: u16) -> Rpc {
        Rpc::try_connect(port).unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"))
    }

    pub fn try_connect(port: u16) -> io::Result<Rpc> {
        let s = TcpStream::connect(SocketAddrV4::new(LOCALHOST, port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Rpc { s: Stream::Tcp(s), buf: Vec::new() })
    }

    /// A connection to a Unix listener (`--listen unix:PATH`).
    pub fn connect_unix(path: &Path) -> Rpc {
        Rpc::try_connect_unix(path).unwrap_or_else(|e| panic!("connect unix:{}: {e}", path.display()))
    }

    pub fn try_connect_unix(path: &Path) -> io::Result<Rpc> {
        let s = std::os::unix::net::UnixStream::connect(path)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Rpc { s: Stream::Unix(s), buf: Vec::new() })
    }

    /// A connection to any address (an IPv6 one, say).
    pub fn connect_addr(addr: std::net::SocketAddr) -> Rpc {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Rpc { s: Stream::Tcp(s), buf: Vec::new() }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap_or_else(|e| panic!("write: {e}"));
    }

    pub fn send(&mut self, v: &Value) {
        let f = frame(v);
        self.send_raw(&f);
    }

    /// One reply frame, parsed (panics on EOF, error or bad JSON).
    pub fn recv(&mut self) -> Value {
        match self.try_recv() {
            Ok(Some(v)) => v,
            Ok(None) => panic!("EOF where a reply was expected"),
            Err(e) => panic!("{e}"),
        }
    }

    /// A reply (`Some`), a clean EOF before any byte of one (`None`), or an error.
    pub fn try_recv(&mut self) -> Result<Option<Value>, String> {
        let mut hdr = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.s.read(&mut hdr[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err("EOF inside a reply header".into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read reply header: {e}")),
            }
        }
        let len = u32::from_le_bytes(hdr) as usize;
        if len > 16 << 20 {
            return Err(format!("reply frame of {len} bytes"));
        }
        self.buf.resize(len, 0);
        self.s.read_exact(&mut self.buf).map_err(|e| format!("read reply body ({len} bytes): {e}"))?;
        serde_json::from_slice(&self.buf)
            .map(Some)
            .map_err(|e| format!("reply is not JSON ({e}): {}", String::from_utf8_lossy(&self.buf)))
    }

    pub fn call(&mut self, v: &Value) -> Value {
        self.send(v);
        self.recv()
    }

    /// Pings `x` and checks the echo.
    #[track_caller]
    pub fn ping(&mut self, x: &Value) {
        let r = self.call(&json!({"in": "ping", "params": x}));
        assert_eq!(r, json!({"out": "pong", "result": x}), "ping {x}");
    }

    /// The whoami result (`{"worker","pid","gen"[,"node"]}`).
    #[track_caller]
    pub fn whoami(&mut self) -> Value {
        let r = self.call(&json!({"in": "whoami"}));
        assert_eq!(r["out"], "whoami", "whoami reply {r}");
        r["result"].clone()
    }

    /// Reads until the server closes: Ok(()) on EOF or reset, Err on a
    /// timeout; replies read meanwhile are discarded.
    pub fn expect_closed(&mut self, timeout: Duration) -> Result<(), String> {
        self.s.set_read_timeout(Some(timeout)).unwrap();
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 65536];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    if Instant::now() > deadline {
                        return Err("still receiving data".into());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("not closed within {timeout:?}: {e}")),
            }
        }
    }

    /// Whether the server has nothing more to say right now (no stray
    /// bytes within `wait`).
    pub fn nothing_pending(&mut self, wait: Duration) -> bool {
        self.s.set_read_timeout(Some(wait)).unwrap();
        let mut b = [0u8; 1];
        let r = matches!(self.s.read(&mut b), Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut));
        self.s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        r
    }
}

/// One frame: u32 LE length + JSON.
pub fn frame(v: &Value) -> Vec<u8> {
    handoff::service::rpc::wire::encode(v)
}

/// One frame with an arbitrary body.
pub fn raw_frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

pub fn ping_req(x: &Value) -> Value {
    json!({"in": "ping", "params": x})
}

pub fn relay_req(node: &str, worker: usize, msg: &Value) -> Value {
    json!({"in": "relay", "params": {"node": node, "worker": worker, "msg": msg}})
}

// -------------------------------------------------------------------- nodes

/// A free port for a server that starts later (below the ephemeral range,
/// never handed out twice in this test process).
pub fn free_port() -> u16 {
    free_pair()
}

/// One `handoff node` (manager + workers).
pub struct Node {
    pub name: String,
    pub c: Cluster,
}

impl Node {
    /// `handoff node --name NAME --port PORT --workers N --dir D --peers PEERS EXTRA...`
    pub fn start(name: &str, port: u16, workers: usize, peers: &[(&str, u16)], extra: &[&str]) -> Node {
        let tmp = TempDir::new(&format!("n{name}"));
        let dir = tmp.path().join("d");
        let peers: Vec<String> = peers.iter().map(|(n, p)| format!("{n}=127.0.0.1:{p}")).collect();
        let mut args: Vec<String> =
            vec!["node".into(), "--name".into(), name.into(), "--port".into(), port.to_string()];
        args.extend(["--workers".into(), workers.to_string(), "--dir".into(), dir.display().to_string()]);
        args.extend(["--peers".into(), peers.join(",")]);
        args.extend(extra.iter().map(|s| s.to_string()));
        // Under valgrind (HANDOFF_WRAP) a link takes seconds to set up and a
        // busy worker misses heartbeats: stretch the node's deadlines the
        // test does not set itself.
        for (flag, secs) in [("--connect-timeout", 1.5), ("--heartbeat", 1.0), ("--relay-timeout", 5.0)] {
            let stretched = crate::support::wrapped_slowly(Duration::from_secs_f64(secs)).as_secs_f64();
            if stretched > secs && !extra.contains(&flag) {
                args.extend([flag.to_string(), (stretched * 2.0).to_string()]);
            }
        }
        let c = Cluster::launch(&format!("node {name}"), tmp, dir, workers, args);
        if port != 0 {
            assert_eq!(c.port, port, "node {name}: port");
        }
        Node { name: name.to_string(), c }
    }

    /// A client connection on worker `w` of this node (connections go
    /// round-robin: opens up to 2N and keeps the one that lands there).
    pub fn conn_on(&self, w: usize) -> Rpc {
        for _ in 0..self.c.workers * 2 + 2 {
            let mut r = self.c.connect();
            if r.whoami()["worker"] == json!(w) {
                return r;
            }
        }
        panic!("node {}: no connection landed on worker {w}", self.name);
    }

    /// The link row of worker `w` to (node, worker) in `status`.
    pub fn link(v: &Value, w: usize, node: &str, peer: usize) -> Option<Value> {
        v["workers"][w]["links"].as_array()?.iter().find(|l| l["node"] == node && l["worker"] == json!(peer)).cloned()
    }
}

/// Checks a relayed reply: from `node`:`worker`, with `msg` echoed.
#[track_caller]
/// Starts nodes `names` (each knowing all the others), `workers` each.
pub fn start_nodes(names: &[&str], workers: usize, extra: &[&str]) -> Vec<Node> {
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let peers: Vec<(&str, u16)> =
                names.iter().zip(&ports).filter(|(n, _)| *n != name).map(|(n, p)| (*n, *p)).collect();
            Node::start(name, ports[i], workers, &peers, extra)
        })
        .collect()
}

pub fn assert_relayed(r: &Value, node: &str, worker: usize, msg: &Value) -> u64 {
    assert_eq!(r["out"], "relayed", "relay to {node}:{worker}: {r}");
    assert_eq!(r["result"]["node"], node, "{r}");
    assert_eq!(r["result"]["worker"], json!(worker), "{r}");
    assert_eq!(&r["result"]["msg"], msg, "{r}");
    r["result"]["pid"].as_u64().unwrap_or_else(|| panic!("no pid in {r}"))
}

// ------------------------------------------------------------ bare children

/// A child process (not a server: no readiness line) killed and reaped on
/// drop; its output is collected by threads.
pub struct ChildGuard {
    pub child: std::process::Child,
    out: Option<std::thread::JoinHandle<String>>,
    err: Option<std::thread::JoinHandle<String>>,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        let (child, out, err) = crate::support::spawn_captured(cmd);
        ChildGuard { child, out: Some(out), err: Some(err) }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the exit (panics after `timeout`); returns (status, stdout, stderr).
    pub fn wait(&mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let mut st = None;
        let ok = poll_until(timeout, || {
            st = self.child.try_wait().expect("try_wait");
            st.is_some()
        });
        assert!(ok, "{:?} still running after {timeout:?}", self.child.id());
        let out = self.out.take().map(|t| t.join().unwrap()).unwrap_or_default();
        let err = self.err.take().map(|t| t.join().unwrap()).unwrap_or_default();
        (st.unwrap(), out, err)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sets SO_RCVBUF (the kernel caps it at net.core.rmem_max).
pub fn set_rcvbuf(r: &Rpc, bytes: libc::c_int) {
    set_buf(r, libc::SO_RCVBUF, bytes);
}

/// Sets SO_SNDBUF (the kernel caps it at net.core.wmem_max); a fixed size
/// also stops the kernel from growing it.
pub fn set_sndbuf(r: &Rpc, bytes: libc::c_int) {
    set_buf(r, libc::SO_SNDBUF, bytes);
}

fn set_buf(r: &Rpc, opt: libc::c_int, bytes: libc::c_int) {
    // SAFETY: setsockopt on our socket with an int of the right size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&r.s),
            libc::SOL_SOCKET,
            opt,
            &bytes as *const _ as *const libc::c_void,
            std::mem::size_of_val(&bytes) as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt {opt}: {}", std::io::Error::last_os_error());
}

/// Established connections to local port `port` (server ends) and the
/// bytes unread in their receive queues, from /proc/net/tcp.
pub fn server_side_unread(port: u16) -> (usize, u64) {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!(":{port:04X}");
    let (mut n, mut unread) = (0usize, 0u64);
    for l in table.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 4 && f[1].ends_with(&local) && f[3] == "01" {
            n += 1;
            unread += f[4].split_once(':').map_or(0, |(_, rx)| u64::from_str_radix(rx, 16).unwrap_or(0));
        }
    }
    (n, unread)
}

/// SIGTERM to the master of `c` (started with `--grace 5`, serving rpc):
/// a request in progress is finished, idle and finished connections
/// close, the master exits 0 and no worker is left.
pub fn check_sigterm_finishes_the_request_in_progress(c: &mut Cluster) {
    let v = c.status();
    let pids: Vec<i32> = worker_field(&v, "pid").into_iter().map(|p| p as i32).collect();
    assert!(pids.iter().all(|&p| pid_alive(p)), "{v}");
    let mut idle = c.connect();
    idle.ping(&json!("idle"));
    // A connection with half a request buffered when SIGTERM comes: the
    // worker finishes it. The half request rides in one write behind a
    // whole one: the reply to the whole one shows the worker read both.
    let mut partial = c.connect();
    let f = frame(&ping_req(&json!("finish me")));
    let mut first = frame(&ping_req(&json!("warm")));
    first.extend_from_slice(&f[..7]);
    partial.send_raw(&first);
    assert_eq!(partial.recv(), json!({"out": "pong", "result": "warm"}));
    c.server.signal(libc::SIGTERM);
    partial.send_raw(&f[7..]);
    assert_eq!(partial.recv(), json!({"out": "pong", "result": "finish me"}), "request in progress at SIGTERM");
    partial.expect_closed(Duration::from_secs(5)).expect("finished connection closed after SIGTERM");
    idle.expect_closed(Duration::from_secs(5)).expect("idle connection closed at SIGTERM");
    let st = c.server.wait_exit(EXIT_TIMEOUT);
    assert!(st.success(), "master exit status after SIGTERM: {st}");
    let left: Vec<i32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
    assert!(left.is_empty(), "workers still alive after the master exited: {left:?}");
    let log = c.server.stderr_text();
    assert!(!log.contains("exited unexpectedly"), "a worker died instead of stopping:\n{log}");
}

/// Malformed rpc requests, each with what is wrong with it: every worker
/// (Rust or C) must answer each with an error and keep the connection.
pub fn bad_rpc_requests() -> Vec<(&'static str, Vec<u8>)> {
    let deep = format!("{{\"in\":\"ping\",\"params\":{}{}}}", "[".repeat(5000), "]".repeat(5000));
    vec![
        ("truncated JSON", b"{".to_vec()),
        ("not JSON", b"hello there".to_vec()),
        ("empty body", Vec::new()),
        ("invalid UTF-8", vec![0xff, 0xfe, 0x22]),
        ("invalid UTF-8 in a string", b"{\"in\":\"ping\",\"params\":\"\xc0\xaf\"}".to_vec()),
        ("a surrogate in UTF-8", b"{\"in\":\"ping\",\"params\":\"\xed\xa0\x80\"}".to_vec()),
        ("array", b"[1,2,3]".to_vec()),
        ("number", b"42".to_vec()),
        ("string", br#""ping""#.to_vec()),
        ("null", b"null".to_vec()),
        ("unknown in", br#"{"in":"dance","params":1}"#.to_vec()),
        ("in not a string", br#"{"in":5,"params":1}"#.to_vec()),
        ("missing in", br#"{"params":1}"#.to_vec()),
        ("ping without params", br#"{"in":"ping"}"#.to_vec()),
        ("trailing garbage", br#"{"in":"ping","params":1} x"#.to_vec()),
        ("trailing comma", br#"{"in":"ping","params":[1,]}"#.to_vec()),
        ("leading zero", br#"{"in":"ping","params":01}"#.to_vec()),
        ("bad escape", br#"{"in":"ping","params":"\x"}"#.to_vec()),
        ("short unicode escape", br#"{"in":"ping","params":"\u12"}"#.to_vec()),
        ("raw control character", b"{\"in\":\"ping\",\"params\":\"a\nb\"}".to_vec()),
        ("single quotes", br#"{'in':'ping'}"#.to_vec()),
        ("bare word", br#"{"in":"ping","params":nul}"#.to_vec()),
        ("nested too deep", deep.into_bytes()),
        ("NUL bytes", vec![0; 64]),
    ]
}

/// Sends every [`bad_rpc_requests`] body on `conn`: an error reply each,
/// and the connection (and a new one from `connect`) still serves; then
/// all of them pipelined, each followed by a good request.
pub fn check_bad_requests_get_errors(connect: impl Fn() -> Rpc, conn: &mut Rpc) {
    let bad = bad_rpc_requests();
    for (what, body) in &bad {
        conn.send_raw(&raw_frame(body));
        let r = conn.recv();
        assert_eq!(r["out"], "error", "{what}: {r}");
        assert!(r["result"].as_str().is_some_and(|s| !s.is_empty()), "{what}: reason {r}");
        conn.ping(&json!({"after": what}));
        connect().ping(&json!({"fresh after": what}));
    }
    let mut batch = Vec::new();
    for (i, (_, body)) in bad.iter().enumerate() {
        batch.extend(raw_frame(body));
        batch.extend(frame(&ping_req(&json!(i))));
    }
    conn.send_raw(&batch);
    for (i, (what, _)) in bad.iter().enumerate() {
        assert_eq!(conn.recv()["out"], "error", "pipelined {what}");
        assert_eq!(conn.recv(), json!({"out": "pong", "result": i}), "pipelined ping after {what}");
    }
}

/// What [`pipelined_restarts`] saw on one connection: rounds completed and
/// the final whoami reply.
pub type PipelinedOutcome = Result<(u64, Value), String>;

/// `conns` connections each send rounds of `batch` pings, written in two
/// pieces split at a random byte (often mid-frame; with `pause`, a short
/// random pause between them, so a restart can catch the half), and check
/// every reply, once and in order, while `restarts` restarts run (each
/// must give the next generation). Ends with a whoami per connection.
/// Panics on a stalled load; returns each connection's outcome.
pub fn pipelined_restarts(
    c: &Cluster,
    conns: usize,
    batch: usize,
    restarts: u64,
    pause: bool,
) -> Vec<PipelinedOutcome> {
    pipelined_restarts_on(c, || c.connect(), conns, batch, restarts, pause)
}

/// [`pipelined_restarts`] over the connections `connect` opens (a Unix
/// listener's, say).
pub fn pipelined_restarts_on(
    c: &Cluster,
    connect: impl Fn() -> Rpc,
    conns: usize,
    batch: usize,
    restarts: u64,
    pause: bool,
) -> Vec<PipelinedOutcome> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let rounds = AtomicU64::new(0);
    let (stop, failed) = (AtomicBool::new(false), AtomicBool::new(false));
    let mut conns: Vec<Rpc> = (0..conns).map(|_| connect()).collect();
    let n = conns.len() as u64;
    let wait = |target: u64| {
        let ok = poll_until(Duration::from_secs(20), || {
            rounds.load(Ordering::Relaxed) >= target || failed.load(Ordering::Relaxed)
        });
        assert!(ok, "traffic stalled at {} rounds (wanted {target})", rounds.load(Ordering::Relaxed));
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(ci, conn)| {
                let (rounds, stop, failed) = (&rounds, &stop, &failed);
                s.spawn(move || {
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((ci as u64 + 1) * 0x1000_0000_01b3));
                    let mut r = 0u64;
                    let res = (|| {
                        while !stop.load(Ordering::Relaxed) {
                            let mut bytes = Vec::new();
                            for i in 0..batch {
                                bytes.extend(frame(&ping_req(&json!({"c": ci, "r": r, "i": i}))));
                            }
                            let cut = rng.below(bytes.len() as u64) as usize;
                            conn.s.write_all(&bytes[..cut]).map_err(|e| format!("round {r}: write: {e}"))?;
                            if pause {
                                std::thread::sleep(Duration::from_micros(rng.below(2000)));
                            }
                            conn.s.write_all(&bytes[cut..]).map_err(|e| format!("round {r}: write: {e}"))?;
                            for i in 0..batch {
                                let want = json!({"out": "pong", "result": {"c": ci, "r": r, "i": i}});
                                match conn.try_recv() {
                                    Ok(Some(v)) if v == want => {}
                                    Ok(Some(v)) => {
                                        return Err(format!("round {r} reply {i}: got {v}, expected {want}"))
                                    }
                                    Ok(None) => return Err(format!("round {r} reply {i}: EOF")),
                                    Err(e) => return Err(format!("round {r} reply {i}: {e}")),
                                }
                            }
                            r += 1;
                            rounds.fetch_add(1, Ordering::Relaxed);
                        }
                        if !conn.nothing_pending(Duration::from_millis(50)) {
                            return Err(format!("after {r} rounds: unexpected extra bytes (a duplicated reply?)"));
                        }
                        Ok((r, conn.call(&json!({"in": "whoami"}))))
                    })();
                    if res.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    res.map_err(|e| format!("connection {ci}: {e}"))
                })
            })
            .collect();
        let mut during = Vec::new();
        for k in 1..=restarts {
            wait(k * 2 * n);
            if failed.load(Ordering::Relaxed) {
                break;
            }
            let before = rounds.load(Ordering::Relaxed);
            let (gen, _pid) = c.restart_ok();
            during.push(rounds.load(Ordering::Relaxed) - before);
            assert_eq!(gen, k + 1);
        }
        wait((restarts + 1) * 2 * n);
        stop.store(true, Ordering::Relaxed);
        eprintln!("pipelined restarts: rounds completed while each restart ran: {during:?}");
        handles.into_iter().map(|h| h.join().expect("connection thread")).collect()
    })
}

/// Asserts every [`pipelined_restarts`] connection completed a round
/// without error and ended on generation `gen` (its whoami's `gen`).
pub fn assert_pipelined_ok(results: &[PipelinedOutcome], gen: u64) {
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(errors.is_empty(), "{} connection(s) failed; first: {:?}", errors.len(), &errors[..errors.len().min(5)]);
    for (ci, r) in results.iter().enumerate() {
        let (n, who) = r.as_ref().expect("checked above");
        assert!(*n >= 1, "connection {ci} completed no round");
        assert_eq!(who["out"], "whoami", "connection {ci}: {who}");
        assert_eq!(who["result"]["gen"], json!(gen), "connection {ci} ends on generation {gen}: {who}");
    }
}

/// JSON values of every kind and size, for ping echoes.
pub fn ping_values() -> Vec<Value> {
    vec![
        json!(null),
        json!(true),
        json!(false),
        json!(0),
        json!(-1),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1.5),
        json!(-0.000123),
        json!(1.7976931348623157e308),
        json!(""),
        json!("plain"),
        json!("héllo wörld ✓ 日本語 𝄞 🦀"),
        json!("quotes \" backslash \\ newline \n tab \t nul \u{0} bell \u{7}"),
        json!([]),
        json!({}),
        json!([1, [2, [3, [4, [5, []]]]], {"a": [null, {"b": {}}]}]),
        json!({"k": {"z": [true, false, null]}, "ü": "ß", "": 0, "n": [1.25, -3, "x"]}),
        json!((0..500).collect::<Vec<u32>>()),
        json!({"big": "x".repeat(100_000)}),
    ]
}

/// Pings with each of `values` on one connection, each on a new one, then
/// all pipelined in one write: every reply echoes its value exactly.
pub fn check_ping_echoes(connect: impl Fn() -> Rpc, values: &[Value]) {
    let mut conn = connect();
    for x in values {
        conn.ping(x);
        connect().ping(x);
    }
    let mut batch = Vec::new();
    for x in values {
        batch.extend(frame(&ping_req(x)));
    }
    conn.send_raw(&batch);
    for x in values {
        assert_eq!(conn.recv(), json!({"out": "pong", "result": x}), "pipelined");
    }
}

/// The exit code of a forked test child (a stranger uid's connect probe),
/// waited for 10 s at most (then killed, and the test fails).
pub fn wait_stranger(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    let ok = poll_until(Duration::from_secs(10), || {
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) == pid }
    });
    if !ok {
        // SAFETY: kill and reap our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut status, 0);
        }
        panic!("stranger child did not finish");
    }
    assert!(libc::WIFEXITED(status), "stranger child: raw status {status}");
    libc::WEXITSTATUS(status)
}

/// Forks a child that becomes uid/gid 65534, connects a Unix socket of
/// `sock_type` to `path` and, if `request` is not empty, sends it and
/// waits up to 3 s for a reply. Its exit code: 10 connect refused with
/// EACCES, 12 connected (with a request: got a reply), 11 closed without a
/// reply, 13 no reply in time, 2x setup or other connect errors.
pub fn stranger_probe(path: &std::path::Path, sock_type: libc::c_int, request: &[u8]) -> i32 {
    // Everything the child needs is prepared before fork (no allocation after).
    let addr = sockaddr_un_of(path);
    // SAFETY: the child only makes raw syscalls on prepared memory, then _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: as above: raw syscalls only, in the forked child.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(20);
            }
            let fd = libc::socket(libc::AF_UNIX, sock_type | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                libc::_exit(21);
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len) != 0 {
                let e = *libc::__errno_location();
                libc::_exit(if e == libc::EACCES { 10 } else { 22 });
            }
            if request.is_empty() {
                libc::_exit(12);
            }
            if libc::send(fd, request.as_ptr() as *const libc::c_void, request.len(), libc::MSG_NOSIGNAL) < 0 {
                libc::_exit(11);
            }
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            if libc::poll(&mut pfd, 1, 3000) == 0 {
                libc::_exit(13);
            }
            let mut buf = [0u8; 1024];
            let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
            libc::_exit(if n > 0 { 12 } else { 11 });
        }
    }
    wait_stranger(pid)
}

/// `path` as a `sockaddr_un`, prepared before a fork (the child of a
/// stranger-uid probe allocates nothing).
pub fn sockaddr_un_of(path: &std::path::Path) -> libc::sockaddr_un {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain old data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let p = path.as_os_str().as_bytes();
    assert!(p.len() < addr.sun_path.len(), "socket path too long");
    for (d, s) in addr.sun_path.iter_mut().zip(p) {
        *d = *s as libc::c_char;
    }
    addr
}

/// Checks a short-connection load run across a SIGKILL of one worker.
/// Every request is answered except, at most, the one the killed worker
/// was serving at the instant of the kill: a worker answers in the
/// callback that read the request, so no more than one can be between
/// read and reply, and bytes a dead process read are gone (README,
/// "Limits"). Its client sees no reply (a timeout), never a wrong one:
/// a wrong or duplicated reply would fail the checks as an error too,
/// so two errors fail the test.
pub fn assert_worker_kill_lost_at_most_one(s: &handoff::client::Summary, what: &str) {
    assert_eq!(s.ok + s.errors, s.expected(), "{what}: every request was tried: {s}");
    assert!(s.errors <= 1, "requests failed around the kill of {what}: {s}");
    if s.errors == 1 {
        eprintln!("{what}: 1 request was in the killed worker's hands (the documented loss): {s}");
    }
}
