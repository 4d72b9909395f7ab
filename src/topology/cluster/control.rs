//! The client side of a master's control socket (`D/control.sock`), used
//! by `handoff status`, `handoff restart` and a new master taking over.
//! Blocking, with deadlines: these are short command-line exchanges.
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use super::control_path;
use crate::core::channel::wire::{version, Header, HEADER_LEN, MAX_BODY};
use crate::core::{fdpass, sock};

/// A connection to the control socket of the master running in a
/// directory. The master accepts only peers of its own uid.
///
/// What `handoff status` does:
///
/// ```no_run
/// use std::time::Duration;
/// use handoff::topology::cluster::control::Client;
/// use handoff::topology::cluster::{KIND_STATUS_REPLY, KIND_STATUS_REQ};
///
/// let mut c = Client::connect("/tmp/mycluster".as_ref())?;
/// c.send(KIND_STATUS_REQ, &[])?;
/// let (json, _) = c.recv(KIND_STATUS_REPLY, Duration::from_secs(3))?;
/// println!("{}", String::from_utf8_lossy(&json));
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Client {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Client {
    /// Connects to `dir/control.sock`. The error names the directory, and
    /// says when the socket is stale (its master is gone).
    pub fn connect(dir: &Path) -> io::Result<Client> {
        let path = control_path(dir);
        let fd = sock::unix_connect(&path).map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::ConnectionRefused {
                " (a stale socket: the master that made it is gone)"
            } else {
                ""
            };
            io::Error::new(e.kind(), format!("no master in {}: {e}{hint}", dir.display()))
        })?;
        Ok(Client { fd, buf: vec![0; HEADER_LEN + MAX_BODY] })
    }

    /// Sends one message of `kind` (a cluster `KIND_*`) with `body`, which
    /// must fit in one message ([`MAX_BODY`] bytes; no descriptor).
    /// Does not wait: `WouldBlock` if the socket buffer is full.
    pub fn send(&self, kind: u16, body: &[u8]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(HEADER_LEN + body.len());
        Header { version: version(), kind, flags: 0, body_len: body.len() as u32, id: 0, tag: 0 }.encode(&mut msg);
        msg.extend_from_slice(body);
        fdpass::send(self.fd.as_fd(), None, &msg).map(drop)
    }

    /// Waits for a message of `kind` (others are skipped, closing any
    /// descriptor they carry); returns its body and descriptor. Errors:
    /// `TimedOut` after `timeout`, `UnexpectedEof` if the master closed
    /// the socket, `InvalidData` for a malformed message.
    pub fn recv(&mut self, kind: u16, timeout: Duration) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
        let deadline = Instant::now() + timeout;
        loop {
            match fdpass::recv(self.fd.as_fd(), &mut self.buf) {
                Ok(r) if r.len == 0 && r.fd.is_none() => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the master closed the control socket (refused our request or channel version)",
                    ))
                }
                Ok(r) => {
                    let h = Header::decode(&self.buf[..r.len])?;
                    if h.kind == kind {
                        return Ok((self.buf[HEADER_LEN..r.len].to_vec(), r.fd));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no reply from the master"));
                    }
                    sock::wait_readable(&self.fd, left)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Gives up the connected socket (non-blocking SOCK_SEQPACKET), for a
    /// new master to drive as a [`Channel`](crate::core::channel::Channel)
    /// to its predecessor. Messages not yet received stay in the socket.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}
