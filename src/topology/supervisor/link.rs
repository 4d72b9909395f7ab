//! A master's end of the link to its supervisor: a SOCK_SEQPACKET socket
//! every master of the service inherits (`HANDOFF_SUPERVISOR_FD`). Masters
//! send datagrams of `KEY=VALUE` lines: systemd's (`READY=1`,
//! `RELOADING=1`, `STOPPING=1`, `STATUS=`...), which the supervisor passes
//! on to `NOTIFY_SOCKET`, and two of our own, `HANDOFF_MASTER=<pid>` (a
//! master started) and `HANDOFF_SERVING=<pid>` (that master serves now:
//! signals go to it). The supervisor sends nothing: the link becoming
//! readable means it is gone.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use crate::core::reactor::{Base, Event, Interest};

/// The variable naming the inherited descriptor.
pub const ENV_FD: &str = "HANDOFF_SUPERVISOR_FD";

static LINK: OnceLock<OwnedFd> = OnceLock::new();

/// Takes the link named by the environment (once, at a master's start),
/// and clears the variable so that workers do not see it. `Ok(false)`:
/// not supervised.
pub fn adopt_from_env() -> io::Result<bool> {
    let Some(v) = std::env::var_os(ENV_FD) else { return Ok(false) };
    std::env::remove_var(ENV_FD);
    let fd: RawFd = v
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{ENV_FD}={v:?}: not a descriptor")))?;
    // SAFETY: fcntl on a descriptor number has no memory effects.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::other(format!("{ENV_FD}={fd}: not an open descriptor")));
    }
    // SAFETY: the supervisor (or the master before us) passed this
    // descriptor for us alone; nothing else in this process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = LINK.set(fd);
    Ok(true)
}

/// The link's descriptor, for a successor master to inherit.
pub fn raw() -> Option<RawFd> {
    LINK.get().map(AsRawFd::as_raw_fd)
}

/// Tells the supervisor, or, with none, systemd directly (`state`: lines
/// of `KEY=VALUE`). Best effort: a lost notification is logged.
pub fn tell(state: &str) {
    let sent = match LINK.get() {
        Some(fd) => {
            // SAFETY: fd is a live socket; state is a live buffer.
            let rc = unsafe {
                libc::send(fd.as_raw_fd(), state.as_ptr().cast(), state.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
        None => {
            let own: String = state.lines().filter(|l| !l.starts_with("HANDOFF_")).collect::<Vec<_>>().join("\n");
            if own.is_empty() {
                Ok(())
            } else {
                crate::core::notify::sd_notify(&own).map(drop)
            }
        }
    };
    match sent {
        // The supervisor is gone; the watch stops us.
        Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
        Err(e) => log::warn!("notify {:?}: {e}", state.lines().next().unwrap_or("")),
        Ok(()) => {}
    }
}

/// Calls `gone` once when the supervisor's end closes (it died: a master
/// left alone stops). The returned event must be kept.
pub fn watch(base: &Base, gone: impl Fn() + 'static) -> io::Result<Option<Event>> {
    let Some(fd) = LINK.get() else { return Ok(None) };
    let raw = fd.as_raw_fd();
    let e = Event::new(base, raw, Interest::Read, move || {
        let mut b = [0u8; 1];
        // SAFETY: raw is the live link; b is a live one-byte buffer.
        let n = unsafe { libc::recv(raw, b.as_mut_ptr().cast(), 1, libc::MSG_DONTWAIT | libc::MSG_PEEK) };
        if n == 0 || n < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
            gone();
        }
    })?;
    e.add(None)?;
    Ok(Some(e))
}
