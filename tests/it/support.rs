//! Test fixtures: a guard around one `handoff` process, free ports, a
//! temporary directory, a running pair, and small helpers shared by the
//! test modules.
#![allow(dead_code)]

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use handoff::client::{self, PingPongOpts, Summary};

/// How long a server may take to print its readiness line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// `READY_TIMEOUT`, stretched under `HANDOFF_WRAP` ([`wrapped_slowly`]).
pub fn ready_timeout() -> Duration {
    wrapped_slowly(READY_TIMEOUT)
}

/// `d`, or 4 times it under `HANDOFF_WRAP`: valgrind runs every process
/// (the supervisor, masters, workers) 20-50 times slower, two tests at a
/// time on two CPUs.
pub fn wrapped_slowly(d: Duration) -> Duration {
    if std::env::var_os("HANDOFF_WRAP").is_some() {
        d * 4
    } else {
        d
    }
}
/// How long a signalled process may take to exit.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read timeout of the tests' own sockets (a hang fails instead of blocking).
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
pub const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The `handoff` binary the tests run. With `HANDOFF_WRAP` set (a
/// command prefix, e.g. `valgrind --trace-children=yes ...`), a script
/// that runs the binary under that prefix instead (`make memcheck`).
pub fn bin() -> &'static str {
    static WRAPPED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let real = env!("CARGO_BIN_EXE_handoff");
    WRAPPED
        .get_or_init(|| std::env::var("HANDOFF_WRAP").ok().filter(|w| !w.trim().is_empty()).map(|w| wrapper(&w, real)))
        .as_deref()
        .unwrap_or(real)
}

/// `real`, or with `HANDOFF_WRAP` set, a script running it under that
/// prefix (as [`bin`] does; the example binaries use it too).
pub fn wrapped(real: &Path) -> std::path::PathBuf {
    match std::env::var("HANDOFF_WRAP").ok().filter(|w| !w.trim().is_empty()) {
        Some(w) => wrapper(&w, &real.display().to_string()).into(),
        None => real.to_path_buf(),
    }
}

/// Writes (once per content) `exec WRAP REAL "$@"` as an executable
/// script under the target's temp dir; returns its path.
fn wrapper(wrap: &str, real: &str) -> String {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::PermissionsExt;
    let body = format!("#!/bin/sh\nexec {wrap} {real} \"$@\"\n");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut h);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("handoff-wrap-{:016x}.sh", h.finish()));
    let tmp = dir.join(format!("handoff-wrap-{}.tmp", std::process::id()));
    std::fs::write(&tmp, &body).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
    std::fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
    path.display().to_string()
}

// ---------------------------------------------------------------- processes

/// One `handoff` process. Its stdout is read line by line (the first line
/// is the readiness line), its stderr is captured. Drop kills it (and its
/// process group, so the children of `handoff pair` go too) and, when the
/// test is failing, prints what it wrote on stderr.
pub struct TestServer {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    stdout_lines: Receiver<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    /// The readiness line (empty until `wait_ready` saw it).
    pub ready: String,
}

impl TestServer {
    /// Starts `handoff ARGS` without waiting for it.
    pub fn spawn<I, S>(name: &str, args: I) -> TestServer
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        TestServer::spawn_cmd(name, cmd)
    }

    /// Starts `cmd` (its program and arguments set by the caller, e.g. a
    /// copy of the binary, or with its own `pre_exec`) without waiting.
    pub fn spawn_cmd(name: &str, mut cmd: Command) -> TestServer {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Own process group: Drop kills the whole group (the servers that
        // `handoff pair` starts included).
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe; the closure touches nothing else.
        // The child dies with the test thread that started it even if this
        // test binary is killed before Drop runs.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{name}: spawn {:?}: {e}", cmd.get_program()));
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        let t1 = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut err = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        let t2 = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match err.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
        TestServer {
            name: name.to_string(),
            child,
            status: None,
            stdout_lines: rx,
            stderr,
            readers: vec![t1, t2],
            ready: String::new(),
        }
    }

    /// Starts `handoff ARGS` and waits for a stdout line starting with
    /// `ready` (panics, showing stderr, if none comes within 10 s).
    pub fn start<I, S>(name: &str, args: I) -> TestServer
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        TestServer::start_cmd(name, cmd)
    }

    /// `spawn_cmd`, then waits for the readiness line as `start` does.
    pub fn start_cmd(name: &str, cmd: Command) -> TestServer {
        let mut s = TestServer::spawn_cmd(name, cmd);
        if let Err(e) = s.wait_ready() {
            panic!("{name}: {e}\n--- stderr ---\n{}", s.stderr_text());
        }
        s
    }

    /// Waits (10 s at most) for the readiness line; returns it.
    pub fn wait_ready(&mut self) -> Result<String, String> {
        match self.stdout_lines.recv_timeout(ready_timeout()) {
            Ok(line) if line.starts_with("ready") => {
                self.ready = line.clone();
                Ok(line)
            }
            Ok(other) => Err(format!("unexpected first stdout line {other:?}")),
            Err(RecvTimeoutError::Timeout) => Err(format!("no readiness line within {:?}", ready_timeout())),
            Err(RecvTimeoutError::Disconnected) => {
                let st = self.wait_exit(EXIT_TIMEOUT);
                Err(format!("exited before it was ready: {st}"))
            }
        }
    }

    /// Waits (10 s at most) for the next stdout line starting with
    /// `prefix`, skipping the others (e.g. a pair server's `linked` line
    /// before the `ready` line it prints again after an in-place restart).
    pub fn wait_line(&mut self, prefix: &str) -> Result<String, String> {
        let deadline = Instant::now() + ready_timeout();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout_lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no {prefix:?} line within {:?}", ready_timeout()))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(format!("stdout closed before a {prefix:?} line")),
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything written on stderr so far.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Sends a signal to the process (not to its group).
    pub fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: plain kill(2) of our own, not yet reaped child.
            let rc = unsafe { libc::kill(self.pid(), sig) };
            assert_eq!(rc, 0, "{}: kill({sig}): {}", self.name, std::io::Error::last_os_error());
        }
    }

    /// The exit status if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Polls until the process exits (panics after `timeout`), then waits
    /// for its stderr to reach EOF.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let ok = poll_until(timeout, || self.try_status().is_some());
        assert!(ok, "{}: still running after {timeout:?}", self.name);
        self.join_readers();
        self.status.expect("exited")
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(EXIT_TIMEOUT)
    }

    /// SIGKILL, then waits for the exit.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_exit(EXIT_TIMEOUT)
    }

    /// Whether the process holds a descriptor to the socket with this inode.
    pub fn holds_socket(&self, inode: u64) -> bool {
        let want = format!("socket:[{inode}]");
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else { return false };
        dir.flatten().any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
    }

    fn join_readers(&mut self) {
        // The readers end at EOF, i.e. when every holder of the pipes is
        // gone; give grandchildren a moment, never block forever.
        let ok = poll_until(Duration::from_secs(2), || self.readers.iter().all(JoinHandle::is_finished));
        if ok {
            for t in self.readers.drain(..) {
                let _ = t.join();
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // How it ended, before Drop kills it: "running", or its exit status.
        let state = match self.try_status() {
            Some(st) => st.to_string(),
            None => "running".to_string(),
        };
        if self.status.is_none() {
            // SAFETY: kill(2) of the process group our unreaped child leads.
            unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
            self.status = self.child.wait().ok();
        }
        if std::thread::panicking() {
            self.join_readers();
            eprintln!(
                "----- {} (pid {}, {state}) stderr -----\n{}----- end of {} -----",
                self.name,
                self.child.id(),
                self.stderr_text(),
                self.name
            );
        }
    }
}

/// Calls `cond` every few milliseconds until it is true or `timeout`
/// passes; returns whether it became true.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts `cmd` with stdout and stderr each collected by a thread (which
/// returns the text when the process closes them).
pub fn spawn_captured(cmd: &mut Command) -> (Child, std::thread::JoinHandle<String>, std::thread::JoinHandle<String>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let collect = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = collect(Box::new(child.stdout.take().expect("piped")));
    let err = collect(Box::new(child.stderr.take().expect("piped")));
    (child, out, err)
}

/// Runs a command to completion (killing it and panicking after
/// `timeout`); returns (status, stdout, stderr).
pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> (ExitStatus, String, String) {
    let (mut child, t_out, t_err) = spawn_captured(cmd);
    let mut status = None;
    let done = poll_until(timeout, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    if !done {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} still running after {timeout:?}");
    }
    (status.expect("exited"), t_out.join().unwrap(), t_err.join().unwrap())
}

/// The inode of the server end of the TCP connection from `client` to
/// 127.0.0.1:`port`, once a process has accepted it (from /proc/net/tcp;
/// a socket still in the accept queue has inode 0).
pub fn accepted_inode(port: u16, client: SocketAddrV4) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let hex = |a: SocketAddrV4| format!("{:08X}:{:04X}", u32::from(*a.ip()).swap_bytes(), a.port());
    let (local, remote) = (hex(SocketAddrV4::new(LOCALHOST, port)), hex(client));
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 9 && f[1] == local && f[2] == remote).then(|| f[9].parse::<u64>().ok()).flatten().filter(|&i| i != 0)
    })
}

// -------------------------------------------------------------------- ports

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// An even port P such that P and P + 1 are both bindable on 127.0.0.1.
/// Picked below the ephemeral range (so that no client connection of a
/// concurrent test takes it before the server binds it) and never twice
/// in this test process.
pub fn free_pair() -> u16 {
    let ephemeral_lo = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse::<u16>().ok()))
        .unwrap_or(32768);
    let (lo, hi) = if ephemeral_lo > 12_000 { (10_000u32, ephemeral_lo as u32) } else { (40_000u32, 60_000u32) };
    let span = (hi - lo) / 2;
    let seed =
        std::process::id() as u64 * 7919 + SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    let mut handed = HANDED_OUT.lock().unwrap();
    let handed = handed.get_or_insert_with(HashSet::new);
    for i in 0..span as u64 {
        let p = (lo + 2 * ((seed + i * 13) % span as u64) as u32) as u16;
        if handed.contains(&p) {
            continue;
        }
        let a = TcpListener::bind(SocketAddrV4::new(LOCALHOST, p));
        let b = TcpListener::bind(SocketAddrV4::new(LOCALHOST, p + 1));
        if a.is_ok() && b.is_ok() {
            handed.insert(p);
            return p;
        }
    }
    panic!("no free port pair in {lo}..{hi}");
}

// ----------------------------------------------------------------- temp dir

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        // Short: a Unix socket path must fit in 108 bytes.
        let p = std::env::temp_dir().join(format!("hoit-{tag}-{}-{n}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// --------------------------------------------------------------------- pair

pub fn server_args(port: u16, peer: u16, dir: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> =
        ["server", "--host", "127.0.0.1", "--port", &port.to_string(), "--peer-port", &peer.to_string(), "--dir"]
            .iter()
            .map(OsString::from)
            .collect();
    v.push(dir.as_os_str().to_owned());
    v
}

/// Starts one pair-mode server and checks its readiness line.
pub fn start_server(port: u16, peer: u16, dir: &Path) -> TestServer {
    let s = TestServer::start(&format!("server {port}"), server_args(port, peer, dir));
    let want = format!("ready port={port} sock={}", dir.join(format!("{port}.sock")).display());
    assert_eq!(s.ready, want, "readiness line");
    s
}

/// Two servers, P (even) and Q = P + 1, handing connections to each
/// other through `dir`, linked in both directions before `start` returns.
pub struct Pair {
    pub p: u16,
    pub q: u16,
    pub dir: PathBuf,
    /// The server on P.
    pub a: TestServer,
    /// The server on Q.
    pub b: TestServer,
    /// Requests the link probe sent, answered by P and by Q.
    pub warm: (u64, u64),
    // Dropped last: the servers are gone before their directory.
    _tmp: TempDir,
}

impl Pair {
    pub fn start() -> Pair {
        Pair::start_with(|_, _, _| {})
    }

    /// `setup(dir, p, q)` runs before the servers start (`dir` may not
    /// exist yet; its parent does).
    pub fn start_with(setup: impl FnOnce(&Path, u16, u16)) -> Pair {
        let tmp = TempDir::new("pair");
        let dir = tmp.path().join("d");
        let p = free_pair();
        let q = p + 1;
        setup(&dir, p, q);
        let a = start_server(p, q, &dir);
        let b = start_server(q, p, &dir);
        let warm = wait_linked(p, q);
        Pair { p, q, dir, a, b, warm, _tmp: tmp }
    }

    pub fn sock(&self, port: u16) -> PathBuf {
        self.dir.join(format!("{port}.sock"))
    }

    pub fn log(&self, port: u16) -> PathBuf {
        self.dir.join(format!("{port}.log"))
    }

    /// Restarts the server on Q (after it was killed or stopped).
    pub fn restart_b(&mut self) {
        assert!(!self.b.is_running(), "restart_b: the server on Q is still running");
        self.b = start_server(self.q, self.p, &self.dir);
    }
}

/// Probes one connection to `p` until responses go P, Q, P: both servers
/// then hand off to each other. A server connects to its peer at start
/// and, if the peer is not up yet, retries with a backoff, so the first
/// of two servers links up a little after the second is ready. Returns the
/// requests answered by P and by Q.
pub fn wait_linked(p: u16, q: u16) -> (u64, u64) {
    let mut s = Conn::open(p);
    let (mut by_p, mut by_q) = (0u64, 0u64);
    let mut seen: Vec<u16> = Vec::new();
    let ok = poll_until(Duration::from_secs(10), || {
        s.send(&request(16, b'w'));
        let port = s.recv();
        match port {
            x if x == p => by_p += 1,
            x if x == q => by_q += 1,
            x => panic!("link probe: response from port {x}, expected {p} or {q}"),
        }
        seen.push(port);
        seen.ends_with(&[p, q, p])
    });
    assert!(ok, "servers {p} and {q} did not link up within 10 s: ports seen {seen:?}");
    (by_p, by_q)
}

// ------------------------------------------------------------------ clients

pub fn opts(port: u16, conns: usize, requests: usize, size: usize) -> PingPongOpts {
    PingPongOpts { host: "127.0.0.1".into(), port, conns, requests, size, unix: None }
}

pub fn unary(port: u16, conns: usize, requests: usize) -> Summary {
    client::unary(&opts(port, conns, requests, 16))
}

pub fn stream(port: u16, conns: usize, requests: usize) -> Summary {
    client::stream(&opts(port, conns, requests, 16))
}

/// The label the client prints for a pair (P even, Q = P + 1).
pub fn xor_check(p: u16) -> String {
    format!("xor({},{})", p, p + 1)
}

/// Every request answered, no error, no break, ports of the pair of P.
#[track_caller]
pub fn assert_passed(s: &Summary, p: u16) {
    assert!(
        s.passed() && s.ok == s.expected() && s.errors == 0 && s.breaks == 0 && s.check == xor_check(p),
        "expected a clean run with check={}: {s}",
        xor_check(p)
    );
}

/// One request: length byte + `len` bytes of `fill`.
pub fn request(len: usize, fill: u8) -> Vec<u8> {
    assert!(len <= 255);
    let mut v = vec![len as u8];
    v.resize(len + 1, fill);
    v
}

/// A blocking client connection with a read timeout and a line reader.
pub struct Conn {
    pub rd: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(port: u16) -> Conn {
        let s =
            TcpStream::connect(SocketAddrV4::new(LOCALHOST, port)).unwrap_or_else(|e| panic!("connect {port}: {e}"));
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Conn { rd: BufReader::new(s) }
    }

    pub fn stream(&self) -> &TcpStream {
        self.rd.get_ref()
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream().write_all(bytes).unwrap_or_else(|e| panic!("write: {e}"));
    }

    /// Reads one response line; returns its port (panics on anything else).
    pub fn recv(&mut self) -> u16 {
        match self.try_recv() {
            Ok(Some(p)) => p,
            Ok(None) => panic!("EOF where a response was expected"),
            Err(e) => panic!("{e}"),
        }
    }

    /// One response (`Some(port)`), a clean EOF (`None`) or an error.
    pub fn try_recv(&mut self) -> Result<Option<u16>, String> {
        let mut line = Vec::new();
        match (&mut self.rd).take(64).read_until(b'\n', &mut line) {
            Ok(0) => Ok(None),
            Ok(_) => client::pingpong::parse_response(&line).map(Some),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// Reads responses until EOF; panics on an error or a bad line.
    pub fn recv_to_eof(&mut self) -> Vec<u16> {
        let mut v = Vec::new();
        loop {
            match self.try_recv() {
                Ok(Some(p)) => v.push(p),
                Ok(None) => return v,
                Err(e) => panic!("after {} responses: {e}", v.len()),
            }
        }
    }

    pub fn shutdown_write(&self) {
        self.stream().shutdown(std::net::Shutdown::Write).expect("shutdown(Write)");
    }
}

/// Ports must be first, other, first, other, ...
#[track_caller]
pub fn assert_alternates(ports: &[u16], first: u16, other: u16) {
    for (i, &port) in ports.iter().enumerate() {
        let want = if i % 2 == 0 { first } else { other };
        assert_eq!(port, want, "response {i} of {} came from the wrong server; ports: {ports:?}", ports.len());
    }
}

/// A small deterministic PRNG (xorshift64*), seeded per test and printed
/// in failure messages so a failing run can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn from_time() -> Rng {
        let s = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        Rng(s | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Lines in a file (0 if it does not exist).
pub fn count_lines(path: &Path) -> usize {
    match std::fs::read(path) {
        Ok(b) => b.iter().filter(|&&c| c == b'\n').count(),
        Err(_) => 0,
    }
}
