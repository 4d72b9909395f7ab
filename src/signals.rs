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
