//! Hot restart under faults and at scale (issue 9): the new master killed
//! mid-takeover, read-ahead kept for thousands of connections, replies
//! not flushed when the drain starts, descriptor pressure in the new
//! generation, a second restart during the first, large read-ahead, a
//! restart asked of a node, and a port that serves the moment `restart`
//! says it is done.
//!
//! These tests define the acceptance bar of the fixes: they assert the
//! README's and DESIGN.md's contract, not what the code happens to do.
use std::io::{self, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_support::*;
use crate::restart::{stuck_client_with, STUCK_PINGS};
use crate::support::*;

// ------------------------------------------------------------------ helpers

/// Raises this test process's RLIMIT_NOFILE soft limit to the hard limit
/// (setrlimit) and checks that `need` descriptors fit.
fn raise_nofile(need: usize) {
    let limit = handoff::core::sock::raise_nofile().expect("raise RLIMIT_NOFILE");
    assert!(limit >= need as u64, "RLIMIT_NOFILE hard limit {limit} too low: this test needs {need} descriptors");
}

/// Outcome of one exchange over many connections.
#[derive(Default)]
struct Tally {
    ok: usize,
    /// (connection index, what went wrong).
    failed: Vec<(usize, String)>,
}

impl Tally {
    /// "N lost: 3 EOF, 1 timeout, ...; first: [...]".
    fn summary(&self) -> String {
        let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
        for (_, why) in &self.failed {
            let k = why.split(':').next().unwrap_or(why).to_string();
            *kinds.entry(k).or_default() += 1;
        }
        let first: Vec<String> = self.failed.iter().take(5).map(|(i, w)| format!("conn {i}: {w}")).collect();
        format!("{} ok, {} lost {kinds:?}; first: {first:?}", self.ok, self.failed.len())
    }
}

/// Per-connection progress of an exchange.
struct Progress {
    out: Vec<u8>,
    sent: usize,
    inbuf: Vec<u8>,
    got: usize,
    done: bool,
}

/// Thousands of client connections driven by one thread with poll(2).
struct Many {
    socks: Vec<TcpStream>,
}

impl Many {
    /// `n` connections to 127.0.0.1:`port` (blocking connects, then
    /// non-blocking).
    fn open(port: u16, n: usize) -> Many {
        let socks = (0..n)
            .map(|i| {
                let s = TcpStream::connect(SocketAddrV4::new(LOCALHOST, port))
                    .unwrap_or_else(|e| panic!("connection {i} of {n} to {port}: {e}"));
                s.set_nodelay(true).unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        Many { socks }
    }

    fn len(&self) -> usize {
        self.socks.len()
    }

    /// Writes `send(i)` on every connection i, then reads `replies` frames
    /// from each, checking reply k of connection i with `check(i, k, v)`.
    /// Never panics on a connection's failure: it is counted.
    fn exchange(
        &self,
        timeout: Duration,
        send: impl Fn(usize) -> Vec<u8>,
        replies: usize,
        check: impl Fn(usize, usize, &Value) -> Result<(), String>,
    ) -> Tally {
        let mut st: Vec<Progress> = (0..self.len())
            .map(|i| Progress { out: send(i), sent: 0, inbuf: Vec::new(), got: 0, done: false })
            .collect();
        let mut tally = Tally::default();
        let deadline = Instant::now() + timeout;
        let mut scratch = vec![0u8; 1 << 16];
        loop {
            let live: Vec<usize> = (0..st.len()).filter(|&i| !st[i].done).collect();
            if live.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                for i in live {
                    let p = &st[i];
                    let why = if p.sent < p.out.len() {
                        format!("timeout: wrote {} of {} bytes", p.sent, p.out.len())
                    } else {
                        format!("timeout: {} of {replies} replies after {timeout:?}", p.got)
                    };
                    tally.failed.push((i, why));
                }
                break;
            }
            let mut pfds: Vec<libc::pollfd> = live
                .iter()
                .map(|&i| {
                    let mut events = libc::POLLIN;
                    if st[i].sent < st[i].out.len() {
                        events |= libc::POLLOUT;
                    }
                    libc::pollfd { fd: self.socks[i].as_raw_fd(), events, revents: 0 }
                })
                .collect();
            let wait = (deadline - now).min(Duration::from_millis(100)).as_millis() as libc::c_int;
            // SAFETY: pfds is a live array of pollfd of the given length.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, wait.max(1)) };
            if n < 0 {
                let e = io::Error::last_os_error();
                assert_eq!(e.kind(), io::ErrorKind::Interrupted, "poll: {e}");
                continue;
            }
            for (k, &i) in live.iter().enumerate() {
                let re = pfds[k].revents;
                if re == 0 {
                    continue;
                }
                let mut s = &self.socks[i];
                let p = &mut st[i];
                let mut fail: Option<String> = None;
                if re & libc::POLLOUT != 0 && p.sent < p.out.len() {
                    match s.write(&p.out[p.sent..]) {
                        Ok(n) => p.sent += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => fail = Some(format!("write: {e} after {} bytes", p.sent)),
                    }
                }
                if fail.is_none() && re & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    match s.read(&mut scratch) {
                        Ok(0) => fail = Some(format!("EOF: after {} of {replies} replies", p.got)),
                        Ok(n) => p.inbuf.extend_from_slice(&scratch[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => fail = Some(format!("read: {e} after {} of {replies} replies", p.got)),
                    }
                }
                while fail.is_none() && p.inbuf.len() >= 4 {
                    let len = u32::from_le_bytes(p.inbuf[..4].try_into().unwrap()) as usize;
                    if p.inbuf.len() < 4 + len {
                        break;
                    }
                    let r = match serde_json::from_slice::<Value>(&p.inbuf[4..4 + len]) {
                        Ok(v) if p.got >= replies => Err(format!("extra reply: {v}")),
                        Ok(v) => check(i, p.got, &v).map_err(|e| format!("wrong reply {}: {e}", p.got)),
                        Err(e) => Err(format!("bad reply: {e}")),
                    };
                    p.inbuf.drain(..4 + len);
                    p.got += 1;
                    if let Err(e) = r {
                        fail = Some(e);
                    }
                }
                if let Some(why) = fail {
                    p.done = true;
                    tally.failed.push((i, why));
                } else if p.sent == p.out.len() && p.got == replies {
                    p.done = true;
                    tally.ok += 1;
                }
            }
        }
        tally.failed.sort_by_key(|f| f.0);
        tally
    }

    /// One ping each (`{"i": i, "tag": tag}`), optionally followed by a
    /// whoami whose generation must be `gen`.
    fn ping_all(&self, tag: &str, gen: Option<u64>, timeout: Duration) -> Tally {
        self.exchange(
            timeout,
            |i| {
                let mut b = frame(&ping_req(&json!({"i": i, "tag": tag})));
                if gen.is_some() {
                    b.extend(frame(&json!({"in": "whoami"})));
                }
                b
            },
            if gen.is_some() { 2 } else { 1 },
            |i, k, v| check_ping_then_gen(i, k, v, tag, gen),
        )
    }
}

fn check_ping_then_gen(i: usize, k: usize, v: &Value, tag: &str, gen: Option<u64>) -> Result<(), String> {
    let want = match k {
        0 => json!({"out": "pong", "result": {"i": i, "tag": tag}}),
        _ => {
            return match (v["out"].as_str(), v["result"]["gen"].as_u64()) {
                (Some("whoami"), g) if g == gen => Ok(()),
                _ => Err(format!("whoami {v}, expected generation {gen:?}")),
            }
        }
    };
    if *v == want {
        Ok(())
    } else {
        Err(format!("got {v}, expected {want}"))
    }
}

/// Waits until at least `n` server-side connections of `port` exist and
/// none has unread bytes in the kernel: every byte the clients sent sits
/// in a worker's input buffer (the read-ahead a restart must carry).
#[track_caller]
fn wait_all_read_by_server(port: u16, n: usize) {
    let mut last = (0, 0);
    let ok = poll_until(Duration::from_secs(15), || {
        last = server_side_unread(port);
        last.0 >= n && last.1 == 0
    });
    assert!(ok, "the server never read what {n} connections sent: (connections, unread bytes) = {last:?}");
}

/// Connect and ping at once: the port serves right now (no retry; a
/// refused connect or a missing reply within 2 s fails). Returns whoami.
#[track_caller]
fn assert_serves_now(c: &Cluster, what: &str) -> Value {
    let mut r = Rpc::try_connect(c.port).unwrap_or_else(|e| panic!("{what}: connect to {}: {e}", c.port));
    r.s.set_read_timeout(Some(wrapped_slowly(Duration::from_secs(2)))).unwrap();
    let x = json!({"serves": what});
    r.send(&ping_req(&x));
    match r.try_recv() {
        Ok(Some(v)) if v == json!({"out": "pong", "result": x}) => {}
        other => panic!("{what}: the port does not serve at once: ping got {other:?}"),
    }
    r.whoami()
}

/// `handoff restart --dir D ARGS` started in the background.
fn restart_bg(c: &Cluster, args: &[&str]) -> ChildGuard {
    ChildGuard::spawn(Command::new(bin()).arg("restart").arg("--dir").arg(&c.dir).args(args))
}

/// A failed restart must say why: non-zero, and "restart failed: <reason>".
#[track_caller]
fn assert_failed_with_reason(what: &str, st: ExitStatus, out: &str, err: &str) {
    assert!(!st.success(), "{what}: exit 0 (stdout {out:?}, stderr {err:?})");
    let reason = err.split_once("restart failed").map(|(_, r)| r.trim_start_matches(':').trim()).unwrap_or("");
    assert!(!reason.is_empty(), "{what}: {st} without a reason on stderr: {err:?}");
}

/// One reply frame on `r`, read before `deadline` however slowly its
/// bytes trickle in (Rpc::try_recv's timeout is per read call): the
/// reply, `Ok(None)` on EOF before any byte of it, or what went wrong.
fn recv_before(r: &mut Rpc, deadline: Instant) -> Result<Option<Value>, String> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut want = 4usize;
    loop {
        if buf.len() >= 4 {
            want = 4 + u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
        }
        if buf.len() >= want && buf.len() >= 4 {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("timeout: {} of {want} bytes of a reply", buf.len()));
        }
        r.s.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        let n = (want - buf.len()).min(chunk.len());
        match r.s.read(&mut chunk[..n]) {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(format!("EOF after {} of {want} bytes of a reply", buf.len())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("read: {e} after {} of {want} bytes of a reply", buf.len())),
        }
    }
    r.s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    serde_json::from_slice(&buf[4..]).map(Some).map_err(|e| format!("reply is not JSON: {e}"))
}

/// Reads the stuck client's STUCK_PINGS replies of 100 KB pings (made by
/// `stuck_client_with(.., false)`: a default receive buffer, read at full
/// speed): all of them, in order, then one more ping.
#[track_caller]
fn drain_stuck(stuck: &mut Rpc, what: &str) {
    let big = json!("s".repeat(100_000));
    let deadline = Instant::now() + Duration::from_secs(10);
    for k in 0..STUCK_PINGS {
        match recv_before(stuck, deadline) {
            Ok(Some(v)) if v == json!({"out": "pong", "result": big}) => {}
            Ok(Some(v)) => {
                panic!("{what}: stuck client reply {k}: unexpected {}", &v.to_string()[..80.min(v.to_string().len())])
            }
            Ok(None) => panic!("{what}: stuck client: EOF after {k} of {STUCK_PINGS} replies (connection cut)"),
            Err(e) => panic!("{what}: stuck client: {e}, after {k} of {STUCK_PINGS} replies (10 s for all)"),
        }
    }
    stuck.ping(&json!("stuck, after"));
}

// -------------------------------------------------- 1. new master SIGKILLed

/// The live children of `pid` with their command lines (from /proc).
fn children(pid: i32) -> Vec<(i32, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        // "pid (comm) S ppid ...": fields after the last ')'.
        let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
        let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(pid) && pid_alive(child) {
            let cmd = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            v.push((child, cmd));
        }
    }
    v
}

/// Waits until the new master of a restart of `old` is up: status shows
/// generation 2 (it renamed its control socket over the old one: READY is
/// sent or about to be). Should the control socket stay with the old
/// master until the takeover commits (another valid design), the old
/// master's `takeover` child, once it has had its workers for 1 s, counts
/// instead. Returns the new master's pid.
#[track_caller]
fn wait_new_master(c: &Cluster, old: i32) -> i32 {
    let mut found = None;
    let mut child_since: Option<(i32, Instant)> = None;
    let ok = poll_until(Duration::from_secs(10), || {
        if let Ok(v) = c.try_status(Duration::from_millis(500)) {
            if v["gen"] == json!(2) {
                found = v["pid"].as_i64().map(|p| p as i32);
                eprintln!("new master {found:?} seen in status (generation 2)");
                return true;
            }
        }
        match child_since {
            None => {
                let takeover = children(old).into_iter().find(|(_, cmd)| cmd.contains(" takeover "));
                if let Some((pid, _)) = takeover.filter(|(pid, _)| children(*pid).len() >= c.workers) {
                    child_since = Some((pid, Instant::now()));
                }
            }
            Some((pid, since)) if since.elapsed() >= Duration::from_secs(1) => {
                eprintln!("new master {pid} seen as the takeover child with its workers (status still shows gen 1)");
                found = Some(pid);
                return true;
            }
            Some(_) => {}
        }
        false
    });
    assert!(ok, "no new master (generation 2 in status, or a takeover child with workers) within 10 s");
    let pid = found.expect("found");
    assert_ne!(pid, old);
    pid
}

/// 200 idle connections and one client with 10 MB of replies pending
/// (so that the handover cannot finish before the kill: an idle-only
/// handover of 200 connections takes a few ms). `handoff restart`; as
/// soon as status shows generation 2 (the new master renamed its control
/// socket: it is about to say READY or did), plus `delay`, SIGKILL the
/// new master. The takeover had not committed: the old generation must
/// resume with every connection.
fn new_master_killed_mid_takeover(delay: Duration) {
    const IDLE: usize = 200;
    let t0 = Instant::now();
    let mut c = Cluster::start(2, &[]);
    let master = c.master_pid();
    let idle = Many::open(c.port, IDLE);
    let t = idle.ping_all("before", Some(1), Duration::from_secs(10));
    assert!(t.failed.is_empty(), "before the restart: {}", t.summary());
    // (2 * IDLE requests served so far: a ping and a whoami each.)
    let (mut stuck, writer) = stuck_client_with(&c, 2 * IDLE, false);

    let mut restart = restart_bg(&c, &[]);
    let new_master = wait_new_master(&c, master);
    std::thread::sleep(delay);
    let new_workers: Vec<i32> = children(new_master).into_iter().map(|(p, _)| p).collect();
    assert!(restart.is_running(), "handoff restart ended before the kill although a client holds the handover");
    kill_pid(new_master, libc::SIGKILL);
    let killed_at = Instant::now();

    let (st, out, err) = restart.wait(Duration::from_secs(20));
    eprintln!("kill +{delay:?}: handoff restart ended {:?} after the kill: {st}: {}", killed_at.elapsed(), err.trim());
    assert_failed_with_reason("restart whose new master was SIGKILLed", st, &out, &err);

    // Generation 1 serves again: status, the port, every connection.
    let v = c.wait_status("generation 1 answering status again", Duration::from_secs(5), |v| {
        v["gen"] == json!(1) && v["pid"] == json!(master)
    });
    assert_eq!(v["restarting"], json!(false), "{v}");
    let who = assert_serves_now(&c, "after the aborted restart");
    assert_eq!(who["gen"], json!(1), "a new connection lands on generation 1: {who}");
    let t = idle.ping_all("after", Some(1), Duration::from_secs(10));
    assert!(t.failed.is_empty(), "idle connections after the aborted restart: {}", t.summary());
    drain_stuck(&mut stuck, "after the aborted restart");
    writer.join().unwrap();
    assert_eq!(stuck.whoami()["gen"], json!(1));
    let gone = poll_until(Duration::from_secs(5), || new_workers.iter().all(|&p| !pid_alive(p)));
    assert!(gone, "workers of the killed generation 2 still alive: {new_workers:?}");
    assert!(c.server.is_running(), "the old master exited");
    eprintln!("new master killed +{delay:?}: {:?}", t0.elapsed());
}

#[test]
fn new_master_sigkilled_as_soon_as_it_shows_keeps_every_connection() {
    new_master_killed_mid_takeover(Duration::ZERO);
}

#[test]
fn new_master_sigkilled_mid_handover_keeps_every_connection() {
    new_master_killed_mid_takeover(Duration::from_millis(300));
}

// ------------------------------------------------- 2./3. read-ahead at scale

/// `n` connections each send the first 7 bytes of a ping (the 4-byte
/// length and 3 bytes of JSON), the workers read them; restart; each
/// sends the rest (plus a whoami) and must get its pong.
fn read_ahead_through_restart(n: usize) {
    let t0 = Instant::now();
    raise_nofile(n + 200);
    let c = Cluster::start(2, &[]);
    let conns = Many::open(c.port, n);
    let req = |i: usize| frame(&ping_req(&json!({"i": i, "tag": "split"})));
    let t = conns.exchange(Duration::from_secs(20), |i| req(i)[..7].to_vec(), 0, |_, _, _| Ok(()));
    assert!(t.failed.is_empty(), "sending the first 7 bytes: {}", t.summary());
    c.wait_status("every connection in a worker", Duration::from_secs(15), |v| sum_field(v, "open") == n as u64);
    wait_all_read_by_server(c.port, n);
    let opened = t0.elapsed();

    let t1 = Instant::now();
    let (gen, _) = c.restart_ok();
    let took = t1.elapsed();
    assert_eq!(gen, 2);
    assert_serves_now(&c, "after the restart");

    let t = conns.exchange(
        Duration::from_secs(20),
        |i| {
            let mut b = req(i)[7..].to_vec();
            b.extend(frame(&json!({"in": "whoami"})));
            b
        },
        2,
        |i, k, v| check_ping_then_gen(i, k, v, "split", Some(2)),
    );
    eprintln!("read-ahead x{n}: opened in {opened:?}, restart {took:?}, total {:?}", t0.elapsed());
    assert!(t.failed.is_empty(), "{n} half-sent frames through a restart: {}", t.summary());
}

#[test]
fn read_ahead_of_4000_connections_survives_a_restart() {
    read_ahead_through_restart(4000);
}

#[test]
fn shared_policy_3000_idle_connections_survive_a_restart() {
    const N: usize = 3000;
    let t0 = Instant::now();
    raise_nofile(N + 200);
    let c = Cluster::start(2, &["--policy", "shared"]);
    let conns = Many::open(c.port, N);
    // A reply proves a worker accepted the connection.
    let t = conns.ping_all("before", Some(1), Duration::from_secs(20));
    assert!(t.failed.is_empty(), "before the restart: {}", t.summary());
    let (gen, _) = c.restart_ok();
    assert_eq!(gen, 2);
    assert_serves_now(&c, "after the restart");
    let t = conns.ping_all("after", Some(2), Duration::from_secs(20));
    eprintln!("shared x{N}: {:?}", t0.elapsed());
    assert!(t.failed.is_empty(), "{N} idle connections (shared policy) through a restart: {}", t.summary());
}

// ------------------------------------------- 4. replies unflushed at drain

/// One client pipelines 12 pings of 900 kB and reads nothing: its worker
/// holds replies it cannot flush (and requests it has not read) when the
/// drain starts. The client starts reading once the drain is under way
/// (the idle connections have moved to generation 2): every reply must
/// arrive, in order, long before `--grace` would cut the connection.
#[test]
fn replies_not_flushed_when_the_drain_starts_all_arrive_in_order() {
    const PINGS: usize = 12;
    const IDLE: usize = 10;
    let c = Cluster::start(2, &["--grace", "5"]);
    let idle = Many::open(c.port, IDLE);
    let t = idle.ping_all("before", None, Duration::from_secs(10));
    assert!(t.failed.is_empty(), "before the restart: {}", t.summary());
    let mut conn = c.connect();
    // A small receive window: the replies stay in the worker, not in the
    // kernel's buffers.
    set_rcvbuf(&conn, 64 * 1024);
    let pad = "p".repeat(900_000);
    let params = |k: usize| json!({"k": k, "pad": pad});
    let mut w = conn.s.try_clone().unwrap();
    let reqs: Vec<Vec<u8>> = (0..PINGS).map(|k| frame(&ping_req(&params(k)))).collect();
    let writer = std::thread::spawn(move || {
        for r in &reqs {
            w.write_all(r)?;
        }
        io::Result::Ok(())
    });
    // Two replies (1.8 MB) exceed the worker's 1 MiB output limit: it has
    // paused reading with unsent replies.
    c.wait_status("two 900 kB pings answered", Duration::from_secs(10), |v| sum_field(v, "served") >= IDLE as u64 + 2);

    let t0 = Instant::now();
    let mut restart = restart_bg(&c, &[]);
    c.wait_status("the drain under way (the idle connections on generation 2)", Duration::from_secs(10), |v| {
        v["gen"] == json!(2) && sum_field(v, "open") == IDLE as u64
    });
    let drain_seen = t0.elapsed();
    let mut arrived = Vec::new();
    let deadline = t0 + Duration::from_secs(8);
    for k in 0..PINGS {
        match recv_before(&mut conn, deadline) {
            Ok(Some(v)) => {
                assert_eq!(v["result"]["k"], json!(k), "reply {k} out of order: {}", &v.to_string()[..60]);
                assert!(v == json!({"out": "pong", "result": params(k)}), "reply {k} is not the exact echo");
                arrived.push(t0.elapsed());
            }
            Ok(None) => panic!(
                "EOF {:?} after the restart began; {k} of {PINGS} replies had come (at {arrived:?})",
                t0.elapsed()
            ),
            Err(e) => panic!(
                "{e} {:?} after the restart began; {k} of {PINGS} replies had come (at {arrived:?})",
                t0.elapsed()
            ),
        }
    }
    let took = t0.elapsed();
    writer.join().unwrap().expect("writing the pings");
    eprintln!(
        "unflushed replies: drain seen at {drain_seen:?}, all {PINGS} replies by {took:?} after the restart began"
    );
    assert!(took < Duration::from_secs(4), "the {PINGS} replies took {took:?} (grace 5 s): held until the cut?");
    let (st, out, err) = restart.wait(RESTART_TIMEOUT);
    assert!(st.success(), "restart: {st}\n{out}\n{err}");
    assert_eq!(parse_restarted(&out).0, 2);
    assert_serves_now(&c, "after the restart");
    conn.ping(&json!("after"));
    assert_eq!(conn.whoami()["gen"], json!(2), "the connection moved to generation 2");
    let t = idle.ping_all("after", Some(2), Duration::from_secs(10));
    assert!(t.failed.is_empty(), "idle connections after the restart: {}", t.summary());
}

// ------------------------------------------------ 5. descriptor pressure

/// The new master and its workers run under `ulimit -n 64` (a wrapper
/// given as `restart --binary`) while `n` connections are open: none may
/// be cut; the restart either succeeds or fails with a reason and
/// generation 1 keeps serving them all.
fn restart_into_ulimit_64(n: usize) {
    // A shorter --grace bounds a move that cannot finish.
    let c = Cluster::start(2, &["--grace", "2"]);
    let tmp = TempDir::new("ulim");
    let wrapper = tmp.path().join("handoff-ulimit64.sh");
    script(&wrapper, &format!("#!/bin/sh\nulimit -n 64 || exit 90\nexec {} \"$@\"\n", bin()));
    let conns = Many::open(c.port, n);
    let t = conns.ping_all("before", Some(1), Duration::from_secs(10));
    assert!(t.failed.is_empty(), "before the restart: {}", t.summary());

    let t0 = Instant::now();
    // Bounded well below RESTART_TIMEOUT: PREPARE takes at most --timeout
    // (5 s), a move that cannot finish at most --grace (2 s).
    let mut cmd = Command::new(bin());
    cmd.arg("restart").arg("--dir").arg(&c.dir).arg("--binary").arg(&wrapper).args(["--timeout", "5"]);
    let (st, out, err) = run_cmd(&mut cmd, Duration::from_secs(15));
    let _ = c.try_status(Duration::from_secs(2)); // Drop learns the new master
    let took = t0.elapsed();
    let gen = if st.success() {
        let (gen, pid) = parse_restarted(&out);
        assert_eq!(gen, 2, "{out}");
        // The new master really ran under the limit.
        let lim = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
        let line = lim.lines().find(|l| l.starts_with("Max open files")).unwrap_or("").to_string();
        assert!(line.split_whitespace().nth(3) == Some("64"), "new master's limits: {line:?}");
        assert_serves_now(&c, "after the restart");
        2
    } else {
        assert_failed_with_reason("restart into ulimit -n 64", st, &out, &err);
        let v = c.wait_status("generation 1 serving", Duration::from_secs(5), |v| v["gen"] == json!(1));
        assert_eq!(v["restarting"], json!(false), "{v}");
        1
    };
    eprintln!(
        "ulimit -n 64 restart with {n} connections: {st} in {took:?}: {}",
        if st.success() { out.trim() } else { err.trim() }
    );
    let t = conns.ping_all("after", Some(gen), Duration::from_secs(10));
    assert!(t.failed.is_empty(), "{n} connections after a restart into ulimit -n 64 ({st}): {}", t.summary());
    let who = assert_serves_now(&c, "at the end");
    assert_eq!(who["gen"], json!(gen));
}

#[test]
fn new_generation_under_ulimit_64_cuts_none_of_40_connections() {
    restart_into_ulimit_64(40);
}

/// More connections than the new generation's descriptor limit.
#[test]
fn new_generation_under_ulimit_64_cuts_none_of_100_connections() {
    restart_into_ulimit_64(100);
}

// ---------------------------------------------- 6. a second restart meanwhile

/// What one `handoff restart` said: Ok(generation) or Err(stderr).
fn verdict(what: &str, (st, out, err): (ExitStatus, String, String)) -> Result<u64, String> {
    if st.success() {
        Ok(parse_restarted(&out).0)
    } else {
        assert_failed_with_reason(what, st, &out, &err);
        Err(err.trim().to_string())
    }
}

#[test]
fn a_second_restart_during_the_handover_tells_the_truth_and_cuts_nothing() {
    const IDLE: usize = 50;
    let t0 = Instant::now();
    let c = Cluster::start(2, &[]);
    let idle = Many::open(c.port, IDLE);
    let t = idle.ping_all("before", Some(1), Duration::from_secs(10));
    assert!(t.failed.is_empty(), "before the restart: {}", t.summary());
    // The handover lasts until this client reads.
    let (mut stuck, writer) = stuck_client_with(&c, 2 * IDLE, false);

    let mut first = restart_bg(&c, &[]);
    // Right after the old master took up the first.
    c.wait_status("the first restart taken up", Duration::from_secs(10), |v| {
        v["restarting"] == json!(true) || v["gen"] == json!(2)
    });
    let mut early = restart_bg(&c, &[]);
    // Once generation 2 answers the control socket (it is taking over).
    c.wait_status("generation 2 taking over", Duration::from_secs(10), |v| v["gen"] == json!(2));
    let mut late = restart_bg(&c, &[]);
    // Let the late one reach a master before the handover may end: it was
    // answered, or generation 2 took it up. (Not asserted: any order of
    // events is allowed; the verdicts must match whichever happened.)
    let _ = poll_until(Duration::from_secs(1), || {
        !late.is_running()
            || c.try_status(Duration::from_millis(500))
                .is_ok_and(|v| v["gen"] == json!(3) || (v["gen"] == json!(2) && v["restarting"] == json!(true)))
    });
    if !first.is_running() {
        let (st, out, err) = first.wait(Duration::from_secs(1));
        panic!("the first restart ended although a client holds the handover: {st}\n{out}{err}");
    }

    drain_stuck(&mut stuck, "during two restarts");
    writer.join().unwrap();
    let first = verdict("first restart", first.wait(RESTART_TIMEOUT));
    let early = verdict("second restart, sent at once", early.wait(RESTART_TIMEOUT));
    let late = verdict("second restart, sent during the takeover", late.wait(RESTART_TIMEOUT));
    eprintln!("two restarts: first {first:?}, early {early:?}, late {late:?}");
    assert_eq!(first, Ok(2), "the first restart, disturbed by nothing, succeeds");

    // Their verdicts must match what happened: one generation per success.
    let succeeded: Vec<u64> = [&early, &late].iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    let want = 2 + succeeded.len() as u64;
    let mut gens = succeeded.clone();
    gens.sort();
    assert_eq!(gens, (3..=want).collect::<Vec<u64>>(), "reported generations: early {early:?}, late {late:?}");
    let v = c.wait_status("no restart running", Duration::from_secs(10), |v| v["restarting"] == json!(false));
    assert_eq!(v["gen"], json!(want), "status vs the restarts' exit statuses ({early:?}, {late:?}): {v}");
    let who = assert_serves_now(&c, "after both restarts");
    assert_eq!(who["gen"], json!(want));
    let t = idle.ping_all("after", Some(want), Duration::from_secs(10));
    assert!(t.failed.is_empty(), "idle connections after two restarts: {}", t.summary());
    assert_eq!(stuck.whoami()["gen"], json!(want), "the late reader ends on the last generation");
    eprintln!("two restarts: {:?}", t0.elapsed());
}

// ------------------------------------------------------ 7. large read-ahead

#[test]
fn a_300_kb_read_ahead_of_a_1_mb_frame_survives_a_restart() {
    let c = Cluster::start(2, &["--max-frame", "2000000"]);
    let mut bystander = c.connect();
    bystander.ping(&json!("before"));
    let mut conn = c.connect();
    conn.ping(&json!("before"));
    let x = json!({"big": "b".repeat(1_000_000)});
    let req = frame(&ping_req(&x));
    assert!(req.len() > 1_000_000 && req.len() < 2_000_000);
    conn.send_raw(&req[..300_000]);
    wait_all_read_by_server(c.port, 2);

    let (gen, _) = c.restart_ok();
    assert_eq!(gen, 2);
    assert_serves_now(&c, "after the restart");
    conn.send_raw(&req[300_000..]);
    match recv_before(&mut conn, Instant::now() + Duration::from_secs(10)) {
        Ok(Some(v)) => assert!(v == json!({"out": "pong", "result": x}), "the 1 MB pong is not the exact echo"),
        Ok(None) => panic!("EOF instead of the 1 MB pong (the 300 KB read-ahead was lost)"),
        Err(e) => panic!("no 1 MB pong: {e}"),
    }
    assert_eq!(conn.whoami()["gen"], json!(2));
    bystander.ping(&json!("after"));
    let v = c.status();
    assert_eq!(worker_field(&v, "respawns"), vec![0, 0], "{v}");
    let log = c.server.stderr_text();
    for bad in ["panicked", "exited unexpectedly", "is lost", "is closed"] {
        assert!(!log.contains(bad), "the cluster's log says {bad:?}:\n{log}");
    }
}

// ------------------------------------------------------------- 8. a node

/// A node's new master SIGKILLed mid-handover, while node A relays to
/// it without pause: the restart fails and says so; B's generation 1
/// serves again, the links it had handed over included (taken back from
/// its copies); A's clients lose at most the relays that were inside the
/// killed generation, each answered with an error, never a hang, and
/// relay on over the same links.
#[test]
fn a_node_whose_new_master_dies_mid_handover_keeps_its_links() {
    let nodes = start_nodes(&["A", "B"], 2, &[]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let master = b.c.master_pid();
    let mut relayer = a.conn_on(0);
    for w in 0..2 {
        assert_relayed(&relayer.call(&relay_req("B", w, &json!(w))), "B", w, &json!(w));
    }
    // The handover is held by a client with MBs of replies it does not
    // read yet (before the relay load: its set-up watches B's served count).
    let served = sum_field(&b.c.status(), "served") as usize;
    let (mut stuck, writer) = stuck_client_with(&b.c, served, false);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, Vec::new());
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let m = json!({"n": n});
                let r = relayer.call(&relay_req("B", n % 2, &m));
                if r["out"] == "relayed" && r["result"]["msg"] == m {
                    ok += 1;
                } else {
                    failed.push(r.to_string());
                }
                n += 1;
            }
            (ok, failed, relayer)
        })
    };
    let mut restart = restart_bg(&b.c, &[]);
    let new_master = wait_new_master(&b.c, master);
    std::thread::sleep(Duration::from_millis(300));
    assert!(restart.is_running(), "handoff restart ended before the kill although a client holds the handover");
    kill_pid(new_master, libc::SIGKILL);
    let (st, out, err) = restart.wait(Duration::from_secs(20));
    assert_failed_with_reason("restart of a node whose new master was SIGKILLed", st, &out, &err);
    let v = b.c.wait_status("generation 1 answering again", Duration::from_secs(5), |v| {
        v["gen"] == json!(1) && v["pid"] == json!(master)
    });
    assert_eq!(v["mode"], "node", "{v}");
    drain_stuck(&mut stuck, "after the aborted node restart");
    writer.join().unwrap();
    // Relays go on: let some succeed after the abort.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed, mut relayer) = load.join().unwrap();
    eprintln!("relays during the aborted restart: {ok} ok, {} failed: {failed:?}", failed.len());
    assert!(ok > 10, "{ok} relays");
    for f in &failed {
        assert!(f.contains("unreachable") || f.contains("timeout"), "a failed relay says why: {f}");
    }
    assert!(failed.len() <= 2, "at most the relays inside the killed generation fail: {failed:?}");
    let b_pids = b.c.worker_pids();
    for (w, &pid) in b_pids.iter().enumerate() {
        let m = json!({"after": w});
        assert_eq!(assert_relayed(&relayer.call(&relay_req("B", w, &m)), "B", w, &m), pid as u64);
    }
}

// ------------------------------------------- 9. served at once after exit 0

#[test]
fn after_every_successful_restart_the_port_serves_at_once() {
    let t0 = Instant::now();
    for policy in ["round-robin", "least-conn", "shared"] {
        let c = Cluster::start(2, &["--policy", policy]);
        let mut kept = c.connect();
        kept.ping(&json!(0));
        for k in 1..=4u64 {
            let (st, out, err) = c.restart(&[]);
            // Nothing between the exit and the connect.
            let who = if st.success() { Some(assert_serves_now(&c, &format!("{policy}: restart {k}"))) } else { None };
            assert!(st.success(), "{policy}: restart {k}: {st}\n{out}\n{err}");
            let (gen, _) = parse_restarted(&out);
            assert_eq!(gen, k + 1, "{policy}");
            assert_eq!(who.unwrap()["gen"], json!(gen), "{policy}: a new connection after restart {k}");
            kept.ping(&json!(k));
            assert_eq!(kept.whoami()["gen"], json!(gen), "{policy}: the kept connection after restart {k}");
        }
    }
    eprintln!("12 restarts, each checked at once: {:?}", t0.elapsed());
}

// ------------------------------------------------ 7. connections in batches

/// Every tenth of `n` connections sends the first 7 bytes of a ping and
/// the workers read them (read-ahead a restart must carry exactly); the
/// others have been served once. Returns the connections.
fn idle_with_a_tenth_half_sent(c: &Cluster, n: usize) -> Many {
    let conns = Many::open(c.port, n);
    let t = conns.ping_all("before", Some(1), Duration::from_secs(20));
    assert!(t.failed.is_empty(), "before the restart: {}", t.summary());
    for (i, mut s) in conns.socks.iter().enumerate().step_by(10) {
        // 7 bytes always fit an empty socket buffer: no WouldBlock.
        s.write_all(&half_ping(i)[..7]).unwrap_or_else(|e| panic!("half request on connection {i}: {e}"));
    }
    wait_all_read_by_server(c.port, n);
    conns
}

fn half_ping(i: usize) -> Vec<u8> {
    frame(&ping_req(&json!({"i": i, "tag": "batch"})))
}

/// After a restart (or its abort): each half-sent ping is completed, each
/// other connection pings anew; all must get exactly their pong, then a
/// whoami naming generation `gen`.
fn all_answer_exactly(conns: &Many, gen: u64, what: &str) {
    let t = conns.exchange(
        Duration::from_secs(20),
        |i| {
            let mut b = if i % 10 == 0 { half_ping(i)[7..].to_vec() } else { half_ping(i) };
            b.extend(frame(&json!({"in": "whoami"})));
            b
        },
        2,
        |i, k, v| check_ping_then_gen(i, k, v, "batch", Some(gen)),
    );
    assert!(t.failed.is_empty(), "{what}: {} connections: {}", conns.len(), t.summary());
}

/// 3000 connections, 300 of them holding half a request, cross one
/// restart in CONNS batches (worker -> old master -> new master -> new
/// workers): none closed, every one answered exactly by generation 2.
#[test]
fn batched_restart_of_3000_connections_a_tenth_half_sent_answers_all_exactly() {
    const N: usize = 3000;
    raise_nofile(N + 200);
    let c = Cluster::start(2, &[]);
    let conns = idle_with_a_tenth_half_sent(&c, N);
    let t0 = Instant::now();
    let (gen, _) = c.restart_ok();
    let took = t0.elapsed();
    assert_eq!(gen, 2);
    let v = c.wait_status("all moved into generation 2's workers", Duration::from_secs(10), |v| {
        sum_field(v, "open") == N as u64
    });
    assert_eq!(v["gen"], json!(2));
    eprintln!("batched restart x{N}: {took:?}");
    all_answer_exactly(&conns, 2, "after a batched restart");
}

/// The new master SIGKILLed while the batches are on their way (the move
/// is held open by a client that does not read its replies, and the kill
/// comes as soon as the new master shows): the restart aborts and
/// generation 1 serves every one of the 3000 connections again, each
/// half-sent request completed exactly from the old master's copy.
#[test]
fn new_master_sigkilled_mid_batch_every_connection_served_again_by_generation_1() {
    const N: usize = 3000;
    raise_nofile(N + 200);
    let mut c = Cluster::start(2, &[]);
    let master = c.master_pid();
    let conns = idle_with_a_tenth_half_sent(&c, N);
    // (2 * N requests served so far: a ping and a whoami each.)
    let (mut stuck, writer) = stuck_client_with(&c, 2 * N, false);
    let mut restart = restart_bg(&c, &[]);
    let new_master = wait_new_master(&c, master);
    assert!(restart.is_running(), "handoff restart ended before the kill although a client holds the handover");
    kill_pid(new_master, libc::SIGKILL);
    let (st, out, err) = restart.wait(Duration::from_secs(20));
    assert_failed_with_reason("restart whose new master was SIGKILLed mid-batch", st, &out, &err);
    let v = c.wait_status("generation 1 answering status again", Duration::from_secs(10), |v| {
        v["gen"] == json!(1) && v["pid"] == json!(master)
    });
    assert_eq!(v["restarting"], json!(false), "{v}");
    all_answer_exactly(&conns, 1, "after the aborted batched restart");
    drain_stuck(&mut stuck, "after the aborted batched restart");
    writer.join().unwrap();
    assert!(c.server.is_running(), "the old master exited");
}
