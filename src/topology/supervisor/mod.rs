//! The supervisor: the process that a service manager (systemd, a
//! container runtime, a shell) starts as `handoff cluster ...`. It serves
//! nothing. It runs the master as its child, passes signals on to the
//! master that serves now, relays the masters' systemd notifications,
//! holds the pid file and reaps. A restart replaces masters and workers,
//! never the supervisor, so its pid is the service's pid for the
//! service's whole life; as PID 1 of a container it stays.
//!
//! It stops when no master is left: every master holds the other end of
//! its link ([`link`]), so the link reads EOF once the last one exits.
//! Its exit status is that master's (1 if it was killed).
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::rc::Rc;

pub mod activation;
pub mod link;
mod pidfile;

use crate::core::reactor::{Base, Event, Interest};
use crate::core::signals;
use pidfile::PidFile;

/// The variable naming a listening socket the supervisor passes to the
/// first master (socket activation).
pub const ENV_LISTEN_FD: &str = "HANDOFF_LISTEN_FD";

/// The variable naming the supervisor's pid, for `handoff status`.
pub const ENV_PID: &str = "HANDOFF_SUPERVISOR_PID";

/// Signals the supervisor passes on to the serving master.
const FORWARDED: [i32; 6] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2];

/// Whether this process is a master started by a supervisor (or by the
/// master of the previous generation, which passes the link on).
pub fn supervised() -> bool {
    std::env::var_os(link::ENV_FD).is_some()
}

struct Sup {
    base: Base,
    me: u32,
    /// The master signals go to.
    serving: u32,
    /// Masters that said hello, and how each ended once reaped.
    masters: HashMap<u32, Option<i32>>,
    /// The last master's exit, in reaping order.
    last_exit: Option<(u32, i32)>,
    mainpid_sent: bool,
}

/// Runs the supervisor: starts `BIN ARGS...` (our own command line) as
/// the first master and lives as long as the service. Returns the exit
/// status.
pub fn run(pid_file: Option<&Path>) -> io::Result<i32> {
    let me = std::process::id();
    signals::ignore_sigpipe();
    let pid_file = pid_file.map(|p| PidFile::write(p, me)).transpose()?;
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes this process's
    // attributes: orphaned masters and workers are reparented to us.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let activated = activation::take();
    let (mine, theirs) = crate::core::sock::seqpacket_pair()?;
    let first = spawn_master(&theirs, activated.as_ref())?;
    drop(theirs);
    drop(activated);
    let base = Base::new()?;
    let sup = Rc::new(RefCell::new(Sup {
        base: base.clone(),
        me,
        serving: first,
        masters: HashMap::from([(first, None)]),
        last_exit: None,
        mainpid_sent: false,
    }));
    let mut events: Vec<Event> = Vec::new();
    for sig in FORWARDED.into_iter().chain([libc::SIGCHLD]).chain(signals::IGNORED) {
        let s = sup.clone();
        let e = Event::new(&base, sig, Interest::Signal, move || s.borrow_mut().on_signal(sig))?;
        e.add(None)?;
        events.push(e);
    }
    let s = sup.clone();
    let raw = mine.as_raw_fd();
    let e = Event::new(&base, raw, Interest::Read, move || s.borrow_mut().on_link(raw))?;
    e.add(None)?;
    events.push(e);
    log::info!("supervisor pid {me}: master pid {first} started");
    base.dispatch()?;
    drop(events);
    drop(mine);
    let code = sup.borrow_mut().finish();
    if let Some(p) = pid_file {
        p.remove();
    }
    Ok(code)
}

/// Starts our own command line again as the first master, with the link
/// (and an activated listening socket) inherited.
fn spawn_master(link_end: &OwnedFd, activated: Option<&(OwnedFd, String)>) -> io::Result<u32> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(&exe);
    cmd.args(std::env::args_os().skip(1));
    let link_fd = link_end.as_raw_fd();
    cmd.env(link::ENV_FD, link_fd.to_string()).env(ENV_PID, std::process::id().to_string());
    let listen_fd = activated.map(|(fd, name)| {
        log::info!("socket activation: passing the listening socket ({name:?}) to the master");
        fd.as_raw_fd()
    });
    if let Some(fd) = listen_fd {
        cmd.env(ENV_LISTEN_FD, fd.to_string());
    }
    // SAFETY: the closure runs in the forked child before exec and only
    // calls fcntl (async-signal-safe) on descriptors it inherited.
    unsafe {
        cmd.pre_exec(move || {
            for fd in [Some(link_fd), listen_fd].into_iter().flatten() {
                inherit(fd)?;
            }
            Ok(())
        });
    }
    let child =
        cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("start the master ({}): {e}", exe.display())))?;
    // Reaped by waitpid(-1) below, like every orphan.
    Ok(child.id())
}

/// Clears close-on-exec on `fd` (in a child about to exec).
pub(crate) fn inherit(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor number has no memory effects.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Sup {
    fn on_signal(&mut self, sig: i32) {
        let name = signals::name(sig);
        if sig == libc::SIGCHLD {
            return self.reap(libc::WNOHANG);
        }
        if !FORWARDED.contains(&sig) {
            return log::warn!("{name} has no meaning here; ignored");
        }
        log::info!("{name}: passed on to the master (pid {})", self.serving);
        // SAFETY: kill has no memory effects.
        if unsafe { libc::kill(self.serving as libc::pid_t, sig) } < 0 {
            log::warn!("{name}: master pid {} is gone: {}", self.serving, io::Error::last_os_error());
        }
    }

    /// Reaps every child that has exited (`flags`: WNOHANG, or 0 to wait
    /// for the masters still running).
    fn reap(&mut self, flags: i32) {
        loop {
            let mut status = 0;
            // SAFETY: status is a live out-parameter.
            let pid = unsafe { libc::waitpid(-1, &mut status, flags) };
            if pid <= 0 {
                return;
            }
            let pid = pid as u32;
            let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
            match self.masters.get_mut(&pid) {
                Some(end) => {
                    *end = Some(code);
                    self.last_exit = Some((pid, code));
                    if code == 0 {
                        log::debug!("master pid {pid} exited");
                    } else {
                        log::warn!("master pid {pid} exited with status {code}");
                    }
                }
                None => log::debug!("reaped pid {pid} (status {code})"),
            }
        }
    }

    /// Datagrams from the masters.
    fn on_link(&mut self, fd: RawFd) {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: fd is the live link; buf is a live buffer of its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) {
                    return;
                }
                log::error!("supervisor link: {e}");
            }
            if n <= 0 {
                // Every master has closed its end: the service is over.
                self.base.exit(None);
                return;
            }
            self.on_message(&String::from_utf8_lossy(&buf[..n as usize]));
        }
    }

    fn on_message(&mut self, msg: &str) {
        let mut out: Vec<&str> = Vec::new();
        for line in msg.lines() {
            let pid = |v: &str| v.trim().parse::<u32>().ok();
            if let Some(p) = line.strip_prefix("HANDOFF_MASTER=").and_then(pid) {
                self.masters.entry(p).or_insert(None);
            } else if let Some(p) = line.strip_prefix("HANDOFF_SERVING=").and_then(pid) {
                if p != self.serving {
                    log::info!("master pid {p} serves now (was pid {})", self.serving);
                }
                self.masters.entry(p).or_insert(None);
                self.serving = p;
            } else if !line.is_empty() {
                out.push(line);
            }
        }
        if out.is_empty() {
            return;
        }
        let mainpid;
        if out.contains(&"READY=1") && !self.mainpid_sent {
            self.mainpid_sent = true;
            mainpid = format!("MAINPID={}", self.me);
            out.push(&mainpid);
        }
        if let Err(e) = crate::core::notify::sd_notify(&out.join("\n")) {
            log::warn!("NOTIFY_SOCKET: {e}");
        }
    }

    /// The link is closed: waits for the masters still exiting and picks
    /// the exit status.
    fn finish(&mut self) -> i32 {
        self.reap(libc::WNOHANG);
        for (&pid, end) in self.masters.iter_mut() {
            if end.is_some() {
                continue;
            }
            let mut status = 0;
            // SAFETY: status is a live out-parameter; a pid that is not our
            // child gives ECHILD at once.
            if unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) } == pid as libc::pid_t {
                let code =
                    if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
                *end = Some(code);
                self.last_exit = Some((pid, code));
            }
        }
        match self.last_exit {
            Some((_, 0)) => {
                log::info!("supervisor: the service stopped");
                0
            }
            Some((pid, code)) => {
                log::error!("supervisor: the last master (pid {pid}) ended with status {code}");
                code.min(255)
            }
            None => {
                log::error!("supervisor: every master is gone, and none was reaped here");
                1
            }
        }
    }
}
