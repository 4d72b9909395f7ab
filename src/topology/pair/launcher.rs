//! `handoff pair`: runs both servers of a pair as two child processes,
//! starts a server again when it dies (the other serves alone meanwhile),
//! forwards SIGINT/SIGTERM/SIGQUIT to them and exits when both are gone.
use std::cell::RefCell;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::core::reactor::{Base, Event, Interest};

/// How one server of the pair is started: `EXE server ...`, with the
/// service's options in `HANDOFF_OPTIONS`.
#[derive(Clone)]
struct ServerCmd {
    exe: PathBuf,
    dir: PathBuf,
    host: String,
    log_args: Vec<String>,
    options: String,
}

impl ServerCmd {
    fn command(&self, port: u16, peer: u16) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(["server", "--port", &port.to_string(), "--peer-port", &peer.to_string(), "--host", &self.host])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.log_args)
            .env("HANDOFF_OPTIONS", &self.options);
        c
    }
}

/// Runs both servers of a pair until SIGINT/SIGTERM/SIGQUIT, starting
/// again one that dies.
pub fn run(
    exe: &Path,
    ports: (u16, u16),
    dir: &Path,
    host: &str,
    log_args: &[String],
    options: &serde_json::Value,
) -> io::Result<()> {
    let cmd = ServerCmd {
        exe: exe.to_path_buf(),
        dir: dir.to_path_buf(),
        host: host.to_string(),
        log_args: log_args.to_vec(),
        options: options.to_string(),
    };
    let base = Base::new()?;
    let mut children = Vec::new();
    let mut outs = Vec::new();
    for (me, peer) in [(ports.0, ports.1), (ports.1, ports.0)] {
        let mut child = cmd.command(me, peer).stdout(Stdio::piped()).spawn()?;
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
    crate::core::signals::ready(&format!("ready ports={},{} dir={}", ports.0, ports.1, dir.display()));

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
        })
        .collect();
    let state = Rc::new(RefCell::new(Launcher { base: base.clone(), cmd, servers, stopping: false }));
    let mut events = Vec::new();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGQUIT] {
        let st = state.clone();
        let e = Event::new(&base, sig, Interest::Signal, move || st.borrow_mut().stop_all())?;
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
    base.dispatch()?;
    drop(events);
    for m in state.borrow_mut().servers.iter_mut() {
        if let Some(c) = m.child.as_mut() {
            stop(c);
        }
        m.timer = None;
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
}

struct Launcher {
    base: Base,
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
    fn stop_all(&mut self) {
        self.stopping = true;
        for m in &mut self.servers {
            m.timer = None;
            if let Some(c) = &m.child {
                // SAFETY: plain kill(2) of our own child.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
        }
        if self.servers.iter().all(|m| m.child.is_none()) {
            self.base.exit(None);
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
        let spawned = l.cmd.command(port, peer).stdout(Stdio::null()).spawn();
        let m = &mut l.servers[i];
        m.started = Instant::now();
        m.timer = None;
        match spawned {
            Ok(c) => {
                log::info!("server {port} started again, pid {}", c.id());
                m.child = Some(c);
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
