//! `Listener`: accepts connections on a TCP or Unix listening socket and
//! hands each new descriptor to a callback.
use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::time::Duration;

use super::{Base, Event, Interest};
use crate::core::sock;

/// Where a listener listens, or a client connects: written `HOST:PORT`,
/// `[V6]:PORT` or `unix:PATH` (see [`crate::core::sock::parse_endpoint`]
/// and this type's `Display`, which round-trip).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP socket on this IPv4 or IPv6 address (SO_REUSEADDR, backlog
    /// 4096; the unspecified `::` takes IPv4 clients too, any other
    /// IPv6 address only IPv6 ones).
    /// Port 0 picks a free port: see [`Listener::local_addr`].
    Tcp(SocketAddr),
    /// A Unix SOCK_STREAM socket at this path (`unix:PATH`: clients and
    /// node links; removed when a listener bound here drops), created
    /// mode 0600 by [`Listener::bind`].
    Unix(PathBuf),
    /// A Unix SOCK_SEQPACKET socket at this path (handoff channels and
    /// control sockets; removed when the listener drops).
    Seqpacket(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) | Endpoint::Seqpacket(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = io::Error;
    fn from_str(s: &str) -> io::Result<Endpoint> {
        sock::parse_endpoint(s)
    }
}

/// Most connections accepted in one callback, so one busy listener cannot
/// starve the rest of the loop.
const ACCEPT_BATCH: usize = 64;

/// How long accepting pauses after an accept error such as EMFILE (the
/// connection stays in the kernel's backlog meanwhile), as nginx does.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A listening socket registered on a [`Base`]: each accepted connection
/// (non-blocking, close-on-exec) goes to the callback as an `OwnedFd`,
/// which the callback then owns (to serve, pass on or drop). At most 64
/// connections are accepted per wake-up; an accept error (EMFILE...)
/// pauses accepting for 100 ms while the kernel keeps queueing.
///
/// The listener owns the listening descriptor and closes it when dropped;
/// a Unix endpoint's socket file is removed then too (see
/// [`Listener::with_path`] and [`Listener::forget_path`]).
///
/// ```
/// use std::net::{Ipv4Addr, SocketAddr, TcpStream};
/// use handoff::core::reactor::{Base, Endpoint, Listener};
///
/// let base = Base::new()?;
/// let b = base.clone();
/// let ep = Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
/// let listener = Listener::bind(&base, &ep, move |conn| {
///     // `conn` is ours: serve it (`Conn::adopt`), pass it on, or drop it.
///     drop(conn);
///     b.exit(None);
/// })?;
/// let port = listener.local_addr()?.port(); // the free port picked
/// let _client = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
/// base.dispatch()?; // until the callback has run
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Listener {
    state: Rc<State>,
    fd: Option<OwnedFd>,
    unlink: Option<PathBuf>,
}

/// What the accept callback and the backoff timer share with the owner.
struct State {
    event: RefCell<Option<Event>>,
    backoff: RefCell<Option<Event>>,
    /// Paused by the owner: the backoff timer must not resume it.
    paused: Cell<bool>,
    /// Accept errors so far (each one paused accepting).
    errors: Cell<u64>,
}

impl Listener {
    /// Binds `ep` and starts accepting into `on_accept`.
    pub fn bind(base: &Base, ep: &Endpoint, on_accept: impl Fn(OwnedFd) + 'static) -> io::Result<Listener> {
        let (fd, unlink) = match ep {
            Endpoint::Tcp(addr) => (sock::tcp_listen(*addr)?, None),
            Endpoint::Unix(path) => (sock::unix_stream_listen(path, 0o600)?, Some(path.clone())),
            Endpoint::Seqpacket(path) => (sock::unix_listen(path)?, Some(path.clone())),
        };
        let mut l = Listener::adopt(base, fd, on_accept)?;
        l.unlink = unlink;
        Ok(l)
    }

    /// Accepts on an already listening socket (one passed over a restart,
    /// or shared by several workers). An accept error (EMFILE, ENFILE,
    /// ENOBUFS...) pauses accepting for `ACCEPT_BACKOFF`, with one
    /// rate-limited log line, instead of spinning on a full backlog.
    pub fn adopt(base: &Base, fd: OwnedFd, on_accept: impl Fn(OwnedFd) + 'static) -> io::Result<Listener> {
        let raw = fd.as_raw_fd();
        let state = Rc::new(State {
            event: RefCell::new(None),
            backoff: RefCell::new(None),
            paused: Cell::new(false),
            errors: Cell::new(0),
        });
        let w: Weak<State> = Rc::downgrade(&state);
        let event = Event::new(base, raw, Interest::Read, move || {
            for _ in 0..ACCEPT_BATCH {
                match sock::accept(raw) {
                    Ok(Some(c)) => {
                        on_accept(c);
                        // The owner may pause us from the callback (a
                        // connection limit): not one accept more.
                        if w.upgrade().is_some_and(|s| s.paused.get()) {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        crate::warn_limited!("{e}; accepting again in {ACCEPT_BACKOFF:?}");
                        if let Some(s) = w.upgrade() {
                            s.errors.set(s.errors.get() + 1);
                            if let Some(ev) = s.event.borrow().as_ref() {
                                ev.del();
                            }
                            if let Some(t) = s.backoff.borrow().as_ref() {
                                let _ = t.add(Some(ACCEPT_BACKOFF));
                            }
                        }
                        break;
                    }
                }
            }
        })?;
        event.add(None)?;
        let w: Weak<State> = Rc::downgrade(&state);
        let backoff = Event::new(base, -1, Interest::Timer, move || {
            if let Some(s) = w.upgrade() {
                if !s.paused.get() {
                    if let Some(ev) = s.event.borrow().as_ref() {
                        let _ = ev.add(None);
                    }
                }
            }
        })?;
        *state.event.borrow_mut() = Some(event);
        *state.backoff.borrow_mut() = Some(backoff);
        Ok(Listener { state, fd: Some(fd), unlink: None })
    }

    /// Stops accepting; the socket stays open (and keeps queueing).
    pub fn pause(&self) {
        self.state.paused.set(true);
        if let Some(e) = self.state.event.borrow().as_ref() {
            e.del();
        }
    }

    /// Accepts again after [`Listener::pause`].
    pub fn resume(&self) -> io::Result<()> {
        self.state.paused.set(false);
        match self.state.event.borrow().as_ref() {
            Some(e) => e.add(None),
            None => Ok(()),
        }
    }

    /// How many accepts failed so far (EMFILE, ENFILE, ENOBUFS...; each
    /// paused accepting for 100 ms).
    pub fn accept_errors(&self) -> u64 {
        self.state.errors.get()
    }

    /// The IPv4 address a TCP listener is bound to (with the real port
    /// after binding port 0). Meaningless for a Unix endpoint.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        sock::local_addr(self.raw_fd())
    }

    /// The listening descriptor's number (also available as [`AsFd`]).
    /// The listener keeps owning it: never close it or use it after the
    /// listener is gone.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// Removes `path` when dropped (a socket bound elsewhere, renamed).
    pub fn with_path(mut self, path: PathBuf) -> Listener {
        self.unlink = Some(path);
        self
    }

    /// Closes without removing the socket file (a successor owns the path).
    pub fn forget_path(mut self) {
        self.unlink = None;
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_ref().expect("a listener owns its socket").as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.state.backoff.borrow_mut().take();
        self.state.event.borrow_mut().take();
        if let Some(p) = self.unlink.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
