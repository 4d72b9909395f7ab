//! `--access-log PATH`: one line per closed client connection, written by
//! the worker that closed it, for the connection's whole life (what it
//! went through in other workers travels with it, see
//! [`wire::History`]):
//!
//! ```text
//! 2026-12-02T08:24:01.123456Z client=127.0.0.1:53422 worker=0 gen=1 requests=3 in=57 out=112 duration=0.012345 end=client_eof moves=1
//! ```
//!
//! The time is the close (UTC); `client` the peer address (`IP:PORT`,
//! or `unix:PID` for a client on a Unix listener; `-` if unknown); `worker` and `gen` the closing worker and its generation;
//! `in` and `out` bytes received and sent; `duration` seconds since the
//! connection was first served; `end` one of the [`End`] names; `moves`
//! the times it moved between processes (restart, rebalancing).
//!
//! Every worker opens the path with `O_APPEND` and writes whole lines in
//! one `write(2)`, so lines of different workers never mix. Lines wait in
//! a buffer for at most [`FLUSH_AFTER`] (or until it holds
//! [`FLUSH_AT`] bytes) and are flushed when the worker exits.
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::core::channel::wire;
use crate::core::reactor::{Base, Event, Interest};

/// Longest a line waits in the buffer.
pub const FLUSH_AFTER: Duration = Duration::from_millis(100);
/// A buffer this full is written at once.
pub const FLUSH_AT: usize = 32 * 1024;

/// How a connection ended, as the access log's `end` field names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client closed its side; everything it asked was answered.
    ClientEof,
    /// The service closed it after its reply (e.g. HTTP `Connection: close`).
    ServerClose,
    /// The service refused a request and closed it (e.g. a frame over
    /// `--max-frame`).
    ProtocolError,
    /// Idle for `--idle-timeout` seconds.
    IdleTimeout,
    /// The cluster stopped (SIGTERM): idle connections close at once,
    /// the others after their last reply.
    Shutdown,
    /// The client reset it (ECONNRESET, EPIPE).
    Reset,
    /// Another socket error.
    Error,
    /// Cut after the restart's grace: its client did not read its
    /// replies, so it could not move.
    Cut,
    /// The master died (no restart under way): the worker exits.
    MasterLost,
}

impl End {
    /// The name in the log line.
    pub fn name(self) -> &'static str {
        match self {
            End::ClientEof => "client_eof",
            End::ServerClose => "server_close",
            End::ProtocolError => "protocol_error",
            End::IdleTimeout => "idle_timeout",
            End::Shutdown => "shutdown",
            End::Reset => "reset",
            End::Error => "error",
            End::Cut => "cut",
            End::MasterLost => "master_lost",
        }
    }

    /// A socket error: a reset, or another error.
    pub fn of_errno(errno: i32) -> End {
        match errno {
            libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED => End::Reset,
            _ => End::Error,
        }
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// One worker's access log: a buffer of whole lines and the file they go
/// to.
pub struct AccessLog {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    /// Flushes the buffer [`FLUSH_AFTER`] after its first line.
    timer: Event,
    worker: usize,
    gen: u64,
}

/// Opens `path` for appending (created 0644 if missing), with the path
/// in the error.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("--access-log {}: {e}", path.display())))
}

impl AccessLog {
    /// Opens `path`; `on_timer` must call [`AccessLog::flush`] (the
    /// worker owns the log and reaches it from the timer).
    pub fn open(
        base: &Base,
        path: &Path,
        worker: usize,
        gen: u64,
        on_timer: impl Fn() + 'static,
    ) -> io::Result<AccessLog> {
        Ok(AccessLog {
            path: path.to_path_buf(),
            file: open_append(path)?,
            buf: Vec::with_capacity(4096),
            timer: Event::new(base, -1, Interest::Timer, on_timer)?,
            worker,
            gen,
        })
    }

    /// Adds the line of a connection that closed now.
    pub fn record(&mut self, client: Option<&str>, past: &wire::History, end: End) {
        let now = now_us();
        let mut line = String::with_capacity(160);
        push_time(&mut line, now);
        let dur = now.saturating_sub(past.since_us);
        let _ = write!(line, " client=");
        match client {
            Some(a) => {
                let _ = write!(line, "{a}");
            }
            None => line.push('-'),
        }
        let _ = writeln!(
            line,
            " worker={} gen={} requests={} in={} out={} duration={}.{:06} end={} moves={}",
            self.worker,
            self.gen,
            past.requests,
            past.bytes_in,
            past.bytes_out,
            dur / 1_000_000,
            dur % 1_000_000,
            end.name(),
            past.moves
        );
        self.buf.extend_from_slice(line.as_bytes());
        if self.buf.len() >= FLUSH_AT {
            self.flush();
        } else if !self.timer.pending() {
            let _ = self.timer.add(Some(FLUSH_AFTER));
        }
    }

    /// Writes the buffered lines: one `write(2)` for the lot (O_APPEND:
    /// whole lines, never mixed with another worker's).
    pub fn flush(&mut self) {
        let mut at = 0;
        while at < self.buf.len() {
            match self.file.write(&self.buf[at..]) {
                Ok(0) => break,
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    crate::warn_limited!(
                        "worker {}: access log {}: {e}; {} bytes of lines lost",
                        self.worker,
                        self.path.display(),
                        self.buf.len() - at
                    );
                    break;
                }
            }
        }
        self.buf.clear();
        self.timer.del();
    }

    /// Flushes, then opens the path again (it was renamed away: log
    /// rotation). If it cannot be opened, lines go on to the old file.
    pub fn reopen(&mut self) {
        self.flush();
        match open_append(&self.path) {
            Ok(f) => {
                self.file = f;
                log::debug!("worker {}: access log {} reopened", self.worker, self.path.display());
            }
            Err(e) => log::error!("worker {}: cannot reopen the access log: {e}; writing to the old file", self.worker),
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Appends `us` (microseconds since the epoch) as ISO 8601 UTC with
/// microseconds: `2026-12-02T08:24:01.123456Z`.
fn push_time(out: &mut String, us: u64) {
    let secs = us / 1_000_000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        us % 1_000_000
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(us: u64) -> String {
        let mut s = String::new();
        push_time(&mut s, us);
        s
    }

    #[test]
    fn iso_time() {
        assert_eq!(time(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(time(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
        // `date -u -d @1795579751`: Wed Nov 25 04:09:11 UTC 2026
        assert_eq!(time(1_795_579_751_250_000), "2026-11-25T04:09:11.250000Z");
        assert_eq!(time(4_107_542_399_999_999), "2100-02-28T23:59:59.999999Z");
    }

    #[test]
    fn line_format() {
        let dir = std::env::temp_dir().join(format!("handoff-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let _ = std::fs::remove_file(&path);
        let base = Base::new().unwrap();
        let mut log = AccessLog::open(&base, &path, 3, 2, || {}).unwrap();
        let past = wire::History { moves: 1, since_us: now_us() - 1_500_000, requests: 4, bytes_in: 10, bytes_out: 20 };
        log.record(Some("127.0.0.1:4000"), &past, End::IdleTimeout);
        log.record(None, &wire::History { since_us: now_us(), ..Default::default() }, End::Reset);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "", "buffered until the timer or a flush");
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let f: Vec<&str> = lines[0].split(' ').collect();
        assert_eq!(f[0].len(), "2026-12-02T08:24:01.123456Z".len(), "{}", lines[0]);
        assert_eq!(&f[1..6], ["client=127.0.0.1:4000", "worker=3", "gen=2", "requests=4", "in=10"], "{}", lines[0]);
        assert_eq!(f[6], "out=20");
        let secs: f64 = f[7].strip_prefix("duration=").unwrap().parse().unwrap();
        assert!((1.5..3.0).contains(&secs), "{}", lines[0]);
        assert_eq!(&f[8..], ["end=idle_timeout", "moves=1"]);
        assert!(lines[1].contains(" client=- ") && lines[1].ends_with(" end=reset moves=0"), "{}", lines[1]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
