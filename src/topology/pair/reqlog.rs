//! The per-server request log `D/P.log`: one line per served request,
//! `<unix time with microseconds> <client address> <request length>`.
//! Buffered; flushed by a timer and at shutdown.
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Who sent a request, as the log names it.
pub enum Client {
    /// A TCP client: `IP:PORT` (`[V6]:PORT`).
    Ip(SocketAddr),
    /// A Unix-socket client: `unix:PID`.
    Unix(i32),
    /// Neither known: `-`.
    Unknown,
}

pub struct RequestLog {
    out: BufWriter<File>,
    dirty: bool,
    path: std::path::PathBuf,
}

impl RequestLog {
    pub fn open(path: &Path) -> io::Result<RequestLog> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
        Ok(RequestLog { out: BufWriter::with_capacity(64 * 1024, f), dirty: false, path: path.to_path_buf() })
    }

    /// Flushes, then opens the path again (after a log rotation).
    pub fn reopen(&mut self) -> io::Result<()> {
        self.flush();
        *self = RequestLog::open(&self.path.clone())?;
        Ok(())
    }

    pub fn record(&mut self, client: &Client, len: usize) {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let r = match client {
            Client::Ip(a) => writeln!(self.out, "{}.{:06} {a} {len}", t.as_secs(), t.subsec_micros()),
            Client::Unix(pid) => writeln!(self.out, "{}.{:06} unix:{pid} {len}", t.as_secs(), t.subsec_micros()),
            Client::Unknown => writeln!(self.out, "{}.{:06} - {len}", t.as_secs(), t.subsec_micros()),
        };
        if let Err(e) = r {
            log::warn!("request log: {e}");
        }
        self.dirty = true;
    }

    pub fn flush(&mut self) {
        if self.dirty {
            if let Err(e) = self.out.flush() {
                log::warn!("request log: {e}");
            }
            self.dirty = false;
        }
    }
}
