//! systemd socket activation: `LISTEN_PID`, `LISTEN_FDS` and
//! `LISTEN_FDNAMES` name listening sockets passed from descriptor 3 on.
//! Every listening stream socket (TCP or Unix) is used instead of binding.
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// First passed descriptor (`SD_LISTEN_FDS_START`).
const FIRST: RawFd = 3;

/// Takes the passed listening sockets and their names, if the variables
/// are meant for this process (else none); clears them, so that no child
/// mistakes them for its own.
pub fn take() -> Vec<(OwnedFd, String)> {
    take_opt().unwrap_or_default()
}

fn take_opt() -> Option<Vec<(OwnedFd, String)>> {
    let pid = std::env::var("LISTEN_PID").ok()?;
    let n: RawFd = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    if pid.parse::<u32>().ok()? != std::process::id() {
        return None;
    }
    let mut names = names.split(':');
    let mut found = Vec::new();
    for fd in FIRST..FIRST + n.max(0) {
        let name = names.next().unwrap_or("").to_string();
        set_cloexec(fd);
        if crate::core::sock::is_listening_stream(fd) {
            // systemd passes blocking sockets; the reactor accepts until EAGAIN.
            // SAFETY: fcntl on a descriptor number has no memory effects.
            unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK) };
            // SAFETY: systemd passed us descriptors FIRST..FIRST+n; this one
            // is a listening socket nothing else in the process owns.
            found.push((unsafe { OwnedFd::from_raw_fd(fd) }, name));
        } else {
            log::warn!("socket activation: descriptor {fd} ({name}) is not a listening stream socket; not used");
        }
    }
    Some(found)
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: fcntl on a descriptor number has no memory effects.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}
