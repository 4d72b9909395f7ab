//! One pair-mode server of a [`Service`]: answers one request on a
//! connection, then hands the connection (descriptor, read-ahead, session
//! state) to its peer over the handoff channel; serves alone while the
//! peer is away. Its signals (stop, graceful stop, in-place restart, log
//! reopening) are in `lifecycle`.
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
use crate::topology::pair::reexec::{self, Carried, Inherited};
use crate::topology::pair::reqlog::{Client, RequestLog};

mod lifecycle;

use lifecycle::{Leaving, Phase, KIND_NOTICE};

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
    /// `--grace`: how long open requests get to finish on SIGTERM, SIGINT
    /// or SIGQUIT, and connections get to settle before an in-place
    /// restart (SIGHUP, SIGUSR2).
    pub grace: Duration,
    /// `--listen`: more endpoints clients are served on (TCP or Unix),
    /// beside the TCP port.
    pub listen: Vec<Endpoint>,
    /// `--listen-mode`: the mode of Unix listening sockets' files.
    pub listen_mode: u32,
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
    /// Clients (TCP) and the peer's channels (`D/P.sock`).
    tcp: Option<Listener>,
    /// `--listen` listeners (clients, like `tcp`).
    extra: Vec<Listener>,
    unix: Option<Listener>,
    log: RequestLog,
    log_timer: Option<Event>,
    signals: Vec<Event>,
    served: u64,
    handed: u64,
    grace: Duration,
    /// Serving, stopping or restarting (see `lifecycle`).
    phase: Phase,
    /// `--grace` running out during a stop or a restart.
    grace_timer: Option<Event>,
    /// Runs the last step of a stop or a restart from its own callback.
    step: Option<Event>,
    /// A settle callback is registered on the channel to the peer.
    settle_wait: bool,
    /// The peer said it is leaving (it restarts in place, or stops).
    peer_leaving: Option<Leaving>,
    /// Connections the channel to the peer refused because it just broke:
    /// its Closed event, due next, decides where they go (to the peer's
    /// next image if it restarts, else here).
    limbo: Vec<Msg>,
    /// The path this process was first started from (USR2 executes it).
    start_exe: PathBuf,
    /// In-place restarts of this process so far.
    restarts: u64,
}

/// Runs a server of service `P` until SIGTERM/SIGINT/SIGQUIT, restarting
/// in place on SIGHUP/SIGUSR2 (this function then never returns: the
/// process runs the binary again, which carries on from the handover).
pub fn run<P: Service>(cfg: &Config, options: &P::Options) -> io::Result<()> {
    let nofile = sock::raise_nofile()?;
    log::debug!("RLIMIT_NOFILE {nofile}");
    crate::core::signals::ignore_sigpipe();
    // An image started by an in-place restart takes over its predecessor's
    // listeners and connections instead of binding.
    let inherited = Inherited::from_env()?;
    sock::private_dir(&cfg.dir)?;
    let base = Base::new()?;

    let (tcp_fd, unix_fd, extra_fds, port, sock_path, handover) = match inherited {
        Some(Inherited { handover, tcp, unix, extra }) => {
            let port = sock::local_addr(tcp.as_raw_fd())?.port();
            let sock_path = cfg.dir.join(format!("{port}.sock"));
            if !sock_path.exists() {
                log::warn!("{} is gone: the peer cannot reach this server until it starts afresh", sock_path.display());
            }
            if extra.len() != cfg.listen.len() {
                log::warn!(
                    "{} --listen socket(s) carried over, {} asked: the carried ones are kept until a fresh start",
                    extra.len(),
                    cfg.listen.len()
                );
            }
            (tcp, unix, extra, port, sock_path, Some(handover))
        }
        None => {
            let tcp = sock::tcp_listen(sock::resolve(&cfg.host, cfg.port)?)?;
            let port = sock::local_addr(tcp.as_raw_fd())?.port();
            let sock_path = cfg.dir.join(format!("{port}.sock"));
            sock::claim_unix_path(&sock_path)?;
            let extra =
                cfg.listen.iter().map(|ep| sock::listen_endpoint(ep, cfg.listen_mode)).collect::<io::Result<_>>()?;
            (tcp, sock::unix_listen(&sock_path)?, extra, port, sock_path, None)
        }
    };
    let addr = sock::local_addr(tcp_fd.as_raw_fd())?;
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
            tcp: None,
            extra: Vec::new(),
            unix: None,
            log,
            log_timer: None,
            signals: Vec::new(),
            served: handover.as_ref().map_or(0, |h| h.served),
            handed: handover.as_ref().map_or(0, |h| h.handed),
            grace: cfg.grace,
            phase: Phase::Serving,
            grace_timer: None,
            step: None,
            settle_wait: false,
            peer_leaving: None,
            limbo: Vec::new(),
            start_exe: handover.as_ref().map_or_else(reexec::start_path, |h| h.exe.clone()),
            restarts: handover.as_ref().map_or(0, |h| h.restarts),
        })
    });
    let w = Rc::downgrade(&server);
    let tcp = Listener::adopt(&base, tcp_fd, move |fd| with(&w, |s| s.accept_client(fd)))?;
    let w = Rc::downgrade(&server);
    let unix =
        Listener::adopt(&base, unix_fd, move |fd| with(&w, |s| s.accept_channel(fd)))?.with_path(sock_path.clone());
    let mut extra = Vec::with_capacity(extra_fds.len());
    let mut listening = Vec::with_capacity(extra_fds.len());
    for fd in extra_fds {
        let ep = sock::local_endpoint(fd.as_raw_fd())?;
        listening.push(ep.to_string());
        let w = Rc::downgrade(&server);
        let l = Listener::adopt(&base, fd, move |fd| with(&w, |s| s.accept_client(fd)))?;
        // A Unix socket's file goes with the server's final stop (an
        // in-place restart executes without dropping it).
        extra.push(match ep {
            Endpoint::Unix(p) => l.with_path(p),
            _ => l,
        });
    }
    {
        let mut s = server.borrow_mut();
        s.tcp = Some(tcp);
        s.unix = Some(unix);
        s.extra = extra;
        let w = Rc::downgrade(&server);
        s.retry = Some(Event::new(&base, -1, Interest::Timer, move || with(&w, |s| s.connect_peer()))?);
        let w = Rc::downgrade(&server);
        s.step = Some(Event::new(&base, -1, Interest::Timer, move || with(&w, |s| s.step()))?);
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
    // Our handlers are in place: signals that arrived during an in-place
    // restart (blocked across the execve) are delivered now.
    reexec::block_caught_signals(false)?;
    match &handover {
        None => log::info!("serving on {addr}, handoff socket {}", sock_path.display()),
        Some(h) => log::info!(
            "restarted in place by {} (restart {} of pid {}): took over {addr}, {} and {} connection(s)",
            crate::core::signals::name(h.signal),
            h.restarts,
            std::process::id(),
            sock_path.display(),
            h.conns.len()
        ),
    }
    let also = if listening.is_empty() { String::new() } else { format!(" listen={}", listening.join(",")) };
    crate::core::signals::ready(&format!("ready port={port} sock={}{also}", sock_path.display()));
    // After the ready line: a `linked peer=...` line follows when the peer
    // is reached; then the connections carried over are served, the first
    // request of each handed on as usual.
    {
        let mut s = server.borrow_mut();
        s.connect_peer();
        if let Some(h) = handover {
            s.adopt_all(h.conns);
        }
    }
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
        let _ = sock::set_nodelay(fd.as_raw_fd()); // fails harmlessly on a Unix socket
        let client = sock::peer_addr(fd.as_raw_fd());
        self.open_conn(fd, Vec::new(), Vec::new(), false, client);
    }

    fn accept_channel(&mut self, fd: OwnedFd) {
        if !self.phase.serving() {
            // Closed at once: the peer keeps what it would have sent.
            log::debug!("handoff channel refused: {}", self.phase.name());
            return;
        }
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
        if self.peer.is_none() {
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
        self.progress();
    }

    /// Starts serving a connection, first from `leftover`.
    /// `client` is the client's address (for the request log), carried
    /// along with the connection so no receiver needs a getpeername.
    fn open_conn(&mut self, fd: OwnedFd, leftover: Vec<u8>, state: Vec<u8>, eof: bool, client: Option<SocketAddr>) {
        let mut session = self.service.open(&state);
        // Fast path: the read-ahead holds a whole request and the peer is
        // up: answer and pass the connection on without a bufferevent.
        if !leftover.is_empty() && self.peer_linked() && self.phase.serving() {
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
                self.record(client, fd.as_raw_fd(), &lengths);
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
        if self.phase.restarting() {
            // Held as it is (not reading): it goes to the next image.
            return;
        }
        self.serve(id);
        if let Some(s) = self.conns.get(&id) {
            if !(s.eof || s.handing_off || s.closing || s.throttled) {
                s.conn.resume_reading();
            }
        }
    }

    /// Serves the connections carried over an in-place restart (or kept
    /// when one failed).
    fn adopt_all(&mut self, conns: Vec<Carried>) {
        for c in conns {
            self.open_conn(c.fd, c.leftover, c.state, c.eof, c.client);
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

    /// Logs each request answered on connection `fd`; a client with no
    /// address (a Unix socket's) is named by its pid (SO_PEERCRED).
    fn record(&mut self, client: Option<SocketAddr>, fd: std::os::fd::RawFd, lengths: &[usize]) {
        if lengths.is_empty() {
            return;
        }
        let who = match client {
            Some(a) => Client::Ip(a),
            // (A TCP socket reports pid 0.)
            None => sock::peer_cred(fd)
                .ok()
                .filter(|&(pid, _)| pid > 0)
                .map_or(Client::Unknown, |(pid, _)| Client::Unix(pid)),
        };
        for &len in lengths {
            self.log.record(&who, len);
        }
        self.served += lengths.len() as u64;
    }

    /// Whether connections are handed on: there is a channel to the peer
    /// (if it just broke, what is sent waits in `limbo` for its Closed).
    fn peer_linked(&self) -> bool {
        self.peer.is_some()
    }

    fn on_conn(&mut self, id: u64, ev: ConnEvent) {
        self.conn_event(id, ev);
        self.progress();
    }

    fn conn_event(&mut self, id: u64, ev: ConnEvent) {
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
                    let restarting = self.phase.restarting();
                    if let Some(slot) = self.conns.get_mut(&id) {
                        slot.throttled = false;
                        if !restarting {
                            slot.conn.resume_reading();
                        }
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
        while self.serve_once(id) {}
    }

    /// One `serve` call of the session. True when it must run again at
    /// once: it stopped at the output limit, but the socket took all of
    /// that output (nothing is queued, so no drain would wake it).
    fn serve_once(&mut self, id: u64) -> bool {
        // Restarting: nothing more is served here; stopping: nothing is
        // handed on, and a connection closes once it is answered.
        if self.phase.restarting() {
            return false;
        }
        let stopping = self.phase.stopping();
        let peer_up = self.peer_linked() && !stopping;
        let Some(slot) = self.conns.get_mut(&id) else {
            return false;
        };
        if slot.handing_off || slot.closing || slot.throttled {
            return false;
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
        let (client, raw) = (slot.client, slot.conn.raw_fd());
        if abort {
            self.record(client, raw, &lengths);
            self.conns.remove(&id);
            return false;
        }
        // The response must be in the kernel before the descriptor leaves.
        let flushed = if out.is_empty() { Ok(slot.conn.output_len() == 0) } else { slot.conn.write_now(&out) };
        let answered = !lengths.is_empty();
        self.record(client, raw, &lengths);
        let Some(slot) = self.conns.get_mut(&id) else { return false };
        match flushed {
            Err(e) => {
                log::debug!("connection {id}: write: {e}");
                self.conns.remove(&id);
            }
            Ok(_) if close => self.close_when_flushed(id),
            Ok(true) if !more && !peer_up && used > 0 => return true,
            Ok(_) if !more && !peer_up => {
                // Serving alone and over the output limit: wait for the drain.
                slot.throttled = true;
                slot.conn.pause_reading();
            }
            Ok(_) if slot.eof && (!answered || !peer_up) => self.close_when_flushed(id),
            Ok(_) if stopping => {
                // What was in flight is answered: close, unless a request
                // is still arriving.
                if slot.conn.input_len() == 0 && !lifecycle::has_unread(slot.conn.raw_fd()) {
                    self.close_when_flushed(id);
                } else {
                    slot.conn.resume_reading();
                }
            }
            Ok(_) if !answered || !peer_up => {}
            Ok(true) => self.hand_off(id),
            Ok(false) => {
                slot.handing_off = true;
                slot.conn.pause_reading();
            }
        }
        false
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
            // The channel broke under us: its Closed event follows.
            Err(msg) => self.limbo.push(msg),
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

    /// Links to the peer while serving, unless a channel exists (a broken
    /// one is replaced once its Closed event came).
    fn connect_peer(&mut self) {
        if self.peer.is_none() && self.phase.serving() {
            self.link();
        }
    }

    fn link(&mut self) {
        let r = sock::unix_connect(&self.peer_path).and_then(|fd| {
            let w = self.me.clone();
            let ch = Channel::new(&self.base, fd, move |ev| with(&w, |s| s.on_peer(ev)))?;
            // This link carries CONNs out and only ACKs (and notices) back:
            // ACKs are read by the next handoff, not by a wake-up of their own.
            ch.set_lazy_acks(true);
            Ok(ch)
        });
        match r {
            Ok(ch) => {
                if !self.linked_once {
                    log::info!("linked to peer {}", self.peer_path.display());
                    crate::core::signals::ready(&format!("linked peer={}", self.peer_path.display()));
                    self.linked_once = true;
                } else if self.peer_warned {
                    log::info!("peer {} is back; handing off again", self.peer_path.display());
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
            ChannelEvent::Msg(m) if m.kind == KIND_NOTICE => match Leaving::parse(&m.body) {
                Some(why) => {
                    log::info!("peer {} says it is {}", self.peer_path.display(), why.name());
                    self.peer_leaving = Some(why);
                }
                None => log::warn!("peer channel: unknown notice {:?}", String::from_utf8_lossy(&m.body)),
            },
            ChannelEvent::Msg(m) => log::warn!("peer channel: unexpected message kind {}", m.kind),
            ChannelEvent::Refused(m) => {
                log::warn!("peer {} is out of descriptors; serving a connection here", self.peer_path.display());
                self.take_back(vec![m]);
            }
            ChannelEvent::Closed { reason, mut returned, orphans } => {
                drop(orphans); // the peer sends nothing on our outbound channel
                self.peer = None;
                self.settle_wait = false;
                returned.append(&mut self.limbo);
                let n = returned.len();
                let path = self.peer_path.display().to_string();
                match (self.peer_leaving.take(), reason) {
                    (Some(Leaving::Restarting), _) if !self.phase.stopping() => {
                        // Its listener queues while it restarts: link again at
                        // once and give it back what it had not taken, so no
                        // connection is served here out of turn. (Restarting
                        // ourselves, we wait for its next image to take them.)
                        log::info!("peer {path} restarts in place; {n} connection(s) wait for it");
                        self.link();
                        if let Some(peer) = self.peer.clone() {
                            for m in returned {
                                // (Counted as handed when first sent.)
                                if let Err(m) = peer.send(m) {
                                    self.limbo.push(m);
                                }
                            }
                            self.progress();
                            return;
                        }
                    }
                    (Some(why), _) => {
                        log::info!("peer {path} is {}; {n} connection(s) come back; serving here", why.name());
                        self.peer_warned = true;
                    }
                    (None, reason) => {
                        let why = reason.map_or_else(|| "closed".to_string(), |e| e.to_string());
                        log::warn!("lost peer {path} ({why}); {n} connection(s) come back; serving here, retrying");
                        self.peer_warned = true;
                    }
                }
                self.take_back(returned);
                if self.phase.serving() {
                    if let Some(t) = &self.retry {
                        if !t.pending() {
                            let _ = t.add(Some(RETRY_MIN));
                        }
                    }
                }
            }
        }
        self.progress();
    }

    fn flush_log(&mut self) {
        self.log.flush();
        if let Some(t) = &self.log_timer {
            let _ = t.add(Some(LOG_FLUSH));
        }
    }
}
