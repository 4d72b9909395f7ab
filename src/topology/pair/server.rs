//! One pair-mode server of a [`Service`]: answers one request on a
//! connection, then hands the connection (descriptor, read-ahead, session
//! state) to its peer over the handoff channel; serves alone while the
//! peer is away.
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::time::Duration;

use crate::core::channel::{wire, Channel, ChannelEvent, Msg};
use crate::core::reactor::{Base, Conn, ConnEvent, Endpoint, Event, Interest, Listener};
use crate::core::sock;
use crate::service::{Cx, Place, Service, Session};
use crate::topology::pair::reqlog::RequestLog;

/// Serving alone: pause reading a connection while this much output is
/// unsent (a client that sends without reading cannot grow our memory).
const OUTPUT_LIMIT: usize = 256 * 1024;
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
const LOG_FLUSH: Duration = Duration::from_millis(200);

/// One pair server's settings (`handoff server`), for [`run`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to bind (`--host`): an IPv4 or IPv6 address (`::1`, `::`
    /// which takes IPv4 clients too), or a name (its first IPv4 address,
    /// else its first IPv6 one).
    pub host: String,
    /// TCP port for clients; 0 picks a free one (the `ready` line says
    /// which, and names the handoff socket after it).
    pub port: u16,
    /// The peer server's port: connections are handed to
    /// `dir/PEER_PORT.sock`.
    pub peer_port: u16,
    /// Directory of the handoff sockets (`PORT.sock`) and request logs
    /// (`PORT.log`): made 0700 when missing; an existing one must be ours
    /// and closed to other users.
    pub dir: PathBuf,
}

struct Served<T> {
    conn: Conn,
    session: T,
    /// The client sent EOF: serve what is buffered, then close.
    eof: bool,
    /// A response is still flushing; hand off when drained.
    handing_off: bool,
    /// Close when the output is drained.
    closing: bool,
    /// Serving alone, the client does not read: reading paused until the
    /// output drains.
    throttled: bool,
    client: Option<SocketAddr>,
}

struct Server<P: Service> {
    base: Base,
    me: Weak<RefCell<Server<P>>>,
    service: P,
    read_limit: usize,
    peer_path: PathBuf,
    conns: HashMap<u64, Served<P::Session>>,
    next_id: u64,
    peer: Option<Channel>,
    peer_warned: bool,
    /// The first link to the peer was made (later losses are warnings).
    linked_once: bool,
    backoff: Duration,
    retry: Option<Event>,
    inbound: HashMap<u64, Channel>,
    listeners: Vec<Listener>,
    log: RequestLog,
    log_timer: Option<Event>,
    signals: Vec<Event>,
    served: u64,
    handed: u64,
}

/// Runs a server of service `P` until SIGTERM/SIGINT.
pub fn run<P: Service>(cfg: &Config, options: &P::Options) -> io::Result<()> {
    let nofile = sock::raise_nofile()?;
    log::debug!("RLIMIT_NOFILE {nofile}");
    crate::core::signals::ignore_sigpipe();
    sock::private_dir(&cfg.dir)?;
    let base = Base::new()?;

    let addr = sock::resolve(&cfg.host, cfg.port)?;
    let tcp_fd = sock::tcp_listen(addr)?;
    let port = sock::local_addr(tcp_fd.as_raw_fd())?.port();
    let sock_path = cfg.dir.join(format!("{port}.sock"));
    sock::claim_unix_path(&sock_path)?;
    let log = RequestLog::open(&cfg.dir.join(format!("{port}.log")))?;

    let service = P::new(options, &Place::Pair { port, pid: std::process::id() })?;
    let server = Rc::new_cyclic(|me| {
        RefCell::new(Server {
            base: base.clone(),
            me: me.clone(),
            read_limit: service.read_limit(),
            service,
            peer_path: cfg.dir.join(format!("{}.sock", cfg.peer_port)),
            conns: HashMap::new(),
            next_id: 1,
            peer: None,
            peer_warned: false,
            linked_once: false,
            backoff: RETRY_MIN,
            retry: None,
            inbound: HashMap::new(),
            listeners: Vec::new(),
            log,
            log_timer: None,
            signals: Vec::new(),
            served: 0,
            handed: 0,
        })
    });
    let w = Rc::downgrade(&server);
    let tcp = Listener::adopt(&base, tcp_fd, move |fd| with(&w, |s| s.accept_client(fd)))?;
    let w = Rc::downgrade(&server);
    let unix = Listener::bind(&base, &Endpoint::Unix(sock_path.clone()), move |fd| with(&w, |s| s.accept_channel(fd)))?;
    {
        let mut s = server.borrow_mut();
        s.listeners = vec![tcp, unix];
        let w = Rc::downgrade(&server);
        s.retry = Some(Event::new(&base, -1, Interest::Timer, move || with(&w, |s| s.connect_peer()))?);
        let w = Rc::downgrade(&server);
        let t = Event::new(&base, -1, Interest::Timer, move || with(&w, |s| s.flush_log()))?;
        t.add(Some(LOG_FLUSH))?;
        s.log_timer = Some(t);
        let handled = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2];
        for sig in handled.into_iter().chain(crate::core::signals::IGNORED) {
            let w = Rc::downgrade(&server);
            let e = Event::new(&base, sig, Interest::Signal, move || with(&w, |s| s.on_signal(sig)))?;
            e.add(None)?;
            s.signals.push(e);
        }
    }
    log::info!("serving on {}, handoff socket {}", std::net::SocketAddr::new(addr.ip(), port), sock_path.display());
    crate::core::signals::ready(&format!("ready port={port} sock={}", sock_path.display()));
    // After the ready line: a `linked peer=...` line follows when the peer is reached.
    server.borrow_mut().connect_peer();
    base.dispatch()?;
    let s = server.borrow();
    log::info!("stopped: served {} requests, handed {} connections", s.served, s.handed);
    Ok(())
}

/// Runs `f` on the server if it still exists.
fn with<P: Service>(w: &Weak<RefCell<Server<P>>>, f: impl FnOnce(&mut Server<P>)) {
    if let Some(s) = w.upgrade() {
        f(&mut s.borrow_mut());
    }
}

impl<P: Service> Server<P> {
    fn accept_client(&mut self, fd: OwnedFd) {
        let _ = sock::set_nodelay(fd.as_raw_fd());
        let client = sock::peer_addr(fd.as_raw_fd());
        self.open_conn(fd, Vec::new(), Vec::new(), false, client);
    }

    fn accept_channel(&mut self, fd: OwnedFd) {
        if let Err(e) = sock::check_same_uid(fd.as_raw_fd()) {
            log::warn!("refused handoff channel: {e}");
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let w = self.me.clone();
        match Channel::new(&self.base, fd, move |ev| with(&w, |s| s.on_inbound(id, ev))) {
            Ok(ch) => {
                log::debug!("handoff channel {id} accepted");
                self.inbound.insert(id, ch);
            }
            Err(e) => log::warn!("handoff channel: {e}"),
        }
        // A peer just reached us, so it is up: link back now, not at the
        // next retry.
        if !self.peer_up() {
            if let Some(t) = &self.retry {
                t.del();
            }
            self.connect_peer();
        }
    }

    fn on_inbound(&mut self, id: u64, ev: ChannelEvent) {
        match ev {
            ChannelEvent::Msg(m) if m.kind == wire::KIND_CONN => self.take_back(vec![m]),
            ChannelEvent::Msg(m) => {
                log::warn!("handoff channel {id}: unexpected message kind {}", m.kind)
            }
            // We send nothing on an inbound channel.
            ChannelEvent::Refused(m) => self.take_back(vec![m]),
            ChannelEvent::Closed { reason, returned, orphans } => {
                match reason {
                    Some(e) => log::warn!("handoff channel {id} closed: {e}"),
                    None => log::debug!("handoff channel {id} closed by peer"),
                }
                self.inbound.remove(&id);
                self.take_back(returned);
                // The peer left before our ACK reached it: a peer that dies
                // cannot serve them, and one that stops closes its own copies.
                if !orphans.is_empty() {
                    log::warn!(
                        "handoff channel {id}: {} connection(s) arrived as the peer left; serving them",
                        orphans.len()
                    );
                }
                self.take_back(orphans);
            }
        }
    }

    /// Starts serving a connection, first from `leftover`.
    /// `client` is the client's address (for the request log), carried
    /// along with the connection so no receiver needs a getpeername.
    fn open_conn(&mut self, fd: OwnedFd, leftover: Vec<u8>, state: Vec<u8>, eof: bool, client: Option<SocketAddr>) {
        let mut session = self.service.open(&state);
        // Fast path: the read-ahead holds a whole request and the peer is
        // up: answer and pass the connection on without a bufferevent.
        if !leftover.is_empty() && self.peer_up() {
            let mut out = Vec::new();
            let mut cx = Cx::new(&mut out, 0, OUTPUT_LIMIT).with_lengths().with_budget(Some(1)).with_eof(eof);
            let used = session.serve(&leftover, &mut cx).min(leftover.len());
            let (answered, lengths, clean) = (cx.answered, std::mem::take(&mut cx.lengths), !(cx.close || cx.abort));
            if answered == 1 && clean && cx.relays.is_empty() {
                let sent = match sock::send_now(fd.as_raw_fd(), &out) {
                    Ok(k) => k,
                    Err(e) => {
                        log::debug!("connection: write: {e}");
                        return;
                    }
                };
                self.record(client, &lengths);
                let rest = leftover[used..].to_vec();
                if sent == out.len() {
                    let state = session.export();
                    self.send_conn(fd, rest, &state, eof, client);
                } else if let Some(id) = self.new_slot(fd, session, &rest, eof, client) {
                    // The socket took part of the response: the rest first.
                    let slot = self.conns.get_mut(&id).expect("just inserted");
                    slot.conn.write(&out[sent..]);
                    slot.handing_off = true;
                }
                return;
            }
            // Not one clean request: serve it on a bufferevent, below (the
            // session has not consumed anything we keep).
            session = self.service.open(&state);
        }
        let Some(id) = self.new_slot(fd, session, &leftover, eof, client) else { return };
        self.serve(id);
        if let Some(s) = self.conns.get(&id) {
            if !(s.eof || s.handing_off || s.closing) {
                s.conn.resume_reading();
            }
        }
    }

    /// Puts a connection on a bufferevent (not reading yet).
    fn new_slot(
        &mut self,
        fd: OwnedFd,
        session: P::Session,
        leftover: &[u8],
        eof: bool,
        client: Option<SocketAddr>,
    ) -> Option<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let w = self.me.clone();
        let handler = Rc::new(move |ev| with(&w, |s| s.on_conn(id, ev)));
        match Conn::adopt(&self.base, fd, leftover, self.read_limit, handler) {
            Ok(conn) => {
                log::trace!("connection {id} adopted with {} byte(s) read ahead", leftover.len());
                let slot = Served { conn, session, eof, handing_off: false, closing: false, throttled: false, client };
                self.conns.insert(id, slot);
                Some(id)
            }
            Err(e) => {
                log::error!("cannot adopt connection: {e}");
                None
            }
        }
    }

    fn record(&mut self, client: Option<SocketAddr>, lengths: &[usize]) {
        for &len in lengths {
            self.log.record(client, len);
        }
        self.served += lengths.len() as u64;
    }

    fn peer_up(&self) -> bool {
        self.peer.as_ref().is_some_and(Channel::is_open)
    }

    fn on_conn(&mut self, id: u64, ev: ConnEvent) {
        match ev {
            ConnEvent::Read => self.serve(id),
            ConnEvent::Drained => {
                let Some(slot) = self.conns.get(&id) else {
                    return;
                };
                if slot.handing_off {
                    self.hand_off(id);
                } else if slot.closing {
                    self.conns.remove(&id);
                } else if slot.throttled {
                    if let Some(slot) = self.conns.get_mut(&id) {
                        slot.throttled = false;
                        slot.conn.resume_reading();
                    }
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
                log::debug!("connection {id}: {}", io::Error::from_raw_os_error(errno));
                self.conns.remove(&id);
            }
            ConnEvent::Timeout => {}
        }
    }

    /// Runs the session on the buffered input: one request, then hand
    /// off; every request while the peer is away. On EOF, closes once no
    /// complete request is left.
    fn serve(&mut self, id: u64) {
        let peer_up = self.peer_up();
        let Some(slot) = self.conns.get_mut(&id) else {
            return;
        };
        if slot.handing_off || slot.closing || slot.throttled {
            return;
        }
        let avail = slot.conn.input_len();
        let mut out = Vec::new();
        let budget = peer_up.then_some(1);
        let mut cx = Cx::new(&mut out, slot.conn.output_len(), OUTPUT_LIMIT)
            .with_lengths()
            .with_budget(budget)
            .with_eof(slot.eof);
        let used = slot.session.serve(slot.conn.peek(avail), &mut cx).min(avail);
        let (lengths, close, abort, more) = (std::mem::take(&mut cx.lengths), cx.close, cx.abort, cx.more());
        slot.conn.consume(used);
        let client = slot.client;
        if abort {
            self.conns.remove(&id);
            self.record(client, &lengths);
            return;
        }
        // The response must be in the kernel before the descriptor leaves.
        let flushed = if out.is_empty() { Ok(slot.conn.output_len() == 0) } else { slot.conn.write_now(&out) };
        let answered = !lengths.is_empty();
        self.record(client, &lengths);
        let Some(slot) = self.conns.get_mut(&id) else { return };
        match flushed {
            Err(e) => {
                log::debug!("connection {id}: write: {e}");
                self.conns.remove(&id);
            }
            Ok(_) if close => self.close_when_flushed(id),
            Ok(_) if !more && !peer_up => {
                // Serving alone and over the output limit: wait for the drain.
                slot.throttled = true;
                slot.conn.pause_reading();
            }
            Ok(_) if slot.eof && (!answered || !peer_up) => self.close_when_flushed(id),
            Ok(_) if !answered || !peer_up => {}
            Ok(true) => self.hand_off(id),
            Ok(false) => {
                slot.handing_off = true;
                slot.conn.pause_reading();
            }
        }
    }

    fn close_when_flushed(&mut self, id: u64) {
        let Some(slot) = self.conns.get_mut(&id) else {
            return;
        };
        if slot.conn.output_len() == 0 {
            self.conns.remove(&id);
        } else {
            slot.closing = true;
        }
    }

    /// Moves the connection to the peer; on failure keeps serving it.
    fn hand_off(&mut self, id: u64) {
        let Some(slot) = self.conns.remove(&id) else { return };
        let state = slot.session.export();
        let (fd, leftover) = slot.conn.detach();
        self.send_conn(fd, leftover, &state, slot.eof, slot.client);
    }

    fn send_conn(&mut self, fd: OwnedFd, leftover: Vec<u8>, state: &[u8], eof: bool, client: Option<SocketAddr>) {
        let mut flags = if eof { wire::FLAG_EOF } else { 0 };
        if !state.is_empty() {
            flags |= wire::FLAG_STATE;
        }
        let msg = Msg::conn(fd, wire::join_state(state, leftover), flags).with_client(client);
        let Some(peer) = self.peer.as_ref() else {
            self.take_back(vec![msg]);
            return;
        };
        match peer.send(msg) {
            Ok(_) => self.handed += 1,
            // The channel broke under us: its Closed event follows; serve here.
            Err(msg) => self.take_back(vec![msg]),
        }
    }

    /// Serves connections that arrived, or that the peer never took.
    fn take_back(&mut self, msgs: Vec<Msg>) {
        for mut m in msgs {
            let client = m.take_client();
            let Some(fd) = m.fd else { continue };
            let (state, leftover) =
                if m.flags & wire::FLAG_STATE != 0 { wire::split_state(m.body) } else { (Vec::new(), m.body) };
            self.open_conn(fd, leftover, state, m.flags & wire::FLAG_EOF != 0, client);
        }
    }

    fn connect_peer(&mut self) {
        if self.peer.as_ref().is_some_and(Channel::is_open) {
            return;
        }
        let r = sock::unix_connect(&self.peer_path).and_then(|fd| {
            let w = self.me.clone();
            Channel::new(&self.base, fd, move |ev| with(&w, |s| s.on_peer(ev)))
        });
        match r {
            Ok(ch) => {
                if !self.linked_once {
                    log::info!("linked to peer {}", self.peer_path.display());
                    crate::core::signals::ready(&format!("linked peer={}", self.peer_path.display()));
                    self.linked_once = true;
                } else if self.peer_warned {
                    log::warn!("peer {} is back; handing off again", self.peer_path.display());
                }
                self.peer = Some(ch);
                self.peer_warned = false;
                self.backoff = RETRY_MIN;
            }
            Err(e) => {
                if !self.linked_once && !self.peer_warned {
                    log::info!("peer not up yet ({e}); serving connections here until it is");
                    self.peer_warned = true;
                } else if !self.peer_warned {
                    log::warn!("peer unreachable ({e}); serving connections here, retrying");
                    self.peer_warned = true;
                }
                if let Some(t) = &self.retry {
                    let _ = t.add(Some(self.backoff));
                }
                self.backoff = (self.backoff * 2).min(RETRY_MAX);
            }
        }
    }

    fn on_peer(&mut self, ev: ChannelEvent) {
        match ev {
            ChannelEvent::Msg(m) => log::warn!("peer channel: unexpected message kind {}", m.kind),
            ChannelEvent::Refused(m) => {
                log::warn!("peer {} is out of descriptors; serving a connection here", self.peer_path.display());
                self.take_back(vec![m]);
            }
            ChannelEvent::Closed { reason, returned, orphans } => {
                drop(orphans); // the peer sends nothing on our outbound channel
                let why = reason.map_or_else(|| "closed".to_string(), |e| e.to_string());
                log::warn!(
                    "lost peer {} ({why}); {} connection(s) come back; serving here, retrying",
                    self.peer_path.display(),
                    returned.len()
                );
                self.peer = None;
                self.peer_warned = true;
                self.take_back(returned);
                if let Some(t) = &self.retry {
                    let _ = t.add(Some(RETRY_MIN));
                }
            }
        }
    }

    fn flush_log(&mut self) {
        self.log.flush();
        if let Some(t) = &self.log_timer {
            let _ = t.add(Some(LOG_FLUSH));
        }
    }

    /// TERM, INT, QUIT stop; USR1 reopens the request log; the rest are
    /// logged and ignored (a pair server restarts by stopping one server at
    /// a time: its peer serves alone meanwhile).
    fn on_signal(&mut self, sig: i32) {
        let name = crate::core::signals::name(sig);
        match sig {
            libc::SIGTERM | libc::SIGINT | libc::SIGQUIT => self.shutdown(sig),
            libc::SIGUSR1 => match self.log.reopen() {
                Ok(()) => log::info!("{name}: request log reopened"),
                Err(e) => log::error!("{name}: cannot reopen the request log: {e}"),
            },
            libc::SIGHUP | libc::SIGUSR2 => {
                log::warn!(
                    "{name}: a pair server does not restart in place; ignored (stop it, its peer serves meanwhile)"
                )
            }
            _ => log::warn!("{name} has no meaning here; ignored"),
        }
    }

    fn shutdown(&mut self, sig: i32) {
        log::info!("{}: stopping (open connections: {})", crate::core::signals::name(sig), self.conns.len());
        self.listeners.clear();
        self.conns.clear();
        if let Some(p) = self.peer.take() {
            p.shutdown();
        }
        for (_, ch) in self.inbound.drain() {
            ch.shutdown();
        }
        self.retry = None;
        self.log_timer = None;
        self.signals.clear();
        self.log.flush();
        self.base.exit(None);
    }
}
