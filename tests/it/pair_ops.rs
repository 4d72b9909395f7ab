//! Pair servers under operations: every signal of the table in the README
//! ("Operating handoff"), on the real binary. An in-place restart (HUP,
//! USR2) keeps the pid, the listeners and every connection, each owned by
//! exactly one of the two servers afterwards; a stop answers what is in
//! flight within `--grace`; USR1 reopens the request log.
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

// ------------------------------------------------------------------ fixture

/// `EXE server --port PORT --peer-port PEER --dir DIR EXTRA...`
fn server_cmd(exe: &Path, port: u16, peer: u16, dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(exe);
    c.args(server_args(port, peer, dir)).args(extra);
    c
}

/// Two servers, A on P and B on Q = P + 1, linked both ways.
struct OpsPair {
    p: u16,
    q: u16,
    dir: PathBuf,
    a: TestServer,
    b: TestServer,
    warm: (u64, u64),
    _tmp: TempDir,
}

impl OpsPair {
    fn start(extra: &[&str]) -> OpsPair {
        OpsPair::start_from(TempDir::new("ops"), Path::new(bin()), extra)
    }

    /// A runs `a_exe` (B the test binary); `tmp` holds the pair's directory.
    fn start_from(tmp: TempDir, a_exe: &Path, extra: &[&str]) -> OpsPair {
        let dir = tmp.path().join("d");
        let p = free_pair();
        let q = p + 1;
        let a = TestServer::start_cmd(&format!("server {p}"), server_cmd(a_exe, p, q, &dir, extra));
        let b = TestServer::start_cmd(&format!("server {q}"), server_cmd(Path::new(bin()), q, p, &dir, extra));
        let warm = wait_linked(p, q);
        OpsPair { p, q, dir, a, b, warm, _tmp: tmp }
    }

    fn log(&self, port: u16) -> PathBuf {
        self.dir.join(format!("{port}.log"))
    }
}

/// Sends `sig` and waits for the `ready` line the server prints again
/// once the restart is done; checks it is the same line.
#[track_caller]
fn restart(s: &mut TestServer, sig: i32) {
    s.signal(sig);
    wait_ready_again(s);
}

#[track_caller]
fn wait_ready_again(s: &mut TestServer) {
    match s.wait_line("ready") {
        Ok(line) => assert_eq!(line, s.ready, "{}: the ready line after a restart", s.name()),
        Err(e) => panic!("{}: {e}\n--- stderr ---\n{}", s.name(), s.stderr_text()),
    }
}

/// Waits (10 s) until the server's stderr holds `n` lines containing `what`.
#[track_caller]
fn wait_log(s: &TestServer, what: &str, n: usize) {
    let ok = poll_until(Duration::from_secs(10), || s.stderr_text().matches(what).count() >= n);
    assert!(ok, "{}: no {n} line(s) with {what:?} within 10 s:\n{}", s.name(), s.stderr_text());
}

fn count(text: &str, what: &str) -> usize {
    text.matches(what).count()
}

/// The inode of every socket a process holds.
fn socket_inodes(pid: i32) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return HashSet::new() };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

/// Server ends of accepted TCP connections on 127.0.0.1:`ports`:
/// (local port, client address) -> inode.
fn server_ends(ports: &[u16]) -> HashMap<(u16, SocketAddrV4), u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let addr = |s: &str| -> Option<SocketAddrV4> {
        let (ip, port) = s.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?.swap_bytes();
        Some(SocketAddrV4::new(ip.into(), u16::from_str_radix(port, 16).ok()?))
    };
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote) = (addr(f.get(1)?)?, addr(f.get(2)?)?);
            let inode: u64 = f.get(9)?.parse().ok()?;
            (ports.contains(&local.port()) && *local.ip() == LOCALHOST && inode != 0)
                .then_some(((local.port(), remote), inode))
        })
        .collect()
}

/// A client connection and the port it connected to.
struct Held {
    conn: Conn,
    port: u16,
}

impl Held {
    fn open(port: u16) -> Held {
        Held { conn: Conn::open(port), port }
    }

    fn key(&self) -> (u16, SocketAddrV4) {
        let SocketAddr::V4(me) = self.conn.stream().local_addr().unwrap() else { unreachable!("IPv4") };
        (self.port, me)
    }
}

/// For each connection, the indices of the `pids` holding its server end.
fn owners(held: &[Held], pids: &[i32]) -> Vec<Vec<usize>> {
    let ports: Vec<u16> = held.iter().map(|h| h.port).collect::<HashSet<_>>().into_iter().collect();
    let ends = server_ends(&ports);
    let sets: Vec<HashSet<u64>> = pids.iter().map(|&p| socket_inodes(p)).collect();
    held.iter()
        .map(|h| match ends.get(&h.key()) {
            Some(inode) => (0..pids.len()).filter(|&i| sets[i].contains(inode)).collect(),
            None => Vec::new(),
        })
        .collect()
}

/// Waits until every connection is held by exactly one of `pids` (a
/// handoff in flight is briefly held by both); returns each one's owner.
#[track_caller]
fn exactly_one_owner(held: &[Held], pids: &[i32]) -> Vec<usize> {
    let mut last = Vec::new();
    let ok = poll_until(Duration::from_secs(10), || {
        last = owners(held, pids);
        last.iter().all(|o| o.len() == 1)
    });
    let bad: Vec<(usize, &Vec<usize>)> = last.iter().enumerate().filter(|(_, o)| o.len() != 1).take(10).collect();
    assert!(ok, "{} connection(s) not owned by exactly one of {pids:?} (index, owners): {bad:?}", bad.len());
    last.iter().map(|o| o[0]).collect()
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Half a request: a length byte of 10 and 3 of its bytes.
const HALF: [u8; 4] = [10, 1, 2, 3];
/// The other 7 bytes.
const REST: [u8; 7] = [4, 5, 6, 7, 8, 9, 10];

/// Waits until the server at `port` has accepted `h` (it is in a process).
#[track_caller]
fn wait_accepted(h: &Held, pid: i32) {
    let key = h.key();
    let ok = poll_until(Duration::from_secs(5), || {
        server_ends(&[h.port]).get(&key).is_some_and(|i| socket_inodes(pid).contains(i))
    });
    assert!(ok, "the connection from {} to {} was not accepted", key.1, h.port);
}

fn exe_inode(pid: i32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/exe")).expect("/proc/PID/exe").ino()
}

/// A copy of the handoff binary at `path` (written beside it, then
/// renamed over it: a running copy keeps its old inode).
fn install_copy(path: &Path) {
    let tmp = path.with_extension("new");
    std::fs::copy(env!("CARGO_BIN_EXE_handoff"), &tmp).expect("copy the binary");
    std::fs::rename(&tmp, path).expect("rename the copy");
}

// ---------------------------------------------------------------- HUP, USR2

/// HUP on each server, then on both at once, under load and with idle
/// keep-alive connections on both: no request lost or answered out of
/// turn, same pids, every connection owned by exactly one server and
/// answered, half-sent requests completed across the restart.
#[test]
fn hup_under_load_loses_nothing_and_keeps_the_pid() {
    let mut pair = OpsPair::start(&[]);
    let (p, q) = (pair.p, pair.q);
    let (pid_a, pid_b) = (pair.a.pid(), pair.b.pid());
    let mut idle: Vec<Held> = (0..40).map(|i| Held::open(if i % 2 == 0 { p } else { q })).collect();
    let mut half: Vec<Held> = (0..5).map(|_| Held::open(p)).collect();
    for h in &mut half {
        h.conn.send(&HALF);
    }
    let pids = [pid_a, pid_b];
    exactly_one_owner(&idle, &pids);
    exactly_one_owner(&half, &pids);
    // What each holds now; the load's connections come and go.
    let fds_before = [fd_count(pid_a), fd_count(pid_b)];
    let log = pair.log(p);
    let load = std::thread::spawn(move || unary(p, 20, 3000));
    let started = poll_until(Duration::from_secs(10), || count_lines(&log) > 200);
    assert!(started, "the load did not start");
    restart(&mut pair.a, libc::SIGHUP);
    restart(&mut pair.b, libc::SIGHUP);
    pair.a.signal(libc::SIGHUP);
    pair.b.signal(libc::SIGHUP);
    wait_ready_again(&mut pair.a);
    wait_ready_again(&mut pair.b);
    let s = load.join().expect("load thread");
    assert_passed(&s, p);
    assert_eq!(s.ok, 60_000);
    // The load's connections are closed everywhere: no copy left behind.
    let mut fds = [0, 0];
    let same = poll_until(Duration::from_secs(5), || {
        fds = [fd_count(pid_a), fd_count(pid_b)];
        fds == fds_before
    });
    assert!(same, "descriptors before the load {fds_before:?}, after it {fds:?}");

    assert_eq!((pair.a.pid(), pair.b.pid()), (pid_a, pid_b));
    assert!(pair.a.is_running() && pair.b.is_running());
    for srv in [&pair.a, &pair.b] {
        wait_log(srv, "restarted in place by SIGHUP", 2);
        assert_eq!(count(&srv.stderr_text(), "restarted in place by SIGHUP"), 2, "{}", srv.name());
    }
    // Each connection is in exactly one process, and that one answers it.
    let all: Vec<Held> = idle.drain(..).chain(half.drain(..)).collect();
    let owner = exactly_one_owner(&all, &pids);
    let mut all = all;
    for (i, h) in all.iter_mut().enumerate() {
        let at = [p, q][owner[i]];
        let other = if at == p { q } else { p };
        if i < 40 {
            h.conn.send(&request(16, b'k'));
        } else {
            assert_eq!(at, p, "a half-sent request waits at P, which has not answered it");
            h.conn.send(&REST);
        }
        assert_eq!(h.conn.recv(), at, "connection {i}: its first answer after the restarts");
        h.conn.send(&request(3, b'k'));
        assert_eq!(h.conn.recv(), other, "connection {i}: the next answer comes from the other server");
    }
    assert_passed(&unary(q, 10, 100), p);
}

/// 3000 idle keep-alive connections (1500 on each server) across a HUP of
/// both at once: each ends in exactly one process, no descriptor leaks,
/// and every one is answered by its owner, then by the other server.
#[test]
fn hup_carries_three_thousand_idle_connections() {
    let nofile = handoff::core::sock::raise_nofile().expect("raise RLIMIT_NOFILE");
    assert!(nofile >= 3500, "RLIMIT_NOFILE {nofile} is too low for 3000 connections");
    let mut pair = OpsPair::start(&[]);
    let (p, q) = (pair.p, pair.q);
    let pids = [pair.a.pid(), pair.b.pid()];
    let mut held: Vec<Held> = (0..3000).map(|i| Held::open(if i % 2 == 0 { p } else { q })).collect();
    let before = exactly_one_owner(&held, &pids);
    assert!(before.iter().enumerate().all(|(i, &o)| o == i % 2), "each connection at the server it connected to");
    let fds: Vec<usize> = pids.iter().map(|&pid| fd_count(pid)).collect();

    let t0 = Instant::now();
    pair.a.signal(libc::SIGHUP);
    pair.b.signal(libc::SIGHUP);
    wait_ready_again(&mut pair.a);
    wait_ready_again(&mut pair.b);
    let took = t0.elapsed();
    for s in [&pair.a, &pair.b] {
        wait_log(s, "and 1500 connection(s)", 1);
    }
    let after = exactly_one_owner(&held, &pids);
    assert_eq!(after, before, "an idle connection stays where it was");
    // The same descriptors as before (the peers' channels linked again).
    let mut now = Vec::new();
    let same = poll_until(Duration::from_secs(5), || {
        now = pids.iter().map(|&pid| fd_count(pid)).collect();
        now == fds
    });
    assert!(same, "descriptors before {fds:?}, after {now:?}");
    for round in 0..2 {
        for h in &mut held {
            h.conn.send(&request(8, b'i'));
        }
        for (i, h) in held.iter_mut().enumerate() {
            let owner = if (i % 2 == 0) == (round == 0) { p } else { q };
            assert_eq!(h.conn.recv(), owner, "connection {i}, round {round}");
        }
    }
    eprintln!("HUP of both servers with 1500 connections each: ready again after {took:?}");
}

/// USR2 runs the binary now at the path the server was started from: a
/// new file there replaces the running one (/proc/PID/exe changes), same
/// pid, its connections kept; a half-sent request is completed after.
#[test]
fn usr2_runs_the_binary_now_at_the_start_path() {
    let tmp = TempDir::new("usr2");
    let exe = tmp.path().join("handoff-copy");
    install_copy(&exe);
    let mut pair = OpsPair::start_from(tmp, &exe, &[]);
    let (p, pid) = (pair.p, pair.a.pid());
    let old = exe_inode(pid);
    assert_eq!(old, std::fs::metadata(&exe).unwrap().ino());
    let mut h = Held::open(p);
    h.conn.send(&HALF);
    wait_accepted(&h, pid);

    install_copy(&exe);
    let new = std::fs::metadata(&exe).unwrap().ino();
    assert_ne!(new, old);
    let link = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(link.to_string_lossy().ends_with("(deleted)"), "{link:?}");
    restart(&mut pair.a, libc::SIGUSR2);
    assert_eq!(pair.a.pid(), pid);
    assert_eq!(exe_inode(pid), new, "/proc/{pid}/exe is the new binary");
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(), exe);
    wait_log(&pair.a, &format!("SIGUSR2: restarting in place with {}", exe.display()), 1);
    h.conn.send(&REST);
    assert_eq!(h.conn.recv(), p);
    assert_passed(&unary(p, 10, 100), p);
}

/// An execve that fails (USR2 after the start path is deleted) is logged
/// and the server serves on: same pid, its connections answered, handoffs
/// on; a HUP afterwards still restarts it (from /proc/self/exe).
#[test]
fn failed_execve_keeps_serving() {
    let tmp = TempDir::new("noexe");
    let exe = tmp.path().join("handoff-copy");
    install_copy(&exe);
    let mut pair = OpsPair::start_from(tmp, &exe, &[]);
    let (p, q, pid) = (pair.p, pair.q, pair.a.pid());
    let mut idle = Held::open(p);
    let mut half = Held::open(p);
    half.conn.send(&HALF);
    wait_accepted(&idle, pid);
    wait_accepted(&half, pid);
    std::fs::remove_file(&exe).unwrap();

    pair.a.signal(libc::SIGUSR2);
    let why =
        format!("cannot restart: execve {}: No such file or directory (os error 2); serving on with 2", exe.display());
    wait_log(&pair.a, &why, 1);
    assert!(pair.a.is_running());
    assert_eq!(pair.a.pid(), pid);
    idle.conn.send(&request(1, b'x'));
    assert_eq!(idle.conn.recv(), p);
    half.conn.send(&REST);
    assert_eq!(half.conn.recv(), p);
    half.conn.send(&request(1, b'x'));
    assert_eq!(half.conn.recv(), q);
    assert_passed(&unary(p, 10, 100), p);

    restart(&mut pair.a, libc::SIGHUP);
    assert_eq!(pair.a.pid(), pid);
    idle.conn.send(&request(1, b'y'));
    assert_eq!(idle.conn.recv(), q, "served by Q, which it was handed to");
    assert_passed(&unary(p, 10, 100), p);
}

/// A client that sends without reading cannot hold a restart back: after
/// `--grace` its connection is cut (and counted in the log); the others
/// are carried over.
#[test]
fn hup_cuts_a_client_that_does_not_read_after_grace() {
    let tmp = TempDir::new("cut");
    let dir = tmp.path().join("d");
    let p = free_pair();
    // Alone (its peer never starts): it serves every request itself.
    let mut s = TestServer::start_cmd("server alone", server_cmd(Path::new(bin()), p, p + 1, &dir, &["--grace", "1"]));
    let mut idle = Held::open(p);
    let greedy = Held::open(p);
    // A small receive buffer: the kernel holds little of what it never reads.
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt on an open socket with a live int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(greedy.conn.stream()),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &small as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
    let w = greedy.conn.stream().try_clone().unwrap();
    // 2 million empty requests (2 MB), 40 MB of answers never read.
    let writer = std::thread::spawn(move || {
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..32 {
            if (&w).write_all(&chunk).is_err() {
                break;
            }
        }
    });
    // Its answers back up and the server stops serving it: the request
    // log stops growing (it is flushed every 200 ms).
    let log = dir.join(format!("{p}.log"));
    let mut last = (0, Instant::now());
    let stuck = poll_until(Duration::from_secs(30), || {
        let n = count_lines(&log);
        if n != last.0 {
            last = (n, Instant::now());
        }
        n > 0 && last.1.elapsed() > Duration::from_millis(800)
    });
    assert!(stuck, "the server kept serving a client that does not read ({} requests)", last.0);
    restart(&mut s, libc::SIGHUP);
    wait_log(&s, "1 connection(s) did not settle within --grace", 1);
    wait_log(&s, "and 1 connection(s)", 1); // the idle one is carried over
    idle.conn.send(&request(2, b'z'));
    assert_eq!(idle.conn.recv(), p);
    drop(greedy);
    writer.join().unwrap();
}

/// A TERM right behind a HUP (while it drains, or once it executes the
/// binary, before the new image has its handlers) still stops the server
/// cleanly: signals are blocked across the execve, never lost and never
/// fatal. A HUP that comes during the execve restarts the new image.
#[test]
fn signals_during_a_restart_are_not_lost() {
    let tmp = TempDir::new("sigwin");
    let dir = tmp.path().join("d");
    let p = free_pair();
    for round in 0..4 {
        let cmd = server_cmd(Path::new(bin()), p, p + 1, &dir, &[]);
        let mut s = TestServer::start_cmd("server alone", cmd);
        let mut h = Held::open(p);
        h.conn.send(&request(1, b'w'));
        assert_eq!(h.conn.recv(), p);
        s.signal(libc::SIGHUP);
        if round % 2 == 1 {
            wait_log(&s, "SIGHUP: executing", 1);
        }
        s.signal(libc::SIGTERM);
        let st = s.wait_exit(EXIT_TIMEOUT);
        assert!(st.success(), "round {round}: TERM behind a HUP gave {st}\n{}", s.stderr_text());
        assert_eq!(h.conn.try_recv(), Ok(None), "round {round}: the idle connection is closed");
    }
    // A HUP that comes while the first one executes waits for the new
    // image, which restarts again.
    let cmd = server_cmd(Path::new(bin()), p, p + 1, &dir, &[]);
    let mut s = TestServer::start_cmd("server alone", cmd);
    let mut h = Held::open(p);
    h.conn.send(&HALF);
    wait_accepted(&h, s.pid());
    s.signal(libc::SIGHUP);
    wait_log(&s, "SIGHUP: executing", 1);
    s.signal(libc::SIGHUP);
    wait_ready_again(&mut s);
    wait_ready_again(&mut s);
    wait_log(&s, "restarted in place by SIGHUP (restart 2 of", 1);
    h.conn.send(&REST);
    assert_eq!(h.conn.recv(), p);
    assert!(s.terminate().success());
}

// --------------------------------------------------------------------- USR1

/// USR1 reopens the request log: after a rotation (rename) the lines
/// before it are all in the renamed file, the new ones in a new D/P.log.
#[test]
fn usr1_reopens_the_request_log() {
    let mut pair = OpsPair::start(&[]);
    let (p, q) = (pair.p, pair.q);
    let (lp, lq) = (pair.log(p), pair.log(q));
    assert_passed(&unary(p, 10, 100), p);
    let n1 = pair.warm.0 + 500; // P answers the 1st, 3rd, ... request of each
    let flushed = poll_until(Duration::from_secs(5), || count_lines(&lp) as u64 == n1);
    assert!(flushed, "{} holds {} lines, expected {n1}", lp.display(), count_lines(&lp));
    let rotated = lp.with_extension("log.1");
    std::fs::rename(&lp, &rotated).unwrap();
    assert_passed(&unary(p, 10, 10), p); // logged in the renamed file
    pair.a.signal(libc::SIGUSR1);
    wait_log(&pair.a, "SIGUSR1: request log reopened", 1);
    assert_eq!(count_lines(&rotated) as u64, n1 + 50, "the lines before USR1 are flushed into the renamed file");
    assert_passed(&unary(p, 10, 100), p);
    let ok = poll_until(Duration::from_secs(5), || count_lines(&lp) == 500);
    assert!(ok, "{} holds {} lines, expected 500", lp.display(), count_lines(&lp));
    assert_eq!(count_lines(&rotated) as u64, n1 + 50);
    // Q was not signalled: one file, every line of its.
    let all_q = pair.warm.1 + 500 + 50 + 500;
    let ok = poll_until(Duration::from_secs(5), || count_lines(&lq) as u64 == all_q);
    assert!(ok, "{} holds {} lines, expected {all_q}", lq.display(), count_lines(&lq));
    let _ = pair.b.terminate();
}

// ---------------------------------------------------------- QUIT, TERM, INT

/// QUIT: no new connection, idle ones closed at once, a request in flight
/// answered before its connection closes, then exit 0 (long before
/// `--grace`); the peer, told, serves its own connections alone.
#[test]
fn quit_answers_what_is_in_flight_then_closes() {
    let mut pair = OpsPair::start(&["--grace", "30"]);
    let (p, q) = (pair.p, pair.q);
    let mut idle = Held::open(p);
    let mut half = Held::open(p);
    half.conn.send(&HALF);
    let mut at_b = Held::open(q);
    for h in [&idle, &half] {
        wait_accepted(h, pair.a.pid());
    }
    wait_accepted(&at_b, pair.b.pid());
    let t0 = Instant::now();
    pair.a.signal(libc::SIGQUIT);
    wait_log(&pair.a, "SIGQUIT: stopping", 1);
    assert_eq!(idle.conn.try_recv(), Ok(None), "an idle connection is closed");
    assert!(TcpStream::connect(SocketAddrV4::new(LOCALHOST, p)).is_err(), "P still accepts");
    assert!(!pair.dir.join(format!("{p}.sock")).exists(), "{p}.sock is still there");
    assert!(pair.a.is_running(), "stopped with a request in flight");
    pair.a.signal(libc::SIGQUIT); // a second QUIT does not hurry it
    wait_log(&pair.a, "SIGQUIT: already stopping", 1);
    half.conn.send(&REST);
    assert_eq!(half.conn.recv(), p, "the request in flight is answered");
    assert_eq!(half.conn.try_recv(), Ok(None), "then the connection closes");
    let st = pair.a.wait_exit(EXIT_TIMEOUT);
    assert!(st.success(), "QUIT: {st}");
    assert!(t0.elapsed() < Duration::from_secs(20), "it waited for --grace");
    // B was told: no warning, and it serves on alone.
    at_b.conn.send(&request(1, b'b'));
    assert_eq!(at_b.conn.recv(), q);
    at_b.conn.send(&request(1, b'b'));
    assert_eq!(at_b.conn.recv(), q);
    wait_log(&pair.b, &format!("peer {} says it is stopping", pair.dir.join(format!("{p}.sock")).display()), 1);
    let b_text = pair.b.stderr_text();
    assert!(!b_text.contains("WARN"), "B warned about a peer that said it stops:\n{b_text}");
}

/// TERM with a request in flight waits for it (here: `--grace` 60); a
/// second TERM stops now. INT the same, answering the request once it is
/// complete. With a short `--grace` the server stops by itself.
#[test]
fn term_waits_for_requests_in_flight_and_a_second_term_stops_now() {
    let tmp = TempDir::new("term");
    let dir = tmp.path().join("d");
    let p = free_pair();
    let start = |grace: &str| {
        let cmd = server_cmd(Path::new(bin()), p, p + 1, &dir, &["--grace", grace]);
        TestServer::start_cmd("server alone", cmd)
    };

    // TERM, TERM.
    let mut s = start("60");
    let mut idle = Held::open(p);
    let mut half = Held::open(p);
    half.conn.send(&HALF);
    wait_accepted(&half, s.pid());
    s.signal(libc::SIGTERM);
    wait_log(&s, "SIGTERM: stopping; 2 open connection(s) get up to 60s", 1);
    assert_eq!(idle.conn.try_recv(), Ok(None), "an idle connection is closed at once");
    assert!(s.is_running(), "TERM did not wait for the request in flight");
    let t0 = Instant::now();
    s.signal(libc::SIGTERM);
    let st = s.wait_exit(EXIT_TIMEOUT);
    assert!(st.success(), "TERM, TERM: {st}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(s.stderr_text().contains("SIGTERM again: stopping now, cutting 1 open connection(s)"));
    assert_eq!(half.conn.try_recv(), Ok(None), "cut without an answer");
    assert!(!dir.join(format!("{p}.sock")).exists());

    // INT: the request in flight is completed and answered, then exit 0.
    let mut s = start("60");
    let mut half = Held::open(p);
    half.conn.send(&HALF);
    wait_accepted(&half, s.pid());
    s.signal(libc::SIGINT);
    wait_log(&s, "SIGINT: stopping", 1);
    half.conn.send(&REST);
    assert_eq!(half.conn.recv(), p);
    assert_eq!(half.conn.try_recv(), Ok(None));
    assert!(s.wait_exit(EXIT_TIMEOUT).success());

    // --grace over: the incomplete request is cut.
    let mut s = start("0.5");
    let mut half = Held::open(p);
    half.conn.send(&HALF);
    wait_accepted(&half, s.pid());
    s.signal(libc::SIGTERM);
    let st = s.wait_exit(EXIT_TIMEOUT);
    assert!(st.success(), "{st}");
    assert!(s.stderr_text().contains("--grace (500ms) is over: cutting 1 connection(s)"), "{}", s.stderr_text());
    assert_eq!(half.conn.try_recv(), Ok(None));
}

/// Signals without a meaning are logged and ignored: the server serves on.
#[test]
fn ignored_signals_leave_it_serving() {
    let mut pair = OpsPair::start(&[]);
    let pid = pair.a.pid();
    let mut h = Held::open(pair.p);
    for (sig, name) in [(libc::SIGALRM, "SIGALRM"), (libc::SIGVTALRM, "SIGVTALRM"), (libc::SIGPWR, "SIGPWR")] {
        pair.a.signal(sig);
        wait_log(&pair.a, &format!("{name} has no meaning here; ignored"), 1);
    }
    assert!(pair.a.is_running());
    assert_eq!(pair.a.pid(), pid);
    h.conn.send(&request(1, b'a'));
    assert_eq!(h.conn.recv(), pair.p);
    assert_passed(&unary(pair.p, 10, 100), pair.p);
    // HUP while stopping is ignored too.
    let mut half = Held::open(pair.p);
    half.conn.send(&HALF);
    wait_accepted(&half, pid);
    pair.a.signal(libc::SIGQUIT);
    wait_log(&pair.a, "SIGQUIT: stopping", 1);
    pair.a.signal(libc::SIGHUP);
    wait_log(&pair.a, "SIGHUP while stopping; ignored", 1);
    half.conn.send(&REST);
    assert_eq!(half.conn.recv(), pair.p);
    assert!(pair.a.wait_exit(EXIT_TIMEOUT).success());
}

// ----------------------------------------------------------------- launcher

/// `handoff pair --grace G ...`
fn launcher(dir: &Path, p: u16, grace: &str) -> TestServer {
    let ports = format!("{p},{}", p + 1);
    TestServer::start(
        "pair",
        [
            "pair".as_ref(),
            "--ports".as_ref(),
            ports.as_ref(),
            "--dir".as_ref(),
            dir.as_os_str(),
            "--grace".as_ref(),
            grace.as_ref(),
        ],
    )
}

/// The pids of the launcher's two servers, from its log.
fn server_pids(l: &TestServer, ports: [u16; 2]) -> [i32; 2] {
    let text = l.stderr_text();
    ports.map(|port| {
        let line = text.lines().find(|l| l.contains(&format!("server {port} (pid "))).expect("server line");
        line.split("(pid ").nth(1).and_then(|r| r.split(')').next()).and_then(|n| n.parse().ok()).expect("pid")
    })
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks the pid.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// The launcher passes HUP, USR2 and USR1 on to both servers (which
/// restart in place: same pids, no respawn), ignores SIGALRM, and stops
/// both on QUIT.
#[test]
fn launcher_passes_signals_on() {
    let tmp = TempDir::new("lsig");
    let dir = tmp.path().join("d");
    let p = free_pair();
    let q = p + 1;
    let mut l = launcher(&dir, p, "5");
    let pids = server_pids(&l, [p, q]);
    let mut h = Held::open(p);
    for (i, sig) in [libc::SIGHUP, libc::SIGUSR2].into_iter().enumerate() {
        l.signal(sig);
        for port in [p, q] {
            wait_log(&l, &format!("server {port}: ready port={port}"), i + 1);
        }
        assert_passed(&unary(p, 10, 100), p);
    }
    wait_log(&l, "restarted in place by SIGHUP", 2);
    wait_log(&l, "restarted in place by SIGUSR2", 2);
    let text = l.stderr_text();
    assert_eq!(count(&text, "restarted in place by SIGHUP"), 2, "{text}");
    assert_eq!(count(&text, "restarted in place by SIGUSR2"), 2, "{text}");
    assert!(!text.contains("started again"), "a server was respawned: {text}");
    assert_eq!(server_pids(&l, [p, q]), pids);
    assert!(pids.iter().all(|&pid| alive(pid)));
    h.conn.send(&request(1, b'h'));
    assert_eq!(h.conn.recv(), p, "a connection held across both restarts");
    l.signal(libc::SIGUSR1);
    wait_log(&l, "SIGUSR1: request log reopened", 2);
    l.signal(libc::SIGALRM);
    wait_log(&l, "SIGALRM has no meaning here; ignored", 1);
    assert!(l.is_running());
    l.signal(libc::SIGQUIT);
    let st = l.wait_exit(EXIT_TIMEOUT);
    assert!(st.success(), "QUIT: {st}");
    assert!(pids.iter().all(|&pid| !alive(pid)), "a server outlived the launcher");
    assert_eq!(h.conn.try_recv(), Ok(None));
}

/// TERM to the launcher: the servers wait for a request in flight; a
/// second TERM stops them now. A Ctrl-C (INT to the launcher's process
/// group) reaches the servers once, through the launcher: they stop
/// gracefully, answering the request in flight.
#[test]
fn launcher_term_table_and_ctrl_c() {
    let tmp = TempDir::new("lterm");
    let dir = tmp.path().join("d");
    let p = free_pair();
    let mut l = launcher(&dir, p, "60");
    let mut half = Held::open(p);
    half.conn.send(&HALF);
    wait_accepted(&half, server_pids(&l, [p, p + 1])[0]);
    l.signal(libc::SIGTERM);
    wait_log(&l, "SIGTERM: stopping; 1 open connection(s)", 1);
    assert!(l.is_running(), "the launcher did not wait for its servers");
    l.signal(libc::SIGTERM);
    let st = l.wait_exit(EXIT_TIMEOUT);
    assert!(st.success(), "TERM, TERM: {st}");
    assert!(l.stderr_text().contains("SIGTERM again: the servers stop now"));
    assert_eq!(half.conn.try_recv(), Ok(None));

    let mut l = launcher(&dir, p, "60");
    let mut half = Held::open(p);
    half.conn.send(&HALF);
    wait_accepted(&half, server_pids(&l, [p, p + 1])[0]);
    // SAFETY: kill(2) of the process group the launcher leads.
    assert_eq!(unsafe { libc::kill(-l.pid(), libc::SIGINT) }, 0);
    wait_log(&l, "SIGINT: stopping; 1 open connection(s)", 1);
    half.conn.send(&REST);
    assert_eq!(half.conn.recv(), p, "stopped gracefully: the request in flight is answered");
    let st = l.wait_exit(EXIT_TIMEOUT);
    assert!(st.success(), "Ctrl-C: {st}");
    let text = l.stderr_text();
    assert!(!text.contains("stopping now") && !text.contains("stop now"), "a second INT reached a server:\n{text}");
}
