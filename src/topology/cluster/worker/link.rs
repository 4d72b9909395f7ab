//! A worker's side of the master channel, whatever serves the
//! connections (a Rust [`crate::service::Service`], or a C program through
//! `libhandoff`): it turns the master's messages into [`Order`]s, sends
//! released connections and closes back, coalesces stats, and, when the
//! master dies during a restart, reconnects to its successor.
//!
//! A worker taking a connection from its master (played here by a plain
//! [`Channel`] in the same process):
//!
//! ```
//! use std::cell::RefCell;
//! use std::os::fd::OwnedFd;
//! use std::os::unix::net::UnixStream;
//! use std::rc::Rc;
//! use handoff::core::channel::{Channel, Msg};
//! use handoff::core::reactor::Base;
//! use handoff::topology::cluster::worker::link::{MasterLink, Order};
//! # use handoff::core::sock::seqpacket_pair;
//!
//! let base = Base::new()?;
//! // A worker inherits its end (see `env`); here both ends are ours.
//! let (master_end, worker_end) = seqpacket_pair()?;
//! let master = Channel::new(&base, master_end, |_ev| {})?;
//!
//! let link: Rc<RefCell<Option<MasterLink>>> = Rc::default();
//! let orders = Rc::new(RefCell::new(Vec::new()));
//! let (l, o, stop) = (Rc::downgrade(&link), orders.clone(), base.clone());
//! let on_event = move |ev| {
//!     let Some(link) = l.upgrade() else { return };
//!     let order = link.borrow_mut().as_mut().and_then(|link| link.on_event(ev));
//!     if let Some(order) = order {
//!         o.borrow_mut().push(order);
//!         stop.exit(None);
//!     }
//! };
//! *link.borrow_mut() = Some(MasterLink::new(&base, worker_end, 0, None, on_event, || {})?);
//!
//! let (_client, conn) = UnixStream::pair()?;
//! master.send(Msg::conn(OwnedFd::from(conn), b"GET".to_vec(), 0)).expect("open");
//! base.dispatch()?; // until the worker has an order
//! let Some(Order::Conn(handed)) = orders.borrow_mut().pop() else { panic!("a connection") };
//! assert_eq!(handed.leftover, b"GET");
//! assert_eq!(handed.master_id, 1); // report it with `closed` when done
//! # Ok::<(), std::io::Error>(())
//! ```
use std::cell::Cell;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::core::channel::{wire, Channel, ChannelEvent, Msg};
use crate::core::reactor::{Base, Event, Interest};
use crate::topology::cluster::{
    control_path, KIND_DRAIN, KIND_ORPHAN_HELLO, KIND_PING, KIND_PONG, KIND_REBALANCE, KIND_REOPEN_LOGS, KIND_SHUTDOWN,
    KIND_STATS, KIND_TAKEOVER_BEGUN, KIND_TAKEOVER_ENDED,
};

/// Longest delay of a counters-only stats message.
const STATS_EVERY: Duration = Duration::from_millis(100);

/// A connection the master handed over (or gave back).
pub struct Handed {
    /// The connection's socket, now the worker's to serve (e.g. with
    /// `Conn::adopt`), to give back ([`MasterLink::release`]) or to close.
    pub fd: OwnedFd,
    /// Bytes read ahead by its previous owner.
    pub leftover: Vec<u8>,
    /// The state its previous owner's session exported.
    pub state: Vec<u8>,
    /// The master's id for it (0: this worker accepted it itself).
    pub master_id: u64,
    /// Its client had sent EOF.
    pub eof: bool,
    /// Node mode: a link another node's worker opened to us.
    pub node_link: bool,
    /// It comes from another worker by rebalancing (it should stay a while).
    pub moved: bool,
    /// What it went through before (it moved here from another worker);
    /// `None` for a new connection.
    pub history: Option<wire::History>,
}

impl Handed {
    /// A connection this worker accepted itself (shared policy), or a node
    /// link it opened (`node_link`): nothing read yet, no master id.
    pub fn accepted(fd: OwnedFd, node_link: bool) -> Handed {
        Handed {
            fd,
            leftover: Vec::new(),
            state: Vec::new(),
            master_id: 0,
            eof: false,
            node_link,
            moved: false,
            history: None,
        }
    }
}

/// What the master (or its death) asks of the worker.
pub enum Order {
    /// Serve this connection.
    Conn(Handed),
    /// Serve this connection again: the master could not take it back
    /// (out of descriptors); offer it later.
    Refused(Handed),
    /// Shared policy: accept on this listening socket.
    Listener(OwnedFd),
    /// Finish open requests, close, exit.
    Shutdown,
    /// Restart: release every connection between requests, exit.
    Drain,
    /// `--rebalance`: this worker is busier than another; release up to
    /// this many of its busiest connections, each between requests, with
    /// [`MasterLink::release_to_rebalance`].
    Rebalance(usize),
    /// The master died during a restart; this link now reaches its
    /// successor. Release every connection as in a drain; cut those still
    /// here after [`MasterLink::orphan_grace`].
    Orphaned,
    /// The master is gone for good: close everything and exit.
    Lost,
    /// Reopen log files (the master got USR1): the access log may have
    /// been renamed away.
    ReopenLogs,
    /// Node mode: the membership changed; these peers (`A=ADDR,B=ADDR`)
    /// replace the worker's.
    Peers(String),
}

/// The master channel of one worker process.
pub struct MasterLink {
    base: Base,
    channel: Channel,
    /// Makes the handler of a channel (the first, or one to a successor).
    handler: Rc<dyn Fn(ChannelEvent)>,
    index: usize,
    dir: Option<PathBuf>,
    successor_known: bool,
    /// Released connections a broken channel gave straight back.
    unsent: Vec<Msg>,
    /// Master ids of connections closed since the last stats message.
    closed: Vec<u64>,
    stats_timer: Option<Event>,
    quitting: bool,
    /// Set when a pending exit waits on a channel that was replaced.
    exit_superseded: Rc<Cell<bool>>,
    /// How long an orphaned worker waits for clients that do not read.
    pub orphan_grace: Duration,
    /// The loop's busy time and the clock at the last heartbeat.
    busy_mark: (Duration, std::time::Instant),
}

impl MasterLink {
    /// Wraps the inherited channel. `handler` gets its events (pass them
    /// to [`MasterLink::on_event`]); `on_stats` runs when stats are due
    /// (call [`MasterLink::send_stats`] from it).
    pub fn new(
        base: &Base,
        fd: OwnedFd,
        index: usize,
        dir: Option<PathBuf>,
        handler: impl Fn(ChannelEvent) + 'static,
        on_stats: impl Fn() + 'static,
    ) -> io::Result<MasterLink> {
        let handler: Rc<dyn Fn(ChannelEvent)> = Rc::new(handler);
        let h = handler.clone();
        let channel = Channel::new(base, fd, move |ev| h(ev))?;
        // The socket pair our master made: what it passes, it checked.
        channel.trust_descriptors();
        let stats_timer = Event::new(base, -1, Interest::Timer, on_stats)?;
        Ok(MasterLink {
            base: base.clone(),
            channel,
            handler,
            index,
            dir,
            successor_known: false,
            unsent: Vec::new(),
            closed: Vec::new(),
            stats_timer: Some(stats_timer),
            quitting: false,
            exit_superseded: Rc::default(),
            orphan_grace: Duration::from_secs(5),
            busy_mark: (crate::core::reactor::busy_time(), std::time::Instant::now()),
        })
    }

    /// Turns a channel event into what the worker must do (`None`: handled
    /// here).
    pub fn on_event(&mut self, ev: ChannelEvent) -> Option<Order> {
        match ev {
            ChannelEvent::Msg(m) => match m.kind {
                wire::KIND_CONN => Some(Order::Conn(handed(m, true))),
                wire::KIND_LISTENER => {
                    Some(Order::Listener(m.fd.expect("channel checks LISTENER carries a descriptor")))
                }
                KIND_SHUTDOWN => Some(Order::Shutdown),
                KIND_REOPEN_LOGS => Some(Order::ReopenLogs),
                KIND_DRAIN => {
                    // A master that reads CONNS batches says so: the
                    // connections go back in batches of up to 253.
                    let v: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
                    if v["batch"] == Value::Bool(true) {
                        self.channel.set_batch(true);
                    }
                    Some(Order::Drain)
                }
                crate::topology::cluster::KIND_NODE_PEERS => {
                    Some(Order::Peers(String::from_utf8_lossy(&m.body).into_owned()))
                }
                KIND_TAKEOVER_BEGUN => {
                    let v: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
                    self.orphan_grace = Duration::from_secs_f64(v["grace"].as_f64().unwrap_or(5.0).clamp(0.0, 3600.0));
                    self.successor_begun(true);
                    None
                }
                KIND_TAKEOVER_ENDED => {
                    self.successor_begun(false);
                    None
                }
                KIND_PING => {
                    let busy = self.busy_share();
                    let _ = self.channel.send(Msg::control(KIND_PONG, format!(r#"{{"busy":{busy:.3}}}"#).into_bytes()));
                    None
                }
                KIND_REBALANCE => {
                    let v: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
                    Some(Order::Rebalance(v["count"].as_u64().unwrap_or(0).min(1 << 20) as usize))
                }
                k => {
                    log::warn!("worker {}: unexpected message kind {k} from master", self.index);
                    None
                }
            },
            // The master had no descriptor to spare for a connection we
            // sent (accepted here, or released): it is ours again.
            ChannelEvent::Refused(m) if m.fd.is_some() => Some(Order::Refused(handed(m, false))),
            ChannelEvent::Refused(_) => None,
            ChannelEvent::Closed { reason, mut returned, .. } => {
                returned.append(&mut self.unsent);
                let n = returned.len();
                if self.successor_known && self.hand_to_successor(returned) {
                    return Some(Order::Orphaned);
                }
                if n > 0 {
                    log::error!("worker {}: master gone; {n} released connection(s) close", self.index);
                }
                log::info!(
                    "worker {}: master channel closed ({}); exiting",
                    self.index,
                    reason.map_or("EOF".into(), |e| e.to_string())
                );
                Some(Order::Lost)
            }
        }
    }

    /// Lets go of a connection: it goes back to the master whole (CONN,
    /// descriptor, read-ahead and session state), kept in the channel
    /// until the master's ACK, so it survives the master's death. One the
    /// master handed us is marked released, with the master's id for it.
    pub fn release(&mut self, fd: OwnedFd, leftover: Vec<u8>, state: &[u8], master_id: u64, eof: bool) {
        let h = Handed { state: state.to_vec(), master_id, eof, ..Handed::accepted(fd, false) };
        self.give_back(Handed { leftover, ..h }, false);
    }

    /// Lets go of a connection as [`MasterLink::release`] does (or as
    /// [`MasterLink::release_to_rebalance`] with `rebalance`), with its
    /// history, which travels with it to the next worker (`node_link` and
    /// `moved` are not used).
    pub fn give_back(&mut self, h: Handed, rebalance: bool) {
        let mut flags = if h.eof { wire::FLAG_EOF } else { 0 };
        if rebalance {
            flags |= wire::FLAG_REBALANCED;
        }
        if h.master_id != 0 {
            flags |= wire::FLAG_RELEASED;
        }
        if h.node_link {
            flags |= wire::FLAG_NODE_LINK;
        }
        if !h.state.is_empty() {
            flags |= wire::FLAG_STATE;
        }
        let mut body = wire::join_state(&h.state, h.leftover);
        if let Some(past) = &h.history {
            flags |= wire::FLAG_HISTORY;
            body = wire::join_history(past, body);
        }
        let msg = Msg::conn(h.fd, body, flags).with_master_id(h.master_id);
        if let Err(back) = self.channel.send(msg) {
            // The channel just broke: its Closed event decides (a successor
            // takes it, or it closes with us).
            self.unsent.push(back);
        }
    }

    /// The share (0 to 1) of the time since the last call that this
    /// process's event loop spent in callbacks: its load.
    fn busy_share(&mut self) -> f64 {
        let now = (crate::core::reactor::busy_time(), std::time::Instant::now());
        let (busy, wall) = (now.0.saturating_sub(self.busy_mark.0), now.1 - self.busy_mark.1);
        self.busy_mark = now;
        if wall.is_zero() {
            return 0.0;
        }
        (busy.as_secs_f64() / wall.as_secs_f64()).clamp(0.0, 1.0)
    }

    /// As [`MasterLink::release`], marked as a rebalancing move: the
    /// master hands the connection to a colder worker.
    pub fn release_to_rebalance(&mut self, fd: OwnedFd, leftover: Vec<u8>, state: &[u8], master_id: u64, eof: bool) {
        let h = Handed { state: state.to_vec(), master_id, eof, ..Handed::accepted(fd, false) };
        self.give_back(Handed { leftover, ..h }, true);
    }

    /// A connection closed for good (the master drops its copy).
    pub fn closed(&mut self, master_id: u64) {
        if master_id != 0 {
            self.closed.push(master_id);
        }
        self.stats_changed();
    }

    /// Counters moved (stats within 100 ms; at once if a close is waiting).
    pub fn stats_changed(&mut self) {
        if let Some(t) = &self.stats_timer {
            if !self.closed.is_empty() {
                let _ = t.add(Some(Duration::ZERO));
            } else if !t.pending() {
                let _ = t.add(Some(STATS_EVERY));
            }
        }
    }

    /// Sends `{"open","served","closed"[,"links"]}` to the master.
    pub fn send_stats(&mut self, open: usize, served: u64, links: Option<Value>) {
        let closed = std::mem::take(&mut self.closed);
        let mut body = json!({"open": open, "served": served, "closed": closed});
        if let Some(l) = links {
            body["links"] = l;
        }
        let _ = self.channel.send(Msg::control(KIND_STATS, body.to_string().into_bytes()));
    }

    /// Exits the loop once every message (connections, the last stats) is
    /// in the kernel: the master reads them all, even after we are gone.
    /// Send the last stats first.
    pub fn quit(&mut self) {
        if self.quitting {
            return;
        }
        self.quitting = true;
        self.stats_timer = None;
        let base = self.base.clone();
        let superseded = self.exit_superseded.clone();
        self.channel.when_settled(move || {
            if !superseded.get() {
                base.exit(None)
            }
        });
    }

    /// Whether [`MasterLink::quit`] was called (the loop ends once the
    /// channel has settled).
    pub fn is_quitting(&self) -> bool {
        self.quitting
    }

    /// A takeover began (`true`: a successor listens on the control
    /// socket) or was aborted (`false`). While it runs, this worker does
    /// not die with its master: it hands its connections to the successor.
    fn successor_begun(&mut self, begun: bool) {
        if self.dir.is_none() {
            return;
        }
        self.successor_known = begun;
        if let Err(e) = crate::core::signals::die_with_parent(!begun) {
            log::error!("worker {}: prctl: {e}", self.index);
        }
    }

    /// Our master died during a restart: connections go to the new master
    /// through its control socket (those it never acknowledged first).
    /// False if it cannot be reached.
    fn hand_to_successor(&mut self, returned: Vec<Msg>) -> bool {
        self.successor_known = false; // once: if this one dies too, give up
        let Some(dir) = self.dir.clone() else { return false };
        let h = self.handler.clone();
        let ch = crate::core::sock::unix_connect(&control_path(&dir))
            .and_then(|fd| Channel::new(&self.base, fd, move |ev| h(ev)));
        let ch = match ch {
            Ok(ch) => ch,
            Err(e) => {
                log::error!("worker {}: master died mid-restart and its successor is unreachable: {e}", self.index);
                return false;
            }
        };
        log::warn!("worker {}: master died mid-restart; handing connections to the new master", self.index);
        let hello = json!({"worker": self.index, "pid": std::process::id()}).to_string().into_bytes();
        let _ = ch.send(Msg::control(KIND_ORPHAN_HELLO, hello));
        for m in returned.into_iter().filter(|m| m.kind == wire::KIND_CONN) {
            let _ = ch.send(m);
        }
        self.channel = ch;
        if self.quitting {
            // The exit waited on the dead channel: wait on this one.
            self.exit_superseded.set(true);
            self.exit_superseded = Rc::default();
            self.quitting = false;
            self.quit();
        }
        true
    }
}

/// A CONN message as a connection to serve: one from the master is known
/// by the master's message id, one given back by its `tag`.
fn handed(m: Msg, from_master: bool) -> Handed {
    let master_id = if from_master {
        m.id
    } else if m.flags & wire::FLAG_RELEASED != 0 {
        m.master_id()
    } else {
        0
    };
    let fd = m.fd.expect("channel checks CONN carries a descriptor");
    let (history, body) = wire::split_history(m.flags, m.body);
    let (state, leftover) = if m.flags & wire::FLAG_STATE != 0 { wire::split_state(body) } else { (Vec::new(), body) };
    Handed {
        fd,
        leftover,
        state,
        master_id,
        eof: m.flags & wire::FLAG_EOF != 0,
        node_link: m.flags & wire::FLAG_NODE_LINK != 0,
        moved: m.flags & wire::FLAG_REBALANCED != 0,
        history,
    }
}
