//! A cluster (or node) worker serving a [`Service`]: takes connections
//! from the master's channel (or accepts on the shared listener), runs a
//! session on each, releases them between requests when the master asks
//! (restart), and reports closes so the master drops its rescue copies.
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::time::Duration;

use crate::core::channel::wire::History;
use crate::core::idmap::IdMap;
use crate::core::reactor::{Base, Conn, ConnEvent, Event, Interest, Listener};
use crate::core::sock;
use crate::service::{cx::RelayReq, Cx, Place, RelayAnswer, Service, Session, Ticket};

pub mod access;
pub mod env;
pub mod link;

use crate::topology::node::handover::LinkState;
use crate::topology::node::links;
use access::{AccessLog, End};
pub use env::WorkerEnv;
use link::{Handed, MasterLink, Order};

/// Pause reading a connection while this much output is unsent.
const OUTPUT_LIMIT: usize = 1 << 20;
/// Draining: how soon a connection the master refused is offered again.
const RETRY_RELEASE: Duration = Duration::from_millis(100);
/// `--rebalance`: a connection that was moved moves again only after this
/// long (no ping-pong between two workers).
const MOVE_COOLDOWN: Duration = Duration::from_secs(1);

/// What a connection is to this worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A client, served by a session.
    Client,
    /// Node mode: a link another node's worker opened to us.
    LinkIn,
    /// Node mode: our link to (node, worker).
    LinkOut(links::Key),
}

/// One connection this worker owns.
pub(crate) struct Served<T> {
    pub(crate) conn: Conn,
    pub(crate) kind: Kind,
    /// The service's session (clients only).
    pub(crate) session: Option<T>,
    /// Output in request order behind a relay still out (`None`: waiting).
    pub(crate) replies: VecDeque<Option<Vec<u8>>>,
    /// Request number of `replies[0]`.
    pub(crate) reply_head: u64,
    pub(crate) next_ticket: u64,
    /// The master's id for this connection (0: accepted here).
    pub(crate) master_id: u64,
    pub(crate) eof: bool,
    /// The session asked to close once the replies are out.
    pub(crate) close_after: bool,
    pub(crate) closing: bool,
    pub(crate) throttled: bool,
    /// Draining: release to the master once between requests.
    pub(crate) releasing: bool,
    /// The release is a rebalancing move (the worker goes on serving).
    pub(crate) rebalancing: bool,
    /// When it arrived here by a rebalancing move (the move cooldown).
    pub(crate) moved_at: Option<std::time::Instant>,
    /// Requests answered since the last rebalance order: its load.
    pub(crate) recent: u64,
    /// Its life so far, here and in the workers it came from (the access
    /// log's counters; it travels with the connection).
    pub(crate) history: History,
    /// The client's address (clients, with `--access-log` only).
    pub(crate) peer: Option<String>,
}

impl<T> Served<T> {
    /// Every request consumed is answered and the answers are flushed.
    fn between_requests(&self) -> bool {
        self.replies.is_empty() && self.conn.output_len() == 0
    }
}

pub(crate) struct Worker<S: Service> {
    pub(crate) base: Base,
    pub(crate) me: Weak<RefCell<Worker<S>>>,
    pub(crate) index: usize,
    pub(crate) service: S,
    pub(crate) read_limit: usize,
    pub(crate) master: MasterLink,
    /// Boxed: an idle connection's table slot is then 16 bytes, not a
    /// whole `Served` (the table runs 45-88 % full).
    pub(crate) conns: IdMap<Box<Served<S::Session>>>,
    pub(crate) next_id: u64,
    /// The shared policy's listening sockets (one per endpoint).
    pub(crate) listeners: Vec<Listener>,
    pub(crate) stopping: bool,
    /// Restart: hand every connection back between requests, then exit.
    pub(crate) draining: bool,
    pub(crate) served: u64,
    pub(crate) signals: Vec<Event>,
    /// Node mode: this node's name, its peers, and the links to them.
    pub(crate) node: Option<links::Node>,
    pub(crate) orphan_timer: Option<Event>,
    /// Draining: offers refused connections again.
    pub(crate) retry_timer: Option<Event>,
    /// `--idle-timeout`: a client connection idle this long is closed.
    pub(crate) idle_timeout: Option<Duration>,
    /// `--access-log`: one line per closed client connection.
    pub(crate) access: Option<AccessLog>,
    /// The replies of one `serve_client` call, reused (see [`SCRATCH_KEEP`]).
    pub(crate) scratch: Vec<u8>,
}

/// The largest scratch buffer a worker keeps between requests; a bigger
/// one (a large reply) is freed after use.
const SCRATCH_KEEP: usize = 64 * 1024;

pub(crate) fn with<S: Service>(w: &Weak<RefCell<Worker<S>>>, f: impl FnOnce(&mut Worker<S>)) {
    if let Some(s) = w.upgrade() {
        f(&mut s.borrow_mut());
    }
}

/// Sets up a worker process: writes to closed sockets fail with EPIPE
/// instead of killing it, it dies with its master (until a restart says
/// otherwise), and it may open as many descriptors as the hard limit allows.
pub fn prepare_process() -> io::Result<()> {
    crate::core::signals::ignore_sigpipe();
    crate::core::signals::die_with_parent(true)?;
    crate::core::limits::raise()?;
    Ok(())
}

/// Runs a worker of service `S` as its master's environment describes.
pub fn run<S: Service>(env: WorkerEnv) -> io::Result<()> {
    prepare_process()?;
    let base = Base::new()?;
    let index = env.index;
    let options: S::Options = serde_json::from_value(env.options.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("HANDOFF_OPTIONS: {e}")))?;
    let place =
        Place::Worker { index, pid: std::process::id(), gen: env.gen, node: env.node.as_ref().map(|n| n.name.clone()) };
    let service = S::new(&options, &place)?;
    let node = env.node.map(|n| links::Node::new(n, index));
    let worker = Rc::new_cyclic(|me: &Weak<RefCell<Worker<S>>>| {
        let (w, ws) = (me.clone(), me.clone());
        let master = MasterLink::new(
            &base,
            env.channel,
            index,
            env.dir,
            move |ev| {
                // A message may arrive while the worker is borrowed (never:
                // the channel calls back from the loop only).
                if let Some(order) = w.upgrade().and_then(|s| s.borrow_mut().master.on_event(ev)) {
                    with(&w, |s| s.obey(order));
                }
            },
            move || with(&ws, |s| s.send_stats()),
        )
        .expect("channel on the master socket");
        RefCell::new(Worker {
            base: base.clone(),
            me: me.clone(),
            index,
            read_limit: service.read_limit(),
            service,
            master,
            conns: IdMap::default(),
            next_id: 1,
            listeners: Vec::new(),
            stopping: false,
            draining: false,
            served: 0,
            signals: Vec::new(),
            node,
            orphan_timer: None,
            retry_timer: None,
            idle_timeout: env.idle_timeout,
            access: None,
            scratch: Vec::new(),
        })
    });
    {
        let mut w = worker.borrow_mut();
        if let Some(path) = &env.access_log {
            let wk = Rc::downgrade(&worker);
            let on_timer = move || with(&wk, |s| s.access.as_mut().map_or((), AccessLog::flush));
            match AccessLog::open(&base, path, index, env.gen, on_timer) {
                Ok(l) => w.access = Some(l),
                Err(e) => log::error!("worker {index}: {e}; no access log"),
            }
        }
        // SIGTERM from outside acts like the master's SHUTDOWN; SIGINT (a
        // terminal's ^C reaching the whole group) is left to the master.
        let wk = Rc::downgrade(&worker);
        let e = Event::new(&base, libc::SIGTERM, Interest::Signal, move || with(&wk, |s| s.begin_shutdown()))?;
        e.add(None)?;
        w.signals.push(e);
        // The rest reach workers through their process group (a terminal's
        // ^C or ^\, `kill -- -PGID`): the master acts on them and tells us.
        let group = [libc::SIGINT, libc::SIGQUIT, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2];
        for sig in group.into_iter().chain(crate::core::signals::IGNORED) {
            let e = Event::new(&base, sig, Interest::Signal, move || {
                log::debug!("worker {index}: {} ignored (the master decides)", crate::core::signals::name(sig))
            })?;
            e.add(None)?;
            w.signals.push(e);
        }
    }
    log::debug!("worker {index} (pid {}) up", std::process::id());
    let r = base.dispatch();
    // The last access-log lines.
    worker.borrow_mut().access = None;
    r?;
    log::debug!("worker {index} exits");
    Ok(())
}

impl<S: Service> Worker<S> {
    fn obey(&mut self, order: Order) {
        match order {
            Order::Conn(h) => {
                self.open_handed(h);
            }
            Order::Refused(mut h) => {
                // It did not move after all.
                if let Some(past) = h.history.as_mut() {
                    past.moves = past.moves.saturating_sub(1);
                }
                if self.open_handed(h).is_some() && self.draining {
                    self.retry_release_later();
                }
            }
            Order::Listener(fd) => self.share_listener(fd),
            Order::Shutdown => self.begin_shutdown(),
            Order::Drain => self.begin_drain(),
            Order::Rebalance(k) => self.rebalance(k),
            Order::Orphaned => self.orphaned(),
            Order::Lost => {
                if let Some(log) = self.access.as_mut() {
                    for s in self.conns.values().filter(|s| s.kind == Kind::Client) {
                        log.record(s.peer.as_deref(), &final_history(s), End::MasterLost);
                    }
                }
                self.conns.clear();
                self.quit();
            }
            Order::ReopenLogs => {
                if let Some(log) = self.access.as_mut() {
                    log.reopen();
                }
            }
            Order::Peers(peers) => self.set_peers(&peers),
        }
    }

    fn share_listener(&mut self, fd: OwnedFd) {
        let w = self.me.clone();
        match Listener::adopt(&self.base, fd, move |c| {
            with(&w, |s| {
                let _ = sock::set_nodelay(c.as_raw_fd());
                let h = Handed::accepted(c, false);
                s.open_conn(h, Kind::Client);
            })
        }) {
            Ok(l) => self.listeners.push(l),
            Err(e) => log::error!("worker {}: shared listener: {e}", self.index),
        }
    }

    /// Serves a connection the master handed us: a client, or a node link
    /// (one another node opened to us, or, after a restart, one our
    /// predecessor had opened).
    fn open_handed(&mut self, h: Handed) -> Option<u64> {
        if !h.node_link {
            return self.open_conn(h, Kind::Client);
        }
        let (out, pings) = LinkState::decode(&h.state).map_or((None, false), |s| (s.out, s.pings));
        match out {
            Some((key, seq)) if self.node.is_some() => self.adopt_link_out(h, key, seq, pings),
            _ => self.open_conn(h, Kind::LinkIn),
        }
    }

    pub(crate) fn open_conn(&mut self, h: Handed, kind: Kind) -> Option<u64> {
        if self.stopping {
            // The master stopped sending before SHUTDOWN; nothing should come.
            log::warn!("worker {}: connection arrived while stopping; closing it", self.index);
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        let peer = if kind == Kind::Client && self.access.is_some() { sock::peer_name(h.fd.as_raw_fd()) } else { None };
        let w = self.me.clone();
        let conn = match Conn::adopt(
            &self.base,
            h.fd,
            &h.leftover,
            self.read_limit,
            Rc::new(move |ev| with(&w, |s| s.on_conn(id, ev))),
        ) {
            Ok(c) => c,
            Err(e) => {
                log::error!("worker {}: cannot adopt connection: {e}", self.index);
                return None;
            }
        };
        if let (Kind::Client, Some(d)) = (&kind, self.idle_timeout) {
            // Counted from its arrival here (a moved connection's clock
            // starts again), while reading is on.
            conn.set_read_timeout(Some(d));
        }
        let session = (kind == Kind::Client).then(|| self.service.open(&h.state));
        let history = h.history.unwrap_or(History { since_us: access::now_us(), ..History::default() });
        self.conns.insert(
            id,
            Box::new(Served {
                conn,
                kind,
                session,
                replies: VecDeque::new(),
                reply_head: 0,
                next_ticket: 0,
                master_id: h.master_id,
                eof: h.eof,
                close_after: false,
                closing: false,
                throttled: false,
                releasing: false,
                rebalancing: false,
                moved_at: h.moved.then(std::time::Instant::now),
                recent: 0,
                history,
                peer,
            }),
        );
        self.master.stats_changed();
        self.serve(id);
        if let Some(s) = self.conns.get(&id) {
            if !(s.eof || s.closing || s.throttled || s.releasing || s.close_after) {
                s.conn.resume_reading();
            }
        }
        Some(id)
    }

    fn on_conn(&mut self, id: u64, ev: ConnEvent) {
        match ev {
            ConnEvent::Read => self.serve(id),
            ConnEvent::Drained => {
                let Some(slot) = self.conns.get_mut(&id) else {
                    return;
                };
                if slot.closing {
                    self.close(id);
                } else if slot.releasing {
                    // Replies are out: the connection moves now.
                    self.release_when_flushed(id);
                } else if slot.throttled {
                    slot.throttled = false;
                    slot.conn.resume_reading();
                    self.serve(id);
                }
            }
            ConnEvent::Eof => {
                if let Some(slot) = self.conns.get_mut(&id) {
                    slot.eof = true;
                    self.serve(id);
                }
            }
            ConnEvent::Error(errno) => {
                let e = io::Error::from_raw_os_error(errno);
                log::debug!("worker {}: connection {id}: {e}", self.index);
                self.finish(id, &e.to_string(), Some(End::of_errno(errno)));
            }
            ConnEvent::Timeout => self.on_idle(id),
        }
    }

    fn serve(&mut self, id: u64) {
        match self.conns.get(&id).map(|s| &s.kind) {
            Some(Kind::Client) => self.serve_client(id),
            Some(_) => self.serve_link(id),
            None => {}
        }
    }

    /// Runs the session on the buffered input; its output leaves in one
    /// write, except what waits behind a relay (node mode).
    fn serve_client(&mut self, id: u64) {
        let node_mode = self.node.is_some();
        let Some(slot) = self.conns.get_mut(&id) else { return };
        if slot.closing || slot.releasing || slot.close_after {
            return;
        }
        let Some(session) = slot.session.as_mut() else { return };
        // The replies go into the worker's scratch buffer, kept between
        // calls so that a request costs no allocation (given back below).
        let mut out = std::mem::take(&mut self.scratch);
        let avail = slot.conn.input_len();
        let mut cx = Cx::new(&mut out, slot.conn.output_len(), OUTPUT_LIMIT).with_eof(slot.eof);
        if node_mode {
            cx = cx.with_relays(slot.next_ticket);
        }
        let used = session.serve(slot.conn.peek(avail), &mut cx);
        let (answered, close, abort, relays) = (cx.answered, cx.close, cx.abort, std::mem::take(&mut cx.relays));
        let more = cx.more();
        slot.conn.consume(used.min(avail));
        slot.recent += answered as u64;
        slot.history.requests += answered as u64;
        slot.history.bytes_in += used.min(avail) as u64;
        self.served += answered as u64;
        if abort {
            self.close_as(id, End::ProtocolError);
            return;
        }
        if relays.is_empty() && slot.replies.is_empty() {
            // Every reply is ready and none waits before them: they go
            // out from the scratch buffer, in one write.
            let wrote = if out.is_empty() { Ok(true) } else { slot.conn.write_now(&out) };
            slot.history.bytes_out += out.len() as u64;
            if out.capacity() <= SCRATCH_KEEP {
                out.clear();
                self.scratch = out;
            }
            if let Err(e) = wrote {
                log::debug!("worker {}: connection {id}: write: {e}", self.index);
                self.close_as(id, End::of_errno(e.raw_os_error().unwrap_or(0)));
                return;
            }
            self.settle_served(id, more, close);
            self.master.stats_changed();
            return;
        }
        slot.next_ticket += relays.len() as u64;
        let mut pending = Vec::new();
        let mut at = 0;
        let mut direct = Vec::new();
        for RelayReq { at: end, ticket, node, worker, msg } in relays {
            let seg = out[at..end].to_vec();
            at = end;
            if slot.replies.is_empty() {
                direct.extend(seg);
            } else if !seg.is_empty() {
                slot.replies.push_back(Some(seg));
            }
            let seq = slot.reply_head + slot.replies.len() as u64;
            slot.replies.push_back(None);
            pending.push((seq, ticket, node, worker, msg));
        }
        if slot.replies.is_empty() {
            direct.extend_from_slice(&out[at..]);
        } else if at < out.len() {
            slot.replies.push_back(Some(out[at..].to_vec()));
        }
        if !direct.is_empty() {
            slot.history.bytes_out += direct.len() as u64;
            if let Err(e) = slot.conn.write_now(&direct) {
                log::debug!("worker {}: connection {id}: write: {e}", self.index);
                self.close_as(id, End::of_errno(e.raw_os_error().unwrap_or(0)));
                return;
            }
        }
        self.settle_served(id, more, close);
        for (seq, ticket, node, worker, msg) in pending {
            self.relay(id, seq, ticket, node, worker, msg);
        }
        self.master.stats_changed();
    }

    /// After serving: throttle a client that does not read, and close or
    /// release the connection once its replies are out, as asked.
    fn settle_served(&mut self, id: u64, more: bool, close: bool) {
        let Some(slot) = self.conns.get_mut(&id) else { return };
        if !more && !close && slot.conn.output_len() > 0 {
            // Over the output limit (the client does not read): serve the
            // rest once the output drains.
            slot.throttled = true;
            slot.conn.pause_reading();
        }
        if close {
            slot.close_after = true;
            slot.conn.pause_reading();
        }
        let waiting = !slot.replies.is_empty();
        if self.draining {
            self.release_when_flushed(id);
        } else if (slot.eof || self.stopping || close) && !waiting {
            self.close_when_flushed(id);
        }
    }

    /// A relay's answer came (or it failed): the session writes its
    /// response, which goes out with every ready one behind it.
    pub(crate) fn relay_done(&mut self, id: u64, seq: u64, ticket: Ticket, answer: Result<RelayAnswer<'_>, &str>) {
        let Some(slot) = self.conns.get_mut(&id) else { return };
        let Some(session) = slot.session.as_mut() else { return };
        let mut frame = Vec::new();
        session.relayed(ticket, answer, &mut frame);
        self.complete(id, seq, frame);
    }

    /// A deferred reply is ready: send it and every ready one behind it.
    fn complete(&mut self, id: u64, seq: u64, frame: Vec<u8>) {
        let Some(slot) = self.conns.get_mut(&id) else { return };
        let Some(i) = seq.checked_sub(slot.reply_head).map(|i| i as usize) else { return };
        if i >= slot.replies.len() {
            return;
        }
        slot.replies[i] = Some(frame);
        let mut out = Vec::new();
        while let Some(Some(_)) = slot.replies.front() {
            out.extend(slot.replies.pop_front().flatten().expect("checked Some"));
            slot.reply_head += 1;
        }
        if !out.is_empty() {
            slot.history.bytes_out += out.len() as u64;
            if let Err(e) = slot.conn.write_now(&out) {
                log::debug!("worker {}: connection {id}: write: {e}", self.index);
                self.close_as(id, End::of_errno(e.raw_os_error().unwrap_or(0)));
                return;
            }
        }
        if slot.replies.is_empty() {
            if slot.releasing || self.draining {
                self.release_when_flushed(id);
            } else if slot.eof || self.stopping || slot.close_after {
                self.close_when_flushed(id);
            } else {
                // Requests that arrived behind the relay.
                self.serve(id);
            }
        }
    }

    fn close_when_flushed(&mut self, id: u64) {
        let Some(slot) = self.conns.get_mut(&id) else {
            return;
        };
        if slot.conn.output_len() == 0 {
            self.close(id);
        } else {
            slot.closing = true;
        }
    }

    /// Closes a connection whose end its state tells (see [`Worker::finish`]).
    fn close(&mut self, id: u64) {
        self.finish(id, "closed", None);
    }

    fn close_as(&mut self, id: u64, end: End) {
        self.finish(id, end.name(), Some(end));
    }

    /// Closes a connection for good (see [`Worker::finish`]).
    pub(crate) fn close_because(&mut self, id: u64, why: &str) {
        self.finish(id, why, None);
    }

    /// Closes a connection for good: shut down first, because the master
    /// still holds a descriptor to it (to rescue it should we die). A
    /// lost link fails the relays waiting on it with `why`. A client's
    /// access-log line says `end`, or, when `None`, what its state says
    /// (the service closed it, its client sent EOF, we are stopping).
    fn finish(&mut self, id: u64, why: &str, end: Option<End>) {
        if let Some(slot) = self.conns.remove(&id) {
            if let Kind::LinkOut(key) = &slot.kind {
                self.link_lost(key, why);
            }
            if let (Kind::Client, Some(log)) = (&slot.kind, self.access.as_mut()) {
                let end = end.unwrap_or(if slot.close_after {
                    End::ServerClose
                } else if slot.eof {
                    End::ClientEof
                } else if self.stopping {
                    End::Shutdown
                } else {
                    End::Error
                });
                log.record(slot.peer.as_deref(), &final_history(&slot), end);
            }
            sock::shutdown_both(slot.conn.raw_fd());
            self.master.closed(slot.master_id);
        }
        // Stopping, or draining for a restart: done with the last one.
        if (self.stopping || self.draining) && self.conns.is_empty() {
            self.quit();
        }
    }

    /// `--idle-timeout`: no byte came for that long. A client connection
    /// with nothing to answer either (no reply waiting, none unsent) is
    /// closed; a busy one is left (the timer runs on).
    fn on_idle(&mut self, id: u64) {
        let Some(s) = self.conns.get(&id) else { return };
        if s.kind != Kind::Client && self.node.is_some() {
            // A link's read timeout is its heartbeat.
            return self.link_silent(id);
        }
        let busy = !s.replies.is_empty() || s.conn.output_len() > 0 || s.closing || s.releasing;
        if s.kind != Kind::Client || busy {
            return;
        }
        log::debug!("worker {}: connection {id} idle for {:?}; closing", self.index, self.idle_timeout);
        self.close_as(id, End::IdleTimeout);
    }

    /// Restart: every connection goes back to the master (which passes it
    /// to the new generation) as soon as it is between requests; the
    /// bytes of a request still arriving travel with it.
    fn begin_drain(&mut self) {
        if self.draining || self.stopping {
            return;
        }
        self.draining = true;
        self.listeners.clear();
        log::debug!("worker {}: draining {} connection(s) to the next generation", self.index, self.conns.len());
        self.release_all();
    }

    fn release_all(&mut self) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.release_when_flushed(id);
        }
        if self.conns.is_empty() {
            self.quit();
        }
    }

    pub(crate) fn release_when_flushed(&mut self, id: u64) {
        let Some(slot) = self.conns.get_mut(&id) else { return };
        if slot.closing {
            return;
        }
        if let Kind::LinkOut(key) = &slot.kind {
            // Our link moves once no relay waits on it; it keeps reading
            // meanwhile (the answers come on it).
            let (key, flushed) = (key.clone(), slot.conn.output_len() == 0);
            slot.releasing = true;
            match self.link_idle(&key) {
                Some(true) if flushed => self.release(id),
                Some(true) | None => {}
                // Still being set up with nothing queued: close it.
                Some(false) => self.close_because(id, "restart"),
            }
            return;
        }
        if slot.between_requests() {
            self.release(id);
        } else {
            slot.releasing = true;
            slot.conn.pause_reading();
        }
    }

    /// Lets go of a connection: descriptor, read-ahead and session state
    /// go back to the master.
    fn release(&mut self, id: u64) {
        let Some(slot) = self.conns.remove(&id) else { return };
        let state = match &slot.kind {
            Kind::Client => slot.session.as_ref().map(Session::export).unwrap_or_default(),
            Kind::LinkIn => LinkState { worker: self.index, out: None, pings: false }.encode(),
            Kind::LinkOut(key) => {
                let pings = self.link_pings(key);
                let seq = self.link_moved(key);
                LinkState { worker: self.index, out: Some((key.clone(), seq)), pings }.encode()
            }
        };
        let (fd, leftover) = slot.conn.detach();
        let history = History { moves: slot.history.moves.saturating_add(1), ..slot.history };
        let h = Handed {
            fd,
            leftover,
            state,
            master_id: slot.master_id,
            eof: slot.eof,
            node_link: slot.kind != Kind::Client,
            moved: false,
            history: (slot.kind == Kind::Client).then_some(history),
        };
        if slot.rebalancing && !self.draining {
            self.master.give_back(h, true);
            self.master.stats_changed();
            return;
        }
        self.master.give_back(h, false);
        if self.draining && self.conns.is_empty() {
            self.quit();
        }
    }

    /// `--rebalance`: moves up to `k` of the busiest client connections
    /// (by requests since the last order) away, each between requests;
    /// those moved here less than [`MOVE_COOLDOWN`] ago stay.
    fn rebalance(&mut self, k: usize) {
        if self.draining || self.stopping {
            return;
        }
        let now = std::time::Instant::now();
        let mut busiest: Vec<(u64, u64)> = self
            .conns
            .iter()
            .filter(|(_, s)| {
                s.kind == Kind::Client
                    && s.recent > 0
                    && !(s.closing || s.releasing || s.close_after)
                    && s.moved_at.is_none_or(|t| now.duration_since(t) >= MOVE_COOLDOWN)
            })
            .map(|(&id, s)| (s.recent, id))
            .collect();
        busiest.sort_unstable_by(|a, b| b.cmp(a));
        for s in self.conns.values_mut() {
            s.recent = 0;
        }
        busiest.truncate(k);
        log::debug!("worker {}: rebalancing: moving {} of {} asked", self.index, busiest.len(), k);
        for (_, id) in busiest {
            if let Some(s) = self.conns.get_mut(&id) {
                s.rebalancing = true;
            }
            self.release_when_flushed(id);
        }
    }

    fn send_stats(&mut self) {
        let links = self.node.as_ref().map(links::Node::table);
        self.master.send_stats(self.conns.len(), self.served, links);
    }

    /// Stops taking connections, finishes the requests it has (a
    /// connection with no partial request buffered closes at once), exits
    /// when it owns none.
    fn begin_shutdown(&mut self) {
        if self.stopping || self.draining {
            return;
        }
        self.stopping = true;
        self.listeners.clear();
        log::debug!("worker {}: shutting down with {} open connection(s)", self.index, self.conns.len());
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            let idle = self.conns.get(&id).is_some_and(|s| s.conn.input_len() == 0 && s.replies.is_empty());
            if idle {
                self.close_when_flushed(id);
            }
        }
        if self.conns.is_empty() {
            self.quit();
        }
    }

    fn quit(&mut self) {
        if self.master.is_quitting() {
            return;
        }
        self.send_stats();
        self.signals.clear();
        self.listeners.clear();
        self.retry_timer = None;
        self.master.quit();
    }

    /// Our master died mid-restart and the link now reaches its
    /// successor: every connection moves there between requests; no
    /// master will cut clients that never read, so we do, after the grace.
    fn orphaned(&mut self) {
        let grace = self.master.orphan_grace;
        let w = self.me.clone();
        let t = Event::new(&self.base, -1, Interest::Timer, move || {
            with(&w, |s| {
                if !s.conns.is_empty() {
                    log::warn!(
                        "worker {}: {} connection(s) could not move within {grace:?} (clients not reading); cutting them",
                        s.index,
                        s.conns.len(),
                    );
                }
                let ids: Vec<u64> = s.conns.keys().copied().collect();
                for id in ids {
                    s.close_as(id, End::Cut);
                }
                s.quit();
            })
        });
        match t.and_then(|t| t.add(Some(grace)).map(|()| t)) {
            Ok(t) => self.orphan_timer = Some(t),
            Err(e) => log::error!("worker {}: grace timer: {e}", self.index),
        }
        self.draining = true;
        self.stopping = false;
        self.listeners.clear();
        self.release_all();
    }

    /// Draining: a connection the master refused is offered again soon.
    fn retry_release_later(&mut self) {
        if self.retry_timer.as_ref().is_some_and(Event::pending) {
            return;
        }
        let w = self.me.clone();
        let t = Event::new(&self.base, -1, Interest::Timer, move || with(&w, |s| s.release_all()));
        match t.and_then(|t| t.add(Some(RETRY_RELEASE)).map(|()| t)) {
            Ok(t) => self.retry_timer = Some(t),
            Err(e) => log::error!("worker {}: retry timer: {e}", self.index),
        }
    }
}

/// A closing connection's history with what is still buffered counted:
/// input received but not consumed, less output never sent.
fn final_history<T>(s: &Served<T>) -> History {
    let h = s.history;
    History {
        bytes_in: h.bytes_in + s.conn.input_len() as u64,
        bytes_out: h.bytes_out.saturating_sub(s.conn.output_len() as u64),
        ..h
    }
}
