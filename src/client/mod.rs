//! Load-generating clients.
//!
//! * [`pingpong`] — pair mode (`unary` / `stream`): 1-byte-length-prefixed
//!   requests answered with `rsp from port: P\n`, ports must alternate.
//! * [`rpc`](mod@rpc) — cluster mode: u32-LE-length-prefixed JSON ping/pong.
//! * [`work`](mod@work) — cluster mode: CPU work on keep-alive connections
//!   (all, or those on one worker), and where they sit over time.
//! * [`stats`] — latency histogram and the one-line [`Summary`].
//!
//! The keep-alive rpc load and the work load run on one event loop (the
//! project's reactor); the others use std threads and blocking `std::net`
//! sockets.
//!
//! Every client connects to a [`Target`]: `host:port` over TCP, or with
//! the options' `unix` field (`--unix PATH`) a Unix stream socket. Both
//! kinds go through one connect function; past the connect, the code is
//! the same for both (generic over the stream type, or a reactor `Conn`).

pub(crate) mod evented;
pub mod pingpong;
pub mod rpc;
pub mod stats;
pub mod work;

pub use pingpong::{stream, unary, PingPongOpts};
pub use rpc::{rpc, RpcOpts};
pub use stats::Summary;
pub use work::{work, WorkOpts, WorkSummary};

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Read (idle) / write timeout applied to every client socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout for a single connect attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Stack size of the per-connection threads (keeps hundreds of threads cheap).
const THREAD_STACK: usize = 256 * 1024;

/// Resolve `host:port` once, as the servers do: an IPv4 or IPv6 address
/// (`::1` or `[::1]`), or a name (its first IPv4 address, else its first
/// IPv6 one), with `crate::core::sock::resolve`.
pub(crate) fn resolve(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    crate::core::sock::resolve(host, port)
}

/// Where a load client connects, decided once per run: a TCP address
/// (`--host`/`--port`, resolved once) or a Unix stream socket (`--unix`).
#[derive(Debug, Clone)]
pub enum Target {
    /// A TCP server.
    Tcp(SocketAddr),
    /// A server listening on a Unix stream socket at this path.
    Unix(Arc<Path>),
}

impl Target {
    /// `unix` when given (host and port are then not looked at), else
    /// `host:port` resolved with [`crate::core::sock::resolve`].
    pub fn new(host: &str, port: u16, unix: Option<&Path>) -> io::Result<Target> {
        match unix {
            Some(p) => Ok(Target::Unix(p.into())),
            None => resolve(host, port).map(Target::Tcp),
        }
    }
}

/// `127.0.0.1:7000`, `[::1]:7000` or `unix:/run/x.sock` (as `--listen` spells it).
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "{a}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected blocking client socket. The clients match on it once per
/// connection and run code generic over the std stream type, so the
/// per-request path is the same machine code as a plain `TcpStream`'s.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Connects to `t`: TCP with [`CONNECT_TIMEOUT`] and TCP_NODELAY. A
    /// Unix connect does not wait for a handshake (it fails at once when
    /// nobody listens; it blocks only while the listener's backlog is full).
    pub(crate) fn open(t: &Target) -> io::Result<Stream> {
        match t {
            Target::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, CONNECT_TIMEOUT)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Target::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
        }
    }

    /// Read and write timeouts (blocking use).
    pub(crate) fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Stream::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
    }

    /// The descriptor, non-blocking, for a reactor `Conn`.
    pub(crate) fn into_nonblocking_fd(self) -> io::Result<OwnedFd> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(true).map(|()| s.into()),
            Stream::Unix(s) => s.set_nonblocking(true).map(|()| s.into()),
        }
    }
}

/// `shutdown(SHUT_RDWR)` for the std stream types (unblocks a writer).
pub(crate) trait ShutdownBoth {
    fn shutdown_both(&self);
}

impl ShutdownBoth for TcpStream {
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl ShutdownBoth for UnixStream {
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

/// Connects for blocking use: [`Stream::open`], then read/write timeouts
/// of [`IO_TIMEOUT`].
pub(crate) fn connect(t: &Target) -> io::Result<Stream> {
    let s = Stream::open(t)?;
    s.set_timeouts(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Spawn a named worker thread with a small stack.
pub(crate) fn spawn<F, T>(name: String, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new().name(name).stack_size(THREAD_STACK).spawn(f)
}

/// Start gate: every worker arrives (after connecting), the main thread waits
/// for all of them, then opens the gate and starts the clock. Unlike
/// `std::sync::Barrier` the participant count is decided after spawning, so a
/// failed spawn cannot deadlock the run.
#[derive(Default)]
pub(crate) struct Gate {
    m: std::sync::Mutex<(usize, bool)>,
    cv: std::sync::Condvar,
}

impl Gate {
    /// Worker side: announce readiness and block until the gate opens.
    pub(crate) fn arrive_and_wait(&self) {
        let mut g = self.m.lock().unwrap_or_else(|e| e.into_inner());
        g.0 += 1;
        self.cv.notify_all();
        while !g.1 {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Main side: wait until `n` workers arrived, then open the gate.
    pub(crate) fn open_when(&self, n: usize) {
        let mut g = self.m.lock().unwrap_or_else(|e| e.into_inner());
        while g.0 < n {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.1 = true;
        self.cv.notify_all();
    }
}
