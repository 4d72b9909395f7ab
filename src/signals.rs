//! Process-wide odds and ends: SIGPIPE, the readiness line.
use std::io::Write;

/// Writes to a closed socket must fail with EPIPE, not kill the process
/// (bufferevents write with writev, which has no MSG_NOSIGNAL).
pub fn ignore_sigpipe() {
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Prints the readiness line on stdout (tests and scripts wait for it).
pub fn ready(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Asks the kernel to SIGKILL this process when its parent dies, so no
/// worker outlives its master. (A master that died before this call is
/// noticed through the EOF on the worker's channel.)
/// `die_with_parent(false)` lifts it (a worker of an old generation during
/// a restart hands its connections to the successor instead of dying).
pub fn die_with_parent(on: bool) -> std::io::Result<()> {
    let sig = if on { libc::SIGKILL as libc::c_ulong } else { 0 };
    // SAFETY: prctl(PR_SET_PDEATHSIG) only changes this process's settings.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0, 0, 0) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
