//! The handoff channel: moves connections (descriptor + read-ahead bytes)
//! and small control messages between two processes over a non-blocking
//! SOCK_SEQPACKET Unix socket, driven by plain libevent events (never a
//! bufferevent: a plain read would drop passed descriptors).
//!
//! - Sends never block: on EAGAIN the message is queued and the channel
//!   waits for EV_WRITE, so two processes handing connections to each other
//!   cannot deadlock. Bodies of any size travel (split into MORE chunks).
//! - Reads take every waiting message (up to 8) with one `recvmmsg`
//!   ([`fdpass::recv_batch`]); a call that comes back short says the
//!   socket is empty, so no second call is made only to hear EAGAIN.
//! - A channel that mostly sends CONNs can read its ACKs lazily
//!   ([`Channel::set_lazy_acks`]): they wake nobody, and are read by a
//!   later send or a short timer. The copy is still kept until its ACK is
//!   read.
//!
//! ## One owner per connection
//! A CONN moves in three steps: the sender writes it (and keeps its
//! descriptor, unregistered from epoll), the receiver writes an ACK, and
//! only once that ACK is in the kernel does the receiver deliver the
//! connection to its owner. So at every instant exactly one side owns it:
//! - the receiver owns a CONN iff its ACK was written;
//! - the sender gives a CONN back to its owner (`Closed::returned`) only
//!   after it has made further ACKs impossible (`shutdown(SHUT_RD)`: the
//!   peer's later writes fail with EPIPE) and read every ACK already
//!   queued to it.
//! - A CONN whose descriptor the receiver could not take (EMFILE:
//!   MSG_CTRUNC) is refused with a NACK; the sender's owner gets it back at
//!   once ([`ChannelEvent::Refused`]) and tries again later.
//! - A CONN whose ACK cannot be written because the peer is gone is an
//!   orphan (`Closed::orphans`): a peer that closed on purpose took it
//!   back, a peer that died did not. Only the owner knows which (a master
//!   reaps its workers), so it decides.
//! - A peer known to be dead ([`Channel::peer_died`]) is read to the end:
//!   every message it managed to send is delivered, CONNs included.
//!
//! Malformed input closes the channel, never the process.
//!
//! Moving a connection, with both ends in one process for the example
//! (normally each end is in its own process):
//!
//! ```
//! use std::cell::RefCell;
//! use std::io::{Read, Write};
//! use std::os::fd::OwnedFd;
//! use std::os::unix::net::UnixStream;
//! use std::rc::Rc;
//! use handoff::core::channel::{Channel, ChannelEvent, Msg};
//! use handoff::core::reactor::Base;
//! # use handoff::core::sock::seqpacket_pair;
//!
//! let base = Base::new()?;
//! // A connected, non-blocking SOCK_SEQPACKET pair (socketpair(2), or a
//! // connection to a Unix listener).
//! let (a, b) = seqpacket_pair()?;
//! let sender = Channel::new(&base, a, |_ev| {})?;
//! let got = Rc::new(RefCell::new(None));
//! let (g, stop) = (got.clone(), base.clone());
//! let _receiver = Channel::new(&base, b, move |ev| {
//!     if let ChannelEvent::Msg(m) = ev {
//!         *g.borrow_mut() = Some(m); // acknowledged: ours from now on
//!         stop.exit(None);
//!     }
//! })?;
//!
//! let (mut client, conn) = UnixStream::pair()?;
//! let msg = Msg::conn(OwnedFd::from(conn), b"read-ahead".to_vec(), 0);
//! let id = sender.send(msg).expect("the channel is open");
//! base.dispatch()?; // until the receiver has it
//! let m = got.borrow_mut().take().expect("delivered");
//! assert_eq!((m.id, &m.body[..]), (id, &b"read-ahead"[..]));
//!
//! // The sender closes its copy once the ACK is in.
//! let stop = base.clone();
//! sender.when_settled(move || stop.exit(None));
//! base.dispatch()?;
//! assert_eq!(sender.stats().conns_acked, 1);
//!
//! let mut moved = UnixStream::from(m.fd.expect("a CONN carries its descriptor"));
//! client.write_all(b"hi")?;
//! let mut buf = [0u8; 2];
//! moved.read_exact(&mut buf)?;
//! assert_eq!(&buf, b"hi");
//! # Ok::<(), std::io::Error>(())
//! ```
pub mod wire;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use crate::core::fdpass;
use crate::core::reactor::{Base, Event, Interest};
use wire::{
    version, Header, BATCH_ENTRY_LEN, BATCH_ENTRY_MAX, HEADER_LEN, KIND_ACK, KIND_CONN, KIND_CONNS, KIND_MORE,
    KIND_NACK, MAX_BATCH, MAX_BODY, MAX_JOINED,
};

/// One channel message.
#[derive(Debug)]
pub struct Msg {
    /// [`wire::KIND_CONN`], [`wire::KIND_LISTENER`], or a mode's own kind
    /// (>= [`wire::KIND_USER`]). ACK, NACK and MORE are the channel's own
    /// and never reach the owner.
    pub kind: u16,
    /// CONN: `wire::FLAG_*` bits ([`wire::FLAG_EOF`], [`wire::FLAG_STATE`],
    /// ...); 0 for other kinds.
    pub flags: u32,
    /// CONN: the sender's sequence number (from 1), set by
    /// [`Channel::send`], which returns it; what the peer's ACK refers to.
    /// Other kinds: sent as given (0 from [`Msg::control`]).
    pub id: u64,
    /// CONN: the bytes already read from the connection (after the session
    /// state with [`wire::FLAG_STATE`]: see [`wire::split_state`]). Other
    /// kinds: the mode's payload (JSON for the cluster kinds). Any length
    /// up to [`wire::MAX_JOINED`]; bodies over [`wire::MAX_BODY`] travel in
    /// MORE chunks.
    pub body: Vec<u8>,
    /// CONN and LISTENER: the descriptor (a stream socket: the receiver
    /// refuses anything else), owned by the message: dropping the `Msg`
    /// closes it. A sent CONN's descriptor stays in the channel until the
    /// peer's ACK, then is closed (or kept: [`Channel::set_keep_acked`]).
    /// `None` for the other kinds.
    pub fd: Option<OwnedFd>,
    /// CONN: the header's `tag`, whose meaning depends on the flags: see
    /// [`Msg::take_client`] and [`Msg::master_id`]. 0: none.
    pub tag: u64,
}

impl Msg {
    /// Pair mode: the client's address, as the accepting server saw it
    /// (for the request log, without a getpeername), set by
    /// [`Msg::with_client`]. Takes an IPv6 address's 16 bytes off the end
    /// of the body (and clears [`wire::FLAG_CLIENT_V6`]), so call it once,
    /// before the body is read as state and read-ahead.
    ///
    /// ```
    /// use std::os::unix::net::UnixStream;
    /// use handoff::core::channel::Msg;
    ///
    /// let (_client, conn) = UnixStream::pair()?;
    /// let ahead = b"read-ahead".to_vec();
    /// let mut m = Msg::conn(conn.into(), ahead.clone(), 0).with_client(Some("[::1]:4000".parse().unwrap()));
    /// assert_eq!(m.take_client(), Some("[::1]:4000".parse().unwrap()));
    /// assert_eq!(m.body, ahead);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn take_client(&mut self) -> Option<std::net::SocketAddr> {
        use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
        let t = self.tag;
        if self.flags & wire::FLAG_CLIENT_V6 == 0 {
            return (t != 0).then(|| SocketAddr::V4(SocketAddrV4::new(((t >> 16) as u32).into(), t as u16)));
        }
        let at = self.body.len().checked_sub(16)?;
        let ip: [u8; 16] = self.body[at..].try_into().expect("16 bytes");
        self.body.truncate(at);
        self.flags &= !wire::FLAG_CLIENT_V6;
        Some(SocketAddr::V6(SocketAddrV6::new(ip.into(), t as u16, 0, (t >> 16) as u32)))
    }

    /// Sets [`Msg::take_client`]: an IPv4 address fits in the header's
    /// `tag`; an IPv6 one sets [`wire::FLAG_CLIENT_V6`] and appends its
    /// 16 bytes to the body (call it after the body is complete).
    pub fn with_client(mut self, a: Option<std::net::SocketAddr>) -> Msg {
        use std::net::SocketAddr;
        self.tag = match a {
            None => 0,
            Some(SocketAddr::V4(a)) => (u64::from(u32::from(*a.ip())) << 16) | u64::from(a.port()),
            Some(SocketAddr::V6(a)) => {
                self.flags |= wire::FLAG_CLIENT_V6;
                self.body.extend_from_slice(&a.ip().octets());
                (u64::from(a.scope_id()) << 16) | u64::from(a.port())
            }
        };
        self
    }

    /// A CONN a worker gives back ([`wire::FLAG_RELEASED`]): the master's
    /// id for it, from when the master handed it over.
    pub fn master_id(&self) -> u64 {
        self.tag
    }

    /// Sets [`Msg::master_id`].
    pub fn with_master_id(mut self, id: u64) -> Msg {
        self.tag = id;
        self
    }

    /// A connection handoff: its descriptor plus the bytes already read.
    pub fn conn(fd: OwnedFd, leftover: Vec<u8>, flags: u32) -> Msg {
        Msg { kind: KIND_CONN, flags, id: 0, body: leftover, fd: Some(fd), tag: 0 }
    }

    /// A mode-defined control message (kind >= `wire::KIND_USER`).
    pub fn control(kind: u16, body: Vec<u8>) -> Msg {
        Msg { kind, flags: 0, id: 0, body, fd: None, tag: 0 }
    }
}

/// What a channel reports to its owner.
#[derive(Debug)]
pub enum ChannelEvent {
    /// A message arrived (a received CONN is acknowledged and ours).
    Msg(Msg),
    /// The peer could not take this CONN (out of descriptors): ours again.
    Refused(Msg),
    /// The channel is gone (`reason` is `None` on a clean EOF). `returned`
    /// holds every connection sent on it that the peer never took: the
    /// owner serves them again. `orphans` are connections the peer sent
    /// whose ACK could not be written: ours if the peer died, the peer's
    /// if it closed on purpose (see the module docs).
    Closed {
        /// `None` on a clean EOF; otherwise the socket error, or why the
        /// peer's input was refused (malformed, another channel version).
        reason: Option<io::Error>,
        /// CONNs we sent that the peer never took (queued, unacknowledged
        /// or refused): ours again, descriptor and read-ahead included.
        returned: Vec<Msg>,
        /// CONNs the peer sent whose ACK could not be written.
        orphans: Vec<Msg>,
    },
}

/// Counters for status reports, since the channel was made.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// CONNs written to the socket.
    pub conns_sent: u64,
    /// CONNs the peer acknowledged (the peer's from then on).
    pub conns_acked: u64,
    /// CONNs the peer refused with a NACK (given back as
    /// [`ChannelEvent::Refused`]).
    pub conns_refused: u64,
    /// CONNs received with their descriptor (those we refused excluded).
    pub conns_received: u64,
    /// The owner's messages written whole (ACKs, NACKs and MORE chunks not
    /// counted).
    pub msgs_sent: u64,
    /// Every message read, ACKs, NACKs and MORE chunks included.
    pub msgs_received: u64,
}

type Handler = Rc<dyn Fn(ChannelEvent)>;

struct Inner {
    sock: Option<OwnedFd>,
    read_ev: Option<Event>,
    write_ev: Option<Event>,
    /// Zero-delay timer: delivers `ready` and, after a failure, `Closed`.
    wake_ev: Option<Event>,
    /// Outgoing messages not yet (completely) written.
    queue: VecDeque<Msg>,
    /// Bytes of `queue[0]`'s body already written as MORE chunks.
    chunk_off: usize,
    /// CONNs written, waiting for the peer's ACK (descriptor kept).
    unacked: VecDeque<Msg>,
    next_id: u64,
    /// [`RX_SLOTS`] receive buffers of [`SLOT_LEN`] bytes, filled by one
    /// `recvmmsg`. Two: one call that returns one message says the socket
    /// is empty (no EAGAIN read), and a channel costs 2 x 128 KiB of
    /// address space, of which only what messages wrote is touched.
    buf: Vec<u8>,
    /// Room for the descriptors of each slot.
    rx_slots: Vec<fdpass::RecvSlot>,
    /// Messages received but not yet read by `read_one`: (slot, result).
    rx: VecDeque<(usize, io::Result<fdpass::ReceivedMany>)>,
    /// The last receive filled fewer slots than it had: the socket was
    /// empty then, so `read_one` reports `Empty` once `rx` is read, without
    /// a system call that would only say EAGAIN (level-triggered epoll
    /// calls us again for anything that arrives later).
    rx_short: bool,
    /// Body chunks (MORE) of the message still arriving.
    partial: Vec<u8>,
    /// NACKs to write (before anything else).
    nacks: VecDeque<u64>,
    /// Highest CONN id received, and the highest whose ACK is written.
    ack_due: u64,
    acked: u64,
    /// Received messages waiting behind an unwritten ACK, in order.
    held: VecDeque<Msg>,
    /// Events to hand to the owner outside our borrow.
    ready: VecDeque<ChannelEvent>,
    /// Received CONNs whose ACK could not be written (peer gone).
    orphans: Vec<Msg>,
    /// Set when the channel must close; delivered from `wake_ev`.
    failure: Option<Option<io::Error>>,
    handler: Handler,
    /// Callbacks waiting for the channel to settle.
    flushed: Vec<Box<dyn FnOnce()>>,
    /// Keep acknowledged CONNs (their descriptors) for the owner.
    keep_acked: bool,
    acked_msgs: Vec<Msg>,
    /// The peer closed its end (EOF, EPIPE, ECONNRESET).
    peer_closed: bool,
    stats: Stats,
    /// [`Channel::time_acks`]: told each CONN's time from send to ACK.
    ack_timer: Option<Rc<dyn Fn(Duration)>>,
    /// When each CONN not yet acknowledged was sent, by id (only while
    /// `ack_timer` is set).
    sent_at: VecDeque<(u64, Instant)>,
    /// [`Channel::set_batch`]: CONNs sent in one turn of the event loop
    /// leave together, as CONNS messages.
    batch: bool,
    /// Zero-delay timer that writes the CONNs queued in this turn.
    flush_ev: Option<Event>,
    /// CONNs of a received CONNS not yet handed out by `read_one`.
    unpacked: VecDeque<Msg>,
    /// [`Channel::set_lazy_acks`].
    lazy: bool,
    /// Lazy, with CONNs unacknowledged: `read_ev` is off (ACKs wake
    /// nobody); `lazy_ev` reads them if no send does first.
    lazy_reading: bool,
    /// Timer that reads the socket while `lazy_reading`.
    lazy_ev: Option<Event>,
    /// [`Channel::trust_descriptors`]: received descriptors are not
    /// checked for being stream sockets.
    trusted: bool,
}

/// A handle to a channel; clones share it.
#[derive(Clone)]
pub struct Channel(Rc<RefCell<Inner>>);

/// Most messages read in one callback.
const READ_BATCH: usize = 64;
/// [`Channel::set_lazy_acks`]: a send reads the socket once more than this
/// many CONNs wait for their ACK.
pub const LAZY_DRAIN: usize = 4;
/// [`Channel::set_lazy_acks`]: the socket is read this long after the last
/// send at the latest.
pub const LAZY_POLL: Duration = Duration::from_millis(2);
/// Messages one `recvmmsg` reads at most.
const RX_SLOTS: usize = 2;
/// One message's room: the largest message.
const SLOT_LEN: usize = HEADER_LEN + MAX_BODY;

impl Channel {
    /// Drives `sock` (a connected, non-blocking SOCK_SEQPACKET socket).
    pub fn new(base: &Base, sock: OwnedFd, handler: impl Fn(ChannelEvent) + 'static) -> io::Result<Channel> {
        crate::core::sock::set_sndbuf(sock.as_raw_fd(), 1 << 20);
        let raw = sock.as_raw_fd();
        let inner = Rc::new(RefCell::new(Inner {
            sock: Some(sock),
            read_ev: None,
            write_ev: None,
            wake_ev: None,
            queue: VecDeque::new(),
            chunk_off: 0,
            unacked: VecDeque::new(),
            next_id: 1,
            buf: vec![0; RX_SLOTS * SLOT_LEN],
            rx_slots: (0..RX_SLOTS).map(|_| fdpass::RecvSlot::new()).collect(),
            rx: VecDeque::new(),
            rx_short: false,
            partial: Vec::new(),
            nacks: VecDeque::new(),
            ack_due: 0,
            acked: 0,
            held: VecDeque::new(),
            ready: VecDeque::new(),
            orphans: Vec::new(),
            failure: None,
            handler: Rc::new(handler),
            flushed: Vec::new(),
            keep_acked: false,
            acked_msgs: Vec::new(),
            peer_closed: false,
            stats: Stats::default(),
            ack_timer: None,
            sent_at: VecDeque::new(),
            batch: false,
            flush_ev: None,
            unpacked: VecDeque::new(),
            lazy: false,
            lazy_reading: false,
            lazy_ev: None,
            trusted: false,
        }));
        let w = Rc::downgrade(&inner);
        let read_ev = Event::new(base, raw, Interest::Read, move || on_readable(&w))?;
        let w = Rc::downgrade(&inner);
        let write_ev = Event::new(base, raw, Interest::Write, move || on_writable(&w))?;
        let w = Rc::downgrade(&inner);
        let wake_ev = Event::new(base, -1, Interest::Timer, move || on_wake(&w))?;
        let w = Rc::downgrade(&inner);
        let flush_ev = Event::new(base, -1, Interest::Timer, move || on_writable(&w))?;
        let w = Rc::downgrade(&inner);
        let lazy_ev = Event::new(base, -1, Interest::Timer, move || on_lazy(&w))?;
        read_ev.add(None)?;
        {
            let mut i = inner.borrow_mut();
            i.read_ev = Some(read_ev);
            i.write_ev = Some(write_ev);
            i.wake_ev = Some(wake_ev);
            i.flush_ev = Some(flush_ev);
            i.lazy_ev = Some(lazy_ev);
        }
        Ok(Channel(inner))
    }

    /// Sends (or queues) a message. Returns the id given to a CONN (the
    /// one the receiver sees; 0 for other kinds). `Err(msg)` gives the
    /// message straight back when the channel is already broken.
    pub fn send(&self, mut msg: Msg) -> Result<u64, Msg> {
        let mut i = self.0.borrow_mut();
        if i.sock.is_none() || i.failure.is_some() {
            return Err(msg);
        }
        if msg.kind == KIND_CONN {
            msg.id = i.next_id;
            i.next_id += 1;
        }
        let id = msg.id;
        let timed = msg.kind == KIND_CONN && i.ack_timer.is_some();
        if timed {
            i.sent_at.push_back((id, Instant::now()));
        }
        let alone = i.queue.is_empty();
        let defer = i.batch && msg.kind == KIND_CONN;
        i.queue.push_back(msg);
        if defer {
            // Written at the end of this turn, with every other CONN sent
            // in it (CONNS messages).
            if let Some(ev) = i.flush_ev.as_ref().filter(|ev| !ev.pending()) {
                let _ = ev.add(Some(Duration::ZERO));
            }
            return Ok(id);
        }
        let lazy_conn = i.lazy && i.queue.back().is_some_and(|m| m.kind == KIND_CONN);
        if let Err(e) = i.pump() {
            if alone && i.chunk_off == 0 && i.queue.len() == 1 {
                // Nothing of it left: give it straight back.
                let msg = i.queue.pop_back().expect("just pushed");
                if timed {
                    i.sent_at.pop_back();
                }
                i.fail(Some(e));
                return Err(msg);
            }
            i.fail(Some(e));
        }
        if lazy_conn && i.failure.is_none() {
            if i.lazy_reading && i.unacked.len() > LAZY_DRAIN {
                // After the write (the peer is on its way already): one
                // receive takes the ACKs (and anything else) waiting.
                let eof = i.read_some(false);
                if let Err(e) = i.pump() {
                    i.fail(Some(e));
                }
                if eof {
                    i.fail(None);
                }
            }
            i.go_lazy();
        }
        i.wake_if_ready();
        Ok(id)
    }

    /// Reads the peer's ACKs without a wake-up of their own (for a channel
    /// that mostly sends CONNs, as a pair server's link to its peer):
    /// while CONNs are unacknowledged, the socket is not watched; ACKs are
    /// read when a later CONN is sent (once over [`LAZY_DRAIN`] wait), or at
    /// the latest [`LAZY_POLL`] after the last send. Each sent CONN is
    /// still kept until its ACK is read, and a peer that dies is noticed
    /// by the next send, or within [`LAZY_POLL`]. An idle channel (nothing
    /// unacknowledged) is watched as usual. Off by default.
    pub fn set_lazy_acks(&self, on: bool) {
        let mut i = self.0.borrow_mut();
        i.lazy = on;
        if !on {
            i.stop_lazy();
        }
    }

    /// The peer is one of our own processes that passes only descriptors
    /// checked where they entered (accepted from our listeners, or
    /// received on a checked channel): a worker's master over the socket
    /// pair it made, a master's own worker binary (not `--worker-cmd`), a
    /// new master's predecessor, dialled in the private `--dir`. So
    /// descriptors received here are not checked again (one `getsockopt`
    /// per connection less). Off by default: a channel a stranger could
    /// open (the control socket, a pair peer's socket) is checked.
    pub fn trust_descriptors(&self) {
        self.0.borrow_mut().trusted = true;
    }

    /// The peer reads CONNS (it said so): from now on, the CONNs sent in
    /// one turn of the event loop are written together at its end, up to
    /// [`wire::MAX_BATCH`] per message. Each is still acknowledged, refused
    /// or returned on its own, as a single CONN is. Off by default: a peer
    /// that does not know CONNS would close the channel.
    pub fn set_batch(&self, on: bool) {
        self.0.borrow_mut().batch = on;
    }

    /// Whether [`Channel::set_batch`] is on.
    pub fn batching(&self) -> bool {
        self.0.borrow().batch
    }

    /// Whether the channel can still carry messages.
    pub fn is_open(&self) -> bool {
        let i = self.0.borrow();
        i.sock.is_some() && i.failure.is_none()
    }

    /// Messages queued plus connections waiting for an acknowledgement.
    pub fn in_flight(&self) -> usize {
        let i = self.0.borrow();
        i.queue.len() + i.unacked.len()
    }

    /// Runs `f` once the channel is settled (at once if it is): everything
    /// queued is in the kernel, our ACKs are written, and the peer has
    /// acknowledged every connection we sent; or once the channel is gone.
    pub fn when_settled(&self, f: impl FnOnce() + 'static) {
        let mut i = self.0.borrow_mut();
        if i.settled() {
            drop(i);
            f();
            return;
        }
        i.flushed.push(Box::new(f));
    }

    /// Keeps every acknowledged CONN (descriptor and body) instead of
    /// closing it: a takeover's old side can then resume what it handed
    /// over until the new side commits. See [`Channel::take_acked`].
    pub fn set_keep_acked(&self, keep: bool) {
        self.0.borrow_mut().keep_acked = keep;
    }

    /// Calls `f` with each CONN's time from [`Channel::send`] to the peer's
    /// ACK (a handover's latency): one clock read per send and per ACK
    /// while set. `f` runs inside the channel's read path: it must not use
    /// this channel (count, and return).
    pub fn time_acks(&self, f: impl Fn(Duration) + 'static) {
        self.0.borrow_mut().ack_timer = Some(Rc::new(f));
    }

    /// The acknowledged CONNs kept so far (`set_keep_acked`).
    pub fn take_acked(&self) -> Vec<Msg> {
        std::mem::take(&mut self.0.borrow_mut().acked_msgs)
    }

    /// The peer's pid as the kernel saw it at connect time (SO_PEERCRED),
    /// never what the peer says of itself.
    pub fn peer_pid(&self) -> Option<u32> {
        let i = self.0.borrow();
        let fd = i.sock.as_ref()?.as_raw_fd();
        crate::core::sock::peer_cred(fd).ok().map(|(pid, _)| pid as u32)
    }

    /// Stops reading (the peer's messages wait in the socket); sends go on.
    pub fn pause_reading(&self) {
        if let Some(ev) = &self.0.borrow().read_ev {
            ev.del();
        }
    }

    /// Reads again after [`Channel::pause_reading`].
    pub fn resume_reading(&self) {
        if let Some(ev) = &self.0.borrow().read_ev {
            let _ = ev.add(None);
        }
    }

    /// Whether the channel is settled (see [`Channel::when_settled`]).
    pub fn is_settled(&self) -> bool {
        let i = self.0.borrow();
        i.settled()
    }

    /// Sends this channel's future events to another handler.
    pub fn set_handler(&self, handler: impl Fn(ChannelEvent) + 'static) {
        self.0.borrow_mut().handler = Rc::new(handler);
    }

    /// A copy of the counters so far.
    pub fn stats(&self) -> Stats {
        self.0.borrow().stats
    }

    /// Closes the channel now, without an event; returns what the peer
    /// never took (queued and unacknowledged connections), and any
    /// connection that became ours but was not delivered yet. Connections
    /// the peer sent and we had not acknowledged stay the peer's.
    pub fn shutdown(&self) -> Vec<Msg> {
        let mut i = self.0.borrow_mut();
        let (mut returned, orphans) = i.close_now(false);
        returned.extend(orphans);
        for ev in i.ready.drain(..) {
            if let ChannelEvent::Msg(m) = ev {
                if m.kind == KIND_CONN {
                    returned.push(m);
                }
            }
        }
        returned
    }

    /// The peer process is dead (its owner reaped it): reads everything it
    /// sent, and closes. Returns the messages in order (CONNs included:
    /// nobody else holds them now) and what the peer never took.
    pub fn peer_died(&self) -> (Vec<Msg>, Vec<Msg>) {
        let mut i = self.0.borrow_mut();
        let mut msgs: Vec<Msg> = Vec::new();
        let mut returned: Vec<Msg> = Vec::new();
        let take = |i: &mut Inner, msgs: &mut Vec<Msg>, returned: &mut Vec<Msg>| {
            for ev in i.ready.drain(..) {
                match ev {
                    ChannelEvent::Msg(m) => msgs.push(m),
                    ChannelEvent::Refused(m) => returned.push(m),
                    ChannelEvent::Closed { .. } => {}
                }
            }
        };
        take(&mut i, &mut msgs, &mut returned);
        msgs.append(&mut i.orphans);
        msgs.extend(i.held.drain(..));
        let mut failures = 0;
        while i.sock.is_some() {
            i.rx_short = false;
            match i.read_one() {
                Ok(Some(m)) => msgs.push(m),
                Ok(None) => take(&mut i, &mut msgs, &mut returned),
                Err(Stop::Failed) if failures < 16 => failures += 1,
                Err(_) => break,
            }
        }
        // Everything received is ours; no ACK needs to be written.
        returned.extend(i.teardown());
        i.failure = None;
        (msgs, returned)
    }
}

/// Why reading stopped.
#[derive(Debug)]
enum Stop {
    Empty,
    Eof,
    Failed,
}

impl Inner {
    fn write_raw(&self, h: Header, fd: Option<&OwnedFd>, body: &[u8]) -> io::Result<()> {
        let sock = self.sock.as_ref().ok_or_else(|| io::Error::from_raw_os_error(libc::EPIPE))?;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        h.encode(&mut out);
        out.extend_from_slice(body);
        fdpass::send(sock.as_fd(), fd.map(|f| f.as_fd()), &out).map(drop)
    }

    fn header(kind: u16, flags: u32, id: u64, tag: u64, body_len: usize) -> Header {
        Header { version: version(), kind, flags, body_len: body_len as u32, id, tag }
    }

    /// Writes NACKs, the due ACK, then the queue, until EAGAIN (Ok) or a
    /// hard error (Err). A written ACK releases the messages held behind it.
    fn pump(&mut self) -> io::Result<()> {
        let r = self.pump_inner();
        if let Err(e) = &r {
            if matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET)) {
                self.peer_closed = true;
            }
        }
        match &r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(ev) = &self.write_ev {
                    let _ = ev.add(None);
                }
            }
            Err(_) => {}
            Ok(()) => {
                if !self.flushed.is_empty() {
                    self.wake_if_ready_force();
                }
            }
        }
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            r => r,
        }
    }

    fn pump_inner(&mut self) -> io::Result<()> {
        while let Some(&id) = self.nacks.front() {
            self.write_raw(Self::header(KIND_NACK, 0, id, 0, 0), None, &[])?;
            self.nacks.pop_front();
        }
        if self.ack_due > self.acked {
            match self.write_raw(Self::header(KIND_ACK, 0, self.ack_due, 0, 0), None, &[]) {
                Ok(()) => {
                    self.acked = self.ack_due;
                    self.release_held();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                Err(e) => {
                    // The peer is gone: what waits for this ACK is orphaned.
                    self.orphan_held();
                    return Err(e);
                }
            }
        }
        while let Some(msg) = self.queue.front() {
            if self.batch && self.chunk_off == 0 && msg.kind == KIND_CONN {
                let n = self.batchable();
                if n >= 2 {
                    self.write_batch(n)?;
                    continue;
                }
            }
            let left = msg.body.len() - self.chunk_off;
            if left > MAX_BODY {
                let chunk = &msg.body[self.chunk_off..self.chunk_off + MAX_BODY];
                self.write_raw(Self::header(KIND_MORE, 0, 0, 0, chunk.len()), None, chunk)?;
                self.chunk_off += MAX_BODY;
                continue;
            }
            let body = &msg.body[self.chunk_off..];
            self.write_raw(Self::header(msg.kind, msg.flags, msg.id, msg.tag, body.len()), msg.fd.as_ref(), body)?;
            self.chunk_off = 0;
            let msg = self.queue.pop_front().expect("front exists");
            self.stats.msgs_sent += 1;
            if msg.kind == KIND_CONN {
                self.stats.conns_sent += 1;
                self.unacked.push_back(msg);
            }
        }
        Ok(())
    }

    /// How many CONNs at the queue's front fit one CONNS message: each
    /// with a descriptor and at most [`BATCH_ENTRY_MAX`] body bytes, ids
    /// consecutive, at most [`MAX_BATCH`] and [`MAX_BODY`] bytes in all.
    fn batchable(&self) -> usize {
        let (mut n, mut bytes) = (0, 0);
        let first = self.queue.front().map_or(0, |m| m.id);
        for m in self.queue.iter().take(MAX_BATCH) {
            let fits = m.kind == KIND_CONN
                && m.fd.is_some()
                && m.id == first + n as u64
                && m.body.len() <= BATCH_ENTRY_MAX
                && bytes + BATCH_ENTRY_LEN + m.body.len() <= MAX_BODY;
            if !fits {
                break;
            }
            bytes += BATCH_ENTRY_LEN + m.body.len();
            n += 1;
        }
        n
    }

    /// Writes the first `n` queued CONNs as one CONNS message.
    fn write_batch(&mut self, n: usize) -> io::Result<()> {
        let sock = self.sock.as_ref().ok_or_else(|| io::Error::from_raw_os_error(libc::EPIPE))?;
        let msgs = self.queue.range(..n);
        let mut body = Vec::with_capacity(msgs.clone().map(|m| BATCH_ENTRY_LEN + m.body.len()).sum());
        let mut fds = Vec::with_capacity(n);
        for m in msgs {
            wire::encode_entry(m.flags, m.tag, &m.body, &mut body);
            fds.push(m.fd.as_ref().expect("batchable checked").as_fd());
        }
        let first = self.queue[0].id;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        Self::header(KIND_CONNS, 0, first, n as u64, body.len()).encode(&mut out);
        out.extend_from_slice(&body);
        fdpass::send_many(sock.as_fd(), &fds, &out)?;
        self.stats.msgs_sent += n as u64;
        self.stats.conns_sent += n as u64;
        self.unacked.extend(self.queue.drain(..n));
        Ok(())
    }

    /// Takes one message read by `read_one`: held behind an unwritten ACK,
    /// or ready for the owner.
    fn take(&mut self, m: Msg) {
        if self.held.is_empty() && m.kind != KIND_CONN {
            self.ready.push_back(ChannelEvent::Msg(m));
        } else {
            // Delivered once the ACK covering it is written.
            self.held.push_back(m);
        }
    }

    /// Reads what the socket holds and acknowledges it before anything is
    /// served (from then on it is ours); a failed write or the peer's EOF
    /// fails the channel. Whether it is still up.
    fn take_in(&mut self) -> bool {
        let eof = self.read_some(true);
        if let Err(e) = self.pump() {
            self.fail(Some(e));
        }
        if eof {
            self.fail(None);
        }
        !eof && self.failure.is_none()
    }

    /// Reads what waits: with `all`, to the socket's end (as a readable
    /// callback does), else what one receive call returns. Returns whether
    /// the peer's end of stream was read.
    fn read_some(&mut self, all: bool) -> bool {
        if self.failure.is_some() {
            return false;
        }
        self.rx_short = false;
        let mut n = 0;
        // At most READ_BATCH messages, and every CONN of a batch and every
        // message already received read (nothing would call us for those).
        while (all && n < READ_BATCH) || !self.unpacked.is_empty() || !self.rx.is_empty() || n == 0 {
            n += 1;
            match self.read_one() {
                Ok(Some(m)) => self.take(m),
                Ok(None) => {}
                Err(Stop::Empty) | Err(Stop::Failed) => break,
                Err(Stop::Eof) => return true,
            }
        }
        false
    }

    /// Lazy ACKs: stops watching the socket while CONNs wait for an ACK.
    fn go_lazy(&mut self) {
        if self.unacked.is_empty() || self.sock.is_none() || self.failure.is_some() {
            return;
        }
        if !self.lazy_reading {
            if let Some(ev) = &self.read_ev {
                ev.del();
            }
            self.lazy_reading = true;
        }
        if let Some(ev) = &self.lazy_ev {
            let _ = ev.add(Some(LAZY_POLL));
        }
    }

    /// Watches the socket again.
    fn stop_lazy(&mut self) {
        if self.lazy_reading {
            self.lazy_reading = false;
            if let Some(ev) = &self.lazy_ev {
                ev.del();
            }
            if let Some(ev) = &self.read_ev {
                let _ = ev.add(None);
            }
        }
    }

    fn release_held(&mut self) {
        while let Some(m) = self.held.front() {
            if m.kind == KIND_CONN && m.id > self.acked {
                break;
            }
            let m = self.held.pop_front().expect("front exists");
            self.ready.push_back(ChannelEvent::Msg(m));
        }
    }

    fn orphan_held(&mut self) {
        for m in self.held.drain(..) {
            if m.kind == KIND_CONN {
                self.orphans.push(m);
            } else {
                self.ready.push_back(ChannelEvent::Msg(m));
            }
        }
    }

    /// Reads one message. `Ok(Some)` is a message for the owner (a CONN
    /// among them is recorded as due for an ACK); `Ok(None)` was handled
    /// here (ACK, NACK, MORE, a refused CONN); `Err` says why to stop.
    fn read_one(&mut self) -> Result<Option<Msg>, Stop> {
        if let Some(m) = self.unpacked.pop_front() {
            // One CONN of a batch: due for an ACK once handed out.
            self.stats.conns_received += 1;
            self.ack_due = self.ack_due.max(m.id);
            return Ok(Some(m));
        }
        let Some(sock) = self.sock.as_ref() else { return Err(Stop::Failed) };
        if self.rx.is_empty() {
            if self.rx_short {
                self.rx_short = false;
                return Err(Stop::Empty);
            }
            match fdpass::recv_batch(sock.as_fd(), &mut self.buf, SLOT_LEN, &mut self.rx_slots) {
                Ok(got) => {
                    self.rx_short = got.len() < RX_SLOTS;
                    self.rx.extend(got.into_iter().enumerate());
                }
                Err(e) => self.rx.push_back((0, Err(e))),
            }
        }
        let (slot, r) = self.rx.pop_front().expect("filled above");
        let at = slot * SLOT_LEN;
        let r = match r {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(Stop::Empty),
            // The peer closed with our messages unread. Linux reports that
            // before the messages still queued to us: read on, to the EOF.
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                self.peer_closed = true;
                return Ok(None);
            }
            Err(e) => {
                self.fail(Some(e));
                return Err(Stop::Failed);
            }
        };
        if r.len == 0 && r.fds.is_empty() && !r.fds_dropped {
            self.peer_closed = true;
            // (Any other slot filled holds the same end of stream.)
            self.rx.clear();
            return Err(Stop::Eof);
        }
        let h = match Header::decode(&self.buf[at..at + r.len]) {
            Ok(h) => h,
            Err(e) => {
                self.fail(Some(e));
                return Err(Stop::Failed);
            }
        };
        self.stats.msgs_received += 1;
        let mut r = r;
        let mut short = false;
        if r.fds_dropped
            && h.kind == KIND_CONNS
            && (1..=MAX_BATCH as u64).contains(&h.tag)
            && r.fds.len() < h.tag as usize
        {
            // EMFILE here: the CONNs whose descriptors came are taken (the
            // kernel installs in order), the others refused; the sender
            // keeps those and offers each again.
            let got = r.fds.len() as u64;
            crate::warn_limited!(
                "channel: {} of a batch of {} connections' descriptors could not be received (out of descriptors); refused",
                h.tag - got,
                h.tag
            );
            self.nacks.extend(h.id + got..h.id + h.tag);
            if got == 0 {
                self.partial.clear();
                return Ok(None);
            }
            r.fds_dropped = false;
            short = true;
        }
        if r.fds_dropped && h.kind == KIND_CONN {
            // EMFILE here: refuse this one; the sender keeps it.
            crate::warn_limited!(
                "channel: a connection's descriptor could not be received (out of descriptors); refused"
            );
            self.partial.clear();
            self.nacks.push_back(h.id);
            return Ok(None);
        }
        let want = match h.kind {
            KIND_CONNS if short => r.fds.len(),
            KIND_CONNS => h.tag.min(MAX_BATCH as u64 + 1) as usize,
            k => usize::from(wire::carries_fd(k)),
        };
        if r.fds.len() != want {
            let why = if r.fds.len() > want { "unexpected descriptor" } else { "descriptor missing" };
            self.fail(Some(io::Error::new(io::ErrorKind::InvalidData, why)));
            return Err(Stop::Failed);
        }
        // A connection or listener must be a stream socket: a file, a pipe
        // or a datagram socket is refused (and closed here).
        if !self.trusted && !r.fds.iter().all(|fd| crate::core::sock::is_stream_socket(fd.as_raw_fd())) {
            let e = io::Error::new(io::ErrorKind::InvalidData, "the descriptor passed is not a stream socket");
            self.fail(Some(e));
            return Err(Stop::Failed);
        }
        if h.kind == KIND_CONNS {
            let entries = match wire::decode_batch(h.tag, &self.buf[at + HEADER_LEN..at + r.len]) {
                Ok(_) if !self.partial.is_empty() => {
                    self.fail(Some(io::Error::new(io::ErrorKind::InvalidData, "MORE chunks before a batch")));
                    return Err(Stop::Failed);
                }
                Ok(e) => e,
                Err(e) => {
                    self.fail(Some(e));
                    return Err(Stop::Failed);
                }
            };
            let body = &self.buf[at + HEADER_LEN..at + r.len];
            // (Fewer descriptors than entries: the rest were refused above.)
            for (k, (e, fd)) in entries.into_iter().zip(r.fds).enumerate() {
                self.unpacked.push_back(Msg {
                    kind: KIND_CONN,
                    flags: e.flags,
                    id: h.id + k as u64,
                    body: body[e.body].to_vec(),
                    fd: Some(fd),
                    tag: e.tag,
                });
            }
            return self.read_one();
        }
        let body = &self.buf[at + HEADER_LEN..at + r.len];
        let fd = r.fds.into_iter().next();
        match h.kind {
            KIND_ACK => {
                if let (Some(f), false) = (&self.ack_timer, self.sent_at.is_empty()) {
                    let now = Instant::now();
                    while let Some(&(_, sent)) = self.sent_at.front().filter(|(id, _)| *id <= h.id) {
                        self.sent_at.pop_front();
                        f(now.saturating_duration_since(sent));
                    }
                }
                while self.unacked.front().is_some_and(|m| m.id <= h.id) {
                    let m = self.unacked.pop_front().expect("front exists");
                    self.stats.conns_acked += 1;
                    if self.keep_acked {
                        self.acked_msgs.push(m);
                    }
                }
                Ok(None)
            }
            KIND_NACK => {
                if let Some(pos) = self.sent_at.iter().position(|(id, _)| *id == h.id) {
                    self.sent_at.remove(pos);
                }
                if let Some(pos) = self.unacked.iter().position(|m| m.id == h.id) {
                    let m = self.unacked.remove(pos).expect("position is valid");
                    self.stats.conns_refused += 1;
                    self.ready.push_back(ChannelEvent::Refused(m));
                }
                Ok(None)
            }
            KIND_MORE => {
                if self.partial.len() + body.len() > MAX_JOINED {
                    let e = io::Error::new(io::ErrorKind::InvalidData, "message longer than the channel allows");
                    self.fail(Some(e));
                    return Err(Stop::Failed);
                }
                self.partial.extend_from_slice(body);
                Ok(None)
            }
            kind => {
                let mut full = std::mem::take(&mut self.partial);
                full.extend_from_slice(body);
                if kind == KIND_CONN {
                    self.stats.conns_received += 1;
                    self.ack_due = self.ack_due.max(h.id);
                }
                Ok(Some(Msg { kind, flags: h.flags, id: h.id, body: full, fd, tag: h.tag }))
            }
        }
    }

    /// Marks the channel failed; the owner hears of it from `wake_ev`, so
    /// no callback runs inside the owner's own call.
    fn fail(&mut self, reason: Option<io::Error>) {
        if self.failure.is_none() {
            self.failure = Some(reason);
            self.wake_if_ready_force();
        }
    }

    /// Nothing queued, our ACKs written, every CONN we sent acknowledged
    /// (or the channel gone): see [`Channel::when_settled`].
    fn settled(&self) -> bool {
        self.sock.is_none()
            || (self.queue.is_empty() && self.nacks.is_empty() && self.acked >= self.ack_due && self.unacked.is_empty())
    }

    fn wake_if_ready(&self) {
        if !self.ready.is_empty() || !self.flushed.is_empty() && self.settled() {
            self.wake_if_ready_force();
        }
    }

    fn wake_if_ready_force(&self) {
        if let Some(ev) = &self.wake_ev {
            if !ev.pending() {
                let _ = ev.add(Some(Duration::ZERO));
            }
        }
    }

    /// Makes further ACKs from the peer impossible, reads the ones already
    /// queued, then closes. With `last_ack`, first tries once more to write
    /// a due ACK (what it covers becomes ours: left in `ready`). Returns
    /// (what the peer never took, orphans).
    fn close_now(&mut self, last_ack: bool) -> (Vec<Msg>, Vec<Msg>) {
        if last_ack && self.sock.is_some() && self.ack_due > self.acked {
            let _ = self.pump_inner();
        }
        if let Some(sock) = &self.sock {
            // SAFETY: shutdown on a descriptor we own; no memory involved.
            unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RD) };
            let mut failures = 0;
            loop {
                // Read to the real end: messages may have come since.
                self.rx_short = false;
                match self.read_one() {
                    // The peer is gone: what it sent is for the owner to
                    // judge (CONNs as orphans).
                    Ok(Some(m)) if self.peer_closed => {
                        if m.kind == KIND_CONN {
                            self.orphans.push(m);
                        } else {
                            self.ready.push_back(ChannelEvent::Msg(m));
                        }
                    }
                    // Not acknowledged, and the peer can still take it back.
                    Ok(Some(m)) => drop(m),
                    Ok(None) => {}
                    Err(Stop::Failed) if failures < 16 => failures += 1,
                    Err(_) => break,
                }
            }
        }
        let mut returned = Vec::new();
        let mut keep = VecDeque::new();
        for ev in self.ready.drain(..) {
            match ev {
                ChannelEvent::Refused(m) => returned.push(m),
                ev => keep.push_back(ev),
            }
        }
        self.ready = keep;
        // Held CONNs were never acknowledged: a live peer takes them back.
        if self.peer_closed {
            self.orphan_held();
        }
        self.held.clear();
        let orphans = std::mem::take(&mut self.orphans);
        returned.extend(self.teardown());
        (returned, orphans)
    }

    fn teardown(&mut self) -> Vec<Msg> {
        self.read_ev.take();
        self.write_ev.take();
        self.wake_ev.take();
        self.flush_ev.take();
        self.lazy_ev.take();
        self.lazy_reading = false;
        self.sock.take();
        self.chunk_off = 0;
        // Never handed out, never acknowledged: the peer's still.
        self.unpacked.clear();
        self.rx.clear();
        let mut back: Vec<Msg> = self.unacked.drain(..).collect();
        back.extend(self.queue.drain(..).filter(|m| m.kind == KIND_CONN));
        back
    }
}

impl Drop for Inner {
    /// Events leave epoll before the socket closes (fields drop in
    /// declaration order, and `sock` comes first).
    fn drop(&mut self) {
        self.read_ev.take();
        self.write_ev.take();
        self.wake_ev.take();
        self.flush_ev.take();
        self.lazy_ev.take();
    }
}

/// Hands the owner what is ready, outside our borrow.
fn deliver(inner: &Rc<RefCell<Inner>>) {
    loop {
        let (ev, handler) = {
            let mut i = inner.borrow_mut();
            match i.ready.pop_front() {
                Some(ev) => (ev, i.handler.clone()),
                None => break,
            }
        };
        handler(ev);
    }
    let callbacks = {
        let mut i = inner.borrow_mut();
        if i.settled() {
            std::mem::take(&mut i.flushed)
        } else {
            Vec::new()
        }
    };
    for f in callbacks {
        f();
    }
}

fn on_writable(w: &Weak<RefCell<Inner>>) {
    let Some(inner) = w.upgrade() else { return };
    {
        let mut i = inner.borrow_mut();
        if let Err(e) = i.pump() {
            i.fail(Some(e));
        }
    }
    deliver(&inner);
}

fn on_readable(w: &Weak<RefCell<Inner>>) {
    let Some(inner) = w.upgrade() else { return };
    {
        let mut i = inner.borrow_mut();
        if i.failure.is_some() {
            return;
        }
        i.take_in();
    }
    deliver(&inner);
}

/// Lazy ACKs: reads what the peer sent since the last send; watches the
/// socket again once every CONN is acknowledged.
fn on_lazy(w: &Weak<RefCell<Inner>>) {
    let Some(inner) = w.upgrade() else { return };
    {
        let mut i = inner.borrow_mut();
        if i.failure.is_some() || i.sock.is_none() {
            return;
        }
        if !i.take_in() {
            // Failed or closed: nothing to watch any more.
        } else if i.unacked.is_empty() || !i.lazy {
            i.stop_lazy();
        } else if let Some(ev) = &i.lazy_ev {
            let _ = ev.add(Some(LAZY_POLL));
        }
    }
    deliver(&inner);
}

fn on_wake(w: &Weak<RefCell<Inner>>) {
    let Some(inner) = w.upgrade() else { return };
    deliver(&inner);
    let closed = {
        let mut i = inner.borrow_mut();
        match i.failure.take() {
            Some(reason) => {
                let (returned, orphans) = i.close_now(true);
                Some((ChannelEvent::Closed { reason, returned, orphans }, i.handler.clone()))
            }
            None => None,
        }
    };
    if let Some((ev, handler)) = closed {
        deliver(&inner);
        handler(ev);
        let callbacks = std::mem::take(&mut inner.borrow_mut().flushed);
        for f in callbacks {
            f();
        }
    }
}

#[cfg(test)]
mod tests;
