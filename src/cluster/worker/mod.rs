//! A cluster worker: takes connections from the master's channel (or
//! accepts on the shared listener) and answers the rpc protocol. It tells
//! the master which connections it closed (in the coalesced stats
//! message), so the master can release its rescue copies.
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{
    control_path, KIND_DRAIN, KIND_ORPHAN_HELLO, KIND_PING, KIND_PONG, KIND_SHUTDOWN, KIND_STATS, KIND_TAKEOVER_BEGUN,
    KIND_TAKEOVER_ENDED,
};
use crate::channel::{wire, Channel, ChannelEvent, Msg};
use crate::proto::rpc::{self, Frame};
use crate::reactor::{Base, Conn, ConnEvent, Event, Interest, Listener};
use crate::sock;

mod links;

/// Pause reading a connection while this much output is unsent.
const OUTPUT_LIMIT: usize = 1 << 20;
/// Draining: how soon a connection the master refused is offered again.
const RETRY_RELEASE: Duration = Duration::from_millis(100);
/// Longest delay of a counters-only stats message.
const STATS_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct Config {
    /// Node mode (`handoff node`); `None` for a plain cluster.
    pub node: Option<crate::node::NodeConfig>,
    pub index: usize,
    /// The cluster's generation (restarts), shown by whoami.
    pub gen: u64,
    pub max_frame: usize,
    /// The worker's end of the master socketpair.
    pub channel: OwnedFd,
    /// The cluster's directory (a successor's control socket).
    pub dir: Option<std::path::PathBuf>,
}

/// What a connection is to this worker.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// A client speaking the rpc protocol.
    Client,
    /// Node mode: a link another node's worker opened to us.
    LinkIn,
    /// Node mode: our link to (node, worker).
    LinkOut(links::Key),
}

struct Slot {
    conn: Conn,
    kind: Kind,
    /// Client replies in request order; `None` while a relay is out.
    replies: VecDeque<Option<Vec<u8>>>,
    /// Request number of `replies[0]`.
    reply_head: u64,
    /// The master's id for this connection (0: accepted here).
    master_id: u64,
    eof: bool,
    closing: bool,
    throttled: bool,
    /// Draining: release to the master once the output is flushed.
    releasing: bool,
}

struct Worker {
    base: Base,
    me: Weak<RefCell<Worker>>,
    index: usize,
    max_frame: usize,
    identity: Map<String, Value>,
    /// The whoami reply's JSON, made once.
    whoami: Vec<u8>,
    master: Channel,
    conns: HashMap<u64, Slot>,
    next_id: u64,
    listener: Option<Listener>,
    stats_timer: Option<Event>,
    stopping: bool,
    /// Restart: hand every connection back between requests, then exit.
    draining: bool,
    served: u64,
    /// Master ids of connections closed since the last stats message.
    closed: Vec<u64>,
    signals: Vec<Event>,
    /// Node mode: this node's name, its peers, and the links to them.
    node: Option<links::Node>,
    /// Exiting once the channel is flushed.
    quitting: bool,
    /// Set when a pending exit waits on a channel that was replaced.
    exit_superseded: Rc<std::cell::Cell<bool>>,
    dir: Option<std::path::PathBuf>,
    /// A restart is under way: if the master dies, the connections go to
    /// the successor listening on the control socket.
    successor_known: bool,
    /// Released connections the broken master channel gave straight back.
    unsent: Vec<Msg>,
    /// How long an orphaned worker waits for clients that do not read.
    orphan_grace: Duration,
    orphan_timer: Option<Event>,
    /// Draining: offers refused connections again.
    retry_timer: Option<Event>,
}

fn with(w: &Weak<RefCell<Worker>>, f: impl FnOnce(&mut Worker)) {
    if let Some(s) = w.upgrade() {
        f(&mut s.borrow_mut());
    }
}

pub fn run(cfg: Config) -> io::Result<()> {
    crate::signals::ignore_sigpipe();
    crate::signals::die_with_parent(true)?;
    sock::raise_nofile()?;
    let base = Base::new()?;
    let index = cfg.index;
    let mut identity =
        json!({"worker": index, "pid": std::process::id(), "gen": cfg.gen}).as_object().cloned().unwrap_or_default();
    if let Some(n) = &cfg.node {
        identity.insert("node".into(), Value::String(n.name.clone()));
    }
    let node = cfg.node.map(|n| links::Node::new(n, index));
    let worker = Rc::new_cyclic(|me: &Weak<RefCell<Worker>>| {
        let w = me.clone();
        let master = Channel::new(&base, cfg.channel, move |ev| with(&w, |s| s.on_master(ev)))
            .expect("channel on the master socket");
        RefCell::new(Worker {
            base: base.clone(),
            me: me.clone(),
            index,
            max_frame: cfg.max_frame,
            whoami: serde_json::to_vec(&rpc::respond(Ok(("whoami".into(), Map::new())), &identity))
                .expect("a Value always serialises"),
            identity,
            master,
            conns: HashMap::new(),
            next_id: 1,
            listener: None,
            stats_timer: None,
            stopping: false,
            draining: false,
            served: 0,
            closed: Vec::new(),
            signals: Vec::new(),
            node,
            quitting: false,
            exit_superseded: Rc::default(),
            dir: cfg.dir,
            successor_known: false,
            unsent: Vec::new(),
            orphan_grace: Duration::from_secs(5),
            orphan_timer: None,
            retry_timer: None,
        })
    });
    {
        let mut w = worker.borrow_mut();
        let wk = Rc::downgrade(&worker);
        w.stats_timer = Some(Event::new(&base, -1, Interest::Timer, move || with(&wk, |s| s.send_stats()))?);
        // SIGTERM from outside acts like the master's SHUTDOWN; SIGINT (a
        // terminal's ^C reaching the whole group) is left to the master.
        let wk = Rc::downgrade(&worker);
        let e = Event::new(&base, libc::SIGTERM, Interest::Signal, move || with(&wk, |s| s.begin_shutdown()))?;
        e.add(None)?;
        w.signals.push(e);
        // The rest reach workers through their process group (a terminal's
        // ^C or ^\, `kill -- -PGID`): the master acts on them and tells us.
        let group = [libc::SIGINT, libc::SIGQUIT, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2];
        for sig in group.into_iter().chain(crate::signals::IGNORED) {
            let e = Event::new(&base, sig, Interest::Signal, move || {
                log::debug!("worker {index}: {} ignored (the master decides)", crate::signals::name(sig))
            })?;
            e.add(None)?;
            w.signals.push(e);
        }
    }
    log::debug!("worker {index} (pid {}) up", std::process::id());
    base.dispatch()?;
    log::debug!("worker {index} exits");
    Ok(())
}

impl Worker {
    fn on_master(&mut self, ev: ChannelEvent) {
        match ev {
            ChannelEvent::Msg(m) => match m.kind {
                wire::KIND_CONN => {
                    let fd = m.fd.expect("channel checks CONN carries a descriptor");
                    let kind = if m.flags & wire::FLAG_NODE_LINK != 0 { Kind::LinkIn } else { Kind::Client };
                    self.adopt(fd, &m.body, m.id, kind);
                }
                wire::KIND_LISTENER => self.share_listener(m.fd.expect("channel checks LISTENER carries a descriptor")),
                KIND_SHUTDOWN => self.begin_shutdown(),
                KIND_DRAIN => self.begin_drain(),
                KIND_TAKEOVER_BEGUN => {
                    let v: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
                    self.orphan_grace = Duration::from_secs_f64(v["grace"].as_f64().unwrap_or(5.0).clamp(0.0, 3600.0));
                    self.successor_begun(true)
                }
                KIND_TAKEOVER_ENDED => self.successor_begun(false),
                KIND_PING => {
                    let _ = self.master.send(Msg::control(KIND_PONG, Vec::new()));
                }
                k => log::warn!("worker {}: unexpected message kind {k} from master", self.index),
            },
            // The master had no descriptor to spare for a connection we
            // accepted (shared policy): serve it, and offer it again later
            // if we are draining.
            ChannelEvent::Refused(m) => {
                let Some(fd) = m.fd else { return };
                let eof = m.flags & wire::FLAG_EOF != 0;
                let master_id = if m.flags & wire::FLAG_RELEASED != 0 { m.meta } else { 0 };
                if let Some(id) = self.adopt(fd, &m.body, master_id, Kind::Client) {
                    if let Some(slot) = self.conns.get_mut(&id) {
                        slot.eof |= eof;
                    }
                    if self.draining {
                        self.retry_release_later();
                    }
                }
            }
            ChannelEvent::Closed { reason, mut returned, .. } => {
                returned.append(&mut self.unsent);
                let n = returned.len();
                if self.successor_known && self.hand_to_successor(returned) {
                    return;
                }
                if n > 0 {
                    log::error!("worker {}: master gone; {n} released connection(s) close", self.index);
                }
                log::info!(
                    "worker {}: master channel closed ({}); exiting",
                    self.index,
                    reason.map_or("EOF".into(), |e| e.to_string())
                );
                self.conns.clear();
                self.quit();
            }
        }
    }

    fn share_listener(&mut self, fd: OwnedFd) {
        let w = self.me.clone();
        match Listener::adopt(&self.base, fd, move |c| {
            with(&w, |s| {
                let _ = sock::set_nodelay(c.as_raw_fd());
                s.adopt(c, &[], 0, Kind::Client);
            })
        }) {
            Ok(l) => self.listener = Some(l),
            Err(e) => log::error!("worker {}: shared listener: {e}", self.index),
        }
    }

    fn adopt(&mut self, fd: OwnedFd, leftover: &[u8], master_id: u64, kind: Kind) -> Option<u64> {
        if self.stopping {
            // The master stopped sending before SHUTDOWN; nothing should come.
            log::warn!("worker {}: connection arrived while stopping; closing it", self.index);
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        let w = self.me.clone();
        let read_limit = self.max_frame + 4 + 64 * 1024;
        match Conn::adopt(&self.base, fd, leftover, read_limit, Rc::new(move |ev| with(&w, |s| s.on_conn(id, ev)))) {
            Ok(conn) => {
                let slot = Slot {
                    conn,
                    kind,
                    replies: VecDeque::new(),
                    reply_head: 0,
                    master_id,
                    eof: false,
                    closing: false,
                    throttled: false,
                    releasing: false,
                };
                self.conns.insert(id, slot);
                self.stats_changed(false);
                self.serve(id);
                if let Some(s) = self.conns.get(&id) {
                    if !(s.eof || s.closing || s.throttled || s.releasing) {
                        s.conn.resume_reading();
                    }
                }
                Some(id)
            }
            Err(e) => {
                log::error!("worker {}: cannot adopt connection: {e}", self.index);
                None
            }
        }
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
                    self.release(id);
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
                self.close_because(id, &e.to_string());
            }
            ConnEvent::Timeout => {}
        }
    }

    fn serve(&mut self, id: u64) {
        match self.conns.get(&id).map(|s| &s.kind) {
            Some(Kind::Client) => self.serve_client(id),
            Some(_) => self.serve_link(id),
            None => {}
        }
    }

    /// Answers every complete request in the input, in order; the replies
    /// of one batch leave in one write. Relays (node mode) answer later;
    /// replies behind them wait their turn.
    fn serve_client(&mut self, id: u64) {
        let Some(slot) = self.conns.get_mut(&id) else { return };
        if slot.closing || slot.releasing {
            return;
        }
        let node_mode = self.node.is_some();
        let mut relays = Vec::new();
        let mut out = Vec::new();
        let mut close = false;
        loop {
            let avail = slot.conn.input_len();
            match rpc::frame(slot.conn.peek(avail.min(4)), avail, self.max_frame) {
                Frame::Complete { body } => {
                    let frame = &slot.conn.peek(4 + body)[4..];
                    let relay = if node_mode { rpc::parse_relay(frame) } else { None };
                    if let Some(r) = relay {
                        let seq = slot.reply_head + slot.replies.len() as u64;
                        relays.push((seq, r.node.into_owned(), r.worker, r.msg.get().to_string()));
                        slot.replies.push_back(None);
                        slot.conn.consume(4 + body);
                        self.served += 1;
                        continue;
                    }
                    // In order behind a pending relay, or on the fast path.
                    let fast = slot.replies.is_empty() && rpc::answer_fast(frame, &self.whoami, &mut out);
                    let req = if fast { None } else { Some(rpc::parse(frame)) };
                    slot.conn.consume(4 + body);
                    self.served += 1;
                    match req {
                        None => {}
                        Some(Ok((kind, _))) if node_mode && kind == "relay" => {
                            let e = rpc::error("relay: params must be {\"node\":name,\"worker\":index,\"msg\":value}");
                            if slot.replies.is_empty() {
                                rpc::encode_into(&e, &mut out);
                            } else {
                                slot.replies.push_back(Some(rpc::encode(&e)));
                            }
                        }
                        Some(req) => {
                            let reply = rpc::respond(req, &self.identity);
                            if slot.replies.is_empty() {
                                rpc::encode_into(&reply, &mut out);
                            } else {
                                slot.replies.push_back(Some(rpc::encode(&reply)));
                            }
                        }
                    }
                    if out.len() + slot.conn.output_len() > OUTPUT_LIMIT {
                        slot.throttled = true;
                        slot.conn.pause_reading();
                        break;
                    }
                }
                Frame::TooLarge { len } => {
                    log::info!(
                        "worker {}: connection {id}: frame of {len} bytes exceeds --max-frame {}; closing",
                        self.index,
                        self.max_frame
                    );
                    out.clear();
                    close = true;
                    break;
                }
                Frame::Incomplete => {
                    if slot.eof && avail > 0 {
                        log::info!(
                            "worker {}: connection {id}: truncated frame ({avail} bytes) before EOF; closing",
                            self.index
                        );
                    }
                    break;
                }
            }
        }
        if close {
            self.close(id);
            return;
        }
        if !out.is_empty() {
            if let Err(e) = slot.conn.write_now(&out) {
                log::debug!("worker {}: connection {id}: write: {e}", self.index);
                self.close(id);
                return;
            }
        }
        let waiting = !slot.replies.is_empty();
        if self.draining {
            self.release_when_flushed(id);
        } else if (slot.eof || self.stopping) && !waiting {
            self.close_when_flushed(id);
        }
        for (seq, node, worker, msg) in relays {
            self.relay(id, seq, node, worker, msg);
        }
        self.stats_changed(false);
    }

    fn complete_value(&mut self, id: u64, seq: u64, reply: &Value) {
        self.complete(id, seq, rpc::encode(reply));
    }

    /// A deferred reply (a whole frame) is ready: send it and every ready
    /// one behind it.
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
            if let Err(e) = slot.conn.write_now(&out) {
                log::debug!("worker {}: connection {id}: write: {e}", self.index);
                self.close(id);
                return;
            }
        }
        if slot.replies.is_empty() && (slot.eof || self.stopping) {
            self.close_when_flushed(id);
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

    fn close(&mut self, id: u64) {
        self.close_because(id, "closed");
    }

    /// Closes a connection for good: shut down first, because the master
    /// still holds a descriptor to it (to rescue it should we die). A
    /// lost link fails the relays waiting on it with `why`.
    fn close_because(&mut self, id: u64, why: &str) {
        if let Some(slot) = self.conns.remove(&id) {
            if let Kind::LinkOut(key) = &slot.kind {
                self.link_lost(key, why);
            }
            sock::shutdown_both(slot.conn.raw_fd());
            if slot.master_id != 0 {
                self.closed.push(slot.master_id);
            }
            self.stats_changed(true);
        }
        if self.stopping && self.conns.is_empty() {
            self.quit();
        }
    }

    /// Restart: every connection goes back to the master (which passes it
    /// to the new generation) as soon as its responses are flushed; the
    /// bytes of a request still arriving travel with it.
    fn begin_drain(&mut self) {
        if self.draining || self.stopping {
            return;
        }
        self.draining = true;
        self.listener = None;
        log::debug!("worker {}: draining {} connection(s) to the next generation", self.index, self.conns.len());
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.release_when_flushed(id);
        }
        if self.conns.is_empty() {
            self.quit();
        }
    }

    fn release_when_flushed(&mut self, id: u64) {
        let Some(slot) = self.conns.get_mut(&id) else { return };
        if slot.closing {
            return;
        }
        if slot.conn.output_len() == 0 {
            self.release(id);
        } else {
            slot.releasing = true;
            slot.conn.pause_reading();
        }
    }

    /// Lets go of a connection: it goes back to the master whole (CONN,
    /// descriptor and read-ahead), kept here until the master's ACK, so it
    /// survives the master's death. One the master handed us is marked
    /// released, with the master's id for it in `meta`.
    fn release(&mut self, id: u64) {
        let Some(slot) = self.conns.remove(&id) else { return };
        let mut flags = if slot.eof { wire::FLAG_EOF } else { 0 };
        let (fd, leftover) = slot.conn.detach();
        if slot.master_id != 0 {
            flags |= wire::FLAG_RELEASED;
        }
        let mut msg = Msg::conn(fd, leftover, flags);
        msg.meta = slot.master_id;
        if let Err(back) = self.master.send(msg) {
            // The channel just broke: its Closed event decides (a successor
            // takes it, or it closes with us).
            self.unsent.push(back);
        }
        if self.conns.is_empty() {
            self.quit();
        }
    }

    /// Stats go to the master coalesced: at the end of this loop round
    /// when a connection closed (the master then drops its copy), within
    /// `STATS_EVERY` when only counters moved.
    fn stats_changed(&mut self, closed: bool) {
        if let Some(t) = &self.stats_timer {
            if closed || !self.closed.is_empty() {
                let _ = t.add(Some(Duration::ZERO));
            } else if !t.pending() {
                let _ = t.add(Some(STATS_EVERY));
            }
        }
    }

    fn send_stats(&mut self) {
        let closed = std::mem::take(&mut self.closed);
        let mut body = json!({"open": self.conns.len(), "served": self.served, "closed": closed});
        if let Some(n) = &self.node {
            body["links"] = n.table();
        }
        let _ = self.master.send(Msg::control(KIND_STATS, body.to_string().into_bytes()));
    }

    /// Stops taking connections, finishes the requests it has (a
    /// connection with no partial request buffered closes at once), exits
    /// when it owns none.
    fn begin_shutdown(&mut self) {
        if self.stopping || self.draining {
            return;
        }
        self.stopping = true;
        self.listener = None;
        log::debug!("worker {}: shutting down with {} open connection(s)", self.index, self.conns.len());
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            let idle = self.conns.get(&id).is_some_and(|s| s.conn.input_len() == 0);
            if idle {
                self.close_when_flushed(id);
            }
        }
        if self.conns.is_empty() {
            self.quit();
        }
    }

    fn quit(&mut self) {
        if self.quitting {
            return;
        }
        self.quitting = true;
        self.send_stats();
        self.signals.clear();
        self.stats_timer = None;
        self.listener = None;
        self.retry_timer = None;
        // Leave once every message (connections, the last stats) is in
        // the kernel: the master reads them all, even after we are gone.
        let base = self.base.clone();
        let superseded = self.exit_superseded.clone();
        self.master.when_settled(move || {
            if !superseded.get() {
                base.exit(None)
            }
        });
    }

    /// A takeover began (`true`: a successor listens on the control
    /// socket) or was aborted (`false`). While it runs, this worker does
    /// not die with its master: it hands its connections to the successor.
    fn successor_begun(&mut self, begun: bool) {
        if self.dir.is_none() {
            return;
        }
        self.successor_known = begun;
        if let Err(e) = crate::signals::die_with_parent(!begun) {
            log::error!("worker {}: prctl: {e}", self.index);
        }
    }

    /// Our master died during a restart: every connection (those it never
    /// acknowledged included) goes to the new master, through its control
    /// socket, between requests as in a drain. False if it cannot be reached.
    fn hand_to_successor(&mut self, returned: Vec<Msg>) -> bool {
        self.successor_known = false; // once: if this one dies too, give up
        let Some(dir) = self.dir.clone() else { return false };
        let w = self.me.clone();
        let ch = crate::sock::unix_connect(&control_path(&dir))
            .and_then(|fd| Channel::new(&self.base, fd, move |ev| with(&w, |s| s.on_master(ev))));
        let ch = match ch {
            Ok(ch) => ch,
            Err(e) => {
                log::error!("worker {}: master died mid-restart and its successor is unreachable: {e}", self.index);
                return false;
            }
        };
        log::warn!(
            "worker {}: master died mid-restart; handing {} connection(s) to the new master",
            self.index,
            self.conns.len() + returned.len()
        );
        let hello = json!({"worker": self.index, "pid": std::process::id()}).to_string().into_bytes();
        let _ = ch.send(Msg::control(KIND_ORPHAN_HELLO, hello));
        for m in returned.into_iter().filter(|m| m.kind == wire::KIND_CONN) {
            let _ = ch.send(m);
        }
        self.master = ch;
        // No master will cut clients that never read: we do, after --grace.
        let w = self.me.clone();
        let t = Event::new(&self.base, -1, Interest::Timer, move || {
            with(&w, |s| {
                if !s.conns.is_empty() {
                    log::warn!(
                        "worker {}: {} connection(s) could not move within {:?} (clients not reading); cutting them",
                        s.index,
                        s.conns.len(),
                        s.orphan_grace
                    );
                }
                let ids: Vec<u64> = s.conns.keys().copied().collect();
                for id in ids {
                    s.close(id);
                }
                s.quit();
            })
        });
        match t.and_then(|t| t.add(Some(self.orphan_grace)).map(|()| t)) {
            Ok(t) => self.orphan_timer = Some(t),
            Err(e) => log::error!("worker {}: grace timer: {e}", self.index),
        }
        if self.quitting {
            // The exit waited on the dead channel: wait on this one.
            self.exit_superseded.set(true);
            self.exit_superseded = Rc::default();
            self.quitting = false;
            self.quit();
        } else if !self.draining {
            self.begin_drain();
        } else {
            let ids: Vec<u64> = self.conns.keys().copied().collect();
            for id in ids {
                self.release_when_flushed(id);
            }
        }
        true
    }

    /// Draining: a connection the master refused is offered again soon.
    fn retry_release_later(&mut self) {
        if self.retry_timer.as_ref().is_some_and(Event::pending) {
            return;
        }
        let w = self.me.clone();
        let t = Event::new(&self.base, -1, Interest::Timer, move || {
            with(&w, |s| {
                let ids: Vec<u64> = s.conns.keys().copied().collect();
                for id in ids {
                    s.release_when_flushed(id);
                }
            })
        });
        match t.and_then(|t| t.add(Some(RETRY_RELEASE)).map(|()| t)) {
            Ok(t) => self.retry_timer = Some(t),
            Err(e) => log::error!("worker {}: retry timer: {e}", self.index),
        }
    }
}
