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

pub(crate) mod evented;
pub mod pingpong;
pub mod rpc;
pub mod stats;
pub mod work;

pub use pingpong::{stream, unary, PingPongOpts};
pub use rpc::{rpc, RpcOpts};
pub use stats::Summary;
pub use work::{work, WorkOpts, WorkSummary};

use std::net::{SocketAddr, TcpStream};
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

/// Connect with a timeout and set TCP_NODELAY + read/write timeouts.
pub(crate) fn connect(addr: &SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
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
