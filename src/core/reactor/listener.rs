//! `Listener`: accepts connections on a TCP or Unix listening socket and
//! hands each new descriptor to a callback.
use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::time::Duration;

use super::{Base, Event, Interest};
use crate::core::sock;

/// Where a listener listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Tcp(SocketAddrV4),
    /// A SOCK_SEQPACKET socket at this path (removed when the listener drops).
    Unix(PathBuf),
}

/// Most connections accepted in one callback, so one busy listener cannot
/// starve the rest of the loop.
const ACCEPT_BATCH: usize = 64;

/// How long accepting pauses after an accept error such as EMFILE (the
/// connection stays in the kernel's backlog meanwhile), as nginx does.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
}

impl Listener {
    /// Binds `ep` and starts accepting into `on_accept`.
    pub fn bind(base: &Base, ep: &Endpoint, on_accept: impl Fn(OwnedFd) + 'static) -> io::Result<Listener> {
        let (fd, unlink) = match ep {
            Endpoint::Tcp(addr) => (sock::tcp_listen(*addr)?, None),
            Endpoint::Unix(path) => (sock::unix_listen(path)?, Some(path.clone())),
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
        let state = Rc::new(State { event: RefCell::new(None), backoff: RefCell::new(None), paused: Cell::new(false) });
        let w: Weak<State> = Rc::downgrade(&state);
        let event = Event::new(base, raw, Interest::Read, move || {
            for _ in 0..ACCEPT_BATCH {
                match sock::accept(raw) {
                    Ok(Some(c)) => on_accept(c),
                    Ok(None) => break,
                    Err(e) => {
                        crate::warn_limited!("{e}; accepting again in {ACCEPT_BACKOFF:?}");
                        if let Some(s) = w.upgrade() {
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

    pub fn resume(&self) -> io::Result<()> {
        self.state.paused.set(false);
        match self.state.event.borrow().as_ref() {
            Some(e) => e.add(None),
            None => Ok(()),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddrV4> {
        sock::local_addr(self.raw_fd())
    }

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
