//! `handoff status`: asks a running master over its control socket.
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{control_path, KIND_STATUS_REPLY, KIND_STATUS_REQ};
use crate::channel::wire::{Header, HEADER_LEN, MAX_BODY, VERSION};
use crate::{fdpass, sock};

/// Fetches the status JSON of the master running in `dir`.
pub fn fetch(dir: &Path, timeout: Duration) -> io::Result<Value> {
    let path = control_path(dir);
    let fd = sock::unix_connect(&path)?;
    let mut req = Vec::new();
    Header { version: VERSION, kind: KIND_STATUS_REQ, flags: 0, body_len: 0, id: 0 }.encode(&mut req);
    fdpass::send(fd.as_fd(), None, &req)?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; HEADER_LEN + MAX_BODY];
    loop {
        match fdpass::recv(fd.as_fd(), &mut buf) {
            Ok(r) if r.len == 0 => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "master closed the control socket"))
            }
            Ok(r) => {
                let h = Header::decode(&buf[..r.len])?;
                if h.kind != KIND_STATUS_REPLY {
                    continue;
                }
                return serde_json::from_slice(&buf[HEADER_LEN..r.len])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "no status reply"));
                }
                sock::wait_readable(&fd, left)?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The human-readable table.
pub fn render(v: &Value) -> String {
    let mut out = format!(
        "{} master pid {}  port {}  policy {}  started {}  pending {}\n",
        v["mode"].as_str().unwrap_or("?"),
        v["pid"],
        v["port"],
        v["policy"].as_str().unwrap_or("?"),
        v["started"],
        v["pending"]
    );
    out.push_str(&format!(
        "{:>6} {:>8} {:>10} {:>8} {:>10} {:>8}\n",
        "worker", "pid", "handed", "open", "served", "respawns"
    ));
    for w in v["workers"].as_array().into_iter().flatten() {
        let f = |k: &str| w[k].to_string();
        out.push_str(&format!(
            "{:>6} {:>8} {:>10} {:>8} {:>10} {:>8}\n",
            f("worker"),
            f("pid"),
            f("handed"),
            f("open"),
            f("served"),
            f("respawns")
        ));
    }
    out
}
