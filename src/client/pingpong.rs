//! Pair-mode clients: `unary` and `stream`.
//!
//! Request: 1 byte length N (0..=255) then N payload bytes.
//! Response: ASCII `rsp from port: P\n`.
//! The two servers hand every connection back and forth after each request,
//! so per connection the reported ports must strictly alternate.
//!
//! Accounting (always `ok + errors + breaks == conns * requests`):
//! * `errors` — requests without a well-formed response (connect/IO failure,
//!   timeout, malformed line, EOF / short read, or never sent because the
//!   connection had already failed);
//! * `breaks` — well-formed responses that violate the port check;
//! * `ok` — the remaining well-formed responses.

use super::stats::{ErrLog, Latency, Summary};
use super::{connect, spawn, Gate, ShutdownBoth, Stream, Target};
use crate::service::pingpong::wire as proto;
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Options for `unary` / `stream`. `Default`: 127.0.0.1, no port, 100
/// connections of 1000 requests of 16 bytes (the command line's defaults).
#[derive(Debug, Clone)]
pub struct PingPongOpts {
    /// The server's host name or address (not used with `unix`).
    pub host: String,
    /// The server's TCP port (not used with `unix`).
    pub port: u16,
    /// Connections, each on its own thread.
    pub conns: usize,
    /// Requests per connection.
    pub requests: usize,
    /// Payload bytes per request (0..=255; larger values are clamped to 255).
    pub size: usize,
    /// Connect to the Unix stream socket at this path instead of
    /// `host:port` (`--unix PATH`).
    pub unix: Option<PathBuf>,
}

impl Default for PingPongOpts {
    fn default() -> Self {
        PingPongOpts { host: "127.0.0.1".into(), port: 0, conns: 100, requests: 1000, size: 16, unix: None }
    }
}

/// Longest response line accepted (`rsp from port: 65535\n` is 21 bytes).
const MAX_LINE: u64 = 64;
/// At most this many error details are logged per run.
const ERR_DETAILS: u64 = 5;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Unary,
    Stream,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Unary => "unary",
            Mode::Stream => "stream",
        }
    }
}

/// `conns` connections in parallel, each sending `requests` requests one at
/// a time (send, read the full response line, next).
pub fn unary(o: &PingPongOpts) -> Summary {
    run(o, Mode::Unary)
}

/// Each connection writes all `requests` requests in one `write_all`, then
/// reads all responses (5 s idle timeout; missing responses are errors).
pub fn stream(o: &PingPongOpts) -> Summary {
    run(o, Mode::Stream)
}

/// Parse one response line (including the trailing `\n`) into the port.
pub fn parse_response(line: &[u8]) -> Result<u16, String> {
    proto::parse_response(line).ok_or_else(|| format!("malformed response {:?}", String::from_utf8_lossy(line)))
}

/// Build one request: length byte + `size` payload bytes.
pub fn build_request(size: usize, seed: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..size.min(255)).map(|k| b'a' + ((seed + k) % 26) as u8).collect();
    proto::request(&payload)
}

/// Records the ports seen on connections; the verdict (`check=` label and
/// number of breaks) is computed once all connections are merged, because
/// whether the xor rule applies depends on the two ports seen overall.
///
/// ```
/// use handoff::client::pingpong::PortTrack;
///
/// let mut t = PortTrack::default();
/// t.new_conn();
/// for port in [7000, 7001, 7000, 7000] {
///     t.push(port);
/// }
/// let v = t.verdict();
/// assert_eq!((v.check.as_str(), v.breaks, v.total), ("xor(7000,7001)", 1, 4));
/// ```
#[derive(Default, Debug, Clone)]
pub struct PortTrack {
    /// Port of the first response of each connection -> count.
    first: HashMap<u16, u64>,
    /// (previous port, port) on the same connection -> count.
    trans: HashMap<(u16, u16), u64>,
    last: Option<u16>,
}

/// Outcome of the port check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `xor(a,b)`, `alternate(a,b)`, `alternate(a,-)` (one port seen) or `none`.
    pub check: String,
    /// Responses that broke the check (a foreign port, or one that does
    /// not alternate).
    pub breaks: u64,
    /// Responses recorded.
    pub total: u64,
}

impl PortTrack {
    /// Start a new connection (the next `push` is its first response).
    pub fn new_conn(&mut self) {
        self.last = None;
    }

    /// Record the next response port of the current connection.
    pub fn push(&mut self, port: u16) {
        match self.last {
            None => *self.first.entry(port).or_default() += 1,
            Some(l) => *self.trans.entry((l, port)).or_default() += 1,
        }
        self.last = Some(port);
    }

    /// Adds the counts of `o` (another connection's tracker, typically
    /// from another thread). Which connection is current does not change.
    pub fn merge(&mut self, o: &PortTrack) {
        for (&p, &n) in &o.first {
            *self.first.entry(p).or_default() += n;
        }
        for (&t, &n) in &o.trans {
            *self.trans.entry(t).or_default() += n;
        }
    }

    /// Decide the check and count violating responses.
    ///
    /// The pair (a, b) is the two most frequent ports overall. If `a ^ b == 1`
    /// every response after the first on a connection must satisfy
    /// `(port ^ last) == 1` (the seed's check) -> `xor(a,b)`. Otherwise each
    /// response must differ from the previous one -> `alternate(a,b)`. In both
    /// cases a response reporting a port other than a or b is a break.
    pub fn verdict(&self) -> Verdict {
        let mut counts: HashMap<u16, u64> = self.first.clone();
        for (&(_, p), &n) in &self.trans {
            *counts.entry(p).or_default() += n;
        }
        let total: u64 = counts.values().sum();
        let mut ranked: Vec<(u16, u64)> = counts.into_iter().collect();
        ranked.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
        let (a, b) = match ranked.as_slice() {
            [] => {
                return Verdict { check: "none".into(), breaks: 0, total };
            }
            [(a, _)] => {
                // A single port: only "same port twice in a row" can be judged.
                let breaks = self.trans.get(&(*a, *a)).copied().unwrap_or(0);
                return Verdict { check: format!("alternate({a},-)"), breaks, total };
            }
            [(x, _), (y, _), ..] => (*x.min(y), *x.max(y)),
        };
        let xor = a ^ b == 1;
        let foreign = |p: u16| p != a && p != b;
        let mut breaks: u64 = self.first.iter().filter(|(p, _)| foreign(**p)).map(|(_, n)| *n).sum();
        for (&(l, p), &n) in &self.trans {
            let bad = foreign(p) || if xor { (p ^ l) != 1 } else { p == l };
            if bad {
                breaks += n;
            }
        }
        let check = if xor { format!("xor({a},{b})") } else { format!("alternate({a},{b})") };
        Verdict { check, breaks, total }
    }
}

/// Per-connection (or merged) result.
#[derive(Default)]
struct ConnResult {
    /// Well-formed responses (ok + breaks, split later by the verdict).
    good: u64,
    errors: u64,
    ports: PortTrack,
    lat: Latency,
}

impl ConnResult {
    fn merge(&mut self, o: &ConnResult) {
        self.good += o.good;
        self.errors += o.errors;
        self.ports.merge(&o.ports);
        self.lat.merge(&o.lat);
    }
}

/// Read one `\n`-terminated line of at most MAX_LINE bytes into `buf`.
fn read_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> Result<(), String> {
    buf.clear();
    match io::Read::take(&mut *r, MAX_LINE).read_until(b'\n', buf) {
        Err(e) => Err(io_msg("read", &e)),
        Ok(_) if buf.last() == Some(&b'\n') => Ok(()),
        Ok(0) => Err("connection closed by peer (EOF)".into()),
        Ok(n) if n as u64 >= MAX_LINE => Err(format!("response line too long: {:?}", String::from_utf8_lossy(buf))),
        Ok(_) => Err(format!("short read: EOF after {:?}", String::from_utf8_lossy(buf))),
    }
}

fn io_msg(what: &str, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!("{what}: timed out ({e})"),
        _ => format!("{what}: {e}"),
    }
}

fn run(o: &PingPongOpts, mode: Mode) -> Summary {
    let errlog = Arc::new(ErrLog::new(ERR_DETAILS));
    if o.size > 255 {
        log::warn!("{}: size {} > 255, clamped to 255", mode.name(), o.size);
    }
    let mut total = ConnResult::default();
    let t0 = Instant::now();
    let mut secs = 0.0;
    match Target::new(&o.host, o.port, o.unix.as_deref()) {
        Err(e) => {
            errlog.report(format_args!("{}: resolve {}:{}: {e}", mode.name(), o.host, o.port));
            total.errors = o.conns as u64 * o.requests as u64;
        }
        Ok(target) => {
            let gate = Arc::new(Gate::default());
            let mut handles = Vec::with_capacity(o.conns);
            for c in 0..o.conns {
                let (gate2, errlog2, target) = (gate.clone(), errlog.clone(), target.clone());
                let (requests, size) = (o.requests, o.size);
                let h = spawn(format!("{}-{c}", mode.name()), move || {
                    conn_main(&target, c, requests, size, mode, &gate2, &errlog2)
                });
                match h {
                    Ok(h) => handles.push(h),
                    Err(e) => {
                        errlog.report(format_args!("conn {c}: spawn thread: {e}"));
                        total.errors += o.requests as u64;
                    }
                }
            }
            gate.open_when(handles.len());
            let start = Instant::now();
            for h in handles {
                match h.join() {
                    Ok(r) => total.merge(&r),
                    Err(_) => {
                        errlog.report(format_args!("{}: connection thread panicked", mode.name()));
                        total.errors += o.requests as u64;
                    }
                }
            }
            secs = start.elapsed().as_secs_f64();
        }
    }
    if secs == 0.0 {
        secs = t0.elapsed().as_secs_f64();
    }
    let v = total.ports.verdict();
    debug_assert_eq!(v.total, total.good);
    if v.breaks > 0 {
        log::warn!("{}: {} responses broke the {} check", mode.name(), v.breaks, v.check);
    }
    Summary::new(
        mode.name(),
        o.conns,
        o.requests,
        None,
        total.good - v.breaks.min(total.good),
        total.errors,
        v.breaks,
        v.check,
        secs,
        &total.lat,
    )
}

/// One connection: connect, wait at the gate, then run the mode.
fn conn_main(
    target: &Target,
    c: usize,
    requests: usize,
    size: usize,
    mode: Mode,
    gate: &Gate,
    errlog: &ErrLog,
) -> ConnResult {
    let mut r = ConnResult::default();
    r.ports.new_conn();
    let sock = connect(target);
    gate.arrive_and_wait();
    let sock = match sock {
        Ok(s) => s,
        Err(e) => {
            errlog.report(format_args!("conn {c}: connect {target}: {e}"));
            r.errors = requests as u64;
            return r;
        }
    };
    // One match per connection; each arm runs code made for its stream type.
    let res = match (mode, sock) {
        (Mode::Unary, Stream::Tcp(s)) => unary_conn(s, requests, size, &mut r),
        (Mode::Unary, Stream::Unix(s)) => unary_conn(s, requests, size, &mut r),
        (Mode::Stream, Stream::Tcp(s)) => stream_conn(s, requests, size, &mut r),
        (Mode::Stream, Stream::Unix(s)) => stream_conn(s, requests, size, &mut r),
    };
    if let Err(msg) = res {
        errlog.report(format_args!("conn {c}: {msg}"));
    }
    debug_assert_eq!(r.good + r.errors, requests as u64);
    r
}

fn unary_conn<S>(sock: S, requests: usize, size: usize, r: &mut ConnResult) -> Result<(), String>
where
    for<'a> &'a S: Read + Write,
{
    let mut w = &sock;
    let mut rd = BufReader::with_capacity(256, &sock);
    let req = build_request(size, 0);
    let mut line = Vec::with_capacity(MAX_LINE as usize);
    for i in 0..requests {
        let t = Instant::now();
        let res = w
            .write_all(&req)
            .map_err(|e| io_msg("write", &e))
            .and_then(|()| read_line(&mut rd, &mut line))
            .and_then(|()| parse_response(&line));
        match res {
            Ok(port) => {
                r.lat.record(t.elapsed());
                r.ports.push(port);
                r.good += 1;
            }
            Err(msg) => {
                r.errors += (requests - i) as u64;
                return Err(format!("request {i}/{requests}: {msg}"));
            }
        }
    }
    Ok(())
}

fn stream_conn<S: ShutdownBoth + Sync>(sock: S, requests: usize, size: usize, r: &mut ConnResult) -> Result<(), String>
where
    for<'a> &'a S: Read + Write,
{
    let one = build_request(size, 0);
    let mut all = Vec::with_capacity(one.len() * requests);
    for _ in 0..requests {
        all.extend_from_slice(&one);
    }
    // The single write runs on its own thread so that a large batch cannot
    // deadlock against responses filling our receive buffer.
    std::thread::scope(|s| {
        let start = Instant::now();
        let writer = std::thread::Builder::new().stack_size(64 * 1024).spawn_scoped(s, || (&sock).write_all(&all));
        let writer = match writer {
            Ok(h) => h,
            Err(e) => {
                r.errors += requests as u64;
                return Err(format!("spawn writer thread: {e}"));
            }
        };
        let mut rd = BufReader::with_capacity(16 * 1024, &sock);
        let mut line = Vec::with_capacity(MAX_LINE as usize);
        let mut result = Ok(());
        for i in 0..requests {
            match read_line(&mut rd, &mut line).and_then(|()| parse_response(&line)) {
                Ok(port) => {
                    r.lat.record(start.elapsed());
                    r.ports.push(port);
                    r.good += 1;
                }
                Err(msg) => {
                    r.errors += (requests - i) as u64;
                    result = Err(format!("response {i}/{requests}: {msg}"));
                    // Unblock a writer stuck on a full send buffer.
                    sock.shutdown_both();
                    break;
                }
            }
        }
        let wres = match writer.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io_msg("write", &e)),
            Err(_) => Err("writer thread panicked".to_string()),
        };
        match (result, wres) {
            (Ok(()), w) => w,
            (Err(m), Ok(())) => Err(m),
            (Err(m), Err(w)) => Err(format!("{m} ({w})")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_ok() {
        assert_eq!(parse_response(b"rsp from port: 7000\n"), Ok(7000));
        assert_eq!(parse_response(b"rsp from port: 0\n"), Ok(0));
        assert_eq!(parse_response(b"rsp from port: 65535\n"), Ok(65535));
    }

    #[test]
    fn parse_bad() {
        for l in [
            &b"rsp from port: 65536\n"[..],
            b"rsp from port: 7000",
            b"rsp from port: 7000\r\n",
            b"rsp from port: \n",
            b"rsp from port:7000\n",
            b"rsp from port: 07000\n",
            b"rsp from port: +7000\n",
            b"rsp from port: 7000 \n",
            b"rsp from port: 123456\n",
            b"RSP from port: 7000\n",
            b"\n",
            b"",
        ] {
            assert!(parse_response(l).is_err(), "{:?}", String::from_utf8_lossy(l));
        }
    }

    #[test]
    fn request_bytes() {
        assert_eq!(build_request(0, 0), vec![0]);
        let r = build_request(3, 0);
        assert_eq!(r, vec![3, b'a', b'b', b'c']);
        assert_eq!(build_request(300, 0).len(), 256);
        assert_eq!(build_request(300, 0)[0], 255);
    }

    fn track(conns: &[&[u16]]) -> PortTrack {
        let mut all = PortTrack::default();
        for c in conns {
            let mut t = PortTrack::default();
            t.new_conn();
            for &p in *c {
                t.push(p);
            }
            all.merge(&t);
        }
        all
    }

    #[test]
    fn verdict_xor() {
        let v = track(&[&[7000, 7001, 7000, 7001], &[7001, 7000]]).verdict();
        assert_eq!(v, Verdict { check: "xor(7000,7001)".into(), breaks: 0, total: 6 });
    }

    #[test]
    fn verdict_alternate() {
        let v = track(&[&[7002, 7000, 7002], &[7000, 7002, 7000]]).verdict();
        assert_eq!(v, Verdict { check: "alternate(7000,7002)".into(), breaks: 0, total: 6 });
        // 7001 ^ 7002 = 3 -> alternate
        let v = track(&[&[7001, 7002, 7001]]).verdict();
        assert_eq!(v.check, "alternate(7001,7002)");
        assert_eq!(v.breaks, 0);
    }

    #[test]
    fn verdict_breaks() {
        // repeat on the same connection
        let v = track(&[&[7000, 7000, 7001, 7001], &[7001, 7000]]).verdict();
        assert_eq!(v.check, "xor(7000,7001)");
        assert_eq!(v.breaks, 2);
        // a third port: the response itself and (xor rule) the next one break
        let v = track(&[&[7000, 7001, 7000, 7001], &[7000, 7005, 7000]]).verdict();
        assert_eq!(v.check, "xor(7000,7001)");
        assert_eq!(v.breaks, 2);
        // alternate mode: foreign port breaks, coming back from it does not
        let v = track(&[&[7000, 7002, 7000, 7002], &[7000, 9999, 7000]]).verdict();
        assert_eq!(v.check, "alternate(7000,7002)");
        assert_eq!(v.breaks, 1);
        // foreign port as first response of a connection
        let v = track(&[&[7000, 7002, 7000, 7002], &[9999]]).verdict();
        assert_eq!(v.breaks, 1);
        // no alternation at all, two ports: every repeat breaks
        let v = track(&[&[7000, 7000, 7000], &[7002, 7002]]).verdict();
        assert_eq!(v.check, "alternate(7000,7002)");
        assert_eq!(v.breaks, 3);
    }

    #[test]
    fn verdict_single_and_empty() {
        let v = track(&[&[7000], &[7000]]).verdict();
        assert_eq!(v, Verdict { check: "alternate(7000,-)".into(), breaks: 0, total: 2 });
        let v = track(&[&[7000, 7000, 7000]]).verdict();
        assert_eq!(v.breaks, 2);
        let v = track(&[]).verdict();
        assert_eq!(v, Verdict { check: "none".into(), breaks: 0, total: 0 });
    }

    #[test]
    fn line_reader() {
        let mut b = Vec::new();
        let mut r = &b"rsp from port: 1\nrsp from port: 2\nrsp fr"[..];
        assert!(read_line(&mut r, &mut b).is_ok());
        assert_eq!(parse_response(&b), Ok(1));
        assert!(read_line(&mut r, &mut b).is_ok());
        assert_eq!(parse_response(&b), Ok(2));
        assert!(read_line(&mut r, &mut b).unwrap_err().contains("short read"));
        assert!(read_line(&mut r, &mut b).unwrap_err().contains("EOF"));
        let long = [b'x'; 100];
        let mut r = &long[..];
        assert!(read_line(&mut r, &mut b).unwrap_err().contains("too long"));
    }
}
