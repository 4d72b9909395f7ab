//! Pair mode: two servers answer one request each in turn, handing the
//! connection (descriptor + read-ahead) to each other after every response.
use std::io::Write;
use std::net::{Shutdown, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

// ------------------------------------------------------------- load clients

#[test]
fn unary_100_conns_200_requests() {
    let pair = Pair::start();
    let s = unary(pair.p, 100, 200);
    assert_passed(&s, pair.p);
    assert_eq!(s.ok, 20_000);
    assert_eq!(s.check, format!("xor({},{})", pair.p, pair.q));
}

#[test]
fn stream_1x1000_and_100x1000() {
    let pair = Pair::start();
    // One connection, starting at Q this time.
    let s = stream(pair.q, 1, 1000);
    assert_passed(&s, pair.p);
    assert_eq!(s.ok, 1000);
    let s = stream(pair.p, 100, 1000);
    assert_passed(&s, pair.p);
    assert_eq!(s.ok, 100_000);
}

// ------------------------------------------------------------ raw framing

/// Requests of random sizes 0..=255 with random payloads, all in one
/// write, then EOF: exactly one response per request, strictly
/// alternating, then the server closes.
#[test]
fn random_sizes_pipelined_then_eof() {
    let pair = Pair::start();
    let mut rng = Rng::from_time();
    let seed = rng.0;
    const N: usize = 1000;
    let mut all = Vec::new();
    for _ in 0..N {
        let len = rng.below(256) as usize;
        all.push(len as u8);
        all.extend(rng.bytes(len));
    }
    let mut c = Conn::open(pair.p);
    let w = c.stream().try_clone().unwrap();
    // Write on another thread so a full buffer cannot deadlock the test.
    let writer = std::thread::spawn(move || {
        (&w).write_all(&all).expect("write");
        w.shutdown(Shutdown::Write).expect("shutdown(Write)");
    });
    let ports = c.recv_to_eof();
    writer.join().unwrap();
    assert_eq!(ports.len(), N, "responses (seed {seed:#x})");
    assert_alternates(&ports, pair.p, pair.q);
}

/// Every byte in its own segment (TCP_NODELAY, one write per byte).
#[test]
fn one_byte_writes() {
    let pair = Pair::start();
    let sizes = [0usize, 1, 2, 17, 100, 255, 3, 0, 254, 5];
    // One request at a time, each read back before the next.
    let mut c = Conn::open(pair.p);
    let mut ports = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        for b in request(n, b'a' + i as u8) {
            c.send(&[b]);
        }
        ports.push(c.recv());
    }
    assert_alternates(&ports, pair.p, pair.q);

    // All requests byte by byte without waiting: partial requests are
    // buffered when a connection moves and must travel with it.
    let mut c = Conn::open(pair.q);
    for (i, &n) in sizes.iter().cycle().take(40).enumerate() {
        for b in request(n, i as u8) {
            c.send(&[b]);
        }
    }
    c.shutdown_write();
    let ports = c.recv_to_eof();
    assert_eq!(ports.len(), 40);
    assert_alternates(&ports, pair.q, pair.p);
}

#[test]
fn lengths_0_and_255() {
    let pair = Pair::start();
    // One at a time.
    let mut c = Conn::open(pair.p);
    let mut ports = Vec::new();
    for i in 0..20 {
        c.send(&request(if i % 3 == 0 { 255 } else { 0 }, 0xff));
        ports.push(c.recv());
    }
    assert_alternates(&ports, pair.p, pair.q);
    // Pipelined: 255-byte payloads of 0x00 (would read as empty requests if
    // the length were misparsed) and empty requests mixed.
    let mut c = Conn::open(pair.p);
    let mut all = Vec::new();
    for i in 0..200 {
        all.extend(request(if i % 2 == 0 { 255 } else { 0 }, 0x00));
    }
    c.send(&all);
    c.shutdown_write();
    let ports = c.recv_to_eof();
    assert_eq!(ports.len(), 200);
    assert_alternates(&ports, pair.p, pair.q);
    // Through the library clients.
    for size in [0, 255] {
        let s = handoff::client::unary(&opts(pair.p, 10, 100, size));
        assert_passed(&s, pair.p);
        let s = handoff::client::stream(&opts(pair.q, 10, 100, size));
        assert_passed(&s, pair.p);
    }
}

// -------------------------------------------------------------- half-close

#[test]
fn half_close_after_pipelined_requests() {
    let pair = Pair::start();
    // Odd and even counts: the EOF is met by either server.
    for (start, other) in [(pair.p, pair.q), (pair.q, pair.p)] {
        for k in [0usize, 1, 2, 7, 8, 50] {
            let mut c = Conn::open(start);
            let mut all = Vec::new();
            for i in 0..k {
                all.extend(request(i * 5 % 256, b'h'));
            }
            c.send(&all);
            c.shutdown_write();
            let ports = c.recv_to_eof();
            assert_eq!(ports.len(), k, "{k} pipelined requests to {start}, then EOF");
            assert_alternates(&ports, start, other);
        }
    }
}

#[test]
fn truncated_request_before_eof_closes() {
    let pair = Pair::start();
    for (start, other) in [(pair.p, pair.q), (pair.q, pair.p)] {
        for k in [0usize, 1, 2, 5] {
            for tail in [&[10u8, 1, 2, 3][..], &[200u8][..], &[255u8, 9][..]] {
                let mut c = Conn::open(start);
                let mut all = Vec::new();
                for _ in 0..k {
                    all.extend(request(16, b't'));
                }
                all.extend_from_slice(tail);
                c.send(&all);
                c.shutdown_write();
                let ports = c.recv_to_eof();
                assert_eq!(ports.len(), k, "{k} requests + truncated {tail:?} to {start}");
                assert_alternates(&ports, start, other);
            }
        }
    }
    // The servers are fine afterwards.
    assert_passed(&unary(pair.p, 10, 100), pair.p);
}

// ------------------------------------------------------------ bad clients

/// Requests a byte string parses into before it runs out.
fn complete_frames(b: &[u8]) -> usize {
    let (mut i, mut n) = (0, 0);
    while i < b.len() && i + 1 + b[i] as usize <= b.len() {
        i += 1 + b[i] as usize;
        n += 1;
    }
    n
}

/// Closes with SO_LINGER 0: the peer gets a RST, not a FIN.
fn reset(s: TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: s is an open socket; l is a live linger of the given size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_LINGER: {}", std::io::Error::last_os_error());
    drop(s);
}

/// One misbehaving client, picked at random.
fn bad_client(rng: &mut Rng, p: u16, q: u16) {
    let (start, other) = if rng.below(2) == 0 { (p, q) } else { (q, p) };
    let mut c = Conn::open(start);
    match rng.below(7) {
        // Connect and go away.
        0 => drop(c),
        // Garbage, then close without reading (answers hit a closed socket).
        1 => {
            let n = 1 + rng.below(3000) as usize;
            let _ = c.stream().write_all(&rng.bytes(n));
        }
        // Garbage, then a reset.
        2 => {
            let n = 1 + rng.below(3000) as usize;
            let _ = c.stream().write_all(&rng.bytes(n));
            reset(c.rd.into_inner());
        }
        // Part of a request, then a reset.
        3 => {
            let _ = c.stream().write_all(&[200, 1, 2, 3]);
            reset(c.rd.into_inner());
        }
        // Pipelined requests, reset before reading (the connection is
        // being handed around while the RST arrives).
        4 => {
            let mut all = Vec::new();
            for _ in 0..1 + rng.below(20) {
                all.extend(request(rng.below(256) as usize, b'r'));
            }
            let _ = c.stream().write_all(&all);
            reset(c.rd.into_inner());
        }
        // A few good requests, then a reset mid-conversation.
        5 => {
            for _ in 0..1 + rng.below(4) {
                c.send(&request(16, b'g'));
                c.recv();
            }
            c.send(&request(16, b'g'));
            reset(c.rd.into_inner());
        }
        // Garbage then EOF, reading everything back: exactly the complete
        // frames inside the garbage are answered, then the server closes.
        _ => {
            let n = 1 + rng.below(2000) as usize;
            let g = rng.bytes(n);
            c.send(&g);
            c.shutdown_write();
            let ports = c.recv_to_eof();
            assert_eq!(ports.len(), complete_frames(&g), "responses to {} garbage bytes then EOF, at {start}", g.len());
            assert_alternates(&ports, start, other);
        }
    }
}

#[test]
fn garbage_and_reset_clients_do_not_hurt() {
    let mut pair = Pair::start();
    let (p, q) = (pair.p, pair.q);
    let seed = Rng::from_time().0;
    // Bad clients on four threads while a good client runs.
    let bad: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
                for _ in 0..60 {
                    bad_client(&mut rng, p, q);
                }
            })
        })
        .collect();
    let during = unary(p, 20, 200);
    for (i, t) in bad.into_iter().enumerate() {
        if t.join().is_err() {
            panic!("bad-client thread {i} failed (seed {seed:#x})");
        }
    }
    assert_passed(&during, p);
    assert!(pair.a.is_running() && pair.b.is_running(), "a server died (seed {seed:#x})");
    // Both servers still serve fully, whichever takes the connection first.
    assert_passed(&unary(p, 20, 100), p);
    assert_passed(&unary(q, 20, 100), p);
}

/// A reset connection must not affect others: a client resets its
/// connection (half a request, then SO_LINGER 0); once P has closed that
/// connection (seen in /proc), an idle client sends one request. Repeated
/// 20 times; every request must be answered.
#[test]
fn reset_client_does_not_break_the_next_request() {
    let pair = Pair::start();
    let mut good: Vec<Conn> = (0..20).map(|_| Conn::open(pair.p)).collect();
    let mut lost = Vec::new();
    for (i, g) in good.iter_mut().enumerate() {
        let bad = Conn::open(pair.p);
        bad.stream().write_all(&[200, 1, 2]).unwrap();
        let std::net::SocketAddr::V4(client) = bad.stream().local_addr().unwrap() else { unreachable!() };
        let mut inode = None;
        let accepted = poll_until(Duration::from_secs(5), || {
            inode = accepted_inode(pair.p, client).filter(|&i| pair.a.holds_socket(i));
            inode.is_some()
        });
        assert!(accepted, "P did not accept the connection from {client}");
        reset(bad.rd.into_inner());
        let inode = inode.unwrap();
        let closed = poll_until(Duration::from_secs(5), || !pair.a.holds_socket(inode));
        assert!(closed, "P did not close the reset connection from {client}");
        g.send(&request(3, b'g'));
        match g.try_recv() {
            Ok(Some(port)) => assert_eq!(port, pair.p),
            other => lost.push((i, other)),
        }
    }
    assert!(lost.is_empty(), "{} of 20 requests sent after a reset got no response: {lost:?}", lost.len());
}

// ------------------------------------------------------------------- scale

#[test]
fn two_thousand_idle_connections() {
    let nofile = handoff::core::sock::raise_nofile().expect("raise RLIMIT_NOFILE");
    assert!(nofile >= 2500, "RLIMIT_NOFILE {nofile} is too low for 2000 idle connections");
    let pair = Pair::start();
    // Half of them on each server; they send nothing.
    let mut idle: Vec<(Conn, u16, u16)> = (0..2000)
        .map(|i| if i % 2 == 0 { (Conn::open(pair.p), pair.p, pair.q) } else { (Conn::open(pair.q), pair.q, pair.p) })
        .collect();
    assert_passed(&unary(pair.p, 10, 100), pair.p);
    // Now each idle connection sends a request, then another: the first
    // is answered where it was accepted, the second by the other server.
    for round in 0..2 {
        for (c, _, _) in &mut idle {
            c.send(&request(8, b'i'));
        }
        for (i, (c, first, other)) in idle.iter_mut().enumerate() {
            let want = if round == 0 { *first } else { *other };
            let got = c.try_recv().unwrap_or_else(|e| panic!("idle connection {i}, round {round}: {e}"));
            assert_eq!(got, Some(want), "idle connection {i}, round {round}");
        }
    }
}

// ------------------------------------------------------------ request logs

/// Checks every line is `<secs.micros> 127.0.0.1:<port> <len>`; returns
/// the number of lines.
fn check_log(path: &Path, since: f64) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    for (i, line) in text.lines().enumerate() {
        let bad = || format!("{}:{}: malformed {line:?}", path.display(), i + 1);
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 3, "{}", bad());
        let (secs, micros) = f[0].split_once('.').unwrap_or_else(|| panic!("{}", bad()));
        assert!(micros.len() == 6 && micros.bytes().all(|c| c.is_ascii_digit()), "{}", bad());
        let t: f64 = f[0].parse().unwrap_or_else(|_| panic!("{}", bad()));
        assert!(secs.parse::<u64>().is_ok() && t >= since - 1.0 && t <= now + 1.0, "{} (time)", bad());
        let addr: SocketAddrV4 = f[1].parse().unwrap_or_else(|_| panic!("{}", bad()));
        assert_eq!(*addr.ip(), LOCALHOST, "{}", bad());
        assert_eq!(f[2], "16", "{}", bad());
    }
    text.lines().count()
}

#[test]
fn request_logs_balanced_and_flushed() {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let mut pair = Pair::start();
    let (lp, lq) = (pair.log(pair.p), pair.log(pair.q));
    let warm = pair.warm.0 + pair.warm.1;
    // The periodic flush (every 200 ms) brings the logs up to date.
    assert_passed(&unary(pair.p, 20, 50), pair.p);
    let n1 = warm + 1000;
    let flushed = poll_until(Duration::from_secs(3), || (count_lines(&lp) + count_lines(&lq)) as u64 == n1);
    assert!(flushed, "logs hold {} + {} lines 3 s after {n1} requests", count_lines(&lp), count_lines(&lq));
    // Stopping flushes the rest.
    assert_passed(&unary(pair.q, 20, 50), pair.p);
    for s in [&mut pair.a, &mut pair.b] {
        let st = s.terminate();
        assert!(st.success(), "{}: SIGTERM gave {st}", s.name());
    }
    let (np, nq) = (check_log(&lp, since) as u64, check_log(&lq, since) as u64);
    assert_eq!(np + nq, warm + 2000, "log lines {np} + {nq}");
    let (np, nq) = (np - pair.warm.0, nq - pair.warm.1);
    assert!(np.abs_diff(nq) <= 4, "unbalanced logs: {np} vs {nq} requests");
    assert!(!pair.sock(pair.p).exists() && !pair.sock(pair.q).exists(), "sockets left behind");
}

// ------------------------------------------------------------- peer failure

fn warn_lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.contains("WARN")).collect()
}

#[test]
fn peer_killed_then_serves_alone_and_resumes() {
    let mut pair = Pair::start();
    let p = pair.p;
    let before = pair.a.stderr_text().len();
    pair.b.kill();
    // P serves every request alone: no error, all from P.
    let s = unary(p, 20, 50);
    assert_eq!(s.errors, 0, "{s}");
    assert_eq!(s.check, format!("alternate({p},-)"), "{s}");
    assert_eq!(s.ok + s.breaks, 1000, "{s}");
    assert_eq!(s.breaks, 20 * 49, "{s}");
    let s = stream(p, 5, 100);
    assert_eq!((s.errors, s.ok + s.breaks), (0, 500), "{s}");
    // Exactly one warning about it, whatever the number of requests.
    let got_warning = poll_until(Duration::from_secs(5), || !warn_lines(&pair.a.stderr_text()[before..]).is_empty());
    assert!(got_warning, "no warning from {p} after its peer died");
    let text = pair.a.stderr_text();
    let warns = warn_lines(&text[before..]);
    assert_eq!(warns.len(), 1, "one warning expected, got {warns:#?}");
    assert!(pair.a.is_running());

    // Q comes back (over its stale socket): handoffs resume.
    pair.restart_b();
    let mut last = None;
    let resumed = poll_until(Duration::from_secs(10), || {
        let s = unary(p, 2, 10);
        assert_eq!(s.errors, 0, "{s}");
        let done = s.passed();
        last = Some(s);
        done
    });
    assert!(resumed, "handoffs did not resume within 10 s; last run: {}", last.unwrap());
    assert_passed(&unary(p, 20, 100), p);
}

#[test]
fn peer_killed_mid_run() {
    let mut pair = Pair::start();
    let p = pair.p;
    let log = pair.log(p);
    let t0 = Instant::now();
    let run = std::thread::spawn(move || unary(p, 40, 1500));
    // Kill Q once the run is under way (P's log shows served requests).
    let started = poll_until(Duration::from_secs(10), || count_lines(&log) > 100);
    assert!(started, "the run did not start");
    pair.b.kill();
    let s = run.join().expect("client thread");
    // Connections that were at Q die with it; the rest go on at P. The
    // run ends (no connection hangs) and P is unharmed.
    assert_eq!(s.ok + s.errors + s.breaks, 60_000, "{s}");
    assert!(t0.elapsed() < Duration::from_secs(30), "run took {:?}: {s}", t0.elapsed());
    assert!(s.ok + s.breaks > 0, "nothing answered: {s}");
    assert!(pair.a.is_running(), "P died with its peer");
    let s = unary(p, 20, 50);
    assert_eq!((s.errors, s.ok + s.breaks), (0, 1000), "{s}");
    pair.restart_b();
    let resumed = poll_until(Duration::from_secs(10), || unary(p, 2, 10).passed());
    assert!(resumed, "handoffs did not resume");
}

// ------------------------------------------------------- process lifecycle

#[test]
fn sigterm_and_sigint_exit_zero_and_remove_socket() {
    let tmp = TempDir::new("sig");
    let dir = tmp.path().join("d");
    let p = free_pair();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // Alone (peer down), with open connections: one idle, one with half
        // a request, one mid-conversation.
        let mut s = start_server(p, p + 1, &dir);
        let sock = dir.join(format!("{p}.sock"));
        assert!(sock.exists());
        let _idle = Conn::open(p);
        let half = Conn::open(p);
        half.stream().write_all(&[100, 1, 2]).unwrap();
        let mut talk = Conn::open(p);
        talk.send(&request(3, b'x'));
        assert_eq!(talk.recv(), p);
        s.signal(sig);
        let st = s.wait_exit(EXIT_TIMEOUT);
        assert!(st.success(), "signal {sig}: exit status {st}");
        assert!(!sock.exists(), "signal {sig}: {} left behind", sock.display());
        assert_eq!(talk.try_recv(), Ok(None), "open connections are closed");
    }
    // The directory was made private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{} has mode {mode:o}", dir.display());
}

#[test]
fn pair_launcher_runs_and_stops_both() {
    let tmp = TempDir::new("launch");
    let dir = tmp.path().join("d");
    let p = free_pair();
    let q = p + 1;
    let mut launcher = TestServer::start(
        "pair",
        ["pair".as_ref(), "--ports".as_ref(), format!("{p},{q}").as_ref(), "--dir".as_ref(), dir.as_os_str()],
    );
    assert_eq!(launcher.ready, format!("ready ports={p},{q} dir={}", dir.display()));
    // The launcher's ready line waits for both servers' `linked` lines: the
    // very first requests already alternate, no probing needed.
    assert_passed(&unary(p, 10, 100), p);
    assert_passed(&stream(q, 10, 100), p);
    let st = launcher.terminate();
    assert!(st.success(), "pair: SIGTERM gave {st}");
    for port in [p, q] {
        assert!(!dir.join(format!("{port}.sock")).exists(), "{port}.sock left behind");
        assert!(TcpStream::connect(SocketAddrV4::new(LOCALHOST, port)).is_err(), "server {port} still listening");
    }
}

/// A SOCK_SEQPACKET listener at `path`, like a live server's.
fn seqpacket_listener(path: &Path) -> OwnedFd {
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain old data.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    assert!(bytes.len() < sa.sun_path.len());
    for (d, &b) in sa.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: sa is a valid sockaddr_un of the given size; fd is open.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of_val(&sa) as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind {}: {}", path.display(), std::io::Error::last_os_error());
    // SAFETY: plain listen(2) on our socket.
    assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 8) }, 0);
    fd
}

fn private_dir(dir: &Path) {
    std::fs::DirBuilder::new().mode(0o700).recursive(true).create(dir).unwrap();
}

#[test]
fn stale_socket_removed_live_socket_refused() {
    // Stale: a socket file nobody listens on (bound, then closed without
    // unlinking). The pair starts over it and links up through it.
    let pair = Pair::start_with(|dir, p, _| {
        private_dir(dir);
        let path = dir.join(format!("{p}.sock"));
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
    });
    assert_passed(&unary(pair.p, 10, 100), pair.p);

    // Live, same arguments: the second server fails and leaves the first
    // one's socket alone.
    let mut dup = TestServer::spawn("duplicate", server_args(pair.p, pair.q, &pair.dir));
    assert!(dup.wait_ready().is_err(), "a second server on {} became ready", pair.p);
    let st = dup.wait_exit(EXIT_TIMEOUT);
    assert!(!st.success(), "duplicate server exited with {st}");
    assert!(dup.stderr_text().to_lowercase().contains("error"), "no error on stderr: {:?}", dup.stderr_text());
    assert!(pair.sock(pair.p).exists(), "the live socket was removed");
    assert_passed(&unary(pair.q, 10, 100), pair.p);

    // Live, owned by another process on a free TCP port: the socket check
    // itself must refuse it (and not unlink it).
    let tmp = TempDir::new("live");
    let dir = tmp.path().join("d");
    private_dir(&dir);
    let x = free_pair();
    let path = dir.join(format!("{x}.sock"));
    let _live = seqpacket_listener(&path);
    let mut s = TestServer::spawn("over a live socket", server_args(x, x + 1, &dir));
    assert!(s.wait_ready().is_err(), "server started over a live socket");
    let st = s.wait_exit(EXIT_TIMEOUT);
    assert!(!st.success(), "exit status {st}");
    let err = s.stderr_text();
    assert!(err.to_lowercase().contains("error") && err.contains(&format!("{x}.sock")), "stderr: {err:?}");
    assert!(path.exists(), "the live socket was removed");
}

// ----------------------------------------------------------------- clients

/// `key=value` from a summary line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn c_client() {
    let tmp = TempDir::new("cc");
    let exe = tmp.path().join("cclient");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("csrc/cclient.c");
    let (st, out, err) = run_cmd(
        Command::new("cc").args(["-O2", "-Wall", "-std=c11", "-D_GNU_SOURCE", "-pthread", "-o"]).arg(&exe).arg(&src),
        Duration::from_secs(60),
    );
    assert!(st.success(), "compiling {} failed ({st}):\n{out}{err}", src.display());

    let mut pair = Pair::start();
    let p = pair.p.to_string();
    for mode in ["unary", "stream"] {
        let (st, out, err) = run_cmd(Command::new(&exe).args([mode, &p, "10", "100"]), Duration::from_secs(30));
        let line = out.lines().next().unwrap_or_default();
        assert!(st.success(), "cclient {mode}: {st}\n{out}{err}");
        assert!(line.starts_with(mode), "{line:?}");
        assert_eq!((field(line, "ok"), field(line, "errors"), field(line, "breaks")), ("1000", "0", "0"), "{line}");
        assert_eq!(field(line, "check"), xor_check(pair.p), "{line}");
    }
    // Peer down: responses stop alternating and the client says so.
    pair.b.kill();
    let (st, out, err) = run_cmd(Command::new(&exe).args(["unary", &p, "10", "100"]), Duration::from_secs(30));
    assert!(!st.success(), "cclient passed with one server: {out}{err}");
    let line = out.lines().next().unwrap_or_default();
    assert_eq!(field(line, "errors"), "0", "{line}");
    assert_ne!(field(line, "breaks"), "0", "{line}");
}

#[test]
fn cli_client_fails_without_server() {
    let port = free_pair().to_string();
    for mode in ["unary", "stream"] {
        let (st, out, err) = run_cmd(
            Command::new(bin()).args(["client", mode, "--port", &port, "--conns", "2", "--requests", "3"]),
            Duration::from_secs(30),
        );
        assert!(!st.success(), "client {mode} against nothing: {st}\n{out}{err}");
        assert!(out.starts_with(mode), "summary line: {out:?}");
        assert_eq!((field(&out, "ok"), field(&out, "errors")), ("0", "6"), "{out}");
    }
}
