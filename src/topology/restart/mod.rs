//! Hot restart, master side: a takeover is a transaction.
//!
//! | phase | listener | connections of the old generation |
//! |---|---|---|
//! | PREPARE: old spawns `handoff takeover`, sends it a copy of the listening socket on HELLO; the new master starts its workers and says READY | old accepts; new holds a copy and accepts nothing | old workers serve them |
//! | MOVE: old tells its workers to DRAIN; each connection goes back to the old master between requests (a CONN marked released, with its read-ahead) and on to the new master (CONN) | old accepts, and forwards each new connection | in flight: owned by the old side until ACKed; after the ACK the new side owns it and the old master keeps a copy (descriptor + read-ahead). A connection with no read-ahead is served at once; one with read-ahead is held *unread* by the new master until COMMIT, so that the copy of its bytes stays exact |
//! | COMMIT: every old worker has exited and the new master ACKed everything; old sends COMMIT; new checks that its workers are up, answers COMMITTED, starts accepting and serving what it holds | new | new |
//! | ABORT (any failure before COMMITTED: the new master dies, times out, refuses, or cannot take connections) | old, unchanged | old: it kills the new master, waits for it, then serves every copy again, with the read-ahead it had (nothing was read from those). Only a request in flight inside the new generation when it died is lost |
//!
//! `handoff restart` exits 0 only after COMMITTED, and after it has
//! itself seen the new generation answer on the port. A new master whose
//! predecessor dies before COMMIT is alone: it commits by itself.
use clap::ValueEnum;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::{json, Value};

use crate::core::channel::{wire, Channel, ChannelEvent, Msg};
use crate::core::reactor::{Endpoint, Event, Interest};
use crate::topology::cluster::control::Client;
use crate::topology::cluster::control_path;
use crate::topology::cluster::master::{metrics, with, Config, Master};
use crate::topology::cluster::{
    Policy, KIND_DRAIN, KIND_RESTART_PROBED, KIND_RESTART_REPLY, KIND_RESTART_REQ, KIND_TAKEOVER_BEGUN,
    KIND_TAKEOVER_COMMIT, KIND_TAKEOVER_COMMITTED, KIND_TAKEOVER_ENDED, KIND_TAKEOVER_HELLO, KIND_TAKEOVER_READY,
};
use crate::topology::supervisor::link;

/// How long the new master may take to connect and say READY by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new master may take to answer COMMIT.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
const DONE_POLL: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Prepare,
    Move,
    Commit,
    /// COMMITTED, until `handoff restart` has seen the new generation
    /// answer: the old master keeps its listener and its copies, and
    /// resumes if the new master dies meanwhile.
    Standby,
}

/// Connections forwarded to the successor and not yet acknowledged by it,
/// past which the old master stops reading its workers until it catches up.
const FORWARD_WINDOW: usize = 256;

/// The same, when the successor reads CONNS batches: a window of whole
/// batches (each up to 253 connections), so that the move is not one
/// round trip per batch.
const FORWARD_WINDOW_BATCHED: usize = 64 * wire::MAX_BATCH;

/// DRAIN's body: this master reads CONNS batches from its workers.
const DRAIN_BATCH: &[u8] = br#"{"batch":true}"#;

/// Longest standby after COMMITTED (a restart client that never reports).
const STANDBY_MAX: Duration = Duration::from_secs(15);

/// The binary a restart starts the new generation from.
#[derive(Debug, Clone)]
pub(crate) enum Binary {
    /// The executable this master runs (HUP: a reload), even if the file
    /// at its path was replaced since.
    Running,
    /// The file at this path now (USR2, `handoff restart`: an upgrade).
    Path(PathBuf),
}

/// The variable naming the running executable's descriptor, passed to
/// the new master of a reload.
const ENV_EXE_FD: &str = "HANDOFF_EXE_FD";
/// The variable naming the path the service was started from, which a
/// new master keeps as its own (`Config::exe`).
pub const ENV_EXE: &str = "HANDOFF_EXE";
/// Set for a master started by a restart: it takes over from the master
/// serving in its `--dir` instead of binding.
pub const ENV_TAKEOVER: &str = "HANDOFF_TAKEOVER";

/// The executable this master runs, kept open for a reload: the one its
/// predecessor passed, or `exe` opened now.
pub(crate) fn open_exe(exe: &Path) -> Option<OwnedFd> {
    if let Some(v) = std::env::var_os(ENV_EXE_FD) {
        std::env::remove_var(ENV_EXE_FD);
        if let Some(fd) = v.to_str().and_then(|s| s.parse::<std::os::fd::RawFd>().ok()).filter(|&fd| fd > 2) {
            // SAFETY: fcntl on a descriptor number has no memory effects.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == 0 {
                // SAFETY: the previous master passed this descriptor for us.
                return Some(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) });
            }
        }
    }
    match std::fs::File::open(exe) {
        Ok(f) => Some(f.into()),
        Err(e) => {
            log::warn!("cannot open {}: {e}; a reload will start the file at that path", exe.display());
            None
        }
    }
}

/// A restart in progress, seen from the old master.
pub(crate) struct Outgoing {
    child: Option<Child>,
    /// The new master's pid (from its HELLO).
    pid: u32,
    /// The control client (`handoff restart`) waiting for the verdict.
    reply_to: Option<u64>,
    /// PREPARE and COMMIT deadlines.
    timer: Option<Event>,
    phase: Phase,
    /// Benchmark contrast: move only the listener and cut the old
    /// connections (what a listener-only restart with a zero drain does).
    listeners_only: bool,
    /// Bounds the move: `--grace` after READY, connections whose replies
    /// the client never reads are cut.
    drain_timer: Option<Event>,
}

impl Outgoing {
    /// The new master's pid once it has said hello (it may be stopped).
    pub(crate) fn successor_pid(&self) -> Option<u32> {
        (self.phase != Phase::Prepare && self.pid != 0).then_some(self.pid)
    }
}

impl Master {
    /// Starts the new generation (`binary`, or our own executable).
    pub(crate) fn begin_restart(
        &mut self,
        binary: Binary,
        timeout: Duration,
        reply_to: Option<u64>,
        listeners_only: bool,
    ) {
        if self.predecessor.is_some() && !self.takeover_pending && self.restart.is_none() && !self.stopping {
            // Committed, but the old master is still on its way out: the
            // restart starts as soon as it is gone.
            log::info!("restart queued until generation {} has exited", self.cfg.gen - 1);
            self.queued_restart = Some((binary, timeout, reply_to, listeners_only));
            return;
        }
        let refuse = if self.restart.is_some() {
            Some("a restart is already in progress")
        } else if self.predecessor.is_some() {
            Some("this generation is still taking over from the previous one; try again once it has committed")
        } else if self.stopping {
            Some("the master is stopping")
        } else {
            None
        };
        if let Some(reason) = refuse {
            log::warn!("restart refused: {reason}");
            self.reply_restart(reply_to, json!({"ok": false, "reason": reason}));
            return;
        }
        let spawned = self.start_successor(&binary);
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("cannot start the new generation: {e}");
                log::error!("restart failed: {reason}");
                self.reply_restart(reply_to, json!({"ok": false, "reason": reason}));
                return;
            }
        };
        link::tell(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=restarting: generation {} takes over from generation {}",
            crate::core::notify::monotonic_usec(),
            self.cfg.gen + 1,
            self.cfg.gen
        ));
        let pid = child.id();
        self.restart = Some(Outgoing {
            child: Some(child),
            pid,
            reply_to,
            timer: None,
            phase: Phase::Prepare,
            listeners_only,
            drain_timer: None,
        });
        self.restart_deadline(timeout, "the new master did not take over");
    }

    /// Starts the new master: our own command line again (flags and config
    /// file read anew) with `HANDOFF_TAKEOVER` set, or, for a master that
    /// has none (started by `handoff takeover`), `takeover --dir D`. It
    /// inherits the supervisor link.
    fn start_successor(&self, binary: &Binary) -> io::Result<Child> {
        let (mut cmd, exe_fd, exe) = match (binary, &self.exe_fd) {
            (Binary::Running, Some(fd)) => {
                let raw = fd.as_raw_fd();
                let mut c = Command::new(format!("/proc/self/fd/{raw}"));
                c.arg0(&self.cfg.exe).env(ENV_EXE_FD, raw.to_string());
                (c, Some(raw), self.cfg.exe.clone())
            }
            (Binary::Running, None) => (Command::new(&self.cfg.exe), None, self.cfg.exe.clone()),
            (Binary::Path(p), _) => (Command::new(p), None, p.clone()),
        };
        log::info!("restart: starting {} to take over generation {}", exe.display(), self.cfg.gen);
        if self.cfg.argv.is_empty() {
            cmd.arg("takeover").arg("--dir").arg(&self.cfg.dir).args(&self.cfg.log_args);
        } else {
            cmd.args(&self.cfg.argv).env(ENV_TAKEOVER, "1");
        }
        cmd.env(ENV_EXE, &exe);
        let link_fd = link::raw();
        if let Some(fd) = link_fd {
            cmd.env(link::ENV_FD, fd.to_string());
        }
        // SAFETY: the closure runs in the forked child before exec and only
        // calls fcntl (async-signal-safe) on descriptors this process owns.
        unsafe {
            cmd.pre_exec(move || {
                for fd in [link_fd, exe_fd].into_iter().flatten() {
                    crate::topology::supervisor::inherit(fd)?;
                }
                Ok(())
            });
        }
        cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", exe.display())))
    }

    /// Arms the phase deadline: past it, the restart is aborted.
    fn restart_deadline(&mut self, after: Duration, what: &'static str) {
        let w = self.me.clone();
        let t = Event::new(&self.base, -1, Interest::Timer, move || {
            with(&w, |m| {
                if m.restart.as_ref().is_some_and(|r| r.phase == Phase::Standby) {
                    m.finish_restart(); // committed; nobody came to check
                } else {
                    m.abort_restart(format!("{what} within {after:?}"))
                }
            })
        })
        .and_then(|t| t.add(Some(after)).map(|()| t));
        match t {
            Ok(t) => {
                if let Some(r) = self.restart.as_mut() {
                    r.timer = Some(t);
                }
            }
            Err(e) => log::error!("restart timer: {e}"),
        }
    }

    /// ABORT: the new generation failed before COMMITTED. It is killed
    /// (and waited for: its workers die with it), then the old generation
    /// serves again everything it handed over, and keeps accepting.
    pub(crate) fn abort_restart(&mut self, reason: String) {
        if self.stop_after_takeover.is_some() && self.restart.as_ref().is_some_and(|r| r.phase == Phase::Standby) {
            // The new generation committed and stopped as it was told to:
            // nothing to resume; we stop too.
            log::info!("restart: generation {} committed and stopped as asked", self.cfg.gen + 1);
            if let Some(s) = self.successor.take() {
                drop(s.take_acked());
                s.shutdown();
            }
            if let Some(mut r) = self.restart.take() {
                if let Some(c) = r.child.as_mut() {
                    let _ = c.wait();
                }
            }
            // The control path was the new master's: not ours to remove.
            if let Some(c) = self.control.take() {
                c.forget_path();
            }
            if let Some(sig) = self.stop_after_takeover.take() {
                self.shutdown(sig);
            }
            return;
        }
        let Some(mut r) = self.restart.take() else { return };
        self.metrics.error(metrics::Fault::RestartAborted);
        let gen = self.cfg.gen;
        if let Some(c) = r.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        } else if r.pid != 0 && r.phase != Phase::Prepare {
            // Started by hand, not our child: make sure it serves nothing.
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(r.pid as libc::pid_t, libc::SIGKILL) };
        }
        let mut back = Vec::new();
        if let Some(s) = self.successor.take() {
            back.extend(s.shutdown());
            back.extend(s.take_acked());
        }
        if r.phase == Phase::Standby {
            // Those that carried read-ahead were held unread over there
            // until we leave: our copies are exact. The others it served;
            // only what it held in flight is lost.
            log::error!("the new generation died right after committing");
        }
        self.resume_accepting();
        let moved = back.len();
        self.resume_workers();
        self.tell_workers(KIND_TAKEOVER_ENDED, &[]);
        // The new master had taken the control socket's path: take it back.
        if let Err(e) = self.bind_control(true) {
            log::error!("restart abort: cannot take back {}: {e}", control_path(&self.cfg.dir).display());
        }
        self.draining = false;
        self.done_timer = None;
        if r.phase != Phase::Prepare {
            // Workers told to drain finish draining into us; fresh ones
            // take their place.
            for index in 0..self.slots.len() {
                if self.slots[index].child.is_some() {
                    self.slots[index].retiring = true;
                } else if let Err(e) = self.spawn(index) {
                    log::error!("{e}");
                }
            }
            self.share_listener_with_all();
        }
        log::error!(
            "restart aborted: {reason}; generation {gen} goes on serving ({moved} handed-over connection(s) taken back)"
        );
        self.notify_serving("READY=1");
        back.append(&mut self.refused);
        for m in back {
            self.assign(m);
        }
        self.reply_restart(r.reply_to, json!({"ok": false, "reason": reason}));
        if let Some(sig) = self.stop_after_takeover.take() {
            self.shutdown(sig);
        }
    }

    fn tell_workers(&self, kind: u16, body: &[u8]) {
        for slot in &self.slots {
            if let Some(c) = &slot.channel {
                let _ = c.send(Msg::control(kind, body.to_vec()));
            }
        }
    }

    /// `handoff restart`'s verdict when the new generation committed.
    fn success_reply(&self, pid: u32) -> Value {
        json!({"ok": true, "pid": pid, "gen": self.cfg.gen + 1, "host": self.cfg.host, "port": self.port,
               "listen": self.endpoints.iter().map(ToString::to_string).collect::<Vec<_>>()})
    }

    fn reply_restart(&mut self, to: Option<u64>, v: Value) {
        if let Some(c) = to.and_then(|id| self.clients.get(&id)) {
            let _ = c.send(Msg::control(KIND_RESTART_REPLY, v.to_string().into_bytes()));
        }
    }

    /// SIGCHLD for the new master: before COMMITTED, the restart failed.
    pub(crate) fn reap_successor(&mut self) {
        let Some(r) = self.restart.as_mut() else { return };
        let Some(child) = r.child.as_mut() else { return };
        if let Ok(Some(status)) = child.try_wait() {
            r.child = None;
            self.abort_restart(format!("the new master exited: {status}"));
        }
    }

    /// `handoff restart` asked (over the control socket).
    pub(crate) fn on_restart_request(&mut self, client: u64, body: &[u8]) {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let binary = Binary::Path(v["binary"].as_str().map_or_else(|| self.cfg.exe.clone(), PathBuf::from));
        let timeout = v["timeout"].as_f64().map_or(DEFAULT_TIMEOUT, |s| Duration::from_secs_f64(s.clamp(0.1, 3600.0)));
        let listeners_only = v["listeners_only"] == json!(true);
        self.begin_restart(binary, timeout, Some(client), listeners_only);
    }

    /// A new master said hello: give it the listening socket and config.
    pub(crate) fn on_takeover_hello(&mut self, client: u64, body: &[u8]) {
        let Some(ch) = self.clients.remove(&client) else { return };
        let busy = if self.stopping {
            Some("stopping")
        } else if self.successor.is_some() {
            Some("another takeover runs")
        } else if self.predecessor.is_some() {
            Some("this generation has not committed its own takeover yet")
        } else {
            None
        };
        if let Some(why) = busy {
            log::warn!("takeover refused: {why}");
            ch.shutdown();
            return;
        }
        let mut fds = match self.listening_fds() {
            Ok(fds) => fds.into_iter(),
            Err(e) => {
                log::error!("takeover: cannot duplicate the listening sockets: {e}");
                ch.shutdown();
                return;
            }
        };
        // The metrics endpoint's socket moves too (scrapes go on answering).
        let metrics_fd = match self.metrics.server.as_ref().map(|s| s.try_clone_listener()) {
            Some(Ok(fd)) => Some(fd),
            Some(Err(e)) => {
                log::error!(
                    "takeover: cannot duplicate the metrics socket ({e}): the new generation serves no metrics"
                );
                None
            }
            None => None,
        };
        let cfg = json!({
            "metrics": metrics_fd.as_ref().and(self.cfg.metrics.as_ref()),
            "host": self.cfg.host,
            "port": self.port,
            // Every listening socket moves: the first with this message,
            // the others each in a LISTENER message of its own, in order.
            "listen": self.endpoints.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "workers": self.cfg.workers,
            "policy": self.cfg.policy.name(),
            "options": self.cfg.options,
            "worker_cmd": self.cfg.worker_cmd,
            "grace": self.cfg.grace.as_secs_f64(),
            "gen": self.cfg.gen,
            "hang_timeout": self.cfg.hang_timeout.map(|d| d.as_secs_f64()),
            "rebalance": self.cfg.rebalance,
            "max_conns": self.cfg.max_conns,
            "idle_timeout": self.cfg.idle_timeout.map(|d| d.as_secs_f64()),
            "access_log": self.cfg.access_log,
            "user": self.cfg.user,
            // A node stays a node (`handoff takeover` reads these; a
            // restart re-reads its own flags).
            "node": self.cfg.node.as_ref().map(|n| json!({
                "name": n.name,
                "peers": self.static_peers_text(),
                "connect_timeout": n.connect_timeout.as_secs_f64(),
                "etcd": n.etcd.as_ref().map(|e| json!({"urls": e.urls.join(","), "prefix": e.prefix, "ttl": e.ttl})),
                "advertise": n.advertise.as_ref().map(ToString::to_string),
                // 0: off.
                "relay_timeout": n.relay_timeout.map_or(0.0, |d| d.as_secs_f64()),
                "heartbeat": n.heartbeat.map_or(0.0, |d| d.as_secs_f64()),
            })),
        });
        let msg = Msg {
            kind: wire::KIND_LISTENER,
            flags: 0,
            id: 0,
            body: cfg.to_string().into_bytes(),
            fd: fds.next(),
            tag: 0,
        };
        if ch.send(msg).is_err() {
            log::error!("takeover: the new master's channel broke");
            return;
        }
        for fd in fds {
            let msg =
                Msg { kind: wire::KIND_LISTENER, flags: 0, id: 0, body: b"listener".to_vec(), fd: Some(fd), tag: 0 };
            if ch.send(msg).is_err() {
                log::error!("takeover: the new master's channel broke");
                return;
            }
        }
        if let Some(fd) = metrics_fd {
            let msg =
                Msg { kind: wire::KIND_LISTENER, flags: 0, id: 0, body: b"metrics".to_vec(), fd: Some(fd), tag: 0 };
            if ch.send(msg).is_err() {
                log::error!("takeover: the new master's channel broke");
                return;
            }
        }
        // The kernel's word for who connected, not the HELLO's.
        let pid = ch.peer_pid().unwrap_or(0);
        let said = serde_json::from_slice::<Value>(body).ok().and_then(|v| v["pid"].as_u64()).unwrap_or(0);
        if said != u64::from(pid) {
            log::warn!("takeover: HELLO says pid {said}, the socket says pid {pid}");
        }
        if self.restart.is_none() {
            // Started by hand (`handoff takeover`), not by us: still fine.
            self.restart = Some(Outgoing {
                child: None,
                pid,
                reply_to: None,
                timer: None,
                phase: Phase::Prepare,
                listeners_only: false,
                drain_timer: None,
            });
            self.restart_deadline(DEFAULT_TIMEOUT, "the new master did not say READY");
        }
        // Until COMMIT, what the new master ACKs stays ours too.
        ch.set_keep_acked(true);
        // A new master that reads CONNS batches says so in its HELLO (an
        // older one gets single CONNs).
        if serde_json::from_slice::<Value>(body).is_ok_and(|v| v["batch"] == json!(true)) {
            ch.set_batch(true);
        }
        // Should we die now, our workers hand their connections to it.
        let begun = json!({"grace": self.cfg.grace.as_secs_f64()}).to_string().into_bytes();
        self.tell_workers(KIND_TAKEOVER_BEGUN, &begun);
        let w = self.me.clone();
        ch.set_handler(move |ev| with(&w, |m| m.on_successor(ev)));
        self.successor = Some(ch);
    }

    /// Copies of every listening socket, in endpoint order.
    fn listening_fds(&self) -> io::Result<Vec<OwnedFd>> {
        let fds: Vec<OwnedFd> = if self.listeners.is_empty() {
            self.shared_fds.iter().map(OwnedFd::try_clone).collect::<io::Result<_>>()?
        } else {
            self.listeners.iter().map(|l| l.as_fd().try_clone_to_owned()).collect::<io::Result<_>>()?
        };
        if fds.is_empty() {
            return Err(io::Error::other("no listening socket"));
        }
        Ok(fds)
    }

    fn on_successor(&mut self, ev: ChannelEvent) {
        match ev {
            ChannelEvent::Msg(m) if m.kind == KIND_TAKEOVER_READY => self.begin_move(),
            ChannelEvent::Msg(m) if m.kind == KIND_TAKEOVER_COMMITTED => {
                let v: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
                if v["ok"] == json!(true) {
                    self.committed();
                } else {
                    let why = v["reason"].as_str().unwrap_or("no reason given").to_string();
                    self.abort_restart(format!("the new master cannot serve: {why}"));
                }
            }
            ChannelEvent::Msg(m) => log::warn!("successor: unexpected message kind {}", m.kind),
            // Out of descriptors over there: offered again, until --grace.
            ChannelEvent::Refused(m) => {
                self.metrics.error(metrics::Fault::Refused);
                self.retry_later(m)
            }
            ChannelEvent::Closed { reason, returned, .. } => {
                // What it never acknowledged is ours again (the acknowledged
                // ones the channel kept are taken back by the abort).
                self.refused.extend(returned);
                let why = reason.map_or("closed".to_string(), |e| e.to_string());
                self.abort_restart(format!("the new master's channel {why}"));
            }
        }
    }

    /// READY: drain the workers into the successor.
    fn begin_move(&mut self) {
        let Some(r) = self.restart.as_mut() else { return };
        if r.phase != Phase::Prepare {
            return;
        }
        r.phase = Phase::Move;
        r.timer = None;
        let cut = r.listeners_only;
        log::info!("restart: generation {} is ready; handing over connections", self.cfg.gen + 1);
        self.draining = true;
        let pending: Vec<(Option<usize>, Msg)> = self.pending.drain(..).collect();
        for (_, m) in pending {
            self.forward(m);
        }
        // Node mode: what is not yet told apart is the next generation's.
        self.forward_undecided();
        for slot in &mut self.slots {
            if cut {
                // Listener-only restart: the old connections are cut.
                slot.held.clear();
                if let Some(c) = slot.child.as_mut() {
                    let _ = c.kill();
                }
            } else if let Some(c) = &slot.channel {
                // We read CONNS batches: the worker may send them.
                let _ = c.send(Msg::control(KIND_DRAIN, DRAIN_BATCH.to_vec()));
            }
        }
        let w = self.me.clone();
        match Event::new(&self.base, -1, Interest::Timer, move || with(&w, |m| m.check_moved())) {
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

    /// `--grace` after READY: connections the new side cannot take (out of
    /// descriptors) abort the restart; connections that could not move
    /// because their client does not read its replies are cut.
    fn drain_overdue(&mut self) {
        let undelivered = self.refused.len() + self.successor.as_ref().map_or(0, Channel::in_flight);
        if undelivered > 0 {
            let n = undelivered;
            self.abort_restart(format!(
                "the new generation could not take {n} connection(s) within {:?} (out of descriptors?)",
                self.cfg.grace
            ));
            return;
        }
        for slot in &mut self.slots {
            let Some(child) = slot.child.as_mut() else { continue };
            log::warn!(
                "restart: worker {} still holds {} connection(s) after {:?} (clients not reading); cutting them",
                slot.index,
                slot.held.len(),
                self.cfg.grace
            );
            slot.held.clear();
            let _ = child.kill();
        }
    }

    /// Gives a connection to the successor.
    pub(crate) fn forward(&mut self, msg: Msg) {
        match &self.successor {
            Some(s) => {
                if let Err(back) = s.send(msg) {
                    // The channel just broke: the abort that follows takes
                    // the rest back; this one is offered again after it.
                    self.retry_later(back);
                    return;
                }
                // Backpressure: what we acknowledged to a worker and have
                // not yet handed on dies with us; keep that window small by
                // not reading the workers until the successor has caught up.
                let window = if s.batching() { FORWARD_WINDOW_BATCHED } else { FORWARD_WINDOW };
                if s.in_flight() >= window && !self.workers_paused && !s.is_settled() {
                    self.workers_paused = true;
                    for slot in &self.slots {
                        if let Some(c) = &slot.channel {
                            c.pause_reading();
                        }
                    }
                    let w = self.me.clone();
                    s.when_settled(move || with(&w, |m| m.resume_workers()));
                }
            }
            None => {
                log::error!("restart: no successor for a connection; serving it here");
                self.draining = false;
                self.assign(msg);
            }
        }
    }

    fn resume_workers(&mut self) {
        if !self.workers_paused {
            return;
        }
        self.workers_paused = false;
        for slot in &self.slots {
            if let Some(c) = &slot.channel {
                c.resume_reading();
            }
        }
    }

    /// MOVE is over when every old worker has exited, nothing waits to be
    /// offered again, and the successor ACKed everything: then COMMIT.
    fn check_moved(&mut self) {
        // Node links whose CONNECT_RESP is still going out follow soon.
        let workers_gone = self.slots.iter().all(|s| s.child.is_none()) && self.sniffing.is_empty();
        let delivered = self.successor.as_ref().is_some_and(|s| s.in_flight() == 0) && self.refused.is_empty();
        if !(workers_gone && delivered) {
            if let Some(t) = &self.done_timer {
                let _ = t.add(Some(DONE_POLL));
            }
            return;
        }
        self.done_timer = None;
        let Some(r) = self.restart.as_mut() else { return };
        r.phase = Phase::Commit;
        r.drain_timer = None;
        if let Some(s) = &self.successor {
            let _ = s.send(Msg::control(KIND_TAKEOVER_COMMIT, Vec::new()));
        }
        self.restart_deadline(COMMIT_TIMEOUT, "the new master did not commit");
    }

    /// COMMITTED: the new generation serves alone. Say so; stand by until
    /// `handoff restart` has seen it answer (or leave at once if nobody
    /// asked).
    fn committed(&mut self) {
        let Some(r) = self.restart.as_mut() else { return };
        let pid = r.child.as_ref().map_or(r.pid, Child::id);
        let reply_to = r.reply_to.filter(|id| self.clients.contains_key(id));
        if reply_to.is_some() && r.phase == Phase::Commit {
            r.phase = Phase::Standby;
            log::info!("restart: generation {} committed; standing by until it answers", self.cfg.gen + 1);
            self.pause_accepting();
            self.reply_restart(reply_to, self.success_reply(pid));
            self.restart_deadline(STANDBY_MAX, "the restart client did not report");
            return;
        }
        self.finish_restart();
    }

    /// `handoff restart` saw the new generation answer (or went away).
    pub(crate) fn on_restart_probed(&mut self, client: u64) {
        if self.restart.as_ref().is_some_and(|r| r.phase == Phase::Standby && r.reply_to == Some(client)) {
            self.finish_restart();
        }
    }

    /// The takeover is over: close our copies and leave.
    fn finish_restart(&mut self) {
        let Some(r) = self.restart.take() else { return };
        log::info!("restart: generation {} serves; generation {} exits", self.cfg.gen + 1, self.cfg.gen);
        if r.phase != Phase::Standby {
            let pid = r.child.as_ref().map_or(r.pid, Child::id);
            self.reply_restart(r.reply_to, self.success_reply(pid));
        }
        // Listeners close here, their files stay: a Unix socket's path is
        // the new generation's (adopted, never unlinked by a master).
        self.listeners.clear();
        self.shared_fds.clear();
        // The new generation serves the metrics socket alone from now on.
        self.metrics.server = None;
        // The successor registered the node in etcd itself: keep the key.
        self.handover_membership();
        // Our copies of what moved are closed; the new side owns them.
        if let Some(s) = self.successor.take() {
            drop(s.take_acked());
            s.shutdown();
        }
        // The control path now belongs to the successor: leave it.
        if let Some(c) = self.control.take() {
            c.forget_path();
        }
        self.signals.clear();
        // Let the reply reach `handoff restart` before we go.
        let base = self.base.clone();
        match r.reply_to.and_then(|id| self.clients.get(&id)) {
            Some(c) => c.when_settled(move || base.exit(None)),
            None => base.exit(None),
        }
    }

    /// New side: the predecessor's channel delivers connections.
    pub(crate) fn attach_predecessor(&mut self, fd: OwnedFd) -> io::Result<()> {
        let w = self.me.clone();
        let ch = Channel::new(&self.base, fd, move |ev| with(&w, |m| m.on_predecessor(ev)))?;
        // We dialled our predecessor's control socket in our own private
        // --dir: what it moves, it checked where it entered.
        ch.trust_descriptors();
        let _ = ch.send(Msg::control(KIND_TAKEOVER_READY, Vec::new()));
        self.predecessor = Some(ch);
        Ok(())
    }

    fn on_predecessor(&mut self, ev: ChannelEvent) {
        match ev {
            ChannelEvent::Msg(m) if m.kind == wire::KIND_CONN => self.take_moved(m),
            ChannelEvent::Msg(m) if m.kind == KIND_TAKEOVER_COMMIT => {
                let down: Vec<usize> = self.slots.iter().filter(|s| !s.up()).map(|s| s.index).collect();
                let Some(p) = &self.predecessor else { return };
                if !down.is_empty() {
                    let reason = format!("worker(s) {down:?} of generation {} are not up", self.cfg.gen);
                    log::error!("takeover: refusing to commit: {reason}");
                    let _ = p.send(Msg::control(
                        KIND_TAKEOVER_COMMITTED,
                        json!({"ok": false, "reason": reason}).to_string().into_bytes(),
                    ));
                    return;
                }
                let _ = p.send(Msg::control(KIND_TAKEOVER_COMMITTED, json!({"ok": true}).to_string().into_bytes()));
                self.commit_takeover("committed");
            }
            ChannelEvent::Msg(m) => log::warn!("predecessor: unexpected message kind {}", m.kind),
            ChannelEvent::Refused(_) => {}
            ChannelEvent::Closed { orphans, .. } => {
                // Before COMMIT, the old master died (had it aborted, we
                // would be dead): we are all that is left, so we commit.
                // Orphans are connections it sent as it died: ours.
                self.moves.extend(orphans);
                if self.takeover_pending {
                    log::warn!("takeover: generation {} died before COMMIT; serving alone", self.cfg.gen - 1);
                    self.commit_takeover("alone");
                }
                // Until the old master is gone it can resume the connections
                // that carried read-ahead, from its exact copies: only now
                // are they read here.
                let moves = std::mem::take(&mut self.moves);
                let st = self.predecessor.as_ref().map(Channel::stats).unwrap_or_default();
                log::info!(
                    "takeover complete: generation {} is gone; {} connection(s) came in {} message(s); serving {} moved connection(s) that carried read-ahead",
                    self.cfg.gen - 1,
                    st.conns_received,
                    st.msgs_received,
                    moves.len()
                );
                self.predecessor = None;
                for m in moves {
                    self.assign(m);
                }
                if let Some((binary, timeout, reply_to, listeners_only)) = self.queued_restart.take() {
                    self.begin_restart(binary, timeout, reply_to, listeners_only);
                }
            }
        }
    }

    /// A connection moved to us. One with no read-ahead is served at once:
    /// the old side's copy can resume it at any time (losing at most what
    /// is in flight here). One carrying bytes waits unread until the old
    /// master is gone, so that its copy of those bytes stays exact.
    pub(crate) fn take_moved(&mut self, mut m: Msg) {
        self.metrics.moved_by_restart();
        m.flags &= !wire::FLAG_RELEASED;
        m.tag = 0;
        if m.flags & wire::FLAG_SNIFF != 0 {
            // Node mode: accepted by the old manager, not yet told apart.
            if let Some(fd) = m.fd.take() {
                self.sniff_from(fd, &m.body);
            }
            return;
        }
        if self.predecessor.is_some() && !wire::past_history(m.flags, &m.body).is_empty() {
            self.moves.push(m);
        } else {
            self.assign(m);
        }
    }

    /// Starts serving for real: accept, share the listener, serve what moved.
    fn commit_takeover(&mut self, how: &str) {
        if !self.takeover_pending {
            return;
        }
        self.takeover_pending = false;
        self.resume_accepting();
        self.share_listener_with_all();
        log::info!("takeover {how}: generation {} serves", self.cfg.gen);
        self.notify_serving("READY=1");
        if let Some(sig) = self.stop_after_takeover.take() {
            self.shutdown(sig);
        }
    }
}

/// Says HELLO to the master serving in `dir`; returns its listening
/// sockets (in endpoint order), its settings, its metrics endpoint's
/// listening socket (if it serves `--metrics`), and the channel that goes
/// on delivering its connections.
fn hello(dir: &Path) -> io::Result<(Vec<OwnedFd>, Value, Option<OwnedFd>, OwnedFd)> {
    let mut c = Client::connect(dir)?;
    // "batch": we read CONNS (connections in batches of up to 253).
    c.send(KIND_TAKEOVER_HELLO, json!({"pid": std::process::id(), "batch": true}).to_string().as_bytes())?;
    let (body, fd) = c.recv(wire::KIND_LISTENER, DEFAULT_TIMEOUT)?;
    let fd = fd.ok_or_else(|| io::Error::other("takeover: no listening socket"))?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // The other listening sockets follow, one message each.
    let mut fds = vec![fd];
    let more = v["listen"].as_array().map_or(0, Vec::len).saturating_sub(1);
    for _ in 0..more {
        let fd = c.recv(wire::KIND_LISTENER, DEFAULT_TIMEOUT)?.1;
        fds.push(fd.ok_or_else(|| io::Error::other("takeover: a listener message without its socket"))?);
    }
    // The metrics socket follows in a message of its own.
    let metrics_fd = match v["metrics"].is_string() {
        true => c.recv(wire::KIND_LISTENER, DEFAULT_TIMEOUT)?.1,
        false => None,
    };
    Ok((fds, v, metrics_fd, c.into_fd()))
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("takeover: bad config field {what}"))
}

/// `handoff takeover --dir D`: a new master started by hand. Asks the
/// master in `dir` for its listening socket and settings, then serves
/// as the next generation with those settings.
pub fn takeover(dir: &Path, exe: PathBuf, log_args: Vec<String>) -> io::Result<()> {
    let (fds, v, metrics_fd, channel) = hello(dir)?;
    let cfg = Config {
        // Where it listens comes with the sockets themselves.
        listen: Vec::new(),
        listen_mode: 0o600,
        host: v["host"].as_str().ok_or_else(|| bad("host"))?.to_string(),
        port: v["port"].as_u64().ok_or_else(|| bad("port"))? as u16,
        workers: v["workers"].as_u64().ok_or_else(|| bad("workers"))? as usize,
        dir: dir.to_path_buf(),
        policy: Policy::from_str(v["policy"].as_str().unwrap_or(""), false).map_err(|_| bad("policy"))?,
        options: v["options"].clone(),
        worker_cmd: v["worker_cmd"].as_str().map(PathBuf::from),
        grace: Duration::from_secs_f64(v["grace"].as_f64().unwrap_or(5.0)),
        exe,
        log_args,
        gen: v["gen"].as_u64().ok_or_else(|| bad("gen"))? + 1,
        node: match &v["node"] {
            Value::Null => None,
            n => Some(
                crate::topology::node::NodeConfig::new(
                    n["name"].as_str().ok_or_else(|| bad("node.name"))?,
                    n["peers"].as_str().unwrap_or(""),
                    n["connect_timeout"].as_f64().unwrap_or(1.5),
                )
                .and_then(|c| {
                    let e = &n["etcd"];
                    let prefix = e["prefix"].as_str().unwrap_or(crate::topology::node::etcd::DEFAULT_PREFIX);
                    let ttl = e["ttl"].as_u64().unwrap_or(crate::topology::node::etcd::DEFAULT_TTL);
                    c.with_etcd(e["urls"].as_str(), prefix, ttl, n["advertise"].as_str())
                })
                .map(|c| {
                    let secs = |k: &str, default: f64| n[k].as_f64().unwrap_or(default);
                    c.with_deadlines(
                        secs("relay_timeout", crate::topology::node::RELAY_TIMEOUT_SECS),
                        secs("heartbeat", crate::topology::node::HEARTBEAT_SECS),
                    )
                })
                .map_err(|e| bad(&format!("node ({e})")))?,
            ),
        },
        hang_timeout: v["hang_timeout"].as_f64().map(Duration::from_secs_f64),
        rebalance: v["rebalance"].as_bool().unwrap_or(false),
        argv: Vec::new(),
        max_conns: v["max_conns"].as_u64(),
        idle_timeout: v["idle_timeout"].as_f64().map(Duration::from_secs_f64),
        access_log: v["access_log"].as_str().map(PathBuf::from),
        user: v["user"].as_str().map(str::to_string),
        metrics: v["metrics"].as_str().map(str::to_string),
    };
    crate::topology::cluster::master::run_on_with(cfg, fds, Some(channel), metrics_fd)
}

/// A master started by a restart (`HANDOFF_TAKEOVER`): its settings come
/// from its own command line and config file, read anew (so a reload
/// changes workers, policy, limits and log level); the listening socket
/// and the generation come from the master serving in `cfg.dir`.
pub fn takeover_reloaded(mut cfg: Config) -> io::Result<()> {
    let (fds, v, metrics_fd, channel) = hello(&cfg.dir)?;
    cfg.gen = v["gen"].as_u64().ok_or_else(|| bad("gen"))? + 1;
    let (host, port) = (v["host"].as_str().unwrap_or(""), v["port"].as_u64().unwrap_or(0) as u16);
    let kept: Vec<String> = v["listen"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let asked: Vec<String> = cfg.listen.iter().map(ToString::to_string).collect();
    // A port 0 asked for is whatever port was picked.
    let same = asked.len() == kept.len()
        && asked.iter().zip(&kept).all(|(a, k)| {
            a == k || a.ends_with(":0") && a.rsplit_once(':').map(|x| x.0) == k.rsplit_once(':').map(|x| x.0)
        });
    if !same {
        log::warn!(
            "a restart keeps the listening sockets {}; --host/--port/--listen {} take effect at the next stop and start",
            kept.join(","),
            asked.join(",")
        );
    }
    cfg.host = host.to_string();
    cfg.port = port;
    // The metrics socket is kept if --metrics still names it.
    let metrics_fd = metrics::inherit(cfg.metrics.as_deref(), v["metrics"].as_str(), metrics_fd);
    crate::topology::cluster::master::run_on_with(cfg, fds, Some(channel), metrics_fd)
}

/// How long `handoff restart` waits for the new generation's workers to
/// answer the heartbeat before it calls the restart failed.
const PROBE_PATIENCE: Duration = Duration::from_secs(10);

/// `handoff restart --dir D`: asks the master for a restart and waits for
/// the verdict: COMMITTED, then the new generation's status answered on
/// the control socket and a connection taken on the port. Returns the reply (`ok` true).
pub fn request(dir: &Path, binary: Option<&Path>, timeout: Duration, listeners_only: bool) -> io::Result<Value> {
    let mut c = Client::connect(dir)?;
    let body = json!({"binary": binary.map(|b| b.display().to_string()), "timeout": timeout.as_secs_f64(),
                      "listeners_only": listeners_only});
    c.send(KIND_RESTART_REQ, body.to_string().as_bytes())?;
    // Timeout to READY, the move (bounded by --grace), then COMMIT.
    let (reply, _) = c.recv(KIND_RESTART_REPLY, timeout + COMMIT_TIMEOUT + Duration::from_secs(60))?;
    let v: Value = serde_json::from_slice(&reply).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if v["ok"] != json!(true) {
        return Err(io::Error::other(format!("restart failed: {}", v["reason"].as_str().unwrap_or("unknown reason"))));
    }
    let (host, port, gen) =
        (v["host"].as_str().unwrap_or("127.0.0.1"), v["port"].as_u64().unwrap_or(0), v["gen"].as_u64());
    // The first endpoint (TCP or Unix); an older master says host and port.
    let first = match v["listen"].as_array().and_then(|a| a.first()).and_then(Value::as_str) {
        Some(e) => crate::core::sock::parse_endpoint(e)?,
        None => Endpoint::Tcp(crate::core::sock::resolve(host, port as u16)?),
    };
    let first = crate::topology::cluster::master::reachable(&first);
    match probe(dir, &first) {
        Ok(g) if Some(g) == gen => {
            // The old generation stood by until now: it may go.
            let _ = c.send(KIND_RESTART_PROBED, &[]);
            Ok(v)
        }
        Ok(g) => Err(io::Error::other(format!(
            "restart committed generation {}, but {first} is answered by generation {g}",
            gen.unwrap_or(0)
        ))),
        Err(e) => Err(io::Error::other(format!("restart committed, but nothing answers on {first}: {e}"))),
    }
}

/// Whatever the service speaks: the control socket must be answered by
/// generation `gen` with a worker that can serve, and the port must take
/// a connection. Workers that are slow to answer the heartbeat (a loaded
/// machine, valgrind) get up to `PROBE_PATIENCE` to be counted. Returns
/// the generation that answered.
fn probe(dir: &Path, first: &Endpoint) -> io::Result<u64> {
    let deadline = std::time::Instant::now() + PROBE_PATIENCE;
    let gen = loop {
        let v = crate::topology::cluster::status::fetch(dir, Duration::from_secs(5))?;
        let gen = v["gen"].as_u64().ok_or_else(|| io::Error::other(format!("unexpected status reply: {v}")))?;
        if v["accepting"] == json!(true) {
            break gen;
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::other(format!("generation {gen} has no worker that can serve")));
        }
        // Status has no change notification: ask again shortly.
        std::thread::sleep(Duration::from_millis(100));
    };
    match first {
        Endpoint::Tcp(addr) => drop(TcpStream::connect_timeout(addr, Duration::from_secs(5))?),
        Endpoint::Unix(p) | Endpoint::Seqpacket(p) => drop(std::os::unix::net::UnixStream::connect(p)?),
    }
    Ok(gen)
}
