//! A pair server's signals:
//!
//! | signal | what the server does |
//! |---|---|
//! | TERM, INT, QUIT | stops: no new clients or channels, open requests answered (within `--grace`), each connection closed once answered |
//! | TERM or INT again | stops now |
//! | HUP | restarts in place: same binary (`/proc/self/exe`), same pid, every listener and connection kept |
//! | USR2 | the same with the binary now at the path it was started from |
//! | USR1 | reopens the request log `D/P.log` |
//! | any other in `core::signals::IGNORED` (ALRM, PWR, ...) | logged and ignored |
//!
//! An in-place restart stops accepting and serving, lets every connection
//! reach "between requests" (output flushed; one being handed to the peer
//! goes), waits until the peer has acknowledged every connection sent to
//! it, then closes the peer's channels to us (the peer takes back what
//! we had not acknowledged and, told we restart, queues it for our next
//! image) and hands the rest to [`reexec::exec`]. All of it is bounded by
//! `--grace`: a connection whose client does not read is cut then. If the
//! `execve` fails the server logs it and serves on.
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use super::{reexec, with, Carried, Channel, Event, Interest, Msg, Server, Service, Session};
use crate::core::channel::wire;
use crate::core::signals;
use crate::topology::pair::reexec::Handover;

/// Pair channel message: the sender is leaving (body: "restarting" or
/// "stopping"), sent on the peer's channel before closing it.
pub(super) const KIND_NOTICE: u16 = wire::KIND_USER + 32;

/// What a server is doing.
pub(super) enum Phase {
    Serving,
    /// TERM, INT or QUIT: answering what is in flight, then exiting.
    Stopping,
    /// HUP or USR2: settling every connection, then `execve` of `exe`.
    /// `cut`: `--grace` is over (what has not settled is cut). `rounds`:
    /// loop rounds since the signals were blocked for the `execve` (0:
    /// not blocked).
    Restarting {
        sig: i32,
        exe: PathBuf,
        cut: bool,
        rounds: u8,
    },
}

impl Phase {
    pub(super) fn serving(&self) -> bool {
        matches!(self, Phase::Serving)
    }

    pub(super) fn stopping(&self) -> bool {
        matches!(self, Phase::Stopping)
    }

    pub(super) fn restarting(&self) -> bool {
        matches!(self, Phase::Restarting { .. })
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Stopping => "stopping",
            Phase::Restarting { .. } => "restarting",
        }
    }
}

/// Why the peer closes its channel to us (its [`KIND_NOTICE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Leaving {
    Restarting,
    Stopping,
}

impl Leaving {
    pub(super) fn name(self) -> &'static str {
        match self {
            Leaving::Restarting => "restarting",
            Leaving::Stopping => "stopping",
        }
    }

    pub(super) fn parse(body: &[u8]) -> Option<Leaving> {
        match body {
            b"restarting" => Some(Leaving::Restarting),
            b"stopping" => Some(Leaving::Stopping),
            _ => None,
        }
    }
}

/// Whether bytes (not just an EOF) wait unread in a socket: such a
/// connection is not idle, whatever its input buffer holds.
pub(super) fn has_unread(fd: RawFd) -> bool {
    let mut b = 0u8;
    // SAFETY: one writable byte; MSG_PEEK leaves the data in the socket.
    let n = unsafe { libc::recv(fd, &mut b as *mut u8 as *mut libc::c_void, 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    n > 0
}

impl<P: Service> Server<P> {
    pub(super) fn on_signal(&mut self, sig: i32) {
        let name = signals::name(sig);
        match sig {
            libc::SIGTERM | libc::SIGINT if self.phase.stopping() => {
                log::warn!("{name} again: stopping now, cutting {} open connection(s)", self.conns.len());
                self.finish_stop();
            }
            libc::SIGTERM | libc::SIGINT | libc::SIGQUIT if !self.phase.stopping() => self.begin_stop(sig),
            libc::SIGQUIT => log::info!("{name}: already stopping (TERM or INT stops now)"),
            libc::SIGHUP | libc::SIGUSR2 => match &self.phase {
                Phase::Serving => self.begin_restart(sig),
                Phase::Stopping => log::warn!("{name} while stopping; ignored"),
                Phase::Restarting { .. } => log::warn!("{name}: a restart is under way; ignored"),
            },
            libc::SIGUSR1 => match self.log.reopen() {
                Ok(()) => log::info!("{name}: request log reopened"),
                Err(e) => log::error!("{name}: cannot reopen the request log: {e}"),
            },
            _ => log::warn!("{name} has no meaning here; ignored"),
        }
    }

    /// TERM, INT, QUIT: no new client or channel; every connection is
    /// closed once what it sent is answered (an idle one at once); then
    /// exit, after `--grace` at most.
    fn begin_stop(&mut self, sig: i32) {
        let name = signals::name(sig);
        if self.phase.restarting() {
            log::info!("{name}: the restart is abandoned");
            self.disarm();
        }
        log::info!(
            "{name}: stopping; {} open connection(s) get up to {:?} to finish their requests",
            self.conns.len(),
            self.grace
        );
        self.phase = Phase::Stopping;
        // D/P.sock goes with its listener: the peer finds nobody to link to.
        self.tcp = None;
        self.extra.clear();
        self.unix = None;
        if let Some(t) = &self.retry {
            t.del();
        }
        self.close_inbound(Leaving::Stopping);
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(slot) = self.conns.get_mut(&id) else { continue };
            if slot.handing_off {
                // Answered, flushing: closes (or answers what followed) once drained.
                slot.handing_off = false;
                slot.throttled = true;
                continue;
            }
            if !(slot.closing || slot.throttled) {
                self.serve(id);
            }
        }
        self.arm_grace();
        self.progress();
    }

    /// HUP, USR2: stop accepting and serving, and wait (`--grace` at most)
    /// for every connection to be between requests and every connection
    /// sent to the peer to be acknowledged; then `finish_restart`.
    fn begin_restart(&mut self, sig: i32) {
        let name = signals::name(sig);
        let exe = if sig == libc::SIGHUP { PathBuf::from("/proc/self/exe") } else { self.start_exe.clone() };
        log::info!(
            "{name}: restarting in place with {}; {} open connection(s) get up to {:?} to settle",
            exe.display(),
            self.conns.len(),
            self.grace
        );
        self.phase = Phase::Restarting { sig, exe, cut: false, rounds: 0 };
        for l in [&self.tcp, &self.unix].into_iter().flatten().chain(&self.extra) {
            l.pause();
        }
        if let Some(t) = &self.retry {
            t.del();
        }
        for slot in self.conns.values() {
            slot.conn.pause_reading();
        }
        self.arm_grace();
        self.progress();
    }

    fn arm_grace(&mut self) {
        let w = self.me.clone();
        match Event::new(&self.base, -1, Interest::Timer, move || with(&w, |s| s.grace_over())) {
            Ok(t) => {
                let _ = t.add(Some(self.grace));
                self.grace_timer = Some(t);
            }
            Err(e) => log::error!("grace timer: {e}"),
        }
    }

    /// Called after every event during a stop or a restart: once nothing
    /// is left to wait for, the last step runs from its own callback.
    pub(super) fn progress(&mut self) {
        let ready = match &self.phase {
            Phase::Serving => return,
            Phase::Stopping => self.conns.is_empty(),
            Phase::Restarting { .. } => self.conns.values().all(|s| s.settled()),
        };
        if ready && self.peer_settled() {
            self.schedule_step();
        }
    }

    fn schedule_step(&self) {
        if let Some(step) = &self.step {
            if !step.pending() {
                let _ = step.add(Some(Duration::ZERO));
            }
        }
    }

    /// Unblocks the signals blocked for an `execve` that will not happen
    /// (yet): the restart goes on waiting, or was abandoned.
    fn disarm(&mut self) {
        if let Phase::Restarting { rounds, .. } = &mut self.phase {
            if *rounds > 0 {
                *rounds = 0;
                if let Err(e) = reexec::block_caught_signals(false) {
                    log::error!("cannot unblock signals: {e}");
                }
            }
        }
    }

    /// Whether every connection sent to the peer is acknowledged (or the
    /// channel is gone); if not, `progress` runs again when it is.
    fn peer_settled(&mut self) -> bool {
        if !self.limbo.is_empty() {
            return false; // the channel's Closed event, due next, runs progress
        }
        let Some(peer) = &self.peer else { return true };
        if peer.is_settled() {
            return true;
        }
        if !self.settle_wait {
            self.settle_wait = true;
            let w = self.me.clone();
            peer.when_settled(move || {
                with(&w, |s| {
                    s.settle_wait = false;
                    s.progress();
                })
            });
        }
        false
    }

    pub(super) fn step(&mut self) {
        match &self.phase {
            Phase::Serving => {}
            Phase::Stopping => {
                if self.conns.is_empty() && self.peer_settled() {
                    self.finish_stop();
                }
            }
            Phase::Restarting { cut, rounds, .. } => {
                let (cut, rounds) = (*cut, *rounds);
                let settled = cut || (self.conns.values().all(|s| s.settled()) && self.peer_settled());
                if !settled {
                    self.disarm();
                    return;
                }
                // A signal that libevent caught just before we block them
                // waits in its queue, which does not survive the execve: two
                // more loop rounds deliver it (a TERM then stops instead).
                // Signals that come later wait, blocked, for the new image.
                if rounds == 0 {
                    if let Err(e) = reexec::block_caught_signals(true) {
                        log::error!("cannot block signals: {e}");
                    }
                }
                if rounds < 2 {
                    if let Phase::Restarting { rounds, .. } = &mut self.phase {
                        *rounds += 1;
                    }
                    self.schedule_step();
                    return;
                }
                self.finish_restart(cut);
            }
        }
    }

    fn grace_over(&mut self) {
        match &mut self.phase {
            Phase::Serving => {}
            Phase::Stopping => {
                log::warn!(
                    "--grace ({:?}) is over: cutting {} connection(s) still in a request",
                    self.grace,
                    self.conns.len()
                );
                self.finish_stop();
            }
            Phase::Restarting { cut, .. } => {
                *cut = true;
                self.schedule_step();
            }
        }
    }

    /// Closes the peer's channels to us, telling it why. What it sent and
    /// we had not acknowledged stays its own; what we had is ours.
    fn close_inbound(&mut self, why: Leaving) {
        let channels: Vec<Channel> = self.inbound.drain().map(|(_, c)| c).collect();
        for ch in channels {
            let _ = ch.send(Msg::control(KIND_NOTICE, why.name().as_bytes().to_vec()));
            let ours = ch.shutdown();
            self.take_back(ours);
        }
    }

    /// Closes everything and leaves the loop.
    pub(super) fn finish_stop(&mut self) {
        self.tcp = None;
        self.extra.clear();
        self.unix = None;
        self.conns.clear();
        self.limbo.clear();
        if let Some(p) = self.peer.take() {
            // Unacknowledged ones are the peer's if it ever reads them.
            p.shutdown();
        }
        for (_, ch) in self.inbound.drain() {
            ch.shutdown();
        }
        self.retry = None;
        self.log_timer = None;
        self.grace_timer = None;
        self.step = None;
        self.signals.clear();
        self.log.flush();
        self.base.exit(None);
    }

    /// The restart's last step: cut what did not settle within `--grace`
    /// (`cut`), close the channels, and `execve` with every connection.
    /// Returns only if the `execve` failed: the server then serves on.
    fn finish_restart(&mut self, cut: bool) {
        let Phase::Restarting { sig, exe, .. } = &self.phase else { return };
        let (sig, exe, name) = (*sig, exe.clone(), signals::name(*sig));
        let (Some(tcp), Some(unix)) = (&self.tcp, &self.unix) else {
            // (Unreachable: only a stop drops them, and a stop ends the restart.)
            let _ = reexec::block_caught_signals(false);
            self.phase = Phase::Serving;
            return;
        };
        let (tcp, unix) = (tcp.raw_fd(), unix.raw_fd());
        let extra: Vec<std::os::fd::RawFd> = self.extra.iter().map(|l| l.raw_fd()).collect();
        self.grace_timer = None;
        if cut {
            let stuck: Vec<u64> = self.conns.iter().filter(|(_, s)| !s.settled()).map(|(&id, _)| id).collect();
            if !stuck.is_empty() {
                log::warn!(
                    "{name}: {} connection(s) did not settle within --grace ({:?}; clients not reading): cut",
                    stuck.len(),
                    self.grace
                );
            }
            for id in stuck {
                self.conns.remove(&id);
            }
        }
        // The peer takes back what we had not acknowledged, and queues
        // what follows on our listener for the next image.
        self.close_inbound(Leaving::Restarting);
        let limbo = std::mem::take(&mut self.limbo);
        self.take_back(limbo);
        if let Some(p) = self.peer.take() {
            let left = p.shutdown();
            if !left.is_empty() {
                log::warn!(
                    "{name}: the peer has not acknowledged {} connection(s) within --grace: they are its own",
                    left.len()
                );
            }
        }
        self.settle_wait = false;
        self.log.flush();
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        let mut conns = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(s) = self.conns.remove(&id) else { continue };
            let state = s.session.export();
            let (fd, leftover) = s.conn.detach();
            conns.push(Carried { fd, client: s.client, leftover, state, eof: s.eof });
        }
        let n = conns.len();
        let handover = Handover {
            signal: sig,
            restarts: self.restarts + 1,
            served: self.served,
            handed: self.handed,
            exe: self.start_exe.clone(),
            tcp,
            unix,
            extra,
            conns,
        };
        log::info!("{name}: executing {} with {n} connection(s)", exe.display());
        let e = reexec::exec(&exe, &handover);
        // (exec unblocked the signals.)
        log::error!("{name}: cannot restart: execve {}: {e}; serving on with {n} connection(s)", exe.display());
        self.phase = Phase::Serving;
        for l in [&self.tcp, &self.unix].into_iter().flatten().chain(&self.extra) {
            if let Err(e) = l.resume() {
                log::error!("cannot accept again: {e}");
            }
        }
        self.connect_peer();
        self.adopt_all(handover.conns);
    }
}

impl<T> super::Served<T> {
    /// Between requests: nothing flushing, closing or about to move. (A
    /// session answers what it consumes within `serve`, so a connection
    /// with its output flushed has nothing consumed and unanswered.)
    fn settled(&self) -> bool {
        !(self.handing_off || self.closing) && self.conn.output_len() == 0
    }
}
