//! Hot restart, master side. The old master (generation G) spawns the new
//! binary as `handoff takeover --dir D`; the new master connects to the
//! control socket, receives the listening socket and the config, starts
//! its workers (generation G+1) and says READY. The old master stops
//! accepting (the socket stays open: the new one holds it), tells its
//! workers to DRAIN, and forwards every connection they release —
//! descriptor plus read-ahead bytes — to the new master, which gives it
//! to one of its workers. The old generation exits when it owns nothing.
use clap::ValueEnum;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::{json, Value};

use super::{with, Config, Master};
use crate::channel::{wire, Channel, ChannelEvent, Msg};
use crate::cluster::control::Client;
use crate::cluster::{
    Policy, KIND_DRAIN, KIND_RESTART_REPLY, KIND_RESTART_REQ, KIND_TAKEOVER_HELLO, KIND_TAKEOVER_READY,
};
use crate::reactor::{Event, Interest};

/// How long the new master may take to connect and say READY by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DONE_POLL: Duration = Duration::from_millis(5);

/// A restart in progress, seen from the old master.
pub(super) struct Outgoing {
    child: Option<Child>,
    /// The control client (`handoff restart`) waiting for the verdict.
    reply_to: Option<u64>,
    timer: Option<Event>,
    ready: bool,
    /// Benchmark contrast: move only the listener and cut the old
    /// connections (what a listener-only restart with a zero drain does).
    listeners_only: bool,
    /// Bounds the handover: connections that could not move within
    /// `--grace` (a client that never reads its replies) are cut.
    drain_timer: Option<Event>,
}

impl Master {
    /// Starts the new generation (`binary`, or our own executable).
    pub(super) fn begin_restart(
        &mut self,
        binary: Option<PathBuf>,
        timeout: Duration,
        reply_to: Option<u64>,
        listeners_only: bool,
    ) {
        if self.restart.is_some() || self.stopping {
            self.reply_restart(
                reply_to,
                json!({"ok": false, "reason": "a restart or shutdown is already in progress"}),
            );
            return;
        }
        let binary = binary.unwrap_or_else(|| self.cfg.exe.clone());
        log::info!("restart: starting {} to take over generation {}", binary.display(), self.cfg.gen);
        let spawned =
            Command::new(&binary).arg("takeover").arg("--dir").arg(&self.cfg.dir).args(&self.cfg.log_args).spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("cannot start {}: {e}", binary.display());
                log::error!("restart failed: {reason}");
                self.reply_restart(reply_to, json!({"ok": false, "reason": reason}));
                return;
            }
        };
        let w = self.me.clone();
        let timer = Event::new(&self.base, -1, Interest::Timer, move || {
            with(&w, |m| m.restart_failed(format!("the new master did not take over within {timeout:?}")))
        })
        .and_then(|t| t.add(Some(timeout)).map(|()| t));
        self.restart = Some(Outgoing {
            child: Some(child),
            reply_to,
            timer: timer.ok(),
            ready: false,
            listeners_only,
            drain_timer: None,
        });
    }

    /// The new master is gone or late before READY: the old generation
    /// simply keeps serving.
    pub(super) fn restart_failed(&mut self, reason: String) {
        let Some(mut r) = self.restart.take() else { return };
        if r.ready {
            // Too late to go back: connections are moving. Say so and go on.
            log::error!("restart: {reason} after the handover began");
            self.restart = Some(r);
            return;
        }
        log::error!("restart failed: {reason}; generation {} keeps serving", self.cfg.gen);
        if let Some(c) = r.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(s) = self.successor.take() {
            s.shutdown();
        }
        self.reply_restart(r.reply_to, json!({"ok": false, "reason": reason}));
    }

    fn reply_restart(&mut self, to: Option<u64>, v: Value) {
        if let Some(c) = to.and_then(|id| self.clients.get(&id)) {
            let _ = c.send(Msg::control(KIND_RESTART_REPLY, v.to_string().into_bytes()));
        }
    }

    /// SIGCHLD for the new master: before READY, the restart failed.
    pub(super) fn reap_successor(&mut self) {
        let Some(r) = self.restart.as_mut() else { return };
        let Some(child) = r.child.as_mut() else { return };
        if let Ok(Some(status)) = child.try_wait() {
            r.child = None;
            self.restart_failed(format!("the new master exited: {status}"));
        }
    }

    /// `handoff restart` asked (over the control socket).
    pub(super) fn on_restart_request(&mut self, client: u64, body: &[u8]) {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let binary = v["binary"].as_str().map(PathBuf::from);
        let timeout = v["timeout"].as_f64().map_or(DEFAULT_TIMEOUT, |s| Duration::from_secs_f64(s.clamp(0.1, 3600.0)));
        let listeners_only = v["listeners_only"] == json!(true);
        self.begin_restart(binary, timeout, Some(client), listeners_only);
    }

    /// A new master said hello: give it the listening socket and config.
    pub(super) fn on_takeover_hello(&mut self, client: u64) {
        let Some(ch) = self.clients.remove(&client) else { return };
        if self.stopping || self.successor.is_some() {
            log::warn!("takeover refused: {}", if self.stopping { "stopping" } else { "another takeover runs" });
            ch.shutdown();
            return;
        }
        let fd = match self.listening_fd() {
            Ok(fd) => fd,
            Err(e) => {
                log::error!("takeover: cannot duplicate the listening socket: {e}");
                ch.shutdown();
                return;
            }
        };
        let cfg = json!({
            "host": self.cfg.host,
            "port": self.port,
            "workers": self.cfg.workers,
            "policy": self.cfg.policy.name(),
            "max_frame": self.cfg.max_frame,
            "grace": self.cfg.grace.as_secs_f64(),
            "gen": self.cfg.gen,
        });
        let msg = Msg {
            kind: wire::KIND_LISTENER,
            flags: 0,
            id: 0,
            body: cfg.to_string().into_bytes(),
            fd: Some(fd),
            meta: 0,
        };
        if ch.send(msg).is_err() {
            log::error!("takeover: the new master's channel broke");
            return;
        }
        if self.restart.is_none() {
            // Started by hand (`handoff takeover`), not by us: still fine.
            self.restart = Some(Outgoing {
                child: None,
                reply_to: None,
                timer: None,
                ready: false,
                listeners_only: false,
                drain_timer: None,
            });
        }
        // Its events now go to on_successor.
        let w = self.me.clone();
        ch.set_handler(move |ev| with(&w, |m| m.on_successor(ev)));
        self.successor = Some(ch);
    }

    fn listening_fd(&self) -> io::Result<OwnedFd> {
        match (&self.listener, &self.shared_fd) {
            (Some(l), _) => l.as_fd().try_clone_to_owned(),
            (None, Some(fd)) => fd.try_clone(),
            _ => Err(io::Error::other("no listening socket")),
        }
    }

    fn on_successor(&mut self, ev: ChannelEvent) {
        match ev {
            ChannelEvent::Msg(m) if m.kind == KIND_TAKEOVER_READY => self.hand_over(),
            ChannelEvent::Msg(m) => log::warn!("successor: unexpected message kind {}", m.kind),
            ChannelEvent::Closed { reason, returned } => {
                let why = reason.map_or("closed".to_string(), |e| e.to_string());
                self.successor = None;
                if self.restart.as_ref().is_some_and(|r| r.ready) {
                    log::error!("successor channel {why} mid-handover; {} connection(s) come back", returned.len());
                    // Our workers are draining; serve these by respawning is
                    // not possible now: they are closed, and said so.
                } else {
                    self.restart_failed(format!("the new master refused or dropped the takeover ({why})"));
                }
            }
        }
    }

    /// READY: stop accepting, drain the workers into the successor.
    fn hand_over(&mut self) {
        let Some(r) = self.restart.as_mut() else { return };
        r.ready = true;
        r.timer = None;
        let cut = r.listeners_only;
        log::info!("restart: generation {} is ready; handing over connections", self.cfg.gen + 1);
        // Our copy of the listening socket goes; the successor holds it open.
        self.listener = None;
        self.shared_fd = None;
        self.draining = true;
        let pending: Vec<(Option<usize>, Msg)> = self.pending.drain(..).collect();
        for (_, m) in pending {
            self.forward(m);
        }
        for slot in &mut self.slots {
            if cut {
                // Listener-only restart: the old connections are cut.
                slot.held.clear();
                if let Some(c) = slot.child.as_mut() {
                    let _ = c.kill();
                }
            } else if let Some(c) = &slot.channel {
                let _ = c.send(Msg::control(KIND_DRAIN, Vec::new()));
            }
        }
        let w = self.me.clone();
        match Event::new(&self.base, -1, Interest::Timer, move || with(&w, |m| m.check_done())) {
            Ok(t) => {
                let _ = t.add(Some(DONE_POLL));
                self.done_timer = Some(t);
            }
            Err(e) => log::error!("restart: {e}"),
        }
        let w = self.me.clone();
        let grace = self.cfg.grace;
        match Event::new(&self.base, -1, Interest::Timer, move || with(&w, |m| m.drain_overdue())) {
            Ok(t) => {
                let _ = t.add(Some(grace));
                if let Some(r) = self.restart.as_mut() {
                    r.drain_timer = Some(t);
                }
            }
            Err(e) => log::error!("restart: {e}"),
        }
    }

    /// `--grace` after READY some connections still could not move (their
    /// responses do not drain): they are cut, and the old generation ends.
    fn drain_overdue(&mut self) {
        for slot in &mut self.slots {
            let Some(child) = slot.child.as_mut() else { continue };
            log::warn!(
                "restart: worker {} still holds {} connection(s) after {:?}; cutting them",
                slot.index,
                slot.held.len(),
                self.cfg.grace
            );
            slot.held.clear();
            let _ = child.kill();
        }
    }

    /// Gives a connection to the successor.
    pub(super) fn forward(&mut self, msg: Msg) {
        match &self.successor {
            Some(s) => {
                if s.send(msg).is_err() {
                    log::error!("restart: successor gone; a connection is closed");
                }
            }
            None => log::error!("restart: no successor; a connection is closed"),
        }
    }

    /// Done when every worker has exited and the successor acknowledged
    /// every connection.
    fn check_done(&mut self) {
        let workers_gone = self.slots.iter().all(|s| s.child.is_none());
        let delivered = self.successor.as_ref().is_none_or(|s| s.in_flight() == 0);
        if !(workers_gone && delivered) {
            if let Some(t) = &self.done_timer {
                let _ = t.add(Some(DONE_POLL));
            }
            return;
        }
        let (pid, reply_to) = match self.restart.as_mut() {
            Some(r) => (r.child.as_ref().map_or(0, Child::id), r.reply_to),
            None => (0, None),
        };
        log::info!("restart: generation {} handed everything over; exiting", self.cfg.gen);
        self.reply_restart(reply_to, json!({"ok": true, "pid": pid, "gen": self.cfg.gen + 1}));
        // The control path now belongs to the successor: leave it.
        if let Some(c) = self.control.take() {
            c.forget_path();
        }
        if let Some(s) = self.successor.take() {
            s.shutdown();
        }
        self.done_timer = None;
        self.signals.clear();
        self.base.exit(Some(Duration::from_millis(20)));
    }

    /// New side: the predecessor's channel delivers connections.
    pub(super) fn attach_predecessor(&mut self, fd: OwnedFd) -> io::Result<()> {
        let w = self.me.clone();
        let ch = Channel::new(&self.base, fd, move |ev| with(&w, |m| m.on_predecessor(ev)))?;
        let _ = ch.send(Msg::control(KIND_TAKEOVER_READY, Vec::new()));
        self.predecessor = Some(ch);
        Ok(())
    }

    fn on_predecessor(&mut self, ev: ChannelEvent) {
        match ev {
            ChannelEvent::Msg(m) if m.kind == wire::KIND_CONN => self.dispatch(m),
            ChannelEvent::Msg(m) => log::warn!("predecessor: unexpected message kind {}", m.kind),
            ChannelEvent::Closed { .. } => {
                log::info!("takeover complete: generation {} is gone", self.cfg.gen - 1);
                self.predecessor = None;
            }
        }
    }
}

/// `handoff takeover --dir D`: the new master's start. Asks the master in
/// `dir` for its listening socket and config, then serves as the next
/// generation.
pub fn takeover(dir: &Path, exe: PathBuf, log_args: Vec<String>) -> io::Result<()> {
    let mut c = Client::connect(dir)?;
    c.send(KIND_TAKEOVER_HELLO, json!({"pid": std::process::id()}).to_string().as_bytes())?;
    let (body, fd) = c.recv(wire::KIND_LISTENER, DEFAULT_TIMEOUT)?;
    let fd = fd.ok_or_else(|| io::Error::other("takeover: no listening socket"))?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("takeover: bad config field {what}"));
    let cfg = Config {
        host: v["host"].as_str().ok_or_else(|| bad("host"))?.to_string(),
        port: v["port"].as_u64().ok_or_else(|| bad("port"))? as u16,
        workers: v["workers"].as_u64().ok_or_else(|| bad("workers"))? as usize,
        dir: dir.to_path_buf(),
        policy: Policy::from_str(v["policy"].as_str().unwrap_or(""), false).map_err(|_| bad("policy"))?,
        max_frame: v["max_frame"].as_u64().ok_or_else(|| bad("max_frame"))? as usize,
        grace: Duration::from_secs_f64(v["grace"].as_f64().unwrap_or(5.0)),
        exe,
        log_args,
        gen: v["gen"].as_u64().ok_or_else(|| bad("gen"))? + 1,
        node: None,
    };
    super::serve(cfg, fd, Some(c.into_fd()))
}

/// `handoff restart --dir D`: asks the master for a restart and waits
/// until the old generation is gone. Returns the reply (`ok` true).
pub fn request(dir: &Path, binary: Option<&Path>, timeout: Duration, listeners_only: bool) -> io::Result<Value> {
    let mut c = Client::connect(dir)?;
    let body = json!({"binary": binary.map(|b| b.display().to_string()), "timeout": timeout.as_secs_f64(),
                      "listeners_only": listeners_only});
    c.send(KIND_RESTART_REQ, body.to_string().as_bytes())?;
    // Timeout to READY, then the drain itself (bounded by the workers).
    let (reply, _) = c.recv(KIND_RESTART_REPLY, timeout + Duration::from_secs(60))?;
    let v: Value = serde_json::from_slice(&reply).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if v["ok"] == json!(true) {
        Ok(v)
    } else {
        Err(io::Error::other(format!("restart failed: {}", v["reason"].as_str().unwrap_or("unknown reason"))))
    }
}
