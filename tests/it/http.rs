//! The HTTP example (`examples/http`) on handoff's topologies, driven with
//! raw sockets (and curl): keep-alive, pipelining, chunked bodies, the
//! refusals, X-Handoff across workers, a hot restart under keep-alive load
//! and a pair.
use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::cluster_support::*;
use crate::support::*;

/// The example binary: `target/<profile>/examples/http`, next to the
/// profile directory of this test binary (`cargo test` builds examples;
/// `make test` builds release). `HANDOFF_HTTP_BIN` overrides it.
pub fn http_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HANDOFF_HTTP_BIN") {
        return p.into();
    }
    example_bin("http")
}

/// An example binary: `target/<profile>/examples/NAME`, next to the
/// profile directory of this test binary.
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/it-HASH
    let profile = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let p = profile.join("examples").join(name);
    assert!(p.exists(), "{} is missing: cargo build --release --examples", p.display());
    crate::support::wrapped(&p)
}

/// `http cluster --port 0 --workers 2 --dir D EXTRA...`
fn cluster(extra: &[&str]) -> Cluster {
    Cluster::start_with(2, extra, http_bin().as_os_str(), |_| {})
}

/// `http restart --dir D`: returns the new generation, checked against
/// status (which also shows Drop the new processes).
#[track_caller]
fn restart(c: &Cluster) -> u64 {
    let mut cmd = Command::new(http_bin());
    cmd.arg("restart").arg("--dir").arg(&c.dir);
    let (st, out, err) = run_cmd(&mut cmd, RESTART_TIMEOUT);
    let _ = c.try_status(Duration::from_secs(2));
    assert!(
        st.success(),
        "http restart failed: {st}\nstdout: {out}\nstderr: {err}\n--- master stderr ---\n{}",
        c.server.stderr_text()
    );
    let (gen, pid) = parse_restarted(&out);
    assert_eq!(c.master_pid(), pid, "status after restart");
    gen
}

// ------------------------------------------------------------------ client

/// One response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What X-Handoff says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    Worker { index: u64, pid: u64, gen: u64 },
    Pair { port: u16, pid: u64 },
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Parses X-Handoff (panics if it is missing or malformed).
    #[track_caller]
    pub fn who(&self) -> Who {
        let v = self.header("X-Handoff").unwrap_or_else(|| panic!("no X-Handoff: {self:?}"));
        let field = |k: &str| v.split(' ').find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse::<u64>().ok());
        match (field("worker"), field("port"), field("pid"), field("gen")) {
            (Some(index), None, Some(pid), Some(gen)) if v.split(' ').count() == 3 => Who::Worker { index, pid, gen },
            (None, Some(port), Some(pid), None) if v.split(' ').count() == 2 => Who::Pair { port: port as u16, pid },
            _ => panic!("malformed X-Handoff {v:?}"),
        }
    }

    /// The generation of the worker that answered.
    #[track_caller]
    pub fn gen(&self) -> u64 {
        match self.who() {
            Who::Worker { gen, .. } => gen,
            w => panic!("not a worker: {w:?}"),
        }
    }

    #[track_caller]
    pub fn assert_hello(&self) {
        assert_eq!(self.status, 200, "{self:?}");
        assert_eq!(self.body, b"hello\n", "{self:?}");
        assert_eq!(self.header("Content-Type"), Some("text/plain"), "{self:?}");
        assert_eq!(self.header("Content-Length"), Some("6"), "{self:?}");
    }
}

/// A blocking HTTP/1.1 client connection.
pub struct Client {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let s = TcpStream::connect(SocketAddrV4::new(LOCALHOST, port))
            .unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Client { s, buf: Vec::new() }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes).unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn try_send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.s.write_all(bytes).map_err(|e| format!("write: {e}"))
    }

    /// The next final response (1xx skipped), its body read by
    /// Content-Length (none when `head_only`); `None` on a clean EOF.
    pub fn try_recv(&mut self, head_only: bool) -> Result<Option<Resp>, String> {
        loop {
            let mut fields = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut fields);
            match r.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = r.code.unwrap_or(0);
                    let headers: Vec<(String, String)> = r
                        .headers
                        .iter()
                        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                        .collect();
                    if (100..200).contains(&status) {
                        self.buf.drain(..n);
                        continue;
                    }
                    let cl = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length"));
                    let len: usize = match (head_only, cl) {
                        (true, _) => 0,
                        (false, Some((_, v))) => v.parse().map_err(|_| format!("Content-Length {v:?}"))?,
                        (false, None) => return Err(format!("no Content-Length: {headers:?}")),
                    };
                    while self.buf.len() < n + len {
                        if self.fill()? == 0 {
                            return Err(format!("EOF inside a body ({} of {len} bytes)", self.buf.len() - n));
                        }
                    }
                    let body = self.buf[n..n + len].to_vec();
                    self.buf.drain(..n + len);
                    return Ok(Some(Resp { status, headers, body }));
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(format!("bad response ({e}): {:?}", String::from_utf8_lossy(&self.buf))),
            }
            if self.fill()? == 0 {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(format!("EOF inside a response head: {:?}", String::from_utf8_lossy(&self.buf))),
                };
            }
        }
    }

    fn fill(&mut self) -> Result<usize, String> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.s.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    #[track_caller]
    pub fn recv(&mut self) -> Resp {
        self.recv_as(false)
    }

    #[track_caller]
    pub fn recv_as(&mut self, head_only: bool) -> Resp {
        match self.try_recv(head_only) {
            Ok(Some(r)) => r,
            Ok(None) => panic!("EOF where a response was expected"),
            Err(e) => panic!("{e}"),
        }
    }

    #[track_caller]
    pub fn get(&mut self, path: &str) -> Resp {
        self.send(&get(path));
        self.recv()
    }

    /// The server closes: EOF (or a reset) and nothing more.
    #[track_caller]
    pub fn assert_closed(&mut self) {
        match self.try_recv(false) {
            Ok(None) => {}
            Err(e) if e.contains("reset") => {}
            other => panic!("expected the connection closed, got {other:?}"),
        }
    }
}

pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").into_bytes()
}

pub fn post(body: &[u8]) -> Vec<u8> {
    let mut v = format!("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    v.extend_from_slice(body);
    v
}

pub fn post_chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut v = b"POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for c in body.chunks(chunk) {
        v.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        v.extend_from_slice(c);
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(b"0\r\n\r\n");
    v
}

#[track_caller]
fn assert_echo(r: &Resp, body: &[u8]) {
    assert_eq!(r.status, 200, "{:?}", r.header("X-Handoff"));
    assert_eq!(r.header("Content-Length"), Some(body.len().to_string().as_str()));
    assert!(r.body == body, "echo differs: {} bytes back for {}", r.body.len(), body.len());
}

// ------------------------------------------------------------- the checks
// Each takes the port of a running HTTP service (cluster or not).

/// Keep-alive GET/HEAD/POST on one connection, answered by one process.
pub fn check_keepalive(port: u16) -> Resp {
    let mut c = Client::connect(port);
    let first = c.get("/");
    first.assert_hello();
    assert_eq!(first.header("Connection"), None, "HTTP/1.1 keep-alive says nothing: {first:?}");
    for i in 0..20 {
        let r = c.get(&format!("/path/{i}?q={i}"));
        r.assert_hello();
        assert_eq!(r.header("X-Handoff"), first.header("X-Handoff"), "request {i}");
    }
    c.send(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n");
    let h = c.recv_as(true);
    assert_eq!((h.status, h.header("Content-Length")), (200, Some("6")), "{h:?}");
    assert_eq!(h.header("Content-Type"), Some("text/plain"));
    c.send(&post(b"after HEAD"));
    assert_echo(&c.recv(), b"after HEAD");
    first
}

/// Several requests in one write, answered in order; a chunked body sent
/// in pieces; a large body.
pub fn check_pipelining_and_bodies(port: u16) {
    let mut c = Client::connect(port);
    let mut batch = get("/1");
    batch.extend_from_slice(b"HEAD /2 HTTP/1.1\r\n\r\n");
    batch.extend(post(b"three"));
    batch.extend(post_chunked(b"four, in chunks", 4));
    batch.extend_from_slice(b"PUT /5 HTTP/1.1\r\nContent-Length: 4\r\n\r\nfive");
    batch.extend(get("/6"));
    c.send(&batch);
    c.recv().assert_hello();
    assert_eq!(c.recv_as(true).status, 200);
    assert_echo(&c.recv(), b"three");
    assert_echo(&c.recv(), b"four, in chunks");
    assert_echo(&c.recv(), b"five");
    c.recv().assert_hello();

    // A chunked body trickling in, cut mid-size-line and mid-chunk.
    let body: Vec<u8> = (0..3000u32).map(|i| (i * 31 % 251) as u8).collect();
    let req = post_chunked(&body, 700);
    let mut rng = Rng::from_time();
    let mut at = 0;
    while at < req.len() {
        let n = 1 + rng.below(300) as usize;
        let end = (at + n).min(req.len());
        c.send(&req[at..end]);
        at = end;
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_echo(&c.recv(), &body);

    // Large bodies, both framings, then the connection still works.
    let big: Vec<u8> = (0..600_000u32).map(|i| (i % 253) as u8).collect();
    c.send(&post(&big));
    assert_echo(&c.recv(), &big);
    c.send(&post_chunked(&big, 32 * 1024));
    assert_echo(&c.recv(), &big);
    c.get("/").assert_hello();
}

/// Sends `req` after a good request; expects 200, then `status` with
/// Connection: close, X-Handoff and Content-Length, then the close.
#[track_caller]
pub fn check_refused(port: u16, req: &[u8], status: u16) {
    let mut c = Client::connect(port);
    c.get("/").assert_hello();
    c.send(req);
    let r = c.recv();
    let what = String::from_utf8_lossy(&req[..req.len().min(60)]).into_owned();
    assert_eq!(r.status, status, "{what:?}: {r:?}");
    assert_eq!(r.header("Connection"), Some("close"), "{what:?}: {r:?}");
    assert!(r.header("X-Handoff").is_some(), "{what:?}: {r:?}");
    assert_eq!(r.header("Content-Length"), Some(r.body.len().to_string().as_str()), "{what:?}");
    c.assert_closed();
}

pub fn check_refusals(port: u16) {
    check_refused(port, b"GET / HTTP/1.1 junk\r\n\r\n", 400);
    check_refused(port, b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n", 400);
    check_refused(port, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400);
    check_refused(port, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nnot-hex\r\n", 400);
    check_refused(port, b"DELETE /x HTTP/1.1\r\nHost: t\r\n\r\n", 501);
    check_refused(port, b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n", 501);
    // Over --max-body (1 MiB): refused on the head, before any body.
    check_refused(port, b"POST / HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n", 413);
    check_refused(port, b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", 413);
    check_refused(port, b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n100001\r\n", 413);
    // A head reaching 16 KiB unfinished. (Exactly 16 KiB: the server has
    // read every byte when it closes, so no reset can eat the 431.)
    let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
    big.resize(16 * 1024, b'b');
    check_refused(port, &big, 431);
    // Exactly 1 MiB is fine.
    let mut c = Client::connect(port);
    let body = vec![b'm'; 1 << 20];
    c.send(&post(&body));
    assert_echo(&c.recv(), &body);
}

/// `Connection: close`, HTTP/1.0 with and without keep-alive.
pub fn check_connection_header(port: u16) {
    let mut c = Client::connect(port);
    c.send(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let r = c.recv();
    r.assert_hello();
    assert_eq!(r.header("Connection"), Some("close"));
    c.assert_closed();

    let mut c = Client::connect(port);
    c.send(b"GET / HTTP/1.0\r\n\r\n");
    let r = c.recv();
    r.assert_hello();
    assert_eq!(r.header("Connection"), Some("close"));
    c.assert_closed();

    let mut c = Client::connect(port);
    for _ in 0..3 {
        c.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let r = c.recv();
        r.assert_hello();
        assert_eq!(r.header("Connection"), Some("keep-alive"));
    }
    c.send(b"POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\nbye");
    let r = c.recv();
    assert_echo(&r, b"bye");
    assert_eq!(r.header("Connection"), Some("close"));
    c.assert_closed();

    // Requests pipelined after Connection: close are not answered.
    let mut c = Client::connect(port);
    let mut batch = get("/1");
    batch.extend_from_slice(b"GET /2 HTTP/1.1\r\nConnection: close\r\n\r\n");
    batch.extend(get("/3"));
    c.send(&batch);
    c.recv().assert_hello();
    assert_eq!(c.recv().header("Connection"), Some("close"));
    c.assert_closed();
}

/// curl: two GETs on one connection, HEAD, a chunked upload, a 501.
pub fn check_curl(port: u16) {
    let curl = |args: &[&str]| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10"]).args(args);
        run_cmd(&mut cmd, Duration::from_secs(20))
    };
    let url = format!("http://127.0.0.1:{port}/");
    let (st, out, err) = curl(&["-i", &url, &format!("{url}again")]);
    assert!(st.success(), "curl: {st}: {err}");
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert_eq!(out.matches("\r\n\r\nhello\n").count(), 2, "{out}");
    assert_eq!(out.matches("X-Handoff: ").count(), 2, "{out}");
    assert!(!err.contains("Connection died"), "{err}");

    let (st, out, err) = curl(&["-I", &url]);
    assert!(st.success(), "curl -I: {st}: {err}");
    assert!(out.contains("Content-Length: 6\r\n"), "{out}");

    let tmp = TempDir::new("curl");
    let file = tmp.path().join("body");
    let body: String = (0..20_000).map(|i| format!("{i},")).collect();
    std::fs::write(&file, &body).unwrap();
    let data = format!("@{}", file.display());
    let (st, out, err) =
        curl(&["-H", "Transfer-Encoding: chunked", "-H", "Content-Type: text/plain", "--data-binary", &data, &url]);
    assert!(st.success(), "curl chunked upload: {st}: {err}");
    assert!(out == body, "curl chunked upload: {} bytes back for {}", out.len(), body.len());
    let (st, out, err) = curl(&["-X", "PUT", "--data-binary", &data, &url]);
    assert!(st.success() && out == body, "curl PUT: {st}: {err}");

    let (st, out, err) = curl(&["-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE", &url]);
    assert!(st.success(), "curl -X DELETE: {st}: {err}");
    assert_eq!(out, "501");
}

fn have_curl() -> bool {
    Command::new("curl").arg("--version").output().is_ok_and(|o| o.status.success())
}

// ------------------------------------------------------------------ tests

#[test]
fn http_keepalive_connections_land_on_both_workers() {
    let c = cluster(&[]);
    let pids: Vec<u64> = c.worker_pids().into_iter().map(|p| p as u64).collect();
    let mut seen = HashSet::new();
    // Round-robin: connection k goes to worker k mod 2.
    for _ in 0..6 {
        let first = check_keepalive(c.port);
        let Who::Worker { index, pid, gen } = first.who() else { panic!("{first:?}") };
        assert_eq!(gen, 1);
        assert!(index < 2, "{first:?}");
        assert_eq!(pids.get(index as usize), Some(&pid), "X-Handoff pid vs status {pids:?}");
        seen.insert(index);
    }
    assert_eq!(seen.len(), 2, "six connections all answered by one worker");
}

#[test]
fn http_pipelining_and_chunked_bodies() {
    let c = cluster(&[]);
    check_pipelining_and_bodies(c.port);
}

#[test]
fn http_refusals_400_413_431_501_then_close() {
    let c = cluster(&[]);
    check_refusals(c.port);
}

#[test]
fn http_connection_close_and_http10() {
    let c = cluster(&[]);
    check_connection_header(c.port);
}

#[test]
fn http_max_body_flag() {
    let c = cluster(&["--max-body", "1000"]);
    let mut conn = Client::connect(c.port);
    let at = vec![b'a'; 1000];
    conn.send(&post(&at));
    assert_echo(&conn.recv(), &at);
    conn.send(&post_chunked(&at, 300));
    assert_echo(&conn.recv(), &at);
    check_refused(c.port, b"POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n", 413);
    check_refused(c.port, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n", 413);
}

#[test]
fn http_with_curl() {
    if !have_curl() {
        eprintln!("http_with_curl: no curl here, skipped");
        return;
    }
    let c = cluster(&[]);
    check_curl(c.port);
}

#[test]
fn http_restart_under_keepalive_load_fails_no_request() {
    const CONNS: usize = 20;
    let c = cluster(&[]);
    let old_master = c.master_pid();
    let stop = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
    let counts: Vec<AtomicU64> = (0..CONNS).map(|_| AtomicU64::new(0)).collect();
    let on_gen2: Vec<AtomicBool> = (0..CONNS).map(|_| AtomicBool::new(false)).collect();
    let mut conns: Vec<Client> = (0..CONNS).map(|_| Client::connect(c.port)).collect();
    let results: Vec<Result<Vec<u64>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(ci, conn)| {
                let (stop, failed, count, on_gen2) = (&stop, &failed, &counts[ci], &on_gen2[ci]);
                s.spawn(move || {
                    // Odd connections pipeline three requests at a time.
                    let depth = if ci % 2 == 1 { 3 } else { 1 };
                    let mut gens: Vec<u64> = Vec::new(); // each change of generation
                    let res = (|| {
                        let mut n = 0u64;
                        while !stop.load(Ordering::Relaxed) && !failed.load(Ordering::Relaxed) {
                            let mut batch = Vec::new();
                            for k in 0..depth {
                                batch.extend(get(&format!("/c{ci}/r{}", n + k)));
                            }
                            conn.try_send(&batch).map_err(|e| format!("request {n}: {e}"))?;
                            for k in 0..depth {
                                let r = match conn.try_recv(false) {
                                    Ok(Some(r)) => r,
                                    Ok(None) => return Err(format!("request {}: EOF", n + k)),
                                    Err(e) => return Err(format!("request {}: {e}", n + k)),
                                };
                                if r.status != 200 || r.body != b"hello\n" {
                                    return Err(format!("request {}: {r:?}", n + k));
                                }
                                let g = r.gen();
                                if gens.last() != Some(&g) {
                                    gens.push(g);
                                }
                                on_gen2.store(g == 2, Ordering::Relaxed);
                            }
                            n += depth;
                            count.store(n, Ordering::Relaxed);
                        }
                        Ok(gens)
                    })();
                    if res.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    res.map_err(|e| format!("connection {ci}: {e}"))
                })
            })
            .collect();
        let all = |what: &str, cond: &dyn Fn(usize) -> bool| {
            let ok = poll_until(Duration::from_secs(20), || failed.load(Ordering::Relaxed) || (0..CONNS).all(cond));
            assert!(ok, "not every connection {what} within 20 s");
        };
        all("sent 20 requests", &|i| counts[i].load(Ordering::Relaxed) >= 20);
        if !failed.load(Ordering::Relaxed) {
            let gen = restart(&c);
            assert_eq!(gen, 2);
            all("reached generation 2", &|i| on_gen2[i].load(Ordering::Relaxed));
            let after: Vec<u64> = counts.iter().map(|n| n.load(Ordering::Relaxed)).collect();
            all("sent 20 more requests", &|i| counts[i].load(Ordering::Relaxed) >= after[i] + 20);
        }
        stop.store(true, Ordering::Relaxed);
        handles.into_iter().map(|h| h.join().expect("connection thread")).collect()
    });
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(errors.is_empty(), "{} connection(s) failed; first: {:?}", errors.len(), &errors[..errors.len().min(5)]);
    for (ci, r) in results.iter().enumerate() {
        assert_eq!(r.as_ref().unwrap(), &[1, 2], "connection {ci}: generations seen, in order");
    }
    let total: u64 = counts.iter().map(|n| n.load(Ordering::Relaxed)).sum();
    eprintln!("http restart: {total} requests over {CONNS} keep-alive connections, none failed");
    let ok = poll_until(EXIT_TIMEOUT, || !pid_alive(old_master));
    assert!(ok, "the old master {old_master} is still alive");
}

#[test]
fn http_pair_alternates_between_the_two_servers() {
    let tmp = TempDir::new("hpair");
    let dir = tmp.path().join("d");
    let p = free_pair();
    let q = p + 1;
    let start = |port: u16, peer: u16| {
        let mut cmd = Command::new(http_bin());
        cmd.args(server_args(port, peer, &dir));
        let s = TestServer::start_cmd(&format!("http server {port}"), cmd);
        assert!(s.ready.starts_with(&format!("ready port={port} ")), "readiness line {:?}", s.ready);
        s
    };
    let _a = start(p, q);
    let _b = start(q, p);
    // One keep-alive connection moves after each request; wait until both
    // servers hand off (P, Q, P), then every response alternates.
    let mut c = Client::connect(p);
    let port_of = |r: &Resp| match r.who() {
        Who::Pair { port, .. } => port,
        w => panic!("not a pair server: {w:?}"),
    };
    let mut seen = Vec::new();
    let linked = poll_until(Duration::from_secs(10), || {
        let r = c.get("/");
        r.assert_hello();
        seen.push(port_of(&r));
        seen.ends_with(&[p, q, p])
    });
    assert!(linked, "servers {p} and {q} did not link up: ports {seen:?}");
    let mut ports = Vec::new();
    for i in 0..10 {
        let r = if i % 3 == 2 {
            c.send(&post(b"moved"));
            let r = c.recv();
            assert_echo(&r, b"moved");
            r
        } else {
            c.get("/")
        };
        ports.push(port_of(&r));
    }
    assert_alternates(&ports, q, p);
}
