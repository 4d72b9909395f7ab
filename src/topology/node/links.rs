//! Node mode, worker side: relays over links to other nodes' workers.
//!
//! Outgoing: a relay to (node, worker) without a link connects to that
//! node's manager (non-blocking, `--connect-timeout` until the handshake
//! ends), sends CONNECT_REQ, then TELL_REQ once the manager answered;
//! relays wait in the link's queue meanwhile and go out as DATA when
//! TELL_RESP arrives. ACKs are matched to relays by sequence number. A link
//! that fails or times out fails every relay waiting on it; the next relay
//! builds a new one. Incoming: a link the manager handed us answers
//! TELL_REQ and acknowledges DATA.
//!
//! Deadlines (`--relay-timeout`): each relay carries its deadline; one
//! timer per link waits for the oldest (a link's relays are FIFO, so the
//! oldest is at the front of `order`, or of the queue before the link is
//! up). An expired relay is answered with a "timeout" error at once; its
//! sequence number is remembered, so that a late ACK or ERROR for it is
//! dropped instead of closing the link.
//!
//! Heartbeats (`--heartbeat`): an outgoing link whose far worker said it
//! answers PING has a read timeout of one interval (libevent common
//! timeouts); each silent interval sends PING, and after
//! [`DEAD_AFTER`](crate::topology::node::DEAD_AFTER) of them the link is
//! closed, which fails its relays with "unreachable". An incoming link
//! whose opener announced heartbeats is closed after one interval more
//! of silence. A cut-off peer is so noticed within `--connect-timeout`
//! (a link being set up) plus 3 x `--heartbeat` (a link that was up).
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::core::reactor::{Event, Interest};
use crate::core::sock;
use crate::service::{RelayAnswer, Service, Ticket};
use crate::topology::cluster::worker::link::Handed;
use crate::topology::cluster::worker::{with, Kind, Worker};
use crate::topology::node::wire::{self as wire, Cmd, Parsed};
use crate::topology::node::NodeConfig;

/// Timed-out relays a link remembers while their answers may still come;
/// past that many the far worker is taken for dead and the link closes.
const MAX_TIMED_OUT: usize = 10_000;

/// A link's far end: (node, worker).
pub type Key = (String, usize);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// CONNECT_REQ sent (maybe still connecting).
    Connecting,
    /// TELL_REQ sent.
    Telling,
    Up,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Telling => "handshake",
            State::Up => "up",
        }
    }
}

/// A client request waiting for its answer from the far worker.
struct Relay {
    client: u64,
    reply_seq: u64,
    ticket: Ticket,
    /// The message, as the client's JSON text (relayed untouched).
    msg: String,
    /// `--relay-timeout` after it was made; `None`: no deadline.
    deadline: Option<Instant>,
}

/// DATA's body, borrowed: the message stays raw JSON text.
#[derive(Deserialize)]
struct Data<'a> {
    #[serde(borrow)]
    msg: &'a RawValue,
}

/// ACK's body, borrowed.
#[derive(Deserialize)]
struct Ack<'a> {
    pid: u64,
    #[serde(borrow)]
    msg: &'a RawValue,
}

struct Link {
    conn: u64,
    state: State,
    queue: Vec<Relay>,
    inflight: HashMap<u32, Relay>,
    next_seq: u32,
    timer: Option<Event>,
    started: Instant,
    /// DATA written this loop round, sent in one write at its end.
    out: Vec<u8>,
    /// In-flight sequence numbers with a deadline, oldest first (entries
    /// of answered relays are dropped when they reach the front).
    order: VecDeque<(u32, Instant)>,
    /// Fires at the oldest relay's deadline (armed while relays wait).
    deadline: Option<Event>,
    /// Relays answered with a timeout whose ACK/ERROR has not come yet.
    timed_out: HashSet<u32>,
    /// The far worker answers PING (it said `"hb":true`).
    heartbeat: bool,
    /// Heartbeat intervals since the far end last sent a byte.
    silent: u32,
}

/// Counters per far end; they outlive the links themselves.
#[derive(Default)]
struct Counters {
    sent: u64,
    acked: u64,
    connects: u64,
    failures: u64,
    setup_us: u64,
    /// Relays answered with a timeout.
    timeouts: u64,
}

pub struct Node {
    cfg: NodeConfig,
    me: usize,
    links: HashMap<Key, Link>,
    counters: BTreeMap<Key, Counters>,
    /// Runs at the end of the loop round in which DATA was queued.
    flush: Option<Event>,
    /// Links with DATA in `out`.
    dirty: Vec<Key>,
}

impl Node {
    pub fn new(cfg: NodeConfig, me: usize) -> Node {
        Node { cfg, me, links: HashMap::new(), counters: BTreeMap::new(), flush: None, dirty: Vec::new() }
    }

    /// The link table for `handoff status`.
    pub fn table(&self) -> Value {
        let rows: Vec<Value> = self
            .counters
            .iter()
            .map(|(k, c)| {
                let state = self.links.get(k).map_or("down", |l| l.state.name());
                json!({"node": k.0, "worker": k.1, "state": state, "sent": c.sent, "acked": c.acked,
                       "connects": c.connects, "failures": c.failures, "setup_us": c.setup_us,
                       "timeouts": c.timeouts})
            })
            .collect();
        Value::Array(rows)
    }
}

impl<S: Service> Worker<S> {
    fn node(&mut self) -> &mut Node {
        self.node.as_mut().expect("links exist only in node mode")
    }

    /// A session's relay of `msg` (JSON text) to `worker` of `node`, from
    /// client connection `client`, its reply number `reply_seq`.
    pub(crate) fn relay(
        &mut self,
        client: u64,
        reply_seq: u64,
        ticket: Ticket,
        node: String,
        worker: usize,
        msg: String,
    ) {
        let key: Key = (node, worker);
        let deadline = self.node().cfg.relay_timeout.map(|d| Instant::now() + d);
        let relay = Relay { client, reply_seq, ticket, msg, deadline };
        // (A link a restart moved here may come before the membership.)
        if !self.node().cfg.peers.contains_key(&key.0) && !self.node().links.contains_key(&key) {
            let why = format!("node {} unreachable: not a member", key.0);
            self.relay_done(client, reply_seq, ticket, Err(&why));
            return;
        }
        if !self.node().links.contains_key(&key) {
            if let Err(why) = self.open_link(&key) {
                self.relay_done(client, reply_seq, ticket, Err(&format!("node {} unreachable: {why}", key.0)));
                return;
            }
        }
        let link = self.node().links.get_mut(&key).expect("link just made");
        if link.state == State::Up {
            self.send_data(&key, relay);
        } else {
            link.queue.push(relay);
        }
        if deadline.is_some() {
            self.arm_deadline(&key);
        }
    }

    /// Makes sure the link's deadline timer waits for its oldest relay.
    /// A pending timer already fires no later than that: relays only get
    /// younger, and the timer was set for the oldest when it was armed.
    fn arm_deadline(&mut self, key: &Key) {
        let w = self.me.clone();
        let k = key.clone();
        let base = self.base.clone();
        let index = self.index;
        let Some(link) = self.node().links.get_mut(key) else { return };
        if link.deadline.as_ref().is_some_and(Event::pending) {
            return;
        }
        let Some(first) = link.oldest_deadline() else { return };
        if link.deadline.is_none() {
            match Event::new(&base, -1, Interest::Timer, move || with(&w, |s| s.relay_deadline(&k))) {
                Ok(e) => link.deadline = Some(e),
                Err(e) => return log::error!("worker {index}: relay deadline timer: {e}"),
            }
        }
        let wait = first.saturating_duration_since(Instant::now());
        if let Some(Err(e)) = link.deadline.as_ref().map(|t| t.add(Some(wait))) {
            log::error!("worker {index}: relay deadline timer: {e}");
        }
    }

    /// The deadline timer fired: every relay past its deadline is
    /// answered with a timeout (the client's connection goes on), then
    /// the timer waits for the next one.
    fn relay_deadline(&mut self, key: &Key) {
        let now = Instant::now();
        let Some(timeout) = self.node().cfg.relay_timeout else { return };
        let Some(link) = self.node().links.get_mut(key) else { return };
        let due = link.queue.iter().take_while(|r| r.deadline.is_some_and(|d| d <= now)).count();
        let mut expired: Vec<Relay> = link.queue.drain(..due).collect();
        link.drop_answered();
        while let Some(&(seq, d)) = link.order.front() {
            if d > now {
                break;
            }
            link.order.pop_front();
            if let Some(r) = link.inflight.remove(&seq) {
                link.timed_out.insert(seq);
                expired.push(r);
            }
            link.drop_answered();
        }
        if expired.is_empty() {
            return self.arm_deadline(key);
        }
        let overflow = (link.timed_out.len() > MAX_TIMED_OUT).then_some(link.conn);
        let n = expired.len();
        self.node().counters.entry(key.clone()).or_default().timeouts += n as u64;
        let secs = timeout.as_secs_f64();
        crate::warn_limited!(
            "worker {}: {n} relay(s) to {}:{} got no answer in {secs}s; answered with a timeout",
            self.index,
            key.0,
            key.1
        );
        let why = format!("node {}: relay timeout: no answer from worker {} in {secs}s", key.0, key.1);
        for r in expired {
            self.relay_done(r.client, r.reply_seq, r.ticket, Err(&why));
        }
        if let Some(conn) = overflow {
            self.close_because(conn, &format!("over {MAX_TIMED_OUT} relays timed out unanswered"));
        }
        self.arm_deadline(key);
        self.master.stats_changed();
    }

    /// The far end of link connection `id` sent nothing for a heartbeat
    /// interval (its read timeout). An outgoing link pings, and closes
    /// after [`DEAD_AFTER`](crate::topology::node::DEAD_AFTER) silent
    /// intervals; an incoming one (whose opener pings) closes.
    pub(crate) fn link_silent(&mut self, id: u64) {
        let Some(kind) = self.conns.get(&id).map(|s| s.kind.clone()) else { return };
        let Some(hb) = self.node().cfg.heartbeat else { return };
        match kind {
            Kind::LinkOut(key) => {
                let Some(link) = self.node().links.get_mut(&key) else { return };
                link.silent += 1;
                if link.silent >= crate::topology::node::DEAD_AFTER {
                    let dead = (hb * link.silent).as_secs_f64();
                    log::warn!("worker {}: link to {}:{}: nothing heard for {dead}s", self.index, key.0, key.1);
                    return self.close_because(id, &format!("no answer to heartbeats for {dead}s"));
                }
                let ping = wire::encode(Cmd::Ping, 0, &json!({"hb": hb.as_secs_f64()}));
                if let Some(Err(e)) = self.conns.get(&id).map(|s| s.conn.write_now(&ping)) {
                    self.close_because(id, &e.to_string());
                }
            }
            Kind::LinkIn => {
                log::info!("worker {}: incoming link {id}: its opener went silent; closing", self.index);
                self.close_because(id, "no heartbeat from the link's opener");
            }
            Kind::Client => {}
        }
    }

    /// The membership changed (the master's KIND_NODE_PEERS): new peers;
    /// links to a node that left, or moved to another address, close (their
    /// relays fail with "unreachable").
    pub(crate) fn set_peers(&mut self, text: &str) {
        let peers = match crate::topology::node::parse_peers(text) {
            Ok(p) => p,
            Err(e) => return log::warn!("worker {}: bad membership from the master: {e}", self.index),
        };
        let Some(n) = self.node.as_mut() else { return };
        let gone: Vec<(Key, u64)> = n
            .links
            .iter()
            // Gone, or moved from a known address (a link a restart moved
            // here before this worker knew the node stays).
            .filter(|(k, _)| match (n.cfg.peers.get(&k.0), peers.get(&k.0)) {
                (_, None) => true,
                (Some(old), Some(new)) => old != new,
                (None, Some(_)) => false,
            })
            .map(|(k, l)| (k.clone(), l.conn))
            .collect();
        n.cfg.peers = peers;
        log::debug!("worker {}: membership {text}", self.index);
        for (key, conn) in gone {
            let why = if self.node().cfg.peers.contains_key(&key.0) { "moved" } else { "not a member" };
            self.close_because(conn, why);
        }
    }

    fn open_link(&mut self, key: &Key) -> Result<(), String> {
        let (addr, timeout, me, name) = {
            let n = self.node();
            (n.cfg.peers[&key.0].clone(), n.cfg.connect_timeout, n.me, n.cfg.name.clone())
        };
        self.node().counters.entry(key.clone()).or_default().connects += 1;
        let fd = sock::connect_endpoint(&addr).map_err(|e| e.to_string())?;
        let h = Handed::accepted(fd, true);
        let conn = self.open_conn(h, Kind::LinkOut(key.clone())).ok_or("worker is stopping")?;
        // Written once the connect completes (the bufferevent waits for EV_WRITE).
        let hello = wire::encode(Cmd::ConnectReq, 0, &json!({"node": name, "worker": me, "to": key.1}));
        if let Some(slot) = self.conns.get(&conn) {
            slot.conn.write(&hello);
        }
        let w = self.me.clone();
        let k = key.clone();
        let timer = Event::new(&self.base, -1, Interest::Timer, move || with(&w, |s| s.link_timeout(&k)))
            .and_then(|t| t.add(Some(timeout)).map(|()| t))
            .map_err(|e| e.to_string())?;
        let link = Link {
            conn,
            state: State::Connecting,
            queue: Vec::new(),
            inflight: HashMap::new(),
            next_seq: 1,
            timer: Some(timer),
            started: Instant::now(),
            out: Vec::new(),
            order: VecDeque::new(),
            deadline: None,
            timed_out: HashSet::new(),
            heartbeat: false,
            silent: 0,
        };
        log::debug!("worker {}: linking to {}:{} at {addr}", self.index, key.0, key.1);
        self.node().links.insert(key.clone(), link);
        Ok(())
    }

    fn link_timeout(&mut self, key: &Key) {
        let Some(link) = self.node().links.get(key) else { return };
        if link.state != State::Up {
            let conn = link.conn;
            let t = self.node().cfg.connect_timeout;
            self.close_because(conn, &format!("no handshake within {}s", t.as_secs_f64()));
        }
    }

    /// Whether our link to `key` may move now (a restart): `Some(true)`
    /// when it is up with no relay waiting, `Some(false)` when it is still
    /// being set up with nothing queued (nothing to keep), `None` while
    /// relays wait on it.
    pub(crate) fn link_idle(&mut self, key: &Key) -> Option<bool> {
        let link = self.node().links.get(key)?;
        let waiting = !(link.queue.is_empty() && link.inflight.is_empty() && link.out.is_empty());
        match (link.state, waiting) {
            (_, true) => None,
            // Answers to timed-out relays may still come, which the next
            // generation would not expect: close it instead.
            (_, false) if !link.timed_out.is_empty() => Some(false),
            (State::Up, false) => Some(true),
            (_, false) => Some(false),
        }
    }

    /// Whether our link to `key` pings its far worker (which then expects
    /// it to): a moved link goes on doing so.
    pub(crate) fn link_pings(&mut self, key: &Key) -> bool {
        self.node().links.get(key).is_some_and(|l| l.heartbeat)
    }

    /// Our link to `key` leaves with its connection (a restart): forgets
    /// it, and returns the sequence number its next DATA takes.
    pub(crate) fn link_moved(&mut self, key: &Key) -> u32 {
        let link = self.node().links.remove(key);
        log::debug!("worker {}: link to {}:{} moves to the next generation", self.index, key.0, key.1);
        link.map_or(1, |l| l.next_seq)
    }

    /// A link our predecessor opened to `key`, moved to us by a restart:
    /// it is up, and its next DATA takes sequence number `seq`. If we have
    /// built our own link there meanwhile, the moved one closes (the far
    /// worker just sees it end). `pings`: it pinged its far worker (and
    /// goes on, if heartbeats are on here).
    pub(crate) fn adopt_link_out(&mut self, h: Handed, key: Key, seq: u32, pings: bool) -> Option<u64> {
        let hb = self.node().cfg.heartbeat.filter(|_| pings);
        if self.node().links.contains_key(&key) {
            log::debug!("worker {}: a moved link to {}:{} duplicates ours; closing it", self.index, key.0, key.1);
            sock::shutdown_both(std::os::fd::AsRawFd::as_raw_fd(&h.fd));
            self.master.closed(h.master_id);
            return None;
        }
        let link = Link {
            // Set below, once the connection has its id.
            conn: u64::MAX,
            state: State::Up,
            queue: Vec::new(),
            inflight: HashMap::new(),
            next_seq: seq.max(1),
            timer: None,
            started: Instant::now(),
            out: Vec::new(),
            order: VecDeque::new(),
            deadline: None,
            timed_out: HashSet::new(),
            heartbeat: hb.is_some(),
            silent: 0,
        };
        self.node().links.insert(key.clone(), link);
        self.node().counters.entry(key.clone()).or_default();
        let Some(id) = self.open_conn(h, Kind::LinkOut(key.clone())) else {
            self.node().links.remove(&key);
            return None;
        };
        if let Some(l) = self.node().links.get_mut(&key) {
            l.conn = id;
        }
        if let (Some(hb), Some(slot)) = (hb, self.conns.get(&id)) {
            slot.conn.set_read_timeout(Some(hb));
        }
        log::debug!("worker {}: link to {}:{} moved here (next seq {seq})", self.index, key.0, key.1);
        Some(id)
    }

    /// The link's connection is gone: every relay on it fails.
    pub(crate) fn link_lost(&mut self, key: &Key, why: &str) {
        let Some(link) = self.node().links.remove(key) else { return };
        let failed = link.queue.len() + link.inflight.len();
        self.node().counters.entry(key.clone()).or_default().failures += 1;
        if failed > 0 {
            log::warn!("worker {}: link to {}:{} lost ({why}); {failed} relay(s) fail", self.index, key.0, key.1);
        } else {
            log::debug!("worker {}: link to {}:{} closed ({why})", self.index, key.0, key.1);
        }
        let reason = format!("node {} unreachable: {why}", key.0);
        let mut relays: Vec<Relay> = link.queue;
        relays.extend(link.inflight.into_values());
        relays.sort_by_key(|r| (r.client, r.reply_seq));
        for r in relays {
            self.relay_done(r.client, r.reply_seq, r.ticket, Err(&reason));
        }
    }

    /// Queues one DATA on the link; all DATA of a loop round leave in one
    /// write when the round ends (many clients relay over one link).
    fn send_data(&mut self, key: &Key, relay: Relay) {
        if self.node().flush.is_none() {
            let w = self.me.clone();
            match Event::new(&self.base, -1, Interest::Timer, move || with(&w, |s| s.flush_links())) {
                Ok(e) => self.node().flush = Some(e),
                Err(e) => log::error!("worker {}: link flush event: {e}", self.index),
            }
        }
        let n = self.node();
        let link = n.links.get_mut(key).expect("sending on a live link");
        let seq = link.next_seq;
        link.next_seq = link.next_seq.wrapping_add(1).max(1);
        let first = link.out.is_empty();
        wire::encode_raw_into(Cmd::Data, seq, format!(r#"{{"msg":{}}}"#, relay.msg).as_bytes(), &mut link.out);
        if let Some(d) = relay.deadline {
            link.order.push_back((seq, d));
        }
        link.inflight.insert(seq, relay);
        n.counters.entry(key.clone()).or_default().sent += 1;
        if first {
            if n.dirty.is_empty() {
                if let Some(f) = &n.flush {
                    f.activate();
                }
            }
            n.dirty.push(key.clone());
        }
    }

    fn flush_links(&mut self) {
        let dirty = std::mem::take(&mut self.node().dirty);
        for key in dirty {
            let Some(link) = self.node().links.get_mut(&key) else { continue };
            let (conn, out) = (link.conn, std::mem::take(&mut link.out));
            if let Some(slot) = self.conns.get(&conn) {
                if let Err(e) = slot.conn.write_now(&out) {
                    self.close_because(conn, &e.to_string());
                }
            }
        }
    }

    /// Reads node-protocol messages on a link connection.
    pub(crate) fn serve_link(&mut self, id: u64) {
        let mut msgs = Vec::new();
        let (kind, eof) = {
            let Some(slot) = self.conns.get_mut(&id) else { return };
            loop {
                let avail = slot.conn.input_len();
                match wire::parse(slot.conn.peek(avail)) {
                    Parsed::Incomplete => break,
                    Parsed::Bad(why) => {
                        log::info!("worker {}: link {id}: {why}; closing", self.index);
                        self.close_because(id, &why);
                        return;
                    }
                    Parsed::Message { cmd, seq, body, len } => {
                        let body = body.to_vec();
                        slot.conn.consume(len);
                        msgs.push((cmd, seq, body));
                    }
                }
            }
            (slot.kind.clone(), slot.eof)
        };
        if let (Kind::LinkOut(key), false) = (&kind, msgs.is_empty()) {
            // The far end is alive: the heartbeat count starts again.
            if let Some(link) = self.node().links.get_mut(key) {
                link.silent = 0;
            }
        }
        let mut out = Vec::new();
        for (cmd, seq, body) in msgs {
            let r = match &kind {
                Kind::LinkIn => self.on_link_in(id, cmd, seq, &body, &mut out),
                Kind::LinkOut(key) => self.on_link_out(key, cmd, seq, &body, &mut out),
                Kind::Client => Ok(()),
            };
            if let Err(why) = r {
                log::info!("worker {}: link {id}: {why}; closing", self.index);
                self.close_because(id, &why);
                return;
            }
        }
        if let Some(slot) = self.conns.get(&id) {
            if !out.is_empty() {
                if let Err(e) = slot.conn.write_now(&out) {
                    self.close_because(id, &e.to_string());
                    return;
                }
            }
            if eof {
                self.close_because(id, "link closed by the far end");
                self.master.stats_changed();
                return;
            }
        }
        if self.draining {
            // A restart: the link moves once it is between messages (and,
            // ours, once no relay waits on it).
            self.release_when_flushed(id);
        }
        self.master.stats_changed();
    }

    /// An incoming link whose opener pings every `"hb"` seconds (TELL_REQ,
    /// PING) is dropped after one interval more than the opener waits
    /// before it gives up on us.
    fn expect_pings(&mut self, id: u64, v: &Value) {
        if let Some(hb) = v["hb"].as_f64().filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0) {
            let quiet = Duration::from_secs_f64(hb) * (crate::topology::node::DEAD_AFTER + 1);
            if let Some(slot) = self.conns.get(&id) {
                slot.conn.set_read_timeout(Some(quiet));
            }
        }
    }

    /// A link someone opened to us.
    fn on_link_in(&mut self, id: u64, cmd: Cmd, seq: u32, body: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let pid = std::process::id();
        match cmd {
            Cmd::TellReq => {
                let who: Value = wire::body(cmd, body)?;
                log::debug!("worker {}: link from {}:{} (pid {})", self.index, who["node"], who["worker"], who["pid"]);
                let name = self.node().cfg.name.clone();
                self.expect_pings(id, &who);
                let resp = json!({"node": name, "worker": self.index, "pid": pid, "hb": true});
                wire::encode_into(Cmd::TellResp, seq, &resp, out);
            }
            Cmd::Ping => {
                // (Again: a link moved here by a restart lost its timeout.)
                self.expect_pings(id, &wire::body(cmd, body)?);
                wire::encode_into(Cmd::Pong, seq, &json!({}), out);
            }
            Cmd::Data => {
                let d: Data = wire::body(cmd, body)?;
                let ack = format!(r#"{{"pid":{pid},"msg":{}}}"#, d.msg.get());
                wire::encode_raw_into(Cmd::Ack, seq, ack.as_bytes(), out);
                self.served += 1;
            }
            other => return Err(format!("unexpected {other:?} on an incoming link")),
        }
        Ok(())
    }

    /// Our link to `key`.
    fn on_link_out(&mut self, key: &Key, cmd: Cmd, seq: u32, body: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let me = self.index;
        let name = self.node().cfg.name.clone();
        let hb = self.node().cfg.heartbeat;
        let conn_id = self.node().links.get(key).map(|l| l.conn);
        let Some(link) = self.node().links.get_mut(key) else { return Ok(()) };
        match (cmd, link.state) {
            (Cmd::ConnectResp, State::Connecting) => {
                let v: Value = wire::body(cmd, body)?;
                if v["ok"] != json!(true) {
                    return Err(format!("refused: {}", v["reason"].as_str().unwrap_or("no reason")));
                }
                link.state = State::Telling;
                let mut tell = json!({"node": name, "worker": me, "pid": std::process::id()});
                if let Some(hb) = hb {
                    tell["hb"] = json!(hb.as_secs_f64());
                }
                wire::encode_into(Cmd::TellReq, 0, &tell, out);
            }
            (Cmd::TellResp, State::Telling) => {
                let v: Value = wire::body(cmd, body)?;
                link.state = State::Up;
                link.timer = None;
                link.heartbeat = hb.is_some() && v["hb"] == json!(true);
                let pings = link.heartbeat;
                let setup = link.started.elapsed().as_micros() as u64;
                let queued = std::mem::take(&mut link.queue);
                self.node().counters.entry(key.clone()).or_default().setup_us = setup;
                if let (true, Some(slot)) = (pings, conn_id.and_then(|c| self.conns.get(&c))) {
                    slot.conn.set_read_timeout(hb);
                }
                log::debug!("worker {me}: link to {}:{} up in {setup} us (pid {})", key.0, key.1, v["pid"]);
                for r in queued {
                    self.send_data(key, r);
                }
            }
            (Cmd::Ack, State::Up) => {
                let ack: Ack = wire::body(cmd, body)?;
                let Some(r) = link.inflight.remove(&seq) else { return link.late(cmd, seq) };
                link.drop_answered();
                self.node().counters.entry(key.clone()).or_default().acked += 1;
                self.relay_done(r.client, r.reply_seq, r.ticket, Ok(RelayAnswer { pid: ack.pid, msg: ack.msg.get() }));
            }
            (Cmd::Error, State::Up) => {
                let v: Value = wire::body(cmd, body)?;
                let Some(r) = link.inflight.remove(&seq) else { return link.late(cmd, seq) };
                link.drop_answered();
                let e = format!("node {}: {}", key.0, v["reason"].as_str().unwrap_or("error"));
                self.relay_done(r.client, r.reply_seq, r.ticket, Err(&e));
            }
            (Cmd::Pong, State::Up) => {}
            (Cmd::Ping, State::Up) => wire::encode_into(Cmd::Pong, seq, &json!({}), out),
            (cmd, state) => return Err(format!("unexpected {cmd:?} in state {}", state.name())),
        }
        Ok(())
    }
}

impl Link {
    /// The deadline of the oldest relay still waiting (queued or in
    /// flight).
    fn oldest_deadline(&mut self) -> Option<Instant> {
        self.drop_answered();
        let queued = self.queue.first().and_then(|r| r.deadline);
        let sent = self.order.front().map(|&(_, d)| d);
        match (queued, sent) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops answered relays from the front of `order`.
    fn drop_answered(&mut self) {
        while self.order.front().is_some_and(|(seq, _)| !self.inflight.contains_key(seq)) {
            self.order.pop_front();
        }
    }

    /// An ACK or ERROR for no relay in flight: fine for one that timed out
    /// (the answer came late, and is dropped); else a protocol error.
    fn late(&mut self, cmd: Cmd, seq: u32) -> Result<(), String> {
        if self.timed_out.remove(&seq) {
            log::debug!("late {cmd:?} for relay {seq}, which timed out; dropped");
            return Ok(());
        }
        Err(format!("{cmd:?} for unknown seq {seq}"))
    }
}
