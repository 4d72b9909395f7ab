//! Cluster-mode RPC client.
//!
//! Frame: u32 little-endian length, then that many bytes of JSON.
//! Request `{"in":"ping","params":X}` -> reply `{"out":"pong","result":X}`
//! with X echoed exactly (compared as `serde_json::Value`).
//!
//! * keep-alive: `conns` connections, each doing `requests` sequential
//!   request/response round trips, all driven by one event loop
//!   (`client::evented`);
//! * `short`: `conns` threads ("connection slots"), each doing `requests`
//!   times connect / send / read reply / close. Latency then includes connect.
//!
//! Accounting: `ok + errors == conns * requests`. An IO or framing error on a
//! keep-alive connection ends it and counts all its remaining requests as
//! errors; a well-framed but wrong reply is one error and the connection
//! continues.

use super::stats::{ErrLog, Latency, Summary};
use super::{connect, spawn, Gate, Stream, Target};
use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Options for `rpc`. `Default`: 127.0.0.1, no port, 100 keep-alive
/// connections of 1000 requests (the command line's defaults).
#[derive(Debug, Clone)]
pub struct RpcOpts {
    /// The server's host name or address (not used with `unix`).
    pub host: String,
    /// The server's TCP port (not used with `unix`).
    pub port: u16,
    /// Keep-alive connections (all on one event loop), or with `short`
    /// connection slots (one thread each).
    pub conns: usize,
    /// Requests per connection (per connection slot with `short`).
    pub requests: usize,
    /// One request per connection.
    pub short: bool,
    /// Node mode: send relays to (node, worker) instead of pings.
    pub relay: Option<(String, usize)>,
    /// Connect to the Unix stream socket at this path instead of
    /// `host:port` (`--unix PATH`).
    pub unix: Option<PathBuf>,
}

impl Default for RpcOpts {
    fn default() -> Self {
        RpcOpts { host: "127.0.0.1".into(), port: 0, conns: 100, requests: 1000, short: false, relay: None, unix: None }
    }
}

/// Reply frames larger than this are an error.
pub const MAX_REPLY: usize = 16 * 1024 * 1024;
const ERR_DETAILS: u64 = 5;

/// A failure while talking to the server.
#[derive(Debug)]
pub enum RpcError {
    /// Transport-level problem: the connection is no longer usable.
    Fatal(String),
    /// A complete frame arrived but was not the expected reply.
    Reply(String),
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RpcError::Fatal(m) | RpcError::Reply(m) => f.write_str(m),
        }
    }
}

fn io_err(what: &str, e: &io::Error) -> RpcError {
    RpcError::Fatal(match e.kind() {
        io::ErrorKind::UnexpectedEof => format!("{what}: connection closed by peer (EOF)"),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!("{what}: timed out ({e})"),
        _ => format!("{what}: {e}"),
    })
}

/// The params value used for request `i` of connection slot `c`.
pub fn params(c: usize, i: usize) -> Value {
    json!({"c": c, "i": i})
}

/// Encode one frame: u32 LE length + JSON body.
pub fn encode_frame(v: &Value) -> Vec<u8> {
    let body = serde_json::to_vec(v).expect("serialize json");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Encode the ping request carrying `params`.
pub fn ping_frame(params: &Value) -> Vec<u8> {
    encode_frame(&json!({"in": "ping", "params": params}))
}

/// Read one frame body into `buf` (limit `MAX_REPLY`).
pub fn read_frame<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> Result<(), RpcError> {
    let mut hdr = [0u8; 4];
    r.read_exact(&mut hdr).map_err(|e| io_err("read header", &e))?;
    let len = u32::from_le_bytes(hdr) as usize;
    if len > MAX_REPLY {
        return Err(RpcError::Fatal(format!("reply frame of {len} bytes exceeds {MAX_REPLY}")));
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf).map_err(|e| io_err("read body", &e))
}

/// Check that `body` is `{"out":"pong","result":<expected>}`.
pub fn check_reply(body: &[u8], expected: &Value) -> Result<(), RpcError> {
    let shown = || {
        let s = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        if body.len() > 200 {
            s + "..."
        } else {
            s
        }
    };
    let v: Value =
        serde_json::from_slice(body).map_err(|e| RpcError::Reply(format!("reply is not JSON ({e}): {}", shown())))?;
    let ok = v.get("out").and_then(Value::as_str) == Some("pong") && v.get("result") == Some(expected);
    if ok {
        Ok(())
    } else {
        Err(RpcError::Reply(format!("unexpected reply {} (expected pong with result {expected})", shown())))
    }
}

/// Encode the relay request carrying `msg` to worker `worker` of `node`.
pub fn relay_frame(node: &str, worker: usize, msg: &Value) -> Vec<u8> {
    encode_frame(&json!({"in": "relay", "params": {"node": node, "worker": worker, "msg": msg}}))
}

/// Check that `body` is `{"out":"relayed","result":{"node":node,"worker":worker,"pid":..,"msg":<expected>}}`.
pub fn check_relayed(body: &[u8], node: &str, worker: usize, expected: &Value) -> Result<(), RpcError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| RpcError::Reply(format!("reply is not JSON ({e})")))?;
    let r = &v["result"];
    let ok = v["out"] == "relayed"
        && r["node"] == node
        && r["worker"] == worker
        && r["pid"].is_u64()
        && &r["msg"] == expected;
    if ok {
        Ok(())
    } else {
        Err(RpcError::Reply(format!(
            "unexpected reply {v} (expected relayed from {node}:{worker} with msg {expected})"
        )))
    }
}

/// Send one request (ping, or relay when `relay` is set) and verify the reply.
fn round_trip<R: Read, W: Write>(
    w: &mut W,
    r: &mut R,
    buf: &mut Vec<u8>,
    p: &Value,
    relay: Option<&(String, usize)>,
) -> Result<(), RpcError> {
    let frame = match relay {
        Some((node, worker)) => relay_frame(node, *worker, p),
        None => ping_frame(p),
    };
    w.write_all(&frame).map_err(|e| io_err("write", &e))?;
    read_frame(r, buf)?;
    match relay {
        Some((node, worker)) => check_relayed(buf, node, *worker, p),
        None => check_reply(buf, p),
    }
}

#[derive(Default)]
struct SlotResult {
    ok: u64,
    errors: u64,
    lat: Latency,
}

/// Run the RPC load (keep-alive or `short`).
pub fn rpc(o: &RpcOpts) -> Summary {
    let errlog = Arc::new(ErrLog::new(ERR_DETAILS));
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut lat = Latency::new();
    let t0 = Instant::now();
    let mut secs = 0.0;
    match Target::new(&o.host, o.port, o.unix.as_deref()) {
        Err(e) => {
            errlog.report(format_args!("rpc: resolve {}:{}: {e}", o.host, o.port));
            errors = o.conns as u64 * o.requests as u64;
        }
        Ok(target) if !o.short => {
            let r = super::evented::keepalive(&target, o.conns, o.requests, o.relay.clone(), errlog.clone());
            (ok, errors, lat, secs) = (r.ok, r.errors, r.lat, r.secs);
        }
        Ok(target) => {
            let gate = Arc::new(Gate::default());
            let mut handles = Vec::with_capacity(o.conns);
            for c in 0..o.conns {
                let (gate2, errlog2, target) = (gate.clone(), errlog.clone(), target.clone());
                let (requests, relay) = (o.requests, o.relay.clone());
                let h = spawn(format!("rpc-{c}"), move || {
                    gate2.arrive_and_wait();
                    short_slot(&target, c, requests, relay.as_ref(), &errlog2)
                });
                match h {
                    Ok(h) => handles.push(h),
                    Err(e) => {
                        errlog.report(format_args!("conn {c}: spawn thread: {e}"));
                        errors += o.requests as u64;
                    }
                }
            }
            gate.open_when(handles.len());
            let start = Instant::now();
            for h in handles {
                match h.join() {
                    Ok(r) => {
                        ok += r.ok;
                        errors += r.errors;
                        lat.merge(&r.lat);
                    }
                    Err(_) => {
                        errlog.report(format_args!("rpc: connection thread panicked"));
                        errors += o.requests as u64;
                    }
                }
            }
            secs = start.elapsed().as_secs_f64();
        }
    }
    if secs == 0.0 {
        secs = t0.elapsed().as_secs_f64();
    }
    Summary::new("rpc", o.conns, o.requests, Some(o.short), ok, errors, 0, String::new(), secs, &lat)
}

fn short_slot(
    target: &Target,
    c: usize,
    requests: usize,
    relay: Option<&(String, usize)>,
    errlog: &ErrLog,
) -> SlotResult {
    let mut r = SlotResult::default();
    let mut buf = Vec::with_capacity(256);
    for i in 0..requests {
        let p = params(c, i);
        let t = Instant::now();
        let res = connect(target).map_err(|e| io_err(&format!("connect {target}"), &e)).and_then(|sock| match sock {
            Stream::Tcp(s) => round_trip(&mut &s, &mut &s, &mut buf, &p, relay),
            Stream::Unix(s) => round_trip(&mut &s, &mut &s, &mut buf, &p, relay),
            // the socket is dropped (closed) here
        });
        match res {
            Ok(()) => {
                r.lat.record(t.elapsed());
                r.ok += 1;
            }
            Err(e) => {
                errlog.report(format_args!("slot {c} request {i}/{requests}: {e}"));
                r.errors += 1;
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_roundtrip() {
        let p = params(3, 7);
        let f = ping_frame(&p);
        let len = u32::from_le_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(len, f.len() - 4);
        let v: Value = serde_json::from_slice(&f[4..]).unwrap();
        assert_eq!(v, json!({"in":"ping","params":{"c":3,"i":7}}));
        let mut buf = Vec::new();
        let mut r = &f[..];
        read_frame(&mut r, &mut buf).unwrap();
        assert_eq!(buf, &f[4..]);
    }

    #[test]
    fn frame_errors() {
        let mut buf = Vec::new();
        let mut r = &[1u8, 0][..];
        assert!(matches!(read_frame(&mut r, &mut buf), Err(RpcError::Fatal(_))));
        let mut r = &[5u8, 0, 0, 0, b'{'][..];
        let e = read_frame(&mut r, &mut buf).unwrap_err();
        assert!(e.to_string().contains("EOF"), "{e}");
        let big = ((MAX_REPLY + 1) as u32).to_le_bytes();
        let mut r = &big[..];
        let e = read_frame(&mut r, &mut buf).unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
        // exactly 0 bytes is a valid (empty) frame
        let mut r = &[0u8, 0, 0, 0][..];
        read_frame(&mut r, &mut buf).unwrap();
        assert!(buf.is_empty());
    }

    #[test]
    fn reply_checks() {
        let p = params(1, 2);
        assert!(check_reply(br#"{"out":"pong","result":{"c":1,"i":2}}"#, &p).is_ok());
        // key order and whitespace do not matter
        assert!(check_reply(br#" { "result" : {"i":2,"c":1}, "out":"pong" } "#, &p).is_ok());
        for bad in [
            &br#"{"out":"pong","result":{"c":1,"i":3}}"#[..],
            br#"{"out":"pong","result":{"c":1,"i":2,"x":0}}"#,
            br#"{"out":"pong","result":{"c":1,"i":2.0}}"#,
            br#"{"out":"pong"}"#,
            br#"{"out":"error","result":"bad"}"#,
            br#"{"out":"pong","result":{"c":1,"i":2}"#,
            br#"[1,2]"#,
            b"",
        ] {
            let e = check_reply(bad, &p).unwrap_err();
            assert!(matches!(e, RpcError::Reply(_)), "{e}");
        }
    }
}
