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
use std::time::{Duration, Instant};

pub mod activation;
pub mod link;
mod pidfile;

use crate::core::reactor::{Base, Endpoint, Event, Interest};
use crate::core::signals;
use pidfile::PidFile;

/// The variable naming the listening sockets the supervisor passes to
/// every master it starts: descriptor numbers, comma separated
/// (`3,5,6`), in the order of the endpoints (`--port`, then `--listen`).
pub const ENV_LISTEN_FDS: &str = "HANDOFF_LISTEN_FDS";

/// The variable giving a master the supervisor starts its generation (1,
/// or the one after the last master's).
pub const ENV_GEN: &str = "HANDOFF_GEN";

/// The variable naming the supervisor's pid, for `handoff status`.
pub const ENV_PID: &str = "HANDOFF_SUPERVISOR_PID";

/// Signals the supervisor passes on to the serving master.
const FORWARDED: [i32; 6] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2];

/// The generation a master starts as: what the supervisor says
/// ([`ENV_GEN`], taken from the environment), else 1.
pub fn take_gen() -> u64 {
    let gen = std::env::var(ENV_GEN).ok().and_then(|v| v.parse().ok()).filter(|&g| g >= 1).unwrap_or(1);
    std::env::remove_var(ENV_GEN);
    gen
}

/// Whether this process is a master started by a supervisor (or by the
/// master of the previous generation, which passes the link on).
pub fn supervised() -> bool {
    std::env::var_os(link::ENV_FD).is_some()
}

struct Sup {
    base: Base,
    me: std::rc::Weak<RefCell<Sup>>,
    /// Our pid (the service's).
    pid: u32,
    /// Our end of the current masters' link, and its read event.
    link: Option<(OwnedFd, Event)>,
    /// The listening sockets (systemd's, or bound here), passed to every
    /// master started.
    listeners: Vec<OwnedFd>,
    /// The master signals go to.
    serving: u32,
    /// Masters that said hello, and how each ended once reaped.
    masters: HashMap<u32, Option<i32>>,
    /// The last master's exit, in reaping order.
    last_exit: Option<(u32, i32)>,
    mainpid_sent: bool,
    /// A stop signal came: no master is started again.
    stop_asked: bool,
    /// The current masters said READY=1 at least once.
    ready_seen: bool,
    /// When the current masters' first one started; the next delay
    /// before starting one again after they all died.
    started: Instant,
    backoff: Duration,
    respawn_timer: Option<Event>,
    /// The status to exit with, once decided.
    exit_code: Option<i32>,
    /// The generation last said serving: a master started after a crash
    /// is the next one.
    last_gen: u64,
}

/// Starting the master again after every master died: at once if the
/// last one ran for `STABLE`, else after a delay doubling from 100 ms to
/// 10 s (a crash loop).
const RESPAWN_MIN: Duration = Duration::from_millis(100);
const RESPAWN_MAX: Duration = Duration::from_secs(10);
const STABLE: Duration = Duration::from_secs(1);

/// Runs the supervisor: starts `BIN ARGS...` (our own command line) as
/// the first master and lives as long as the service. Returns the exit
/// status.
pub fn run(pid_file: Option<&Path>, endpoints: &[Endpoint], mode: u32) -> io::Result<i32> {
    let pid = std::process::id();
    signals::ignore_sigpipe();
    // The listening sockets are ours (systemd's, or bound here), passed to
    // every master we start: one started after a crash takes the same
    // sockets, and connects wait in their backlogs meanwhile. A Unix
    // socket file we bound is removed when we exit (the service's end),
    // never by a master: a restart keeps it in place.
    let mut unix_paths = UnixPaths(Vec::new());
    let activated = activation::take();
    let listeners = if activated.is_empty() {
        let mut fds = Vec::new();
        for ep in endpoints {
            fds.push(crate::core::sock::listen_endpoint(ep, mode)?);
            if let Endpoint::Unix(p) = ep {
                unix_paths.0.push(p.clone());
            }
        }
        fds
    } else {
        let mut fds = Vec::new();
        for (fd, name) in activated {
            let at = crate::core::sock::local_endpoint(fd.as_raw_fd())?;
            log::info!("socket activation: serving on the socket systemd passed ({at}, name {name:?})");
            fds.push(fd);
        }
        fds
    };
    if listeners.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "nothing to listen on: give --port or --listen"));
    }
    let pid_file = pid_file.map(|p| PidFile::write(p, pid)).transpose()?;
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes this process's
    // attributes: orphaned masters and workers are reparented to us.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let base = Base::new()?;
    let sup = Rc::new_cyclic(|me| {
        RefCell::new(Sup {
            base: base.clone(),
            me: me.clone(),
            pid,
            link: None,
            listeners,
            serving: 0,
            masters: HashMap::new(),
            last_exit: None,
            mainpid_sent: false,
            stop_asked: false,
            ready_seen: false,
            started: Instant::now(),
            backoff: Duration::ZERO,
            respawn_timer: None,
            exit_code: None,
            last_gen: 0,
        })
    });
    let mut events: Vec<Event> = Vec::new();
    for sig in FORWARDED.into_iter().chain([libc::SIGCHLD]).chain(signals::IGNORED) {
        let s = sup.clone();
        let e = Event::new(&base, sig, Interest::Signal, move || s.borrow_mut().on_signal(sig))?;
        e.add(None)?;
        events.push(e);
    }
    let first = sup.borrow_mut().start_master();
    let result = match first {
        Ok(()) => base.dispatch().map(|()| sup.borrow().exit_code.unwrap_or(1)),
        Err(e) => Err(e),
    };
    drop(events);
    {
        let mut s = sup.borrow_mut();
        s.link = None;
        s.respawn_timer = None;
    }
    if let Some(p) = pid_file {
        p.remove();
    }
    drop(unix_paths);
    result
}

/// The Unix socket files this supervisor bound: removed when it exits.
struct UnixPaths(Vec<std::path::PathBuf>);

impl Drop for UnixPaths {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Starts our own command line again as a master, with the link and the
/// listening socket inherited.
fn spawn_master(link_end: &OwnedFd, listeners: &[OwnedFd], gen: u64) -> io::Result<u32> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(&exe);
    cmd.args(std::env::args_os().skip(1));
    let link_fd = link_end.as_raw_fd();
    cmd.env(link::ENV_FD, link_fd.to_string()).env(ENV_PID, std::process::id().to_string());
    let listen_fds: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
    let names: Vec<String> = listen_fds.iter().map(ToString::to_string).collect();
    cmd.env(ENV_LISTEN_FDS, names.join(",")).env(ENV_GEN, gen.to_string());
    // SAFETY: the closure runs in the forked child before exec and only
    // calls fcntl (async-signal-safe) on descriptors it inherited.
    unsafe {
        cmd.pre_exec(move || {
            inherit(link_fd)?;
            for &fd in &listen_fds {
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
    /// Starts a master with a fresh link.
    fn start_master(&mut self) -> io::Result<()> {
        let (mine, theirs) = crate::core::sock::seqpacket_pair()?;
        let pid = spawn_master(&theirs, &self.listeners, self.last_gen + 1)?;
        drop(theirs);
        let w = self.me.clone();
        let raw = mine.as_raw_fd();
        let e = Event::new(&self.base, raw, Interest::Read, move || {
            if let Some(s) = w.upgrade() {
                s.borrow_mut().on_link(raw);
            }
        })?;
        e.add(None)?;
        self.link = Some((mine, e));
        self.serving = pid;
        self.masters.insert(pid, None);
        self.ready_seen = false;
        self.started = Instant::now();
        log::info!("supervisor pid {}: master pid {pid} started", self.pid);
        Ok(())
    }

    /// Every master has closed its end of the link: the service stopped,
    /// or could not start (we exit with its status), or its last master
    /// died (killed, crashed) while serving: a new one is started, on the
    /// same command line, and serves from scratch (the connections the
    /// dead one held are lost with it).
    fn on_all_masters_gone(&mut self) {
        self.link = None;
        let code = self.finish();
        let crashed = code != 0 && self.ready_seen && !self.stop_asked;
        if !crashed {
            self.exit_code = Some(code);
            self.base.exit(None);
            return;
        }
        if self.started.elapsed() >= STABLE {
            self.backoff = Duration::ZERO;
        }
        let delay = self.backoff;
        self.backoff = if delay.is_zero() { RESPAWN_MIN } else { (delay * 2).min(RESPAWN_MAX) };
        log::error!("every master is gone (the last ended with status {code}): starting a new one in {delay:?}");
        let w = self.me.clone();
        let t = Event::new(&self.base, -1, Interest::Timer, move || {
            let Some(s) = w.upgrade() else { return };
            let mut s = s.borrow_mut();
            s.respawn_timer = None;
            if s.stop_asked {
                s.exit_code = Some(0);
                s.base.exit(None);
            } else if let Err(e) = s.start_master() {
                log::error!("cannot start a master: {e}");
                s.exit_code = Some(1);
                s.base.exit(None);
            }
        });
        match t.and_then(|t| t.add(Some(delay)).map(|()| t)) {
            Ok(t) => self.respawn_timer = Some(t),
            Err(e) => {
                log::error!("respawn timer: {e}");
                self.exit_code = Some(code);
                self.base.exit(None);
            }
        }
    }

    fn on_signal(&mut self, sig: i32) {
        let name = signals::name(sig);
        if sig == libc::SIGCHLD {
            return self.reap(libc::WNOHANG);
        }
        if !FORWARDED.contains(&sig) {
            return log::warn!("{name} has no meaning here; ignored");
        }
        if matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGQUIT) {
            self.stop_asked = true;
            if self.link.is_none() {
                // Between a dead master and its replacement: nothing to stop.
                self.exit_code = Some(0);
                self.respawn_timer = None;
                self.base.exit(None);
                return;
            }
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
                return self.on_all_masters_gone();
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
            } else if let Some(g) = line.strip_prefix("HANDOFF_GEN=").and_then(|v| v.parse::<u64>().ok()) {
                self.last_gen = g;
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
        if out.contains(&"READY=1") {
            self.ready_seen = true;
        }
        let mainpid;
        if out.contains(&"READY=1") && !self.mainpid_sent {
            self.mainpid_sent = true;
            mainpid = format!("MAINPID={}", self.pid);
            out.push(&mainpid);
        }
        if let Err(e) = crate::core::notify::sd_notify(&out.join("\n")) {
            log::warn!("NOTIFY_SOCKET: {e}");
        }
    }

    /// The link is closed: waits for the masters still exiting and picks
    /// the status the last one ended with.
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
        let code = match self.last_exit {
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
        };
        self.masters.clear();
        self.last_exit = None;
        code
    }
}
