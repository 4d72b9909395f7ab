//! Process-wide odds and ends: SIGPIPE, the readiness line.
use std::io::Write;

/// Writes to a closed socket must fail with EPIPE, not kill the process
/// (bufferevents write with writev, which has no MSG_NOSIGNAL).
pub fn ignore_sigpipe() {
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Catchable signals whose default action kills the process and that have
/// no meaning here: every server logs and ignores them, so no signal kills
/// a process silently. (Synchronous faults such as SIGSEGV are not caught.)
pub const IGNORED: [i32; 8] = [
    libc::SIGALRM,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGXCPU,
    libc::SIGXFSZ,
    libc::SIGIO,
    libc::SIGPWR,
    libc::SIGSTKFLT,
];

/// A signal's name, for log lines.
pub fn name(sig: i32) -> String {
    let n = match sig {
        libc::SIGHUP => "HUP",
        libc::SIGINT => "INT",
        libc::SIGQUIT => "QUIT",
        libc::SIGUSR1 => "USR1",
        libc::SIGUSR2 => "USR2",
        libc::SIGTERM => "TERM",
        libc::SIGCHLD => "CHLD",
        libc::SIGALRM => "ALRM",
        libc::SIGVTALRM => "VTALRM",
        libc::SIGPROF => "PROF",
        libc::SIGXCPU => "XCPU",
        libc::SIGXFSZ => "XFSZ",
        libc::SIGIO => "IO",
        libc::SIGPWR => "PWR",
        libc::SIGSTKFLT => "STKFLT",
        _ => return sig.to_string(),
    };
    format!("SIG{n}")
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
