//! Safe Rust over `csrc/fdpass.c`: one descriptor plus payload bytes per
//! message, descriptors in and out as `OwnedFd`, errors as `io::Error`.
//!
//! The handoff channel ([`crate::core::channel`]) is built on these two
//! calls; use them directly to pass a descriptor over any Unix-domain
//! socket. Moving a connection to another process:
//!
//! ```
//! use std::io::{Read, Write};
//! use std::os::fd::AsFd;
//! use std::os::unix::net::{UnixDatagram, UnixStream};
//! use handoff::core::fdpass;
//!
//! // Any AF_UNIX socket carries descriptors; the project uses
//! // SOCK_SEQPACKET (one call, one message), as datagrams are here.
//! let (a, b) = UnixDatagram::pair()?;
//! let (mut client, conn) = UnixStream::pair()?; // the connection to move
//!
//! fdpass::send(a.as_fd(), Some(conn.as_fd()), b"read-ahead")?;
//! drop(conn); // the message holds its own reference: closing ours is safe
//!
//! let mut buf = [0u8; 64];
//! let r = fdpass::recv(b.as_fd(), &mut buf)?;
//! assert_eq!(&buf[..r.len], b"read-ahead");
//! let mut moved = UnixStream::from(r.fd.expect("the message carried one"));
//! client.write_all(b"hi")?;
//! let mut got = [0u8; 2];
//! moved.read_exact(&mut got)?;
//! assert_eq!(&got, b"hi");
//! # Ok::<(), std::io::Error>(())
//! ```
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::core::sys;

/// Sends `payload` and, if given, a duplicate reference to `fd` in one
/// message. The caller keeps its `fd` (close it once the receiver owns
/// its copy). `WouldBlock` when the socket buffer is full.
pub fn send(sock: BorrowedFd<'_>, fd: Option<BorrowedFd<'_>>, payload: &[u8]) -> io::Result<usize> {
    let raw = fd.map_or(-1, |f| f.as_raw_fd());
    // SAFETY: sock and fd are live descriptors for the duration of the
    // call; payload is a live slice of the given length.
    let n = unsafe { sys::fdpass_send(sock.as_raw_fd(), raw, payload.as_ptr() as *const _, payload.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One received message.
#[derive(Debug)]
pub struct Received {
    /// Payload length in the caller's buffer; 0 with `fd: None` is EOF.
    pub len: usize,
    /// The descriptor the message carried, now installed in this process
    /// (close-on-exec set) and owned by the caller. `None` when the message
    /// carried none, or when the kernel dropped it (see `fd_dropped`).
    pub fd: Option<OwnedFd>,
    /// The message carried a descriptor that the kernel could not install
    /// here (MSG_CTRUNC, e.g. EMFILE): the payload is valid, the sender
    /// still holds the descriptor.
    pub fd_dropped: bool,
}

/// Receives one message into `buf`. Errors: `WouldBlock`; `EMSGSIZE`
/// (payload larger than `buf`); `EBADMSG` (more than one descriptor). A
/// descriptor the kernel dropped (MSG_CTRUNC) is reported by
/// `fd_dropped`, not as an error. On every error no descriptor is leaked.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut fd: libc::c_int = -1;
    // SAFETY: buf is a live writable slice of the given length; fd is a
    // live out-parameter.
    let n = unsafe { sys::fdpass_recv(sock.as_raw_fd(), &mut fd, buf.as_mut_ptr() as *mut _, buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let dropped = fd == sys::FDPASS_DROPPED;
    // SAFETY: a non-negative fd was just installed in our table by recvmsg
    // and belongs to nobody else.
    let fd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(Received { len: n as usize, fd, fd_dropped: dropped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::sock;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn passed_descriptor_works_from_the_other_side() {
        let (a, b) = sock::seqpacket_pair().unwrap();
        let (mut x, y) = UnixStream::pair().unwrap();
        let n = send(a.as_fd(), Some(y.as_fd()), b"hello").unwrap();
        assert_eq!(n, 5);
        drop(y);
        let mut buf = [0u8; 16];
        let r = recv(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..r.len], b"hello");
        let mut y2 = UnixStream::from(r.fd.expect("descriptor received"));
        x.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        y2.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        // close-on-exec is set on the received copy
        // SAFETY: fcntl on a live descriptor.
        let flags = unsafe { libc::fcntl(y2.as_raw_fd(), libc::F_GETFD) };
        assert!(flags & libc::FD_CLOEXEC != 0);
    }

    #[test]
    fn payload_without_descriptor_and_eof() {
        let (a, b) = sock::seqpacket_pair().unwrap();
        send(a.as_fd(), None, b"x").unwrap();
        let mut buf = [0u8; 4];
        let r = recv(b.as_fd(), &mut buf).unwrap();
        assert_eq!((r.len, r.fd.is_none()), (1, true));
        drop(a);
        let r = recv(b.as_fd(), &mut buf).unwrap();
        assert_eq!((r.len, r.fd.is_none()), (0, true));
    }

    #[test]
    fn truncated_payload_is_an_error_and_leaks_nothing() {
        let (a, b) = sock::seqpacket_pair().unwrap();
        let (_x, y) = UnixStream::pair().unwrap();
        send(a.as_fd(), Some(y.as_fd()), &[7u8; 64]).unwrap();
        let mut small = [0u8; 8];
        let e = recv(b.as_fd(), &mut small).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
    }

    #[test]
    fn bad_descriptor_is_refused_by_the_sender() {
        let (a, _b) = sock::seqpacket_pair().unwrap();
        // SAFETY: a descriptor number that is surely not open; only borrowed
        // for the duration of the call, never closed.
        let bad = unsafe { BorrowedFd::borrow_raw(1_000_000) };
        let e = send(a.as_fd(), Some(bad), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn would_block_when_empty() {
        let (_a, b) = sock::seqpacket_pair().unwrap();
        let mut buf = [0u8; 4];
        let e = recv(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
