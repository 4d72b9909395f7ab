//! `handoff pair`: runs both servers of a pair as two child processes,
//! starts a server again when it dies (the other serves alone meanwhile),
//! and passes signals on to them:
//!
//! | signal | what the launcher does |
//! |---|---|
//! | TERM, INT, QUIT | passes it on; exits once both servers have stopped (no respawn) |
//! | TERM or INT again | passes it on again: the servers stop now |
//! | HUP, USR1, USR2 | passes it on (the servers restart in place, or reopen their logs) |
//! | any other in `core::signals::IGNORED` (ALRM, PWR, ...) | logged and ignored |
//!
//! Each server runs in its own process group (a terminal's Ctrl-C reaches
//! the launcher alone, which passes one SIGINT on, not a second one) and
//! gets SIGTERM if the launcher dies. The launcher reads their stdout and
//! logs each line (`server 7000: ready ...` after an in-place restart).
use std::cell::RefCell;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use crate::core::reactor::{Base, Event, Interest};
use crate::core::signals;

/// How one server of the pair is started: `EXE server ...`, with the
/// service's options in `HANDOFF_OPTIONS`.
#[derive(Clone)]
struct ServerCmd {
    exe: PathBuf,
    dir: PathBuf,
    host: String,
    log_args: Vec<String>,
    options: String,
    grace: Duration,
}

impl ServerCmd {
    fn command(&self, port: u16, peer: u16) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(["server", "--port", &port.to_string(), "--peer-port", &peer.to_string(), "--host", &self.host])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--grace", &self.grace.as_secs_f64().to_string()])
            .args(self.log_args.iter().map(|a| a.replace("{port}", &port.to_string())))
            .env("HANDOFF_OPTIONS", &self.options)
            .env_remove(super::reexec::STATE_ENV)
            .stdout(Stdio::piped())
            .process_group(0);
        let launcher = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec the closure only makes
        // async-signal-safe calls (prctl, getppid) and allocates nothing.
        unsafe {
            c.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The launcher died before the prctl: nobody would stop us.
                if libc::getppid() != launcher {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        c
    }
}

/// Runs both servers of a pair until SIGINT/SIGTERM/SIGQUIT, starting
/// again one that dies. `grace` is each server's `--grace`.
pub fn run(
    exe: &Path,
    ports: (u16, u16),
    dir: &Path,
    host: &str,
    log_args: &[String],
    options: &serde_json::Value,
    grace: Duration,
) -> io::Result<()> {
    let cmd = ServerCmd {
        exe: exe.to_path_buf(),
        dir: dir.to_path_buf(),
        host: host.to_string(),
        log_args: log_args.to_vec(),
        options: options.to_string(),
        grace,
    };
    let base = Base::new()?;
    let mut children = Vec::new();
    let mut outs = Vec::new();
    for (me, peer) in [(ports.0, ports.1), (ports.1, ports.0)] {
        let mut child = cmd.command(me, peer).spawn()?;
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let line = next_line(&mut out);
        if !line.starts_with("ready") {
            let _ = child.kill();
            let _ = child.wait();
            for c in &mut children {
                stop(c);
            }
            return Err(io::Error::other(format!("server on port {me} did not start")));
        }
        log::info!("server {me} (pid {}) {}", child.id(), line.trim_end());
        children.push(child);
        outs.push(out);
    }
    // Ready means both are linked: a client never sees a server alone.
    for (out, port) in outs.iter_mut().zip([ports.0, ports.1]) {
        let line = next_line(out);
        if !line.starts_with("linked") {
            for c in &mut children {
                stop(c);
            }
            return Err(io::Error::other(format!("server on port {port} did not link to its peer")));
        }
    }

    let servers: Vec<Managed> = children
        .into_iter()
        .zip([(ports.0, ports.1), (ports.1, ports.0)])
        .map(|(child, (port, peer))| Managed {
            port,
            peer,
            child: Some(child),
            started: Instant::now(),
            backoff: Duration::ZERO,
            timer: None,
            out: None,
        })
        .collect();
    let state = Rc::new_cyclic(|me| {
        RefCell::new(Launcher { base: base.clone(), me: me.clone(), cmd, servers, stopping: false })
    });
    // From now on their stdout is read as it comes (what the blocking
    // reads above buffered first).
    for (i, out) in outs.into_iter().enumerate() {
        let early = out.buffer().to_vec();
        state.borrow_mut().watch(i, OwnedFd::from(out.into_inner()), early);
    }
    let mut events = Vec::new();
    let caught = [libc::SIGINT, libc::SIGTERM, libc::SIGQUIT, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2];
    for sig in caught.into_iter().chain(signals::IGNORED) {
        let st = state.clone();
        let e = Event::new(&base, sig, Interest::Signal, move || st.borrow_mut().on_signal(sig))?;
        e.add(None)?;
        events.push(e);
    }
    let st = Rc::downgrade(&state);
    let chld = Event::new(&base, libc::SIGCHLD, Interest::Signal, move || {
        if let Some(s) = st.upgrade() {
            Launcher::reap(&s);
        }
    })?;
    chld.add(None)?;
    events.push(chld);
    // A server that died before SIGCHLD was watched is reaped now.
    Launcher::reap(&state);
    // Ready only once the signals are ours: a HUP that comes on the ready
    // line restarts the servers instead of killing the launcher.
    signals::ready(&format!("ready ports={},{} dir={}", ports.0, ports.1, dir.display()));
    base.dispatch()?;
    drop(events);
    for m in state.borrow_mut().servers.iter_mut() {
        if let Some(c) = m.child.as_mut() {
            stop(c);
        }
        m.timer = None;
        m.out = None;
    }
    Ok(())
}

/// One of the two servers, replaced when it dies.
struct Managed {
    port: u16,
    peer: u16,
    child: Option<Child>,
    started: Instant,
    backoff: Duration,
    timer: Option<Event>,
    /// Its stdout, read as lines come.
    out: Option<Output>,
}

/// A server's stdout pipe (non-blocking) and the partial line read so far.
struct Output {
    // Before `pipe`: the event leaves epoll before the pipe closes.
    _event: Event,
    pipe: std::fs::File,
    partial: Vec<u8>,
}

struct Launcher {
    base: Base,
    me: Weak<RefCell<Launcher>>,
    cmd: ServerCmd,
    servers: Vec<Managed>,
    stopping: bool,
}

/// A server that dies is started again: at once if it ran for a while,
/// else after a backoff of 100 ms doubling to 10 s (a crash loop).
const RESPAWN_MIN: Duration = Duration::from_millis(100);
const RESPAWN_MAX: Duration = Duration::from_secs(10);
const STABLE: Duration = Duration::from_secs(1);

impl Launcher {
    fn on_signal(&mut self, sig: i32) {
        let name = signals::name(sig);
        match sig {
            libc::SIGTERM | libc::SIGINT | libc::SIGQUIT => {
                if !self.stopping {
                    log::info!("{name}: stopping both servers (they get --grace to finish)");
                } else if sig == libc::SIGQUIT {
                    log::info!("{name}: already stopping");
                } else {
                    log::warn!("{name} again: the servers stop now");
                }
                self.stopping = true;
                for m in &mut self.servers {
                    m.timer = None;
                }
                self.forward(sig);
                if self.servers.iter().all(|m| m.child.is_none()) {
                    self.base.exit(None);
                }
            }
            libc::SIGHUP | libc::SIGUSR1 | libc::SIGUSR2 => {
                log::info!("{name}: passed on to both servers");
                self.forward(sig);
            }
            _ => log::warn!("{name} has no meaning here; ignored"),
        }
    }

    fn forward(&self, sig: i32) {
        for m in &self.servers {
            if let Some(c) = &m.child {
                // SAFETY: plain kill(2) of our own, not yet reaped child.
                unsafe { libc::kill(c.id() as i32, sig) };
            }
        }
    }

    /// Reads server `i`'s stdout from now on.
    fn watch(&mut self, i: usize, fd: OwnedFd, partial: Vec<u8>) {
        // SAFETY: fcntl on a pipe we own; only its status flags change.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let w = self.me.clone();
        let ev = Event::new(&self.base, fd.as_raw_fd(), Interest::Read, move || {
            if let Some(l) = w.upgrade() {
                l.borrow_mut().read_output(i);
            }
        });
        match ev.and_then(|e| e.add(None).map(|()| e)) {
            Ok(e) => self.servers[i].out = Some(Output { _event: e, pipe: fd.into(), partial }),
            Err(e) => log::error!("server {}: cannot read its output: {e}", self.servers[i].port),
        }
    }

    fn read_output(&mut self, i: usize) {
        let m = &mut self.servers[i];
        let Some(out) = m.out.as_mut() else { return };
        let mut buf = [0u8; 4096];
        let done = loop {
            match (&out.pipe).read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => out.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        while let Some(n) = out.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = out.partial.drain(..=n).collect();
            log::info!("server {}: {}", m.port, String::from_utf8_lossy(&line).trim_end());
        }
        if done {
            m.out = None;
        }
    }

    fn reap(this: &Rc<RefCell<Launcher>>) {
        let mut l = this.borrow_mut();
        let stopping = l.stopping;
        for i in 0..l.servers.len() {
            let m = &mut l.servers[i];
            let Some(child) = m.child.as_mut() else { continue };
            let Ok(Some(st)) = child.try_wait() else { continue };
            let pid = child.id();
            m.child = None;
            if stopping {
                log::info!("server {} (pid {pid}) exited: {st}", m.port);
                continue;
            }
            if m.started.elapsed() >= STABLE {
                m.backoff = Duration::ZERO;
            }
            let delay = m.backoff;
            m.backoff = if delay.is_zero() { RESPAWN_MIN } else { (delay * 2).min(RESPAWN_MAX) };
            if delay.is_zero() {
                log::warn!("server {} (pid {pid}) exited: {st}; starting it again", m.port);
            } else {
                log::warn!("server {} (pid {pid}) exited: {st}; starting it again in {delay:?}", m.port);
            }
            Launcher::schedule(&mut l, this, i, delay);
        }
        if stopping && l.servers.iter().all(|m| m.child.is_none()) {
            l.base.exit(None);
        }
    }

    fn schedule(l: &mut Launcher, this: &Rc<RefCell<Launcher>>, i: usize, delay: Duration) {
        let w = Rc::downgrade(this);
        let t = Event::new(&l.base, -1, Interest::Timer, move || {
            if let Some(s) = w.upgrade() {
                Launcher::respawn(&s, i);
            }
        });
        match t.and_then(|t| t.add(Some(delay)).map(|()| t)) {
            Ok(t) => l.servers[i].timer = Some(t),
            Err(e) => log::error!("respawn timer: {e}"),
        }
    }

    fn respawn(this: &Rc<RefCell<Launcher>>, i: usize) {
        let mut l = this.borrow_mut();
        if l.stopping || l.servers[i].child.is_some() {
            return;
        }
        let (port, peer) = (l.servers[i].port, l.servers[i].peer);
        let spawned = l.cmd.command(port, peer).spawn();
        let m = &mut l.servers[i];
        m.started = Instant::now();
        m.timer = None;
        match spawned {
            Ok(mut c) => {
                log::info!("server {port} started again, pid {}", c.id());
                let out = c.stdout.take().map(OwnedFd::from);
                m.child = Some(c);
                if let Some(fd) = out {
                    l.watch(i, fd, Vec::new());
                }
            }
            Err(e) => {
                let delay = m.backoff.max(RESPAWN_MIN);
                m.backoff = (delay * 2).min(RESPAWN_MAX);
                log::error!("cannot start server {port}: {e}; trying again in {delay:?}");
                Launcher::schedule(&mut l, this, i, delay);
            }
        }
    }
}

fn stop(c: &mut Child) {
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let _ = c.wait();
}

/// The next stdout line of a server ("" at EOF).
fn next_line(out: &mut BufReader<std::process::ChildStdout>) -> String {
    let mut line = String::new();
    let _ = out.read_line(&mut line);
    line
}
