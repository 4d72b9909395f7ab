//! `Listener`: accepts connections on a TCP or Unix listening socket and
//! hands each new descriptor to a callback.
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;

use super::{Base, Event, Interest};
use crate::sock;

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

pub struct Listener {
    event: Option<Event>,
    fd: Option<OwnedFd>,
    unlink: Option<PathBuf>,
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
    /// or shared by several workers).
    pub fn adopt(base: &Base, fd: OwnedFd, on_accept: impl Fn(OwnedFd) + 'static) -> io::Result<Listener> {
        let raw = fd.as_raw_fd();
        let event = Event::new(base, raw, Interest::Read, move || {
            for _ in 0..ACCEPT_BATCH {
                match sock::accept(raw) {
                    Ok(Some(c)) => on_accept(c),
                    Ok(None) => break,
                    Err(e) => {
                        // EMFILE and friends: the connection stays queued; say so and retry next round.
                        log::warn!("{e}");
                        break;
                    }
                }
            }
        })?;
        event.add(None)?;
        Ok(Listener { event: Some(event), fd: Some(fd), unlink: None })
    }

    /// Stops accepting; the socket stays open (and keeps queueing).
    pub fn pause(&self) {
        if let Some(e) = &self.event {
            e.del();
        }
    }

    pub fn resume(&self) -> io::Result<()> {
        match &self.event {
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
        self.event.take();
        if let Some(p) = self.unlink.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
