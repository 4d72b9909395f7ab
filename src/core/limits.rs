//! The descriptor budget: `RLIMIT_NOFILE` raised as far as this process
//! may, and how many connections a cluster master's limit holds.
//!
//! A master keeps one descriptor per open connection (its rescue copy of
//! every connection a worker serves), so its soft limit, less what it
//! needs for itself, caps the service's connection count.
use std::io;

/// Descriptors a master holds whatever its load, with room to spare:
/// stdin/out/err, the event loop (epoll plus its signal pipe), the open
/// executable, the control socket, its clients (`status`, `restart`,
/// orphaned workers handing back), the supervisor link, `--metrics`'
/// listener and scrapes, a restart's channels to the other generation,
/// the descriptor `accept` takes before a connection is counted, and a
/// log file.
pub const MASTER_FIXED_FDS: u64 = 64;

/// Per worker slot: its channel, and the socket pair a respawn makes
/// while the old channel may still be open.
pub const MASTER_FDS_PER_WORKER: u64 = 2;

/// `RLIMIT_NOFILE` as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    /// The soft limit: what this process may open.
    pub soft: u64,
    /// The hard limit: how far the soft one may go without privilege.
    pub hard: u64,
}

/// The kernel's ceiling for any process's descriptor limit
/// (`/proc/sys/fs/nr_open`; 1048576 when it cannot be read).
pub fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20)
}

/// The current limits.
pub fn get() -> io::Result<Nofile> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: lim is a live out-parameter of the right type.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("getrlimit(RLIMIT_NOFILE): {e}")));
    }
    Ok(Nofile { soft: lim.rlim_cur, hard: lim.rlim_max })
}

fn set(soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: lim is a valid rlimit; setrlimit only reads it.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises `RLIMIT_NOFILE`: with privilege (root, `CAP_SYS_RESOURCE`) the
/// hard limit up to `fs.nr_open`; then the soft limit up to the hard one.
/// Without privilege the hard limit stays as it is. Returns the limits
/// now in force.
pub fn raise() -> io::Result<Nofile> {
    let now = get()?;
    let ceiling = nr_open();
    if now.hard < ceiling {
        match set(ceiling, ceiling) {
            Ok(()) => {
                log::debug!("descriptor limit raised to {ceiling} (fs.nr_open; was {}/{})", now.soft, now.hard);
                return get();
            }
            // No privilege: the hard limit is the ceiling.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("setrlimit(RLIMIT_NOFILE, {ceiling}): {e}"))),
        }
    }
    // An unlimited hard limit still stops at fs.nr_open.
    let want = now.hard.min(ceiling);
    if now.soft < want {
        set(want, now.hard).map_err(|e| io::Error::new(e.kind(), format!("setrlimit(RLIMIT_NOFILE, {want}): {e}")))?;
    }
    get()
}

/// Descriptors a master with `workers` worker slots and `listeners`
/// listening sockets needs besides one per connection.
pub fn master_overhead(workers: usize, listeners: usize) -> u64 {
    MASTER_FIXED_FDS + MASTER_FDS_PER_WORKER * workers as u64 + listeners as u64
}

/// How many connections a master with soft limit `soft` can hold.
///
/// ```
/// use handoff::core::limits::{capacity, master_overhead};
/// assert_eq!(capacity(1024, 2, 1), 1024 - master_overhead(2, 1));
/// assert_eq!(capacity(10, 2, 1), 0);
/// ```
pub fn capacity(soft: u64, workers: usize, listeners: usize) -> u64 {
    soft.saturating_sub(master_overhead(workers, listeners))
}

/// Raises the limit (see [`raise`]) and checks that `--max-conns` fits
/// the master's budget; returns the capacity. The error says how far
/// the limit falls short and how to fix it.
pub fn budget(max_conns: Option<u64>, workers: usize, listeners: usize) -> io::Result<u64> {
    let lim = raise()?;
    let cap = capacity(lim.soft, workers, listeners);
    if let Some(max) = max_conns.filter(|&m| m > cap) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "--max-conns {max} exceeds what the descriptor limit allows: the master holds one descriptor per \
                 open connection, and its limit of {} (RLIMIT_NOFILE; hard limit {}, fs.nr_open {}) less {} for \
                 itself ({} workers, {} listeners) leaves room for {cap} connections; lower --max-conns to {cap} \
                 or raise the limit (ulimit -n {}, or LimitNOFILE= in the systemd unit; raising the hard limit \
                 needs root)",
                lim.soft,
                lim.hard,
                nr_open(),
                master_overhead(workers, listeners),
                workers,
                listeners,
                max + master_overhead(workers, listeners),
            ),
        ));
    }
    Ok(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_reaches_at_least_the_old_hard_limit() {
        let before = get().unwrap();
        let after = raise().unwrap();
        assert!(after.soft >= before.hard.min(nr_open()), "{before:?} -> {after:?}");
        assert!(after.hard >= before.hard, "{before:?} -> {after:?}");
        assert!(after.soft <= after.hard);
    }

    #[test]
    fn budget_refuses_what_the_limit_cannot_hold() {
        let cap = budget(None, 2, 1).unwrap();
        assert_eq!(cap, capacity(get().unwrap().soft, 2, 1));
        assert!(budget(Some(cap), 2, 1).is_ok());
        let e = budget(Some(cap + 1), 2, 1).unwrap_err().to_string();
        assert!(e.contains(&format!("room for {cap} connections")), "{e}");
    }
}
