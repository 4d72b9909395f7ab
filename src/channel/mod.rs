//! The handoff channel: moves connections (descriptor + read-ahead bytes)
//! and small control messages between two processes over a non-blocking
//! SOCK_SEQPACKET Unix socket, driven by plain libevent events (never a
//! bufferevent: a plain read would drop passed descriptors).
//!
//! - Sends never block: on EAGAIN the message is queued and the channel
//!   waits for EV_WRITE, so two processes handing connections to each other
//!   cannot deadlock.
//! - A sent connection stays owned by the sender (which keeps its
//!   descriptor, unregistered from epoll) until the receiver acknowledges
//!   it. The receiver acknowledges each batch as soon as it has read it,
//!   before serving anything. If the channel dies first, every queued or
//!   unacknowledged connection is handed back to the owner through
//!   [`ChannelEvent::Closed`], so a connection is never lost nor served twice.
//! - Malformed input closes the channel, never the process.
pub mod wire;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::time::Duration;

use crate::fdpass;
use crate::reactor::{Base, Event, Interest};
use wire::{version, Header, HEADER_LEN, KIND_ACK, KIND_CONN, MAX_BODY};

/// One channel message.
#[derive(Debug)]
pub struct Msg {
    pub kind: u16,
    pub flags: u32,
    pub id: u64,
    pub body: Vec<u8>,
    pub fd: Option<OwnedFd>,
    /// CONN: the client's address (`wire` header `meta`), 0 if unknown.
    pub meta: u64,
}

impl Msg {
    /// The client address as `meta` carries it.
    pub fn pack_addr(a: std::net::SocketAddrV4) -> u64 {
        (u64::from(u32::from(*a.ip())) << 16) | u64::from(a.port())
    }

    /// The client address from `meta` (None when 0).
    pub fn unpack_addr(meta: u64) -> Option<std::net::SocketAddrV4> {
        (meta != 0).then(|| std::net::SocketAddrV4::new(((meta >> 16) as u32).into(), meta as u16))
    }

    /// A connection handoff: its descriptor plus the bytes already read.
    pub fn conn(fd: OwnedFd, leftover: Vec<u8>, flags: u32) -> Msg {
        Msg { kind: KIND_CONN, flags, id: 0, body: leftover, fd: Some(fd), meta: 0 }
    }

    /// A mode-defined control message (kind >= `wire::KIND_USER`).
    pub fn control(kind: u16, body: Vec<u8>) -> Msg {
        Msg { kind, flags: 0, id: 0, body, fd: None, meta: 0 }
    }
}

/// What a channel reports to its owner.
#[derive(Debug)]
pub enum ChannelEvent {
    /// A message arrived (a received CONN is already acknowledged).
    Msg(Msg),
    /// The channel is gone (`reason` is `None` on a clean EOF). `returned`
    /// holds every connection sent on it that the peer never took: the
    /// owner serves them again.
    Closed { reason: Option<io::Error>, returned: Vec<Msg> },
}

/// Counters for status reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub conns_sent: u64,
    pub conns_acked: u64,
    pub conns_received: u64,
    pub msgs_sent: u64,
    pub msgs_received: u64,
}

type Handler = Rc<dyn Fn(ChannelEvent)>;

struct Inner {
    sock: Option<OwnedFd>,
    read_ev: Option<Event>,
    write_ev: Option<Event>,
    close_ev: Option<Event>,
    queue: VecDeque<Msg>,
    unacked: VecDeque<Msg>,
    next_id: u64,
    buf: Vec<u8>,
    /// Set when the channel must close; delivered from `close_ev`.
    failure: Option<Option<io::Error>>,
    handler: Handler,
    stats: Stats,
}

/// A handle to a channel; clones share it.
#[derive(Clone)]
pub struct Channel(Rc<RefCell<Inner>>);

/// Most messages read in one callback.
const READ_BATCH: usize = 64;

impl Channel {
    /// Drives `sock` (a connected, non-blocking SOCK_SEQPACKET socket).
    pub fn new(base: &Base, sock: OwnedFd, handler: impl Fn(ChannelEvent) + 'static) -> io::Result<Channel> {
        crate::sock::set_sndbuf(sock.as_raw_fd(), 1 << 20);
        let raw = sock.as_raw_fd();
        let inner = Rc::new(RefCell::new(Inner {
            sock: Some(sock),
            read_ev: None,
            write_ev: None,
            close_ev: None,
            queue: VecDeque::new(),
            unacked: VecDeque::new(),
            next_id: 1,
            buf: vec![0; HEADER_LEN + MAX_BODY],
            failure: None,
            handler: Rc::new(handler),
            stats: Stats::default(),
        }));
        let w = Rc::downgrade(&inner);
        let read_ev = Event::new(base, raw, Interest::Read, move || on_readable(&w))?;
        let w = Rc::downgrade(&inner);
        let write_ev = Event::new(base, raw, Interest::Write, move || on_writable(&w))?;
        let w = Rc::downgrade(&inner);
        let close_ev = Event::new(base, -1, Interest::Timer, move || on_failed(&w))?;
        read_ev.add(None)?;
        {
            let mut i = inner.borrow_mut();
            i.read_ev = Some(read_ev);
            i.write_ev = Some(write_ev);
            i.close_ev = Some(close_ev);
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
        if !i.queue.is_empty() {
            i.queue.push_back(msg);
            return Ok(id);
        }
        match i.try_send(&msg) {
            Ok(()) => {
                i.sent(msg);
                Ok(id)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                i.queue.push_back(msg);
                i.arm_write();
                Ok(id)
            }
            Err(e) => {
                i.fail(Some(e));
                Err(msg)
            }
        }
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

    /// Sends this channel's future events to another handler.
    pub fn set_handler(&self, handler: impl Fn(ChannelEvent) + 'static) {
        self.0.borrow_mut().handler = Rc::new(handler);
    }

    pub fn stats(&self) -> Stats {
        self.0.borrow().stats
    }

    /// Closes the channel now, without an event; returns what the peer
    /// never took (queued and unacknowledged connections).
    pub fn shutdown(&self) -> Vec<Msg> {
        self.0.borrow_mut().teardown()
    }
}

impl Inner {
    fn try_send(&self, msg: &Msg) -> io::Result<()> {
        let sock = self.sock.as_ref().expect("open channel has a socket");
        let mut out = Vec::with_capacity(HEADER_LEN + msg.body.len());
        Header {
            version: version(),
            kind: msg.kind,
            flags: msg.flags,
            body_len: msg.body.len() as u32,
            id: msg.id,
            meta: msg.meta,
        }
        .encode(&mut out);
        out.extend_from_slice(&msg.body);
        fdpass::send(sock.as_fd(), msg.fd.as_ref().map(|f| f.as_fd()), &out).map(drop)
    }

    /// Bookkeeping after a successful send: connections wait for their ACK
    /// with the descriptor kept; anything else is done with.
    fn sent(&mut self, msg: Msg) {
        self.stats.msgs_sent += 1;
        if msg.kind == KIND_CONN {
            self.stats.conns_sent += 1;
            self.unacked.push_back(msg);
        }
    }

    fn arm_write(&self) {
        if let Some(ev) = &self.write_ev {
            let _ = ev.add(None);
        }
    }

    /// Marks the channel failed; the owner hears of it from `close_ev`, so
    /// no callback runs inside the owner's own call.
    fn fail(&mut self, reason: Option<io::Error>) {
        if self.failure.is_none() {
            self.failure = Some(reason);
            if let Some(ev) = &self.close_ev {
                let _ = ev.add(Some(Duration::ZERO));
            }
        }
    }

    fn teardown(&mut self) -> Vec<Msg> {
        self.read_ev.take();
        self.write_ev.take();
        self.close_ev.take();
        self.sock.take();
        let mut back: Vec<Msg> = self.unacked.drain(..).collect();
        back.extend(self.queue.drain(..).filter(|m| m.kind == KIND_CONN));
        back
    }

    fn ack(&mut self, upto: u64) {
        while self.unacked.front().is_some_and(|m| m.id <= upto) {
            self.unacked.pop_front();
            self.stats.conns_acked += 1;
        }
    }
}

fn on_writable(w: &Weak<RefCell<Inner>>) {
    let Some(inner) = w.upgrade() else { return };
    let mut i = inner.borrow_mut();
    while let Some(msg) = i.queue.pop_front() {
        match i.try_send(&msg) {
            Ok(()) => i.sent(msg),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                i.queue.push_front(msg);
                i.arm_write();
                return;
            }
            Err(e) => {
                i.queue.push_front(msg);
                i.fail(Some(e));
                return;
            }
        }
    }
}

fn on_readable(w: &Weak<RefCell<Inner>>) {
    let Some(inner) = w.upgrade() else { return };
    let mut batch = Vec::new();
    let handler;
    {
        let mut i = inner.borrow_mut();
        if i.failure.is_some() {
            return;
        }
        let mut last_conn = 0;
        for _ in 0..READ_BATCH {
            let i = &mut *i;
            let Some(sock) = i.sock.as_ref() else { return };
            let r = match fdpass::recv(sock.as_fd(), &mut i.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    i.fail(Some(e));
                    break;
                }
            };
            if r.len == 0 && r.fd.is_none() {
                i.fail(None);
                break;
            }
            let h = match Header::decode(&i.buf[..r.len]) {
                Ok(h) => h,
                Err(e) => {
                    i.fail(Some(e));
                    break;
                }
            };
            if wire::carries_fd(h.kind) != r.fd.is_some() {
                let why = if r.fd.is_some() { "unexpected descriptor" } else { "descriptor missing" };
                i.fail(Some(io::Error::new(io::ErrorKind::InvalidData, why)));
                break;
            }
            i.stats.msgs_received += 1;
            match h.kind {
                KIND_ACK => i.ack(h.id),
                kind => {
                    if kind == KIND_CONN {
                        i.stats.conns_received += 1;
                        last_conn = h.id;
                    }
                    let body = i.buf[HEADER_LEN..r.len].to_vec();
                    batch.push(Msg { kind, flags: h.flags, id: h.id, body, fd: r.fd, meta: h.meta });
                }
            }
        }
        if last_conn != 0 {
            // Acknowledge before anything is served: from here on the
            // connections are ours.
            let ack = Msg { kind: KIND_ACK, flags: 0, id: last_conn, body: Vec::new(), fd: None, meta: 0 };
            drop(i);
            let _ = Channel(inner.clone()).send(ack);
            i = inner.borrow_mut();
        }
        handler = i.handler.clone();
    }
    for m in batch {
        handler(ChannelEvent::Msg(m));
    }
}

fn on_failed(w: &Weak<RefCell<Inner>>) {
    let Some(inner) = w.upgrade() else { return };
    let (reason, returned, handler) = {
        let mut i = inner.borrow_mut();
        let reason = i.failure.take().flatten();
        let returned = i.teardown();
        (reason, returned, i.handler.clone())
    };
    handler(ChannelEvent::Closed { reason, returned });
}

#[cfg(test)]
mod tests;
