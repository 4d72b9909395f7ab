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

/// The most descriptors one message carries (the kernel's SCM_MAX_FD).
pub const MAX_FDS: usize = sys::FDPASS_MAX_FDS as usize;

/// Sends `payload` and duplicate references to every descriptor of `fds`
/// (at most [`MAX_FDS`]) in one message: they arrive together, in order,
/// or not at all. The caller keeps its descriptors. `WouldBlock` when the
/// socket buffer is full.
pub fn send_many(sock: BorrowedFd<'_>, fds: &[BorrowedFd<'_>], payload: &[u8]) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} descriptors in one message", fds.len())));
    }
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: sock and every fd are live for the duration of the call; raw
    // and payload are live slices of the given lengths.
    let n = unsafe {
        sys::fdpass_send_many(sock.as_raw_fd(), raw.as_ptr(), raw.len(), payload.as_ptr() as *const _, payload.len())
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One received message with any number of descriptors.
#[derive(Debug)]
pub struct ReceivedMany {
    /// Payload length in the caller's buffer; 0 with no descriptors is EOF.
    pub len: usize,
    /// The descriptors the message carried, in the order sent, installed
    /// here (close-on-exec set) and owned by the caller.
    pub fds: Vec<OwnedFd>,
    /// The message carried descriptors that the kernel could not all
    /// install (MSG_CTRUNC, e.g. EMFILE): `fds` holds the first ones, those
    /// it installed; the payload is valid; the sender still holds them all.
    pub fds_dropped: bool,
}

/// Receives one message into `buf`, with up to [`MAX_FDS`] descriptors.
/// Errors as [`recv`]. On every error no descriptor is leaked.
pub fn recv_many(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<ReceivedMany> {
    let mut raw = [-1 as libc::c_int; MAX_FDS];
    let mut count: usize = 0;
    let mut dropped: libc::c_int = 0;
    // SAFETY: raw holds MAX_FDS ints; count, dropped are live
    // out-parameters; buf is a live writable slice of the given length.
    let n = unsafe {
        sys::fdpass_recv_many(
            sock.as_raw_fd(),
            raw.as_mut_ptr(),
            MAX_FDS,
            &mut count,
            &mut dropped,
            buf.as_mut_ptr() as *mut _,
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the first `count` entries were just installed in our table by
    // recvmsg and belong to nobody else.
    let fds = raw[..count.min(MAX_FDS)].iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
    Ok(ReceivedMany { len: n as usize, fds, fds_dropped: dropped != 0 })
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
    fn a_full_batch_of_descriptors_travels_in_order() {
        let (a, b) = sock::seqpacket_pair().unwrap();
        let pairs: Vec<(UnixStream, UnixStream)> = (0..MAX_FDS).map(|_| UnixStream::pair().unwrap()).collect();
        let fds: Vec<BorrowedFd<'_>> = pairs.iter().map(|p| p.1.as_fd()).collect();
        send_many(a.as_fd(), &fds, b"batch").unwrap();
        let mut buf = [0u8; 16];
        let r = recv_many(b.as_fd(), &mut buf).unwrap();
        assert_eq!((&buf[..r.len], r.fds.len(), r.fds_dropped), (&b"batch"[..], MAX_FDS, false));
        for (i, ((x, _), fd)) in pairs.into_iter().zip(r.fds).enumerate() {
            let mut x = x;
            x.write_all(&[i as u8]).unwrap();
            let mut got = [0u8; 1];
            UnixStream::from(fd).read_exact(&mut got).unwrap();
            assert_eq!(got[0], i as u8, "descriptor {i} arrived in its place");
        }
        let too_many: Vec<BorrowedFd<'_>> = (0..=MAX_FDS).map(|_| a.as_fd()).collect();
        assert_eq!(send_many(a.as_fd(), &too_many, b"x").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        // A single-descriptor message reads the same way.
        let (_x, y) = UnixStream::pair().unwrap();
        send(a.as_fd(), Some(y.as_fd()), b"one").unwrap();
        let r = recv_many(b.as_fd(), &mut buf).unwrap();
        assert_eq!((r.len, r.fds.len()), (3, 1));
    }

    #[test]
    fn would_block_when_empty() {
        let (_a, b) = sock::seqpacket_pair().unwrap();
        let mut buf = [0u8; 4];
        let e = recv(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
